"""Prefect flows: each reads like the pipeline it runs; the work is in ``specdeepmap``."""

from __future__ import annotations

import os
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import (
    ChipSettings,
    MapFlowParams,
    ScenePair,
    ScheduledMappingParams,
    SplitSettings,
    TrainingPipelineParams,
    TrainSettings,
)
from specdeepmap import registry, storage
from specdeepmap.mapping import output_uri_for, unmapped_scenes
from specdeepmap.tracking import ensure_experiment, tracking_uri
from specdeepmap.training import TrainConfig, TrainResult
from tasks import (champion_task, chip_task, evaluate_task, map_scene_task, promote_task,
                   split_task, train_task)

RUNS_DIR = os.environ.get("SPECDEEPMAP_RUNS_DIR", "runs")


@flow(name="chip", task_runner=ThreadPoolTaskRunner(max_workers=2))
def chip_flow(scenes: list[ScenePair], out_uri: str,
              chip: ChipSettings = ChipSettings()) -> list[dict]:
    """Chip one or more scenes into one folder (scenes in parallel)."""
    futures = [chip_task.submit(s.image_uri, s.label_uri, out_uri, chip.to_core(),
                                s.classes_uri) for s in scenes]
    return [{"scene": f.result().image_uri, "chips": f.result().chips} for f in futures]


@flow(name="split")
def split_flow(chip_folder: str, split: SplitSettings = SplitSettings()) -> dict:
    """Balanced train/validation/test CSVs, class weights and band statistics."""
    report = split_task(chip_folder, split.to_core())
    return {"chips": report.chips, "max_share_gap_pp": report.max_share_gap_pp}


@flow(name="train")
def train_flow(dataset_uri: str, train: TrainSettings = TrainSettings(),
               model_name: str = "specdeepmap-segmentation") -> TrainResult:
    """Train on a dataset folder, log to MLflow and register a new model version."""
    out = os.path.join(RUNS_DIR, "training", time.strftime("%Y%m%d-%H%M%S"))
    return train_task(TrainConfig(dataset=dataset_uri, out=out, registered_model=model_name,
                                  **train.model_dump()))


@flow(name="evaluate")
def evaluate_flow(test_csv: str, model_uri: str, out_uri: str) -> dict:
    """Test a model on a test CSV (metrics logged to the model's MLflow run)."""
    return evaluate_task(test_csv, model_uri, out_uri, None)


@flow(name="training-pipeline")
def training_pipeline(params: TrainingPipelineParams) -> dict:
    """chip → split → train → evaluate → score the champion on the same test chips →
    register as champion (if better by the margin and not below the baseline) or challenger."""
    params = TrainingPipelineParams.model_validate(params.model_dump())  # cross-field rules
    logger = get_run_logger()
    ensure_experiment(tracking_uri(), "specdeepmap")
    chips_uri = storage.join(params.work_uri, "chips")
    chip_flow(params.scenes, chips_uri, params.chip)
    split_flow(chips_uri, params.split)
    result = train_flow(chips_uri, params.train, params.model_name)
    test_csv = storage.join(chips_uri, "test_files.csv")
    evaluation_uri = storage.join(params.work_uri, "evaluation", f"v{result.model_version}")
    metrics = evaluate_task(test_csv, result.model_file, evaluation_uri, result.run_id,
                            result.baseline)
    champion = champion_task(params.model_name, test_csv, result.model_file,
                             storage.join(evaluation_uri, "champion"))
    alias = promote_task(params.model_name, result.model_version, metrics["test_mean_iou"],
                         metrics["baseline_rf_test_mean_iou"], champion, params.min_improvement)
    summary = {"model_uri": result.model_uri, "version": result.model_version, "alias": alias,
               "run_id": result.run_id, "best_val_iou": result.best_val_iou,
               "baseline_rf_val_mean_iou": result.baseline_mean_iou("validation"),
               "champion_version": champion["version"],
               "champion_test_mean_iou_same_chips": champion["mean_iou"], **metrics}
    registry.describe_version(params.model_name, result.model_version,
                              registry.version_description(summary))
    create_markdown_artifact(
        key="training-pipeline", description="Training pipeline result",
        markdown="\n".join(f"- **{k}**: {v}" for k, v in summary.items()) +
        f"\n- **MLflow**: {storage.redact(tracking_uri())} (run `{result.run_id}`)")
    logger.info("Model %s version %s (%s): test mean IoU %.4f", params.model_name,
                result.model_version, alias, metrics["test_mean_iou"])
    return summary


@flow(name="map-scenes")
def _map_scenes(scenes: list[str], model_uri: str, output_uri: str, params: MapFlowParams
                ) -> list[dict]:
    futures = [map_scene_task.submit(s, model_uri, output_uri_for(s, output_uri),
                                     params.map.to_core()) for s in scenes]
    return [f.result() for f in futures]


@flow(name="map")
def map_flow(params: MapFlowParams) -> list[dict]:
    """Map scenes (a list or every .tif under a prefix) in parallel, threads or Dask."""
    params = MapFlowParams.model_validate(params.model_dump())
    scenes = params.scenes or storage.list_files(params.input_prefix, ".tif")
    model_uri = registry.resolve(params.model_uri)
    if params.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=params.dask_address) if params.dask_address else \
            DaskTaskRunner(cluster_kwargs={"n_workers": params.max_workers,
                                           "threads_per_worker": 1})
    else:
        runner = ThreadPoolTaskRunner(max_workers=params.max_workers)
    return _map_scenes.with_options(task_runner=runner)(scenes, model_uri, params.output_uri,
                                                        params)


@flow(name="scheduled-mapping")
def scheduled_mapping(params: ScheduledMappingParams) -> list[dict]:
    """Map the scenes under the input prefix that have no map yet, with the champion model.

    Running it again maps nothing new: a scene counts as done once its class map exists (the
    map, metrics JSON and quicklook are each placed atomically).
    """
    logger = get_run_logger()
    scenes = unmapped_scenes(params.input_prefix, params.output_prefix)
    if not scenes:
        logger.info("No new scenes under %s", params.input_prefix)
        return []
    model_uri = registry.resolve(f"models:/{params.model_name}@{params.alias}")
    logger.info("Mapping %d new scene(s) with %s", len(scenes), model_uri)
    return map_flow(MapFlowParams(model_uri=model_uri, output_uri=params.output_prefix,
                                  scenes=scenes, map=params.map))
