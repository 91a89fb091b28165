"""Deep Learning Trainer: Lightning training logged to TensorBoard and the MLflow registry.

Class indices: channel 0 is reserved for 'unlabelled' (label value 0 and any value the dataset
does not know) and is the ignore index of the loss and the metrics; the dataset's class values
(any integers 1–255, e.g. 1, 5, 200) map to channels 1..K and back in every prediction.

IoU is computed from one confusion matrix per epoch (pooled over all pixels), the same
definition as the Tester's dataset-level IoU (SpecDeepMap averaged per-batch values).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from specdeepmap import __version__, storage
from specdeepmap.baseline import describe_forest, pseudo_labels, run_baseline
from specdeepmap.classes import ClassSchema, read_dataset_classes
from specdeepmap.console import is_verbose, quiet_lightning
from specdeepmap.data import (
    ChipDataset,
    band_names,
    chip_properties,
    principal_axes,
    read_dataset_folder,
)
from specdeepmap.errors import InputMismatchError
from specdeepmap.inference import (
    MODEL_FILE,
    export_model_file,
    load_plain_data,
    read_model_file,
    resolve_device,
)
from specdeepmap.lightning_task import (
    IGNORE_INDEX,
    MirroredCheckpoint,
    SegmentationTask,
    ValidationHistory,
)
from specdeepmap.model_card import dataset_facts, dataset_frame, publish_model_card
from specdeepmap.models import (
    SENTINEL2_WEIGHTS,
    EnsembleSegmentation,
    ModelSpec,
    build_model,
    canonical_architecture,
    encoder_depth_for,
    freeze_encoder,
    init_spectral_front_end,
    load_encoder_weights,
    spectral_channels_for,
    weights_kind,
)
from specdeepmap.normalization import Normalization
from specdeepmap.params import BaselineParams, TrainParams
from specdeepmap.resume import (
    LAST_CHECKPOINT,
    RESUME_STATE,
    ResumeState,
    check_prefix_owner,
    check_resume_checkpoint,
    check_run_continuable,
    read_state,
)
from specdeepmap.splitting import NORMALIZE_CSV, SUMMARY_CSV
from specdeepmap.tracking import ensure_experiment, log_baseline, register_model, tracking_uri

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = "{epoch:05d}-val_iou_{val_iou:.4f}"
#: with ``distill``: the ensemble the model file's network learned from, beside it
TEACHER_FILE = "ensemble.pt"
#: ensemble member i trains with seed + i × this: runs with neighbouring seeds share no member
MEMBER_SEED_STEP = 1000


class TrainConfig(TrainParams):
    """A training run: the user's :class:`TrainParams` and where the run reads and writes."""

    dataset: str = Field(..., min_length=1, description="Dataset folder URI (what `split` wrote).")
    out: str = Field(
        ..., min_length=1, description="Local folder for checkpoints and TensorBoard logs."
    )
    workers: int = Field(0, ge=0, le=256, description="Data-loader workers.")
    resume: str | None = Field(None, description="A checkpoint to continue from (local or s3://).")
    checkpoint_uri: str | None = Field(
        None,
        description="Where checkpoints are mirrored as training goes (s3:// or a "
        "folder); a training started again with the same URI continues from its last "
        "checkpoint and its MLflow run.",
    )
    keep_top_k: int = Field(1, ge=-1, description="Best checkpoints kept (-1: all).")
    limit_batches: int | None = Field(
        None, ge=1, description="Cap batches per epoch (smoke tests)."
    )
    tracking_uri: str | None = Field(
        None, description="Default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db."
    )
    experiment: str = Field("specdeepmap", min_length=1, description="MLflow experiment.")
    registered_model: str | None = Field(
        "specdeepmap-segmentation",
        description="MLflow registered model name (None: do not register).",
    )
    run_name: str | None = None
    #: MLflow run tags, e.g. ``mlflow.source.name`` (the command or flow that trained) and a
    #: link to the Prefect flow run; default source: ``specdeepmap train``
    run_tags: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _single_network_plumbing(self) -> TrainConfig:
        if self.ensemble > 1 and (self.resume or self.checkpoint_uri):
            raise ValueError(
                "an ensemble (ensemble > 1) trains its members one after the "
                "other: resume and checkpoint_uri are for single networks"
            )
        return self

    @classmethod
    def from_params(cls, params: TrainParams, **run: Any) -> TrainConfig:
        """A run of ``params`` with the given plumbing (``dataset``, ``out``, ...)."""
        return cls(**params.model_dump(), **run)

    @property
    def recipe(self) -> TrainParams:
        """The user's parameters alone, without the run's plumbing."""
        return TrainParams(**self.model_dump(include=set(TrainParams.model_fields)))


