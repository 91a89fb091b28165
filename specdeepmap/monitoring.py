"""Map-level figures per model version over time, as an MLflow run a reviewer can chart.

Each model version that maps production scenes gets one monitoring run (experiment
``specdeepmap-monitoring``, run name ``NAME vVERSION``, tags naming the version); every mapped
scene adds one step: its verdict (0 ok, 1 suspect), drift scores, masked share, mean
confidence and class shares, and a tag ``scene_STEP`` names the scene. MLflow's chart view
of the run then shows the figures across the scenes mapped so far.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specdeepmap.publishing import SceneProducts

log = logging.getLogger(__name__)

EXPERIMENT = "specdeepmap-monitoring"


def monitoring_run(client, model_uri: str) -> str:
    """The monitoring run of a model (created on first use); its id. ``client`` must be
    bound to the store that :func:`specdeepmap.tracking.tracking_uri` names.
    """
    from specdeepmap.tracking import ensure_experiment, tracking_uri

    ensure_experiment(tracking_uri(), EXPERIMENT)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`specdeepmap.model` = '{model_uri}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    name = model_uri.removeprefix("models:/").replace("/", " v")
    run = client.create_run(
        experiment_id,
        run_name=f"{name} monitoring",
        tags={
            "specdeepmap.model": model_uri,
            "mlflow.note.content": (
                f"Scenes mapped with {model_uri}: one step per scene (verdict 1 = suspect)."
            ),
        },
    )
    return run.info.run_id


def scene_metrics(product: SceneProducts, class_values: list[int]) -> dict[str, float]:
    """A mapped scene's figures as MLflow metrics (None scores left out)."""
    metrics = {
        "suspect": 1.0 if product.verdict == "suspect" else 0.0,
        "masked_share": float(product.masked_share),
        "mean_confidence": float(product.mean_confidence),
    }
    metrics |= {f"drift_{k}": float(v) for k, v in product.scores.items() if v is not None}
    metrics |= {
        f"class_share_{v}": float(s)
        for v, s in zip(class_values, product.class_shares, strict=True)
    }
    return metrics


def log_scenes(model_uri: str, products: list[SceneProducts], class_values: list[int]) -> str:
    """Add one step per mapped scene to the model's monitoring run; returns the run id.

    Scenes skipped (almost all masked) are counted in ``skipped_scenes`` only.
    """
    import time

    import mlflow
    from mlflow.entities import Metric

    from specdeepmap.tracking import tracking_uri

    # one store for every call: the one the environment names, even where an earlier
    # mlflow.set_tracking_uri in this process pointed MLflow elsewhere
    client = mlflow.MlflowClient(tracking_uri())
    run_id = monitoring_run(client, model_uri)
    history = client.get_metric_history(run_id, "suspect")
    step = max((m.step for m in history), default=-1) + 1
    now = int(time.time() * 1000)
    batch = []
    for product in products:
        if product.skipped:
            continue
        batch += [Metric(k, v, now, step) for k, v in scene_metrics(product, class_values).items()]
        client.set_tag(run_id, f"scene_{step}", product.input)
        step += 1
    skipped = sum(1 for p in products if p.skipped)
    if skipped:
        batch.append(Metric("skipped_scenes", float(skipped), now, step))
    for start in range(0, len(batch), 900):  # MLflow takes at most 1000 metrics per call
        client.log_batch(run_id, metrics=batch[start : start + 900])
    log.info("Logged %d scene(s) of %s to MLflow run %s", step, model_uri, run_id)
    return run_id
