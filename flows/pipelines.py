"""Prefect flows: each reads like the pipeline it runs; the work is in ``specdeepmap``."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.params import MapFlowParams, ScenePair, ScheduledMappingParams, TrainingPipelineParams
from specdeepmap import registry, storage
from specdeepmap.bands import stack_scene
from specdeepmap.evaluation import TestFigures
from specdeepmap.mapping import output_uri_for, scenes_under
from specdeepmap.model_card import escape_md, panels_markdown
from specdeepmap.params import ChipParams, SplitParams, TrainParams
from specdeepmap.publishing import (
    SceneProducts,
    mapped_with,
    masks_beside,
    release,
    unmapped_scenes,
)
from specdeepmap.registry import ChampionScore, Promotion
from specdeepmap.stac import is_catalog, update_catalog
from specdeepmap.tracking import ensure_experiment, tracking_uri
from specdeepmap.training import TrainConfig, TrainResult
from tasks import (
    champion_task,
    check_labels_task,
    chip_task,
    evaluate_task,
    map_scene_task,
    model_card_task,
    monitor_task,
    promote_task,
    split_task,
    train_task,
)


def runs_dir() -> str:
    """The worker's local folder for training logs: $SPECDEEPMAP_RUNS_DIR, default ``runs``."""
    return os.environ.get("SPECDEEPMAP_RUNS_DIR", "runs")


@flow(name="chip", task_runner=ThreadPoolTaskRunner(max_workers=2))
def chip_flow(scenes: list[ScenePair], out_uri: str, chip: ChipParams = ChipParams()) -> list[dict]:
    """Chip one or more scenes into one folder (scenes in parallel); scenes given as band files
    are stacked as VRTs under ``out_uri/scenes/`` first.
    """
    images = [
        s.image_uri or stack_scene(s.band_uris, storage.join(out_uri, "scenes"), s.resampling)
        for s in scenes
    ]
    futures = [
        chip_task.submit(image, s.label_uri, out_uri, chip, s.classes_uri)
        for image, s in zip(images, scenes, strict=True)
    ]
    return [{"scene": f.result().image_uri, "chips": f.result().chips} for f in futures]


@flow(name="split")
def split_flow(chip_folder: str, split: SplitParams = SplitParams()) -> dict:
    """Balanced train/validation/test CSVs, class weights and band statistics."""
    report = split_task(chip_folder, split)
    return {"chips": report.chips, "max_share_gap_pp": report.max_share_gap_pp}


@flow(name="train")
def train_flow(
    dataset_uri: str,
    train: TrainParams = TrainParams(),
    model_name: str = "specdeepmap-segmentation",
    checkpoint_uri: str | None = None,
) -> TrainResult:
    """Train on a dataset folder, log to MLflow and register a new model version.

    With ``checkpoint_uri`` (the training pipeline gives one per flow run, in the work
    folder) checkpoints are written there as training goes, and a retried task or a restarted
    flow run continues from the last one, in the same MLflow run (a single network: an
    ensemble, ``train.ensemble > 1``, starts again from the first member).
    """
    out = os.path.join(runs_dir(), "training", time.strftime("%Y%m%d-%H%M%S"))
    run_name, tags = mlflow_run_identity()
    return train_task(
        TrainConfig.from_params(
            train,
            dataset=dataset_uri,
            out=out,
            registered_model=model_name,
            run_name=run_name,
            run_tags=tags,
            checkpoint_uri=checkpoint_uri if train.ensemble == 1 else None,
        )
    )


def mlflow_run_identity() -> tuple[str, dict[str, str]]:
    """The MLflow run's name and source tags for the Prefect flow run that trains: the run
    shows which flow ran it, with a link back to the flow run.
    """
    context = get_run_context()
    flow_run = context.flow_run
    tags = {
        "mlflow.source.name": f"prefect flow {context.flow.name}",
        "mlflow.source.type": "JOB",
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": flow_run.name,
    }
    if flow_run.parent_task_run_id is not None:
        tags["prefect.parent_task_run_id"] = str(flow_run.parent_task_run_id)
    url = flow_run_url(str(flow_run.id))
    if url:
        tags["prefect.flow_run_url"] = url
    return f"{context.flow.name} {flow_run.name}", tags