#: TrainConfig fields that say how a model was trained (shown on its model card)
RECIPE_FIELDS = (
    "epochs",
    "batch_size",
    "lr",
    "augment",
    "augmentation",
    "spectral_jitter",
    "spectral_init",
    "loss",
    "norm",
    "weight_decay",
    "pixel_loss_weight",
    "cutmix",
    "band_dropout",
    "consistency",
    "pseudo_labels",
    "weight_averaging",
    "warmup_epochs",
    "min_chips_per_epoch",
    "ensemble",
    "distill",
    "sampling",
    "balanced",
    "normalize",
    "early_stopping",
    "patience",
    "precision",
    "devices",
    "seed",
    "resume",
)


@dataclass
class TrainResult:
    """What a training run produced."""

    best_checkpoint: str  #: the best checkpoint (of the first member, for an ensemble)
    best_val_iou: float  #: the model file's validation IoU (an ensemble's: of the mean)
    model_file: str
    log_dir: str
    run_id: str | None = None
    model_uri: str | None = None  #: models:/NAME/VERSION when registered
    model_version: str | None = None
    epochs_run: int = 0  #: summed over an ensemble's members
    seconds: float = 0.0
    baseline: dict | None = None  #: the RandomForest's figures (BaselineResult.summary())
    training: dict = field(default_factory=dict)  #: recipe and run facts for the model card
    #: a single network's validated epochs, and their median validation IoU: the best of them
    #: chose the checkpoint, so ``best_val_iou`` overstates the model by about the difference
    val_epochs: int = 0
    val_epoch_median: float | None = None

    def selection_scores(self) -> dict:
        """``val_epochs`` and ``val_median`` for the model card's scores (when known), and
        ``baseline_forest``: which forest the model is compared with.
        """
        out = {"baseline_forest": describe_forest(self.baseline)} if self.baseline else {}
        if self.val_epoch_median is None:
            return out
        return out | {"val_epochs": self.val_epochs, "val_median": self.val_epoch_median}

    def baseline_mean_iou(self, split: str) -> float | None:
        """The RandomForest's pooled mean IoU on 'validation' or 'test' (None if not run)."""
        return ((self.baseline or {}).get(split) or {}).get("mean_iou")


def _software_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


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


