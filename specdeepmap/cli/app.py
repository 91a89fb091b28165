"""The `specdeepmap` app, its error handling and the commands without a step (version, tensorboard).

Every path argument is a URI (local path, ``file://`` or ``s3://``). Expected errors (the
library's own, and GDAL, filesystem, S3 and MLflow errors, by family) are printed as one clear
line and exit with status 2; ``--verbose`` shows the log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specdeepmap import __version__
from specdeepmap.errors import SpecDeepMapError

app = typer.Typer(
    help="SpecDeepMap: semantic segmentation of multispectral and hyperspectral rasters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def describe_error(error: BaseException) -> str | None:
    """One line for an error a user can act on, by family (None: a bug, show the traceback).

    The library's own errors carry their message; GDAL, filesystem, S3 (botocore) and MLflow
    errors are named by what went wrong, so no third-party traceback reaches the console.
    """
    from specdeepmap.storage import is_transient, redact

    if isinstance(error, SpecDeepMapError):
        return str(error)
    text = redact(str(error).strip().splitlines()[0] if str(error).strip() else "")
    kind = type(error).__name__
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    from mlflow.exceptions import MlflowException
    from rasterio.errors import RasterioError

    if isinstance(error, NoCredentialsError):
        return (
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an "
            "instance role) and AWS_ENDPOINT_URL for a non-AWS store"
        )
    if isinstance(error, MlflowException):
        return f"MLflow: {text}"
    if isinstance(error, RasterioError):
        return f"cannot read the raster: {text}"
    if isinstance(error, BotoCoreError | ClientError | OSError):
        if is_transient(error):
            return (
                f"storage unreachable ({kind}: {text}); check AWS_ENDPOINT_URL and the "
                "network, then run again"
            )
        if isinstance(error, NotADirectoryError):
            return f"a path that must be a folder is a file: {text}"
        if isinstance(error, IsADirectoryError):
            return f"a path that must be a file is a folder: {text}"
        if isinstance(error, PermissionError):
            return f"permission denied: {text}"
        if isinstance(error, FileNotFoundError):
            return f"not found: {text}"
        if isinstance(error, FileExistsError):
            return f"already exists: {text}"
        return f"{kind}: {text}"
    return None


def errors_to_exit(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print expected errors as one line (no traceback) and exit with status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - classified by describe_error
            message = describe_error(error)
            if message is None:
                raise
            logging.getLogger(__name__).debug("error details", exc_info=True)
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def progress_bar() -> Progress:
    """A progress bar on stderr that disappears when done."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the log.")] = False,
) -> None:
    """Configure logging for all commands (libraries' chatter only with --verbose)."""
    from specdeepmap import hide_triton_without_gpu
    from specdeepmap.console import configure_console

    hide_triton_without_gpu()
    configure_console(verbose)
    _exit_cleanly_on_sigterm()


def _exit_cleanly_on_sigterm() -> None:
    """End the command on SIGTERM as Ctrl+C does.

    SIGTERM (``kill``, a scheduler's timeout, a container stopping) becomes an exception in the
    main thread, so that every ``finally`` runs and no staging folder or temporary file is left
    behind (exit status 143, as for the signal).
    """
    import signal
    import threading

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


@app.command()
def tensorboard(
    logdir: Annotated[str, typer.Option(help="Training log folder URI.")] = "runs/train",
    port: Annotated[int, typer.Option(min=1024, max=65535)] = 6006,
) -> None:
    """TensorBoard Visualizer: serve the training logs on 127.0.0.1 and print the address."""
    import os
    import sys

    print(f"TensorBoard at http://127.0.0.1:{port}/ (Ctrl+C stops it)", flush=True)
    # replace this process, so that Ctrl+C and signals reach TensorBoard itself
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            logdir,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
    )