def flow_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI (None when no UI address is configured)."""
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base else None


#: MLflow 3.17's UI picks its view from this query parameter (then remembers it), not from the
#: experiment's ``mlflow.experimentKind`` tag: without it the UI opens the GenAI view
MLFLOW_UI_VIEW = "workflowType=machine_learning"


def mlflow_run_url(run_id: str) -> str | None:
    """The MLflow run's page (None for a server-less tracking store)."""
    import mlflow

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    run = mlflow.MlflowClient().get_run(run_id)
    return (
        f"{storage.redact(uri).rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
        f"?{MLFLOW_UI_VIEW}"
    )


@flow(name="evaluate")
def evaluate_flow(test_csv: str, model_uri: str, out_uri: str) -> dict:
    """Test a model on a test CSV (metrics logged to the model's MLflow run)."""
    return evaluate_task(test_csv, model_uri, out_uri, None).to_dict()


class ReviewInput(RunInput):
    """The reviewer's answer to a promotion request (the form in the Prefect UI).

    The decision has no default: a reviewer must choose, so that a form sent without a
    choice is refused instead of being recorded as a rejection.
    """

    decision: Literal["approve", "reject"] = Field(
        ...,
        description="approve: this version becomes the champion (it maps production scenes "
        "from the next scheduled run on); reject: it stays challenger.",
    )
    reviewer: str = Field(..., min_length=1, description="Your name, kept with the version.")
    comment: str = Field("", description="Why: kept with the version as a tag.")


@flow(name="review")
def review_flow(
    model_name: str,
    version: str,
    rule: str,
    comparison: str,
    timeout_hours: float = 24.0,
    links: str = "",
    run_id: str = "",
) -> dict:
    """Ask a reviewer to approve a new version as champion: show the comparison, pause until
    the reviewer answers the form in the Prefect UI (Resume), then move the alias or not.

    The form itself shows the comparison, the maps of the version's card (``run_id``: its
    MLflow run; test chips with the label, this version's and the champion's maps) and
    ``links`` (markdown: the MLflow run, the model card, the test outputs); the parent run's
    name and an artifact on it say that it waits for this run. The version holds
    ``challenger`` meanwhile. No answer within ``timeout_hours``: it stays challenger.
    Returns ``{"alias", "approved", "reviewer", "comment"}``.
    """
    logger = get_run_logger()
    maps = panels_markdown(run_id) if run_id else ""
    request = (
        f"## Approve {model_name} version {version} as champion?\n\n{comparison}\n\n"
        f"{maps}\n\nThe promotion rule says: **{rule}**.\n\n{links}"
    )
    create_markdown_artifact(
        key="review-request",
        description=f"Approve {model_name} version {version}?",
        markdown=request + "\n\nAnswer with **Resume** on this flow run.",
    )
    parent = _announce_wait(f"{model_name} v{version}")
    try:
        answer = pause_flow_run(
            wait_for_input=ReviewInput.with_initial_data(description=request),
            timeout=int(timeout_hours * 3600),
            poll_interval=2,
            key=f"review-{model_name}-{version}",
        )
    except FlowPauseTimeout:
        logger.warning(
            "No review of %s version %s within %s h: it stays challenger",
            model_name,
            version,
            timeout_hours,
        )
        registry.set_alias(
            model_name, version, registry.CHALLENGER, f"no review within {timeout_hours} h"
        )
        _end_wait(parent)
        return {"alias": registry.CHALLENGER, "approved": False, "reviewer": "", "comment": ""}
    _end_wait(parent)
    approved = answer.decision == "approve"
    alias = registry.CHAMPION if approved else registry.CHALLENGER
    verdict = "approved" if approved else "rejected"
    registry.set_alias(
        model_name,
        version,
        alias,
        f"{verdict} by {answer.reviewer} (rule: {rule})",
        by=answer.reviewer,
        comment=answer.comment,
    )
    logger.info("%s version %s %s by %s: %s", model_name, version, verdict, answer.reviewer, alias)
    return {
        "alias": alias,
        "approved": approved,
        "reviewer": answer.reviewer,
        "comment": answer.comment,
    }