def prepare(cfg: TrainConfig) -> tuple:
    """Everything checked and built before training: data, model, normalisation, config."""
    info = read_dataset_folder(cfg.dataset, normalize=cfg.normalize)
    bands, height, width, nodata, dtype = chip_properties(info.train + info.validation)
    kind = weights_kind(cfg.weights)
    scaler = info.scaler
    mean, std = info.band_mean, info.band_std
    backbone = cfg.backbone
    if kind in SENTINEL2_WEIGHTS:
        s2 = SENTINEL2_WEIGHTS[kind]
        if bands != s2["bands"] and not cfg.adapt_first_conv:
            raise InputMismatchError(
                f"{cfg.weights} are Sentinel-2 weights for {s2['bands']} bands (B01…B12), the "
                f"chips of {cfg.dataset} have {bands}. Use 13-band Sentinel-2 L1C chips or set "
                "adapt_first_conv."
            )
        backbone = s2["backbone"]
        scaler, mean, std = s2["scaler"], None, None  # the weights' own normalisation
    if mean is not None and len(mean) != bands:
        raise InputMismatchError(
            f"{NORMALIZE_CSV} of {cfg.dataset} has {len(mean)} bands, the chips have {bands}"
        )
    if canonical_architecture(cfg.architecture) == "justo-unet":
        if height % 4 or width % 4:
            raise InputMismatchError(
                f"Chips of {cfg.dataset} are {width} x {height} px: justo-unet needs multiples "
                "of 4 (two max-pools)"
            )
    elif height % 32 or width % 32:
        log.warning("Chips of %d x %d px: most encoders need sizes divisible by 32", height, width)
    normalization = Normalization(scaler=scaler, mean=mean, std=std, nodata=nodata)
    num_classes = len(info.class_values) + 1
    architecture = canonical_architecture(cfg.architecture)
    # pretrained weights expect the raw bands: no front-end unless one is asked for
    spectral = spectral_channels_for(
        bands,
        cfg.spectral_channels if kind == "none" else max(cfg.spectral_channels, 0),
        architecture,
    )
    # pretrained encoders keep all their stages unless fewer are asked for
    depth = encoder_depth_for(
        architecture,
        min(height, width),
        cfg.encoder_depth if kind == "none" or cfg.encoder_depth != -1 else 5,
    )
    norm = cfg.norm if kind == "none" else "batch"
    freeze = cfg.freeze_backbone if cfg.freeze_backbone is not None else kind != "none"
    config = {
        "architecture": architecture,
        "backbone": backbone,
        "in_channels": bands,
        "num_classes": num_classes,
        "class_values": info.class_values,
        "ignore_index": IGNORE_INDEX,
        "tile_size": [height, width],
        "normalization": normalization.to_dict(),
        "weights": str(cfg.weights),
        "freeze_backbone": freeze,
        "dataset": cfg.dataset,
        "version": _software_version(),
        "spectral_channels": spectral,
        "encoder_depth": depth,
        "norm": norm,
        "classes": read_dataset_classes(cfg.dataset).restrict(info.class_values).to_dict(),
        "band_names": band_names(info.train[0][0]),
        "dtype": dtype,
    }
    if cfg.resume:
        resume_config, _ = read_model_file(cfg.resume)
        for key in (
            "class_values",
            "in_channels",
            "architecture",
            "backbone",
            "spectral_channels",
            "encoder_depth",
            "norm",
        ):
            found = resume_config.get(
                key, {"spectral_channels": 0, "encoder_depth": 5, "norm": "batch"}.get(key)
            )
            if found != config[key]:
                raise InputMismatchError(
                    f"Checkpoint {cfg.resume} was trained with {key} = {found}, "
                    f"the dataset {cfg.dataset} gives {config[key]}: resume needs the same"
                )
    lookup = np.zeros(256, dtype=np.int64)
    for index, value in enumerate(info.class_values, start=1):
        lookup[value] = index
    weights = None
    if cfg.balanced:
        weights = torch.tensor([0.0, *info.class_weights], dtype=torch.float32)
        if weights[1:].sum() == 0:
            weights = None
    cache = os.path.join(cfg.out, "chip-cache")
    train_set = ChipDataset(
        info.train,
        normalization,
        lookup,
        augment=cfg.augment,
        cache_dir=cache,
        augmentation=cfg.augmentation,
        spectral_jitter=cfg.spectral_jitter,
    )
    val_set = ChipDataset(info.validation, normalization, lookup, cache_dir=cache)
    model = initial_model(cfg, config, train_set)
    return info, model, config, weights, train_set, val_set


