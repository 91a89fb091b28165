"""MLflow tracking: where runs go, what a training run logs beside its metrics, and the
registration of a trained model as a new model version.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

import numpy as np

from specdeepmap import __version__
from specdeepmap.baseline import BaselineResult, write_baseline
from specdeepmap.classes import ClassSchema
from specdeepmap.model_config import ModelConfig

log = logging.getLogger(__name__)

#: where a registered version's ONNX export is among its run's artifacts
ONNX_ARTIFACT = "onnx/model.onnx"
#: its int8 OpenVINO network (NNCF, calibrated on the version's training chips; the
#: weights beside it, model_int8.bin)
OPENVINO_INT8_ARTIFACT = "openvino/model_int8.xml"

EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {
    EXPERIMENT_KIND: "custom_model_development",
    "mlflow.note.content": "Segmentation models trained by specdeepmap: one run "
    "per training, with its RandomForest baseline, test results and model card.",
}
REGISTERED_MODEL_DESCRIPTION = """Semantic segmentation models trained by specdeepmap.

Aliases:
- **champion**: the version that maps production scenes. The scheduled mapping flow resolves
  it once per run, so moving it takes effect from the next scheduled run on; scenes already
  mapped are not redone unless the flow runs with `redo_with_new_model` (or a map's
  `*_metrics.json` is deleted).