WAITING = " (waiting for a review)"


def _announce_wait(what: str) -> tuple[str, str] | None:
    """Make the parent run show that it waits for this review run: its name says so and an
    artifact on it links here. Returns (parent id, its name), None without a parent.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    context = get_run_context()
    if context.flow_run.parent_task_run_id is None:
        return None
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(context.flow_run.parent_task_run_id)
        parent = client.read_flow_run(task_run.flow_run_id)
        client.update_flow_run(parent.id, name=parent.name + WAITING)
        here = flow_run_url(str(context.flow_run.id)) or f"flow run {context.flow_run.name}"
        client.create_artifact(
            ArtifactCreate(
                key="waiting-for-review",
                type="markdown",
                flow_run_id=parent.id,
                description=f"Review of {what}",
                data=f"This run waits for the review of **{what}**: answer with **Resume** "
                f"on the review run: {here}",
            )
        )
    return str(parent.id), parent.name


def _end_wait(parent: tuple[str, str] | None) -> None:
    """The parent run's own name again, once the review is answered."""
    if parent is None:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(parent[0], name=parent[1])


@flow(name="training-pipeline")
def training_pipeline(
    params: TrainingPipelineParams, promotion: Literal["auto", "approval", "none"] = "auto"
) -> dict:
    """Check labels → chip → split → train → evaluate → score the champion on the same test
    chips → promote: ``auto`` makes the version champion if it beats the champion by the margin and
    not below the baseline (else challenger); ``approval`` asks a reviewer (the production
    deployment's default); ``none`` only registers.
    """
    params = TrainingPipelineParams.model_validate(params.model_dump())  # cross-field rules
    logger = get_run_logger()
    ensure_experiment(tracking_uri(), "specdeepmap")
    chips_uri = storage.join(params.work_uri, "chips")
    check_labels_task([s.label_uri for s in params.scenes], params.chip, params.split)
    chip_flow(params.scenes, chips_uri, params.chip)
    split_flow(chips_uri, params.split)
    # one checkpoint folder per flow run: a restarted run (same id) continues its training
    checkpoints = storage.join(params.work_uri, "checkpoints", str(get_run_context().flow_run.id))
    result = train_flow(chips_uri, params.train, params.model_name, checkpoints)
    test_csv = storage.join(chips_uri, "test_files.csv")
    evaluation_uri = storage.join(params.work_uri, "evaluation", f"v{result.model_version}")
    tested = evaluate_task(
        test_csv, result.model_file, evaluation_uri, result.run_id, result.baseline
    )
    champion = champion_task(
        params.model_name,
        test_csv,
        result.model_file,
        storage.join(evaluation_uri, "champion"),
        evaluation_uri,
    )
    if promotion == "auto" and champion.version and champion.mean_iou is None:
        logger.warning(
            "The champion cannot be scored on this run's chips (%s): asking a reviewer instead",
            champion.reason,
        )
        promotion = "approval"
    promoted = promote_task(
        params.model_name,
        result.model_version,
        tested,
        champion,
        params.min_improvement,
        promotion,
    )
    links = review_links(result, evaluation_uri)
    if promotion == "approval":
        promoted = ask_reviewer(
            params, result, chips_uri, evaluation_uri, tested, champion, promoted, links
        )
    model_card_task(
        params.model_name, result, chips_uri, evaluation_uri, tested, champion, promoted
    )
    summary = pipeline_summary(result, promoted, promotion, champion, tested)
    create_markdown_artifact(
        key="training-pipeline",
        description="Training pipeline result",
        markdown="\n".join(f"- **{k}**: {v}" for k, v in summary.items()) + "\n" + links,
    )
    logger.info(
        "Model %s version %s (%s): test mean IoU %.4f",
        params.model_name,
        result.model_version,
        promoted.alias or "no alias",
        tested.mean_iou,
    )
    return summary