def initial_model(cfg: TrainConfig, config: dict, train_set: ChipDataset) -> nn.Module:
    """A new network as ``config`` describes it, started as ``cfg`` asks: pretrained encoder
    weights (frozen or not), or the spectral front-end on the training chips' principal axes;
    torch's random generator draws the rest (each ensemble member its own start).
    """
    kind = weights_kind(cfg.weights)
    model = build_model(ModelSpec.from_config(config), imagenet=(kind == "imagenet"))
    if kind not in ("none", "imagenet"):
        load_encoder_weights(model, cfg.weights, adapt_first_conv=cfg.adapt_first_conv)
    if config["freeze_backbone"]:
        freeze_encoder(model)
    if config["spectral_channels"] and cfg.spectral_init == "pca" and not cfg.resume:
        init_spectral_front_end(
            model, principal_axes(train_set, config["in_channels"], seed=cfg.seed)
        )
    return model


def class_balanced_weights(dataset: ChipDataset) -> torch.Tensor:
    """Sampling weight of each training chip: half uniform, half by how much of each class's
    pixels the chip holds (every class gets the same total weight), so that chips with rare
    classes are drawn more often (in the spirit of repeat-factor sampling).
    """
    counts = [
        np.bincount(dataset.class_indices(i).ravel(), minlength=len(dataset.lookup))[1:]
        for i in range(len(dataset))
    ]
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(axis=0)
    present = totals > 0
    share = (counts[:, present] / totals[present]).sum(axis=1) / max(1, present.sum())
    weights = 0.5 / len(counts) + 0.5 * share
    return torch.as_tensor(weights / weights.sum(), dtype=torch.double)


