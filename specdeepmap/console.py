"""What a command prints: the user's progress and results, not the libraries' chatter.

Library warnings (MLflow's type-hint notice, Lightning's tips, deprecation notices) and the
libraries' INFO logs go to the log only with ``--verbose``; this package's own warnings (about
the user's input) are always shown.
"""

from __future__ import annotations

import logging
import os
import warnings

#: loggers of libraries that log routine INFO messages on their own handlers
CHATTY_LOGGERS = ("mlflow", "lightning", "lightning.pytorch", "lightning.fabric", "alembic",
                  "botocore", "urllib3", "matplotlib", "rasterio", "numexpr")
_OURS = f"{os.sep}specdeepmap{os.sep}"


def configure_console(verbose: bool = False) -> None:
    """Set up logging and warnings for a command run by a person.

    ``verbose``: every log line at INFO, and every warning as a log line. Otherwise only
    warnings and errors of this package, and errors of the libraries.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # Lightning's "GPU available", "💡 Tip" and model summaries are INFO on its own handler
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    warnings.showwarning = _show_warning if not verbose else _log_warning


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("py.warnings").warning("%s:%s: %s: %s", filename, lineno,
                                             category.__name__, message)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if _OURS in filename:
        logging.getLogger("specdeepmap").warning("%s", message)
    else:
        logging.getLogger("py.warnings").debug("%s:%s: %s: %s", filename, lineno,
                                               category.__name__, message)