def pipeline_summary(
    result: TrainResult,
    promoted: Promotion,
    promotion: str,
    champion: ChampionScore,
    tested: TestFigures,
) -> dict:
    """The run's figures as the flow returns them (plain data: shown in the Prefect UI and
    read by API callers) and as its artifact lists them.
    """
    return {
        "model_uri": result.model_uri,
        "version": result.model_version,
        "alias": promoted.alias,
        "promotion": promotion,
        "run_id": result.run_id,
        "best_val_iou": result.best_val_iou,
        "baseline_rf_val_mean_iou": result.baseline_mean_iou("validation"),
        "champion_version": champion.version,
        "champion_test_mean_iou_same_chips": champion.mean_iou,
        "champion_difference": champion.difference.to_dict() if champion.difference else None,
        **tested.to_dict(),
    }


def ask_reviewer(
    params: TrainingPipelineParams,
    result: TrainResult,
    chips_uri: str,
    evaluation_uri: str,
    tested: TestFigures,
    champion: ChampionScore,
    promoted: Promotion,
    links: str,
) -> Promotion:
    """The decision on one screen: the card and the version's description hold the figures
    before the run waits for the reviewer; returns the alias and reason they chose.
    """
    waiting = replace(promoted, reason=f"waiting for a reviewer; the rule says: {promoted.reason}")
    model_card_task(params.model_name, result, chips_uri, evaluation_uri, tested, champion, waiting)
    review = review_flow(
        params.model_name,
        result.model_version,
        promoted.reason,
        promoted.comparison,
        params.review_timeout_hours,
        links,
        result.run_id,
    )
    if review["reviewer"]:
        said = f" ({review['comment']})" if review["comment"] else ""
        verdict = "approved" if review["approved"] else "rejected"
        reason = f"{verdict} by {review['reviewer']}{said}; the rule said: {promoted.reason}"
    else:
        reason = f"no review in time; the rule said: {promoted.reason}"
    return replace(promoted, alias=review["alias"], reason=reason)


def review_links(result: TrainResult, evaluation_uri: str) -> str:
    """Where a reviewer finds the run, the model card, the test outputs (markdown list)."""
    run = mlflow_run_url(result.run_id)
    return "\n".join(
        [
            f"- **MLflow run**: {run or result.run_id} ({storage.redact(tracking_uri())})",
            "- **model card**: run artifact `model_card/model_card.html` (figures, confusion "
            f"matrix, class IoU, the maps beside the champion's){' at ' + run if run else ''}",
            f"- **model version**: {result.model_uri}",
            f"- **test outputs**: {storage.redact(evaluation_uri)} (`test_iou.csv`, "
            "`test_metrics.csv`; the champion's under `champion/`)",
        ]
    )


@flow(name="map-scenes")
def _map_scenes(
    scenes: list[str], model_uri: str, output_uri: str, params: MapFlowParams
) -> list[SceneProducts]:
    futures = [
        map_scene_task.submit(
            s,
            model_uri,
            output_uri_for(s, output_uri),
            params.map,
            params.masks.get(s),
            params.quarantine,
        )
        for s in scenes
    ]
    return [f.result() for f in futures]