def train(cfg: TrainConfig) -> TrainResult:
    """Train a segmentation model on a dataset folder (Deep Learning Trainer).

    Checks the data, the weights, the device and a resume checkpoint before the first step.
    Logs TensorBoard events under ``out/lightning_logs`` and an MLflow run (parameters,
    per-epoch metrics, the dataset CSVs, the best checkpoint), and registers the best model in
    the MLflow model registry. With ``cfg.ensemble`` > 1 the networks are trained one after
    the other into the same run (:func:`fit_member`), and the model file is their
    :class:`~specdeepmap.models.EnsembleSegmentation`.
    """
    import lightning as L
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
    from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

    quiet_lightning()
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    # recorded in the model, the run and resume.json: a relative path would name another
    # folder when read from elsewhere
    cfg = cfg.model_copy(update={"dataset": storage.absolute(cfg.dataset)})
    uri = tracking_uri(cfg.tracking_uri)
    cfg, previous_run = resumable(cfg, uri)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the network's random start too
    info, model, config, weights, train_set, val_set = prepare(cfg)
    baseline = None
    if cfg.baseline or cfg.pseudo_labels:  # seconds; first, as pseudo-labels need the forest
        baseline = run_baseline(
            info,
            train_set.normalization,
            BaselineParams(max_pixels=cfg.baseline_pixels, seed=cfg.seed),
        )
    if cfg.pseudo_labels:
        train_set.pseudo_labels = pseudo_labels(
            baseline.forest, info.train, train_set.normalization, cfg.pseudo_labels
        )
    os.makedirs(cfg.out, exist_ok=True)
    ensure_experiment(uri, cfg.experiment)
    tensorboard = TensorBoardLogger(cfg.out, name="lightning_logs")
    mlflow_logger = MLFlowLogger(
        experiment_name=cfg.experiment,
        tracking_uri=uri,
        log_model=False,
        run_name=cfg.run_name or f"train {storage.basename(cfg.dataset.rstrip('/'))}",
        tags={
            "mlflow.source.name": "specdeepmap train",
            "mlflow.source.type": "JOB",
            **cfg.run_tags,
        },
        run_id=previous_run,
    )
    run_id = mlflow_logger.run_id  # the run exists from here on
    pin = device.type == "cuda"
    loader_args = dict(
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        pin_memory=pin,
        persistent_workers=cfg.workers > 0,
    )
    samples = max(len(train_set), cfg.min_chips_per_epoch)
    if cfg.sampling == "class-balanced":
        sampler = WeightedRandomSampler(class_balanced_weights(train_set), samples)
    elif samples > len(train_set):
        sampler = RandomSampler(train_set, num_samples=samples)
    else:
        sampler = None
    train_loader = DataLoader(
        train_set,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=samples > cfg.batch_size,
        **loader_args,
    )
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)
    if previous_run is None:  # a continued run keeps its parameters (MLflow's are immutable)
        mlflow_logger.log_hyperparams(
            {
                k: v
                for k, v in cfg.model_dump().items()
                if k not in ("tracking_uri", "run_tags", "resume")
            }
            | {
                "learning_rate": cfg.learning_rate,  # lr, or the default scaled by batch size
                "class_values": info.class_values,
                "in_channels": config["in_channels"],
                "tile_size": config["tile_size"],
            }
        )
    members: list[tuple[nn.Module, MemberFit]] = []
    for member in range(cfg.ensemble):
        if member:  # a new random start (and new batches) for each further member
            L.seed_everything(cfg.seed + MEMBER_SEED_STEP * member, workers=True, verbose=False)
            model = initial_model(cfg, config, train_set)
            loggers = [
                TensorBoardLogger(cfg.out, name="lightning_logs", version=f"member{member}"),
                MLFlowLogger(
                    experiment_name=cfg.experiment,
                    tracking_uri=uri,
                    log_model=False,
                    run_id=run_id,
                    prefix=f"member{member}",
                ),
            ]
        else:
            loggers = [tensorboard, mlflow_logger]
        fit = fit_member(
            cfg,
            model,
            config,
            weights,
            train_loader,
            val_loader,
            device,
            loggers,
            run_id,
            os.path.join(cfg.out, "checkpoints", *([f"member{member}"] if member else [])),
        )
        if not fit.global_zero:
            return TrainResult("", 0.0, "", tensorboard.log_dir)
        _, state = read_model_file(fit.best_checkpoint)
        model.load_state_dict(state)
        members.append((model, fit))
    best_checkpoint = members[0][1].best_checkpoint
    student = None
    if cfg.ensemble > 1:
        model = EnsembleSegmentation([m for m, _ in members])
        client = mlflow.MlflowClient(uri)
        for member, (_, fit) in enumerate(members):
            client.log_metric(run_id, "member_best_val_iou", fit.best_score, step=member)
        best_iou = pooled_iou(model, val_set, cfg.batch_size, config["num_classes"])
        if cfg.distill:
            client.log_metric(run_id, "ensemble_val_iou", best_iou)
            ensemble_iou = best_iou
            # the teacher beside the model, to compare the two on any chips (not registered)
            export_model_file(
                {**config, "ensemble": cfg.ensemble, "run_id": run_id},
                model,
                os.path.join(cfg.out, TEACHER_FILE),
            )
            student = distill_student(
                cfg,
                model,
                config,
                train_set,
                weights,
                train_loader,
                val_loader,
                device,
                uri,
                run_id,
            )
            model, best_iou, best_checkpoint = (
                student[0],
                student[1].best_score,
                student[1].best_checkpoint,
            )
        else:
            config["ensemble"] = cfg.ensemble
    elif cfg.devices > 1:
        # the processes' validation shards are padded to equal length (a chip or two counted
        # twice): the best model's figure is measured again here, on each chip once
        best_iou = pooled_iou(model, val_set, cfg.batch_size, config["num_classes"])
        mlflow.MlflowClient(uri).log_metric(run_id, "best_val_iou_single_pass", best_iou)
    else:
        best_iou = members[0][1].best_score
    # what the mapper's drift verdict compares each scene's map with
    config["reference"] = validation_reference(model, val_set, cfg.batch_size)
    # lineage: maps made with this model file name the MLflow run that produced it
    model_file = export_model_file(
        {**config, "run_id": run_id}, model, os.path.join(cfg.out, MODEL_FILE)
    )
    fits = [fit for _, fit in members] + ([student[1]] if student else [])
    result = TrainResult(
        best_checkpoint=best_checkpoint,
        best_val_iou=best_iou,
        model_file=model_file,
        log_dir=tensorboard.log_dir,
        run_id=run_id,
        epochs_run=sum(fit.epochs for fit in fits),
    )
    scores = members[0][1].val_scores
    if cfg.ensemble == 1 and scores and not cfg.resume:  # a continued run saw some epochs
        result.val_epochs, result.val_epoch_median = len(scores), float(np.median(scores))
    if baseline is not None:
        result.baseline = baseline.summary()
    with mlflow.start_run(run_id=run_id):
        if baseline is not None:
            log_baseline(
                baseline,
                os.path.join(cfg.out, "baseline"),
                ClassSchema.from_dict(config["classes"]),
            )
        for name in (
            SUMMARY_CSV,
            NORMALIZE_CSV,
            "train_files.csv",
            "validation_files.csv",
            "test_files.csv",
            "split.json",
        ):
            uri_csv = storage.join(cfg.dataset, name)
            if storage.exists(uri_csv):
                local = storage.cached_local_copy(uri_csv, os.path.join(cfg.out, "dataset"))
                mlflow.log_artifact(local, artifact_path="dataset")
        # the Raster Splitter's and Dataset Maker's parameters, as run parameters
        facts = dataset_facts(cfg.dataset)
        mlflow.log_params(
            {f"chip_{k}": v for k, v in facts["chip_params"].items()}
            | {f"split_{k}": v for k, v in facts["split_params"].items()}
        )
        for member, (_, fit) in enumerate(members):
            mlflow.log_artifact(
                fit.best_checkpoint,
                artifact_path="checkpoints" + (f"/member{member}" if member else ""),
            )
        if student:
            mlflow.log_artifact(student[1].best_checkpoint, artifact_path="checkpoints/student")
        mlflow.log_metric("best_val_iou", best_iou)
        if result.val_epoch_median is not None:
            mlflow.log_metric("val_iou_epoch_median", result.val_epoch_median)
        mlflow.set_tags(
            {
                "dataset": cfg.dataset,
                "dataset_digest": facts["digest"],
                "specdeepmap_version": config["version"],
            }
        )
        mlflow.log_input(
            mlflow.data.from_pandas(
                dataset_frame(cfg.dataset),
                source=cfg.dataset,
                name=storage.basename(cfg.dataset) or "chips",
                digest=facts["digest"],  # one digest: the tag's, the card's and MLflow's
            ),
            context="training",
        )
        result.seconds = time.perf_counter() - started
        result.training = {
            **{k: getattr(cfg, k) for k in RECIPE_FIELDS},
            "lr": cfg.lr
            if cfg.lr is not None
            else f"{cfg.learning_rate:.3g} (0.001 x sqrt(batch size / 2))",
            "epochs run": result.epochs_run,
            "wall time (s)": round(result.seconds, 1),
            "device": str(device),
            "best validation IoU": round(best_iou, 4),
        }
        if result.val_epoch_median is not None:
            result.training[
                f"median validation IoU of the {result.val_epochs} validated epochs"
            ] = round(result.val_epoch_median, 4)
        if cfg.ensemble > 1:  # how far the members alone spread, beside the ensemble's figure
            result.training["members' best validation IoU"] = ", ".join(
                f"{fit.best_score:.4f}" for _, fit in members
            )
        if student:
            result.training["validation IoU of the ensemble distilled"] = round(ensemble_iou, 4)
        if cfg.registered_model:
            result.model_uri, result.model_version = register_model(
                model_file,
                config,
                cfg.registered_model,
                best_iou,
                cfg.dataset,
                result.baseline_mean_iou("validation"),
                facts["digest"],
            )
            publish_model_card(
                cfg.registered_model,
                result.model_version,
                run_id,
                model_file,
                cfg.dataset,
                {
                    "val": best_iou,
                    "run_id": run_id,
                    "baseline_val": result.baseline_mean_iou("validation"),
                    **result.selection_scores(),
                },
                result.training,
                facts=facts,
            )
    mark_finished(cfg, run_id)
    log.info("Best val IoU %.4f: %s", best_iou, model_file)
    return result


