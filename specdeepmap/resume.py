"""Continuing a training: what a checkpoint prefix and a checkpoint may be continued.

A checkpoint prefix (``checkpoint_uri``) belongs to one training: its ``resume.json`` names
the MLflow run, the dataset and whether the training finished. A training started again with
the same prefix continues that run only when it did not finish and was on the same dataset;
anything else is refused before the first step, so a finished run is never reopened and a
version is never registered from another dataset's weights. A checkpoint given as ``resume``
must be a Lightning training checkpoint of this dataset with epochs left to train.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError, InvalidParameterError, UnreadableInputError

RESUME_STATE = "resume.json"
LAST_CHECKPOINT = "last.ckpt"


@dataclass(frozen=True)
class ResumeState:
    """The contents of a checkpoint prefix's ``resume.json``."""

    mlflow_run_id: str
    epoch: int
    global_step: int
    last: str = LAST_CHECKPOINT  #: the latest checkpoint's file name inside the prefix
    dataset: str | None = None  #: the dataset trained on (absolute URI)
    finished: bool = False  #: the training ran to its end and was logged
    #: written before ``finished`` was recorded: whether it finished must be asked of MLflow
    legacy: bool = False

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "legacy"})


def read_state(prefix: str) -> ResumeState | None:
    """The prefix's ``resume.json``, checked (None when there is none).

    Raises:
        UnreadableInputError: not JSON, not an object, or fields of the wrong kind.
        InvalidParameterError: ``last`` names a file outside the prefix.
    """
    uri = storage.join(prefix, RESUME_STATE)
    if not storage.exists(uri):
        return None
    try:
        data = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError) as error:
        raise UnreadableInputError(
            f"{uri} is not JSON ({error}): it is not a resume state "
            "written by specdeepmap; use an empty checkpoint "
            "prefix"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("mlflow_run_id"), str):
        raise UnreadableInputError(
            f"{uri} is not a resume state written by specdeepmap (a "
            "JSON object with mlflow_run_id); use an empty prefix"
        )
    try:
        state = ResumeState(
            mlflow_run_id=data["mlflow_run_id"],
            epoch=int(data.get("epoch", 0)),
            global_step=int(data.get("global_step", 0)),
            last=str(data.get("last", LAST_CHECKPOINT)),
            dataset=data.get("dataset"),
            finished=bool(data.get("finished", False)),
            legacy="finished" not in data,
        )
    except (TypeError, ValueError) as error:
        raise UnreadableInputError(f"{uri}: a field has the wrong type ({error})") from None
    if "/" in state.last or "\\" in state.last or state.last in ("", ".", ".."):
        raise InvalidParameterError(
            f"{uri} names its checkpoint {state.last!r}: it must be a file name inside "
            f"{storage.redact(prefix)}, not a path elsewhere"
        )
    return state


def check_prefix_owner(state: ResumeState, prefix: str, dataset: str) -> None:
    """Refuse to continue a finished training or one on another dataset.

    Raises:
        InputMismatchError: naming the prefix, the run and what differs.
    """
    where = storage.redact(prefix)
    if state.finished:
        raise InputMismatchError(
            f"{where} holds the checkpoints of a finished training (MLflow run "
            f"{state.mlflow_run_id}): give a new checkpoint prefix for a new training"
        )
    if state.dataset and not same_dataset(state.dataset, dataset):
        raise InputMismatchError(
            f"{where} holds the checkpoints of a training on {state.dataset}, not on "
            f"{dataset}: give a new checkpoint prefix (one prefix per training)"
        )


def check_run_continuable(
    status: str | None, run_dataset: str | None, run_id: str, prefix: str, dataset: str
) -> None:
    """Refuse to reopen an MLflow run that finished or trained on another dataset.

    Args:
        status: the run's MLflow status (``RUNNING``, ``FAILED``, ``KILLED``, ``FINISHED``);
            None when ``resume.json`` itself says whether the training finished (Lightning
            marks the run FINISHED when fitting ends, before the model is logged, so a
            training interrupted after that is still to be completed).
        run_dataset: the run's ``dataset`` parameter, if logged.
        run_id: the run's id (for the messages).
        prefix: the checkpoint prefix (for the messages).
        dataset: the dataset about to be trained on.
    """
    where = storage.redact(prefix)
    if status == "FINISHED":
        raise InputMismatchError(
            f"{where}/{RESUME_STATE} names MLflow run {run_id}, which has finished: give a "
            "new checkpoint prefix for a new training"
        )
    if run_dataset and not same_dataset(run_dataset, dataset):
        raise InputMismatchError(
            f"{where}/{RESUME_STATE} names MLflow run {run_id}, a training on {run_dataset},"
            f" not on {dataset}: give a new checkpoint prefix"
        )


def same_dataset(a: str, b: str) -> bool:
    """True when two dataset URIs name one folder.

    They may be spelled relative, absolute or with a trailing slash.
    """
    from specdeepmap.guards import location

    return location(a) == location(b)


def check_resume_checkpoint(checkpoint: dict, uri: str, dataset: str, epochs: int | None) -> None:
    """Check a loaded ``resume`` checkpoint before training starts.

    Args:
        checkpoint: what ``torch.load(..., weights_only=True)`` returned.
        uri: where it came from (for the messages).
        dataset: the dataset about to be trained on.
        epochs: the training's ``epochs`` (None: do not require epochs left).

    Raises:
        InvalidParameterError: not a Lightning training checkpoint (e.g. a ``model.pt``), or
            no epochs left to train.
        InputMismatchError: trained on another dataset.
    """
    if (
        not isinstance(checkpoint, dict)
        or "optimizer_states" not in checkpoint
        or "epoch" not in checkpoint
    ):
        raise InvalidParameterError(
            f"{uri} is not a training checkpoint (no optimizer state or epoch): resume takes "
            "a .ckpt from a training's checkpoints/ folder; a model file (model.pt) holds "
            "only weights"
        )
    config = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
    trained_on = config.get("dataset")
    if trained_on and not same_dataset(str(trained_on), dataset):
        raise InputMismatchError(
            f"{uri} is a training on {trained_on}, not on {dataset}: resume continues the "
            "same training; start a new one for another dataset"
        )
    done = int(checkpoint["epoch"]) + 1
    if epochs is not None and done >= epochs:
        raise InvalidParameterError(
            f"{uri} has already trained {done} epoch(s) of the {epochs} asked: nothing is "
            "left to train (raise epochs to continue it)"
        )


__all__ = [
    "LAST_CHECKPOINT",
    "RESUME_STATE",
    "ResumeState",
    "check_prefix_owner",
    "check_resume_checkpoint",
    "check_run_continuable",
    "read_state",
    "same_dataset",
]
