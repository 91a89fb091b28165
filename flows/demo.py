"""The main job (``make run``): the training pipeline, then mapping, on the demo scene.

Embedded defaults: local folders, a SQLite MLflow store beside them, and Prefect's ephemeral
API (no server needed). Prints where the outputs are and how to open the UIs.

Usage: python -m flows.demo [--out runs/demo] [--epochs 8] [--verbose]
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    """Generate the demo scene, run training_pipeline and map_flow, print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--verbose", action="store_true", help="also show the libraries' warnings and INFO logs"
    )
    args = parser.parse_args()
    from specdeepmap.console import configure_console

    # progress: Prefect's flow and task runs; the ephemeral API sends no telemetry
    configure_console(args.verbose, progress=("prefect.flow_runs", "prefect.task_runs"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    out = os.path.abspath(args.out)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out}/mlflow.db")
    os.environ.setdefault("SPECDEEPMAP_RUNS_DIR", out)

    from flows.ephemeral import EphemeralAPIError, start_ephemeral_api

    try:
        start_ephemeral_api()
    except EphemeralAPIError as error:
        raise SystemExit(f"error: {error}") from None
    from flows.params import MapFlowParams, ScenePair, TrainingPipelineParams
    from flows.pipelines import map_flow, training_pipeline
    from specdeepmap.params import ChipParams, SplitParams, TrainParams
    from specdeepmap.sample_data import SampleScene, generate_scene

    folder = os.path.join(out, "scene")
    kept = SampleScene(
        os.path.join(folder, "demo_s2.tif"), os.path.join(folder, "demo_s2_labels.tif")
    )
    # the scene of seed 0 is always the same: a second run keeps the first's file, so that the
    # chips the chipper recorded for it stay valid (it refuses a replaced file of the same name)
    scene = (
        kept
        if os.path.exists(kept.image_uri) and os.path.exists(kept.label_uri)
        else generate_scene(folder, 1024, 1024, seed=0)
    )
    summary = training_pipeline(
        TrainingPipelineParams(
            scenes=[ScenePair(image_uri=scene.image_uri, label_uri=scene.label_uri)],
            work_uri=out,
            chip=ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64),
            split=SplitParams(scaler=10000),
            train=TrainParams(epochs=args.epochs),
        )
    )
    # the model just trained (it is champion only if it beat the champion and the baseline)
    maps = map_flow(
        MapFlowParams(
            model_uri=summary["model_uri"],
            output_uri=os.path.join(out, "maps"),
            scenes=[scene.image_uri],
            force=True,  # the demo maps its scene on every run
        )
    )
    uri = os.environ["MLFLOW_TRACKING_URI"]
    print(f"""
Model {summary["model_uri"]} ({summary["alias"]}): validation IoU {summary["best_val_iou"]:.3f}, \
test mean IoU {summary["test_mean_iou"]:.3f} (pooled pixels; RandomForest baseline \
{summary["baseline_rf_test_mean_iou"]:.3f} on the same chips)
Chips and dataset CSVs: {out}/chips
Test metrics:           {out}/evaluation/v{summary["version"]}
Class map (COG):        {maps[0]["classes"]}
Verdict of the scene:   {maps[0]["verdict"]} {"; ".join(maps[0]["reasons"])}
Quicklook:              {maps[0]["quicklook"]}
STAC item of the map:   {maps[0]["stac_item"]}
Model card:             MLflow run {summary["run_id"]}, artifact model_card/model_card.md
MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning)
Prefect UI:  .venv/bin/prefect server start   (then http://127.0.0.1:4200; this run used the
             ephemeral API, start the server before a run to keep its history there)
TensorBoard: .venv/bin/specdeepmap tensorboard --logdir {out}/training""")


if __name__ == "__main__":
    main()
