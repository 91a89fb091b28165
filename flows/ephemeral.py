"""Prefect's ephemeral API for runs without a server (``make run``), started patiently.

Prefect starts a temporary API server in a subprocess on the first flow call and gives it 20 s
by default; on a busy 2-core machine (other trainings running) it needed longer, and the main
job failed with a traceback. Here it gets :data:`STARTUP_TIMEOUT_S` (or
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``), one more try on a fresh port, and then
one clear line.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: seconds the ephemeral API may take to answer (Prefect's own default: 20)
STARTUP_TIMEOUT_S = 180
ATTEMPTS = 2


class EphemeralAPIError(RuntimeError):
    """The ephemeral Prefect API did not start."""


def start_ephemeral_api(attempts: int = ATTEMPTS) -> str | None:
    """Start the ephemeral API before the first flow call and return its URL.

    Nothing is started when ``PREFECT_API_URL`` names a server.

    Raises:
        EphemeralAPIError: it did not answer within the timeout, ``attempts`` times.
    """
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_TIMEOUT_S)
    )
    if os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's clients use for ephemeral mode
    timeout = int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    for attempt in range(1, attempts + 1):
        try:
            server.start(timeout=timeout)
            return server.api_url
        except RuntimeError as error:
            if "ephemeral Prefect API" not in str(error):
                raise
            log.warning(
                "The ephemeral Prefect API did not answer within %d s (try %d of %d)",
                timeout,
                attempt,
                attempts,
            )
            process = getattr(server, "server_process", None)
            if process is not None and process.poll() is None:
                process.kill()  # Prefect leaves it running; the next try takes a new port
                process.wait(30)
            server.port = None
    raise EphemeralAPIError(
        f"the ephemeral Prefect API did not start within {timeout} s, {attempts} times (a "
        "busy machine?): set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or "
        "PREFECT_API_URL to a running server (`prefect server start`)"
    )