def distill_student(
    cfg: TrainConfig,
    teacher: nn.Module,
    config: dict,
    train_set,
    class_weights: torch.Tensor | None,
    train_loader,
    val_loader,
    device: torch.device,
    uri: str,
    run_id: str,
) -> tuple[nn.Module, MemberFit]:
    """Train one network from a new random start on the labels plus the ensemble
    ``teacher``'s class probabilities on every pixel (``lightning_task.distillation_loss``);
    return it, with its best weights loaded, and its fit.
    """
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    L.seed_everything(cfg.seed + MEMBER_SEED_STEP * cfg.ensemble, workers=True, verbose=False)
    student = initial_model(cfg, config, train_set)
    loggers = [
        TensorBoardLogger(cfg.out, name="lightning_logs", version="student"),
        MLFlowLogger(
            experiment_name=cfg.experiment,
            tracking_uri=uri,
            log_model=False,
            run_id=run_id,
            prefix="student",
        ),
    ]
    fit = fit_member(
        cfg,
        student,
        config,
        class_weights,
        train_loader,
        val_loader,
        device,
        loggers,
        run_id,
        os.path.join(cfg.out, "checkpoints", "student"),
        teacher=teacher,
    )
    _, state = read_model_file(fit.best_checkpoint)
    student.load_state_dict(state)
    return student, fit


