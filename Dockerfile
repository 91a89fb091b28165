# Project image for Prefect workers (production recipe; see infrastructure/docker-compose.yml).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make curl && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 specdeepmap
WORKDIR /app
COPY --chown=specdeepmap:specdeepmap . .
USER specdeepmap
RUN make install
ENV PATH=/app/.venv/bin:$PATH
