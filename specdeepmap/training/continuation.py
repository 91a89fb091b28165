"""Continuing an interrupted training: where it continues from (a checkpoint the user
gives, or the last one mirrored under the run's checkpoint prefix, with its MLflow run) and
the mark that says a prefix's training finished. The checks themselves are in
:mod:`specdeepmap.resume`.
"""

from __future__ import annotations

import logging
import os

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError
from specdeepmap.inference import load_plain_data
from specdeepmap.resume import (
    LAST_CHECKPOINT,
    RESUME_STATE,
    ResumeState,
    check_prefix_owner,
    check_resume_checkpoint,
    check_run_continuable,
    read_state,
)
from specdeepmap.training.config import TrainConfig

log = logging.getLogger(__name__)


def resumable(cfg: TrainConfig, mlflow_uri: str) -> tuple[TrainConfig, str | None]:
    """Where training continues from: ``cfg.resume``, or the last checkpoint mirrored under
    ``cfg.checkpoint_uri`` by an earlier, interrupted run of the same dataset (with its MLflow
    run id, which must not have finished). A remote checkpoint is downloaded once into
    ``out/`` and that checked copy is what is loaded; it must be a training checkpoint of
    this dataset with epochs left (:mod:`specdeepmap.resume`).
    """
    resume, run_id = cfg.resume, None
    if cfg.checkpoint_uri:  # found before the first epoch, not when it is saved
        storage.check_writable_folder(
            cfg.checkpoint_uri, f"checkpoint_uri {storage.redact(cfg.checkpoint_uri)}"
        )
    if cfg.checkpoint_uri and not resume:
        state = read_state(cfg.checkpoint_uri)
        if state is not None:
            check_prefix_owner(state, cfg.checkpoint_uri, cfg.dataset)
            check_mlflow_run(
                mlflow_uri,
                state.mlflow_run_id,
                cfg.checkpoint_uri,
                cfg.dataset,
                ask_status=state.legacy,
            )
            resume = storage.join(cfg.checkpoint_uri, state.last)
            run_id = state.mlflow_run_id
            log.warning(
                "Continuing the interrupted training in %s from epoch %s (MLflow run %s)",
                storage.redact(cfg.checkpoint_uri),
                state.epoch,
                run_id,
            )
    if resume and (storage.is_s3(resume) or resume.startswith("file://")):
        local = os.path.join(cfg.out, "resume-from.ckpt")
        os.makedirs(cfg.out, exist_ok=True)
        resume = storage.download(resume, local)
    if resume:
        # an explicit resume must leave epochs to train; a prefix's own last checkpoint may
        # not (a training killed after its last epoch, before it was logged, is completed)
        check_resume_checkpoint(
            load_plain_data(resume),
            cfg.resume or resume,
            cfg.dataset,
            cfg.epochs if cfg.resume else None,
        )
    return cfg.model_copy(update={"resume": resume}), run_id


def check_mlflow_run(
    mlflow_uri: str, run_id: str, prefix: str, dataset: str, ask_status: bool = True
) -> None:
    """The MLflow run a checkpoint prefix names.

    It must exist here and have trained on ``dataset``; with ``ask_status`` (a ``resume.json`` that
    does not say whether its training finished), it must not have finished either.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient(mlflow_uri).get_run(run_id)
    except MlflowException:
        raise InputMismatchError(
            f"{storage.redact(prefix)}/{RESUME_STATE} names MLflow run {run_id}, which the "
            f"tracking store {storage.redact(mlflow_uri)} does not hold: give a new "
            "checkpoint prefix, or the tracking URI of that training"
        ) from None
    check_run_continuable(
        run.info.status if ask_status else None,
        run.data.params.get("dataset"),
        run_id,
        prefix,
        dataset,
    )


def mark_finished(cfg: TrainConfig, run_id: str) -> None:
    """Record in the checkpoint prefix that its training finished.

    A later training then never continues it, nor reopens its MLflow run.
    """
    if not cfg.checkpoint_uri:
        return
    state = read_state(cfg.checkpoint_uri)
    epoch, step = (state.epoch, state.global_step) if state else (0, 0)
    storage.write_text(
        storage.join(cfg.checkpoint_uri, RESUME_STATE),
        ResumeState(run_id, epoch, step, LAST_CHECKPOINT, cfg.dataset, finished=True).to_json(),
    )
