"""What a command prints: the user's progress and results, not the libraries' chatter.

Library warnings (MLflow's type-hint notice, Lightning's tips, deprecation notices), the
libraries' INFO logs and their download progress bars go to the log only with ``--verbose``;
this package's own warnings (about the user's input) are always shown, and so are the
progress loggers a command names (the demo shows Prefect's flow and task runs).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_OURS = f"{os.sep}specdeepmap{os.sep}"
_state = {"verbose": False}


def configure_console(verbose: bool = False, progress: tuple[str, ...] = ()) -> None:
    """Set up logging and warnings for a command run by a person.

    ``verbose``: every log record at INFO and every warning as a log line. Otherwise: records
    at WARNING and above, plus INFO records of the ``progress`` loggers (name prefixes).
    """
    _state["verbose"] = verbose
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(
        lambda record: (
            verbose or record.levelno >= logging.WARNING or record.name.startswith(progress)
        )
    )  # startswith(()) is False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    warnings.showwarning = _log_warning if verbose else _show_warning
    os.environ["SPECDEEPMAP_VERBOSE"] = "1" if verbose else "0"  # for spawned processes
    if not verbose:  # read by MLflow when it is imported
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet_lightning() -> None:
    """Lightning gives its ``lightning`` logger an INFO handler of its own when imported (GPU
    availability, tips): keep it to warnings unless verbose. Call after importing Lightning;
    processes spawned for multi-device training call it too (and drop library warnings), as
    told by the environment the command set.

    Only an application quiets libraries: without ``SPECDEEPMAP_VERBOSE`` in the environment
    (set by the command line's :func:`configure_console`, and inherited by the processes it
    spawns) this does nothing, so a user of the library, a Prefect worker included, keeps
    Lightning's logging as Lightning sets it.
    """
    if "SPECDEEPMAP_VERBOSE" not in os.environ:
        return
    if os.environ.get("SPECDEEPMAP_VERBOSE") == "0" and not _state["verbose"]:
        warnings.simplefilter("ignore")
    if not _state["verbose"]:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def is_verbose() -> bool:
    """Whether the libraries' details (e.g. Lightning's model summary) should be shown."""
    return _state["verbose"]


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("py.warnings").warning(
        "%s:%s: %s: %s", filename, lineno, category.__name__, message
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if _OURS in filename:
        logging.getLogger("specdeepmap").warning("%s", message)
    else:
        logging.getLogger("py.warnings").debug(
            "%s:%s: %s: %s", filename, lineno, category.__name__, message
        )
