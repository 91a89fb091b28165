"""MLflow model registry: champion/challenger promotion by test mean IoU.

A model version's test score is kept as its tag ``test_mean_iou``. A new version becomes
``champion`` only if it beats the current champion's score (or there is none) and is not below
the per-pixel RandomForest baseline scored on the same test chips (tag ``below_baseline``);
otherwise it becomes ``challenger``. Reviewers can still move the aliases by hand in the
MLflow UI.
"""

from __future__ import annotations

import math

CHAMPION, CHALLENGER = "champion", "challenger"


def promote_if_better(name: str, version: str, test_mean_iou: float,
                      baseline_mean_iou: float | None = None, client=None) -> str:
    """Tag ``version`` with its score and give it ``champion`` or ``challenger``; return which.

    With ``baseline_mean_iou`` (the RandomForest's pooled test mean IoU on the same chips) the
    version is tagged ``below_baseline`` true or false, and a version below the baseline is
    never made champion automatically.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    client.set_model_version_tag(name, version, "test_mean_iou", f"{test_mean_iou:.6f}")
    if baseline_mean_iou is not None and not math.isnan(baseline_mean_iou):
        below = test_mean_iou < baseline_mean_iou
        client.set_model_version_tag(name, version, "baseline_rf_test_mean_iou",
                                     f"{baseline_mean_iou:.6f}")
        client.set_model_version_tag(name, version, "below_baseline", str(below).lower())
        if below:
            client.set_registered_model_alias(name, CHALLENGER, version)
            return CHALLENGER
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    best = float(current.tags.get("test_mean_iou", "nan")) if current else math.nan
    if current is None or math.isnan(best) or test_mean_iou > best:
        client.set_registered_model_alias(name, CHAMPION, version)
        return CHAMPION
    client.set_registered_model_alias(name, CHALLENGER, version)
    return CHALLENGER


def describe_version(name: str, version: str, markdown: str, client=None) -> None:
    """Set the version's description (Markdown, shown on its page in the MLflow UI)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    client.update_model_version(name, version, description=markdown)


def resolve(model_uri: str, client=None) -> str:
    """Pin ``models:/NAME@ALIAS`` to ``models:/NAME/VERSION`` (other URIs unchanged).

    A scheduled run pins the alias once, so every scene of the run uses the same version even
    if a reviewer moves the alias meanwhile.
    """
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    import mlflow

    client = client or mlflow.MlflowClient()
    name, alias = model_uri[len("models:/"):].split("@", 1)
    version = client.get_model_version_by_alias(name, alias)
    return f"models:/{name}/{version.version}"