- **challenger**: the latest version that did not replace the champion (not better on the
  same test chips by the required margin, below the RandomForest baseline, or waiting for a
  reviewer's approval).

Each version's description is its model card's summary; the whole card (data, input contract,
per-class results, prediction panels, training recipe) is the run artifact
`model_card/model_card.md`. Promote by hand with `specdeepmap promote NAME VERSION`."""


def tracking_uri(explicit: str | None = None) -> str:
    """MLflow tracking URI: explicit > $MLFLOW_TRACKING_URI > sqlite:///mlflow.db (embedded)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def ensure_experiment(uri: str, name: str) -> None:
    """Point MLflow at ``uri`` and create the experiment if needed.

    With an embedded ``sqlite:///PATH`` store the artifacts go beside the database
    (``mlartifacts/``), not into whatever folder the process happens to run in. The
    experiment is marked as model training, so MLflow 3's UI opens it on its runs and models
    rather than on the GenAI traces view.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):
            db = os.path.abspath(uri[len("sqlite:///") :])
            location = "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
        mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    elif experiment.tags.get(EXPERIMENT_KIND) != EXPERIMENT_TAGS[EXPERIMENT_KIND]:
        mlflow.MlflowClient().set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND]
        )


#: the child run that holds the RandomForest baseline's figures: its name and role tag
BASELINE_RUN_NAME = "RandomForest baseline"
ROLE_TAG = "specdeepmap.role"


def log_baseline(baseline: BaselineResult, folder: str, classes: ClassSchema | None = None) -> str:
    """Log the baseline in a child run of the active MLflow run ("RandomForest baseline"):
    its metrics (``baseline_rf_*``) and its files (``baseline/``).

    The model's own run keeps the model's figures and the comparison
    (``test_mean_iou_minus_baseline_rf*``), so the metrics a reviewer opens first are the
    model's; the forest's run is listed under it in the experiment and its id is the
    parent's tag ``baseline_run_id``. A continued training logs into the same child.
    Returns the child's run id.
    """
    import mlflow

    active = mlflow.active_run().info
    parent = active.run_id
    names = {v: classes.name(v) for v in baseline.class_values} if classes else None
    write_baseline(baseline, folder, classes=classes)
    existing = baseline_run_id(parent)
    with mlflow.start_run(
        run_id=existing,
        experiment_id=active.experiment_id,  # the parent's, not the process's current one
        run_name=None if existing else BASELINE_RUN_NAME,
        nested=True,
        tags=None if existing else {ROLE_TAG: "baseline"},
    ) as child:
        mlflow.log_metrics(baseline.mlflow_metrics(names))
        mlflow.log_artifacts(folder, artifact_path="baseline")
    mlflow.set_tag("baseline_run_id", child.info.run_id)
    return child.info.run_id


def baseline_run_id(run_id: str, client=None) -> str | None:
    """The id of the RandomForest baseline's child run of a training run (None: none)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    run = client.get_run(run_id)
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.`{ROLE_TAG}` = 'baseline'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def register_model(
    model_file: str,
    config: ModelConfig,
    name: str,
    val_iou: float,
    dataset: str,
    baseline_val_iou: float | None = None,
    dataset_digest: str | None = None,
) -> tuple[str, str]:
    """Log the model (MLflow pyfunc, code-defined, no pickles) and register a new version.

    Must run inside an active MLflow run (the model card, :mod:`specdeepmap.model_card`,
    becomes the version's description). Returns (``models:/NAME/VERSION``, version).
    """
    import mlflow

    from specdeepmap import mlflow_model
    from specdeepmap.mlm import publish_model_item

    height, width = config.tile_size
    example = np.zeros((1, config.in_channels, height, width), dtype=np.float32)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=mlflow_model.__file__,
        artifacts={"model_file": model_file},
        input_example=example,
        registered_model_name=name,
        pip_requirements=[f"specdeepmap=={__version__}"],
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in {
        "val_iou": f"{val_iou:.4f}",
        "dataset": dataset,
        "specdeepmap_version": config.version,
        "architecture": config.architecture,
        "backbone": config.backbone,
    }.items():
        client.set_model_version_tag(name, version, key, value)
    if dataset_digest:  # promotion checks that the test chips are still these
        client.set_model_version_tag(name, version, "dataset_digest", dataset_digest)
    if baseline_val_iou is not None:
        client.set_model_version_tag(
            name, version, "baseline_rf_val_mean_iou", f"{baseline_val_iou:.4f}"
        )
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    onnx_files = log_onnx_export(model_file, name, version, client)
    publish_model_item(name, version, config, os.path.basename(model_file), client, onnx_files)
    return f"models:/{name}/{version}", version


def log_onnx_export(model_file: str, name: str, version: str, client) -> dict[str, str]:
    """Log a new version's portable files with it, in its MLflow run (inside which this
    must run): its ONNX export (:data:`ONNX_ARTIFACT`, checked against torch on its test
    chips; tags ``onnx_agreement``, the share of pixels whose class agrees, and
    ``onnx_max_difference``, the largest probability difference) and its int8 OpenVINO
    network (:data:`OPENVINO_INT8_ARTIFACT` and its ``.bin``, calibrated **once**, on its
    training chips, and checked against the ONNX file; tag ``openvino_int8_agreement``). A
    file that cannot be made or disagrees is not logged, its tag (``onnx``,
    ``openvino_int8``) saying why; the version is registered all the same (its maps then
    make the file themselves). Returns the logged files' artifact paths, by precision.
    """
    import mlflow

    from specdeepmap.onnx_model import export_onnx
    from specdeepmap.openvino_model import onnx_config, write_int8

    def tag(key: str, value: str) -> None:
        client.set_model_version_tag(name, version, key, value)

    def why(error: Exception) -> str:
        return f"not exported: {type(error).__name__}: {str(error)[:300]}"

    logged = {}
    with tempfile.TemporaryDirectory(prefix="specdeepmap-onnx-") as folder:
        fp32 = os.path.join(folder, os.path.basename(ONNX_ARTIFACT))
        try:
            report = export_onnx(model_file, fp32)
        except Exception as error:  # noqa: BLE001 - an operator ONNX lacks, a disagreement
            log.warning("%s version %s: ONNX %s", name, version, why(error))
            tag("onnx", why(error))
            return logged
        mlflow.log_artifact(fp32, os.path.dirname(ONNX_ARTIFACT))
        tag("onnx", ONNX_ARTIFACT)
        tag("onnx_agreement", f"{report.agreement:.6f}")
        tag("onnx_max_difference", f"{report.max_difference:.2e}")
        logged["fp32"] = ONNX_ARTIFACT
        int8 = os.path.join(folder, "int8", os.path.basename(OPENVINO_INT8_ARTIFACT))
        os.makedirs(os.path.dirname(int8))
        try:  # an imported model has no training chips to calibrate on
            agreement = write_int8(fp32, int8, onnx_config(fp32, model_file)[0], model_file)
        except Exception as error:  # noqa: BLE001 - no chips, a disagreement, an operator
            log.warning("%s version %s: int8 %s", name, version, why(error))
            tag("openvino_int8", why(error))
            return logged
        mlflow.log_artifacts(os.path.dirname(int8), os.path.dirname(OPENVINO_INT8_ARTIFACT))
        tag("openvino_int8", OPENVINO_INT8_ARTIFACT)
        tag("openvino_int8_agreement", f"{agreement:.6f}")
        logged["int8"] = OPENVINO_INT8_ARTIFACT
    return logged


def register_imported(
    model_file: str, config: ModelConfig, name: str, card: str, uri: str | None = None
) -> str:
    """Register an imported model (:mod:`specdeepmap.foreign`) in its own MLflow run, with
    its card as the run's ``model_card/model_card.md`` and the version's description.

    Returns ``models:/NAME/VERSION``.
    """
    import mlflow

    ensure_experiment(tracking_uri(uri), "specdeepmap")
    source = config.imported_from["file"]
    with mlflow.start_run(
        experiment_id=mlflow.get_experiment_by_name("specdeepmap").experiment_id,
        run_name=f"import {os.path.basename(source)}",
        tags={"mlflow.source.name": "specdeepmap import", "imported_from": source},
    ):
        mlflow.log_text(card, "model_card/model_card.md")
        found = re.search(r"val_iou_(\d+\.\d+)", os.path.basename(source))
        model_uri, version = register_model(
            model_file, config, name, float(found.group(1)) if found else float("nan"), ""
        )
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, "imported_from", source)
    client.update_model_version(name, version, description=card)
    return model_uri
