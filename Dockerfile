# Project image for Prefect workers (production recipe; see infrastructure/docker-compose.yml).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN make install
ENV PATH=/app/.venv/bin:$PATH