@flow(name="map")
def map_flow(params: MapFlowParams) -> list[dict]:
    """Map scenes in parallel (threads or Dask): a list of rasters, VRTs, STAC items or
    catalogs, or every scene under a prefix (or in a STAC catalog). Each map gets a verdict;
    a suspect one is quarantined (see :class:`MapFlowParams`). The figures of every scene go
    to the model version's MLflow monitoring run, and the published maps into the output's
    STAC catalog.
    """
    params = MapFlowParams.model_validate(params.model_dump())
    scenes = [
        item for uri in params.scenes for item in (scenes_under(uri) if is_catalog(uri) else [uri])
    ] or scenes_under(params.input_prefix)
    model_uri = registry.resolve(params.model_uri)
    if not params.force:  # the same scene announced twice is mapped once per model version
        done = [s for s in scenes if mapped_with(output_uri_for(s, params.output_uri), model_uri)]
        if done:
            get_run_logger().info("Mapped by %s already (force to redo): %s", model_uri, done)
        scenes = [s for s in scenes if s not in done]
        from prefect_dask import DaskTaskRunner

        runner = (
            DaskTaskRunner(address=params.dask_address)
            if params.dask_address
            else DaskTaskRunner(
                cluster_kwargs={"n_workers": params.max_workers, "threads_per_worker": 1}
            )
        )
    else:
        runner = ThreadPoolTaskRunner(max_workers=params.max_workers)
    results = _map_scenes.with_options(task_runner=runner)(
        scenes, model_uri, params.output_uri, params
    )
    monitor_task(model_uri, results)
    update_catalog(params.output_uri)  # one writer, after every scene's item exists
    return [products.to_dict() for products in results]


@flow(name="release-map")
def release_flow(map_uri: str, reviewer: str, reason: str) -> str:
    """Publish a quarantined map after review: it leaves ``quarantine/``, its STAC item
    records who released it and why, and the catalog lists it.
    """
    published = release(map_uri, reviewer, reason)
    get_run_logger().info("%s released by %s: %s", published, reviewer, reason)
    return published


@flow(name="suspect-map")
def suspect_map_flow(map_uri: str, scene: str, model: str, reasons: str) -> dict:
    """React to a suspect map: the automation of ``prefect.yaml`` runs this on each event
    ``specdeepmap.map.suspect``. It asks for a review: an artifact with the reasons, the map's
    place in quarantine and the command that publishes it once checked.
    """
    create_markdown_artifact(
        key="suspect-map",
        description=f"Review the quarantined map of {storage.basename(scene)}",
        markdown=f"## Suspect map: {storage.basename(map_uri)}\n\n"
        f"- **scene**: {scene}\n- **model**: {model}\n- **map (quarantined)**: {map_uri}\n"
        f"- **why**: {escape_md(reasons)}\n\nAfter checking it, publish it with "
        f"`specdeepmap release {map_uri} --reason '…'` or the `release-map` flow.",
    )
    get_run_logger().warning("Suspect map %s of %s: %s", map_uri, scene, reasons)
    return {"map": map_uri, "scene": scene, "model": model, "reasons": reasons}


@flow(name="scheduled-mapping")
def scheduled_mapping(params: ScheduledMappingParams) -> list[dict]:
    """Map the scenes under the input prefix that have no map yet, with the champion model.

    Running it again maps nothing new: a scene counts as done once its metrics JSON exists
    (written last; the map, quicklook and STAC item are each placed atomically before it).
    With ``redo_with_new_model`` a scene mapped by another model version is mapped again.
    """
    logger = get_run_logger()
    alias_uri = f"models:/{params.model_name}@{params.alias}"
    # without redo_with_new_model no model is needed to find the new scenes (nor to do
    # nothing when there are none, even before the first champion exists)
    model_uri = registry.resolve(alias_uri) if params.redo_with_new_model else None
    scenes = unmapped_scenes(params.input_prefix, params.output_prefix, model_uri=model_uri)
    masks: dict[str, list[str]] = {}
    if params.mask_suffix:
        scenes, masks = masks_beside(scenes, params.mask_suffix)
    if not scenes:
        logger.info("No new scenes under %s", params.input_prefix)
        return []
    model_uri = model_uri or registry.resolve(alias_uri)
    logger.info("Mapping %d new scene(s) with %s", len(scenes), model_uri)
    return map_flow(
        MapFlowParams(
            model_uri=model_uri,
            output_uri=params.output_prefix,
            scenes=scenes,
            map=params.map,
            masks=masks,
        )
    )