@dataclass
class MemberFit:
    """One network's training: its best checkpoint and validation IoU, epochs run."""

    best_checkpoint: str
    best_score: float
    epochs: int
    global_zero: bool = True  #: False in the other processes of a multi-device run
    #: validation IoU of each epoch validated in this process, in order
    val_scores: list[float] = field(default_factory=list)


def fit_member(
    cfg: TrainConfig,
    model: nn.Module,
    config: dict,
    class_weights: torch.Tensor | None,
    train_loader,
    val_loader,
    device: torch.device,
    loggers: list,
    run_id: str,
    checkpoint_dir: str,
    teacher: nn.Module | None = None,
) -> MemberFit:
    """Train one network with Lightning (checkpointing on validation IoU, early stopping,
    weight averaging and the learning-rate finder as ``cfg`` says), logging to ``loggers``;
    checkpoints mirrored to ``cfg.checkpoint_uri`` name the MLflow ``run_id`` to continue.
    A ``teacher`` adds its distillation loss.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    task = SegmentationTask(
        model,
        config,
        class_weights,
        cfg.learning_rate,
        cfg.epochs,
        cfg.loss,
        cfg.warmup_epochs,
        cfg.weight_decay,
        cfg.pixel_loss_weight,
        cfg.cutmix,
        cfg.consistency,
        cfg.band_dropout,
        teacher=teacher,
    )
    checkpointing = MirroredCheckpoint(
        cfg.checkpoint_uri,
        run_id,
        cfg.dataset,
        dirpath=checkpoint_dir,
        filename=CHECKPOINT_PATTERN,
        monitor="val_iou",
        mode="max",
        save_top_k=cfg.keep_top_k,
        auto_insert_metric_name=False,
    )
    history = ValidationHistory()
    callbacks = [checkpointing, history]
    if cfg.checkpoint_uri:  # the latest state, every epoch (Lightning's save_last only saves
        # when a best checkpoint is saved too)
        callbacks.append(
            MirroredCheckpoint(
                cfg.checkpoint_uri,
                run_id,
                cfg.dataset,
                dirpath=checkpoint_dir,
                filename=LAST_CHECKPOINT.removesuffix(".ckpt"),
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    if cfg.early_stopping:
        callbacks.append(EarlyStopping(monitor="val_iou", mode="max", patience=cfg.patience))
    if cfg.weight_averaging == "ema":
        steps = (
            len(train_loader)
            if cfg.limit_batches is None
            else min(len(train_loader), cfg.limit_batches)
        )
        callbacks.append(ema_callback(max(1, steps) * cfg.epochs))
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=cfg.devices,
        precision=cfg.precision,
        callbacks=callbacks,
        logger=loggers,
        log_every_n_steps=1,
        enable_progress_bar=True,
        limit_train_batches=cfg.limit_batches,
        limit_val_batches=cfg.limit_batches,
        num_sanity_val_steps=0,
        deterministic=False,
        enable_model_summary=is_verbose(),
        strategy=ddp_strategy(cfg.devices),
    )
    if cfg.lr_finder:
        from lightning.pytorch.tuner import Tuner

        finder = Tuner(trainer).lr_find(
            task, train_loader, val_loader, update_attr=True, attr_name="lr"
        )
        log.info(
            "Learning-rate finder suggests %s (used for training)",
            finder.suggestion() if finder else None,
        )
    # the checked local copy, loaded once more by Lightning as plain data (weights_only)
    trainer.fit(task, train_loader, val_loader, ckpt_path=cfg.resume, weights_only=True)
    return MemberFit(
        checkpointing.best_model_path,
        float(checkpointing.best_model_score or 0.0),
        trainer.current_epoch,
        trainer.is_global_zero,
        history.scores,
    )


@torch.inference_mode()
def pooled_iou(model: nn.Module, dataset: ChipDataset, batch_size: int, num_classes: int) -> float:
    """Pooled mean IoU of ``model`` on every chip of ``dataset`` once (one process, CPU)."""
    from torch.utils.data import DataLoader

    from specdeepmap.lightning_task import PooledIoU

    metric = PooledIoU(num_classes)
    model = model.eval().cpu()
    for x, y in DataLoader(dataset, batch_size=batch_size):
        metric.update(model(x)[:, 1:].argmax(1) + 1, y)
    return float(metric.compute())


def validation_reference(model: nn.Module, dataset: ChipDataset, batch_size: int) -> dict:
    """The model's outputs on its validation chips, as the mapper computes them on a scene
    (softmax over the real classes): class shares and the share of low-confidence pixels.

    The model file carries them, so that each mapped scene's verdict can say whether its map
    looks like the model's maps of data it knows (:func:`specdeepmap.drift.output_drift`).
    """
    from torch.utils.data import DataLoader

    from specdeepmap.drift import output_reference

    model = model.eval().cpu()

    def batches():
        with torch.no_grad():
            for x, _ in DataLoader(dataset, batch_size=batch_size):
                yield torch.softmax(model(x)[:, 1:].float(), dim=1).numpy()

    return output_reference(batches())


def ddp_strategy(devices: int):
    """Lightning's spawn-based DDP for several devices ("auto" for one).

    Spawned processes run only the training loop; Lightning's default launcher would instead
    re-run the process's command line in each extra process, which inside a Prefect worker is
    the flow run itself. Rank 0's results (best checkpoint, metrics) come back to this process.
    """
    if devices <= 1:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(start_method="spawn")


def ema_callback(total_steps: int):
    """Lightning's EMA weight averaging with a horizon of about a twentieth of the training
    steps (10-1000): long enough to smooth the last epochs' noise, short enough to follow the
    model on the few hundred steps of a small dataset (a fixed decay of 0.999 would still be
    averaging the first epochs).
    """
    from lightning.pytorch.callbacks import EMAWeightAveraging

    horizon = min(1000.0, max(10.0, total_steps / 20))
    return EMAWeightAveraging(decay=1 - 1 / horizon)
