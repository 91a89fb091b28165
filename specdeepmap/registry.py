"""MLflow model registry: champion/challenger promotion by test mean IoU on the same chips.

A model version's test score is kept as its tag ``test_mean_iou``. A new version becomes
``champion`` only if there is none yet, or if it beats the current champion *scored on the new
run's test chips* by a margin, and it is not below the per-pixel RandomForest baseline scored on
those chips (tag ``below_baseline``); otherwise it becomes ``challenger``. Reviewers can still
move the aliases by hand in the MLflow UI.
"""

from __future__ import annotations

import math

CHAMPION, CHALLENGER = "champion", "challenger"


def promote_if_better(name: str, version: str, test_mean_iou: float,
                      baseline_mean_iou: float | None = None,
                      champion_mean_iou: float | None = None, min_improvement: float = 0.0,
                      client=None) -> str:
    """Tag ``version`` with its scores and give it ``champion`` or ``challenger``; return which.

    Fair promotion: ``champion_mean_iou`` is the current champion's pooled test mean IoU on
    the *same* test chips as ``test_mean_iou`` (see :func:`score_champion`); the new version
    wins only if it beats that by at least ``min_improvement``. Scores measured on different
    test sets are never compared: without ``champion_mean_iou`` an existing champion stays.
    With ``baseline_mean_iou`` (the RandomForest on the same chips) the version is tagged
    ``below_baseline``, and a version below the baseline is never made champion.
    """
    client = _client(client)
    client.set_model_version_tag(name, version, "test_mean_iou", f"{test_mean_iou:.6f}")
    if baseline_mean_iou is not None and not math.isnan(baseline_mean_iou):
        below = test_mean_iou < baseline_mean_iou
        client.set_model_version_tag(name, version, "baseline_rf_test_mean_iou",
                                     f"{baseline_mean_iou:.6f}")
        client.set_model_version_tag(name, version, "below_baseline", str(below).lower())
        if below:
            client.set_registered_model_alias(name, CHALLENGER, version)
            return CHALLENGER
    current = champion_version(name, client)
    if current is None or current == str(version):
        client.set_registered_model_alias(name, CHAMPION, version)
        return CHAMPION
    if champion_mean_iou is not None and not math.isnan(champion_mean_iou):
        client.set_model_version_tag(name, version, "champion_test_mean_iou_same_chips",
                                     f"{champion_mean_iou:.6f}")
        client.set_model_version_tag(name, version, "compared_with_version", current)
        if test_mean_iou >= champion_mean_iou + min_improvement:
            client.set_registered_model_alias(name, CHAMPION, version)
            return CHAMPION
    client.set_registered_model_alias(name, CHALLENGER, version)
    return CHALLENGER


def champion_version(name: str, client=None) -> str | None:
    """The version that holds ``champion`` (None when no version does)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(client).get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def score_champion(name: str, test_csv: str, new_model_uri: str, out_folder: str,
                   device: str = "auto", client=None) -> dict:
    """Score the current champion on the new run's test chips with the Tester's code.

    Returns ``{"version", "mean_iou", "reason"}``: ``mean_iou`` is None (and ``reason`` says
    why) when there is no champion or its input contract (bands, class values) differs from
    the new model's, since then the two cannot be scored on the same chips. Nothing is logged
    to the champion's own MLflow run (its figures there stay those of its own test set).
    """
    from specdeepmap.evaluation import evaluate_model
    from specdeepmap.inference import read_model_file

    version = champion_version(name, client)
    if version is None:
        return {"version": None, "mean_iou": None, "reason": "no champion yet"}
    champion_uri = f"models:/{name}/{version}"  # named so in the champion's test report
    champion, _ = read_model_file(champion_uri)
    new, _ = read_model_file(new_model_uri)
    for key in ("in_channels", "class_values"):
        if champion.get(key) != new.get(key):
            return {"version": version, "mean_iou": None,
                    "reason": f"champion version {version} has {key} = {champion.get(key)}, "
                    f"the new model {new.get(key)}: they cannot be scored on the same chips"}
    report = evaluate_model(test_csv, champion_uri, out_folder, device=device,
                            log_to_mlflow=False)
    return {"version": version, "mean_iou": report.metrics.mean_iou, "reason": ""}


def _client(client=None):
    import mlflow

    return client or mlflow.MlflowClient()


def describe_version(name: str, version: str, markdown: str, client=None) -> None:
    """Set the version's description (Markdown, shown on its page in the MLflow UI)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    client.update_model_version(name, version, description=markdown)


def version_description(summary: dict) -> str:
    """A version's description for the MLflow UI (Markdown): its pooled mean IoU beside the
    RandomForest baseline's and the previous champion's on the same chips. ``summary`` is the
    training pipeline's result."""
    def fmt(value):
        return "–" if value is None else f"{value:.4f}"

    return "\n".join([
        f"Trained by the training pipeline (MLflow run `{summary['run_id']}`); alias after "
        f"training: **{summary['alias']}**.", "",
        "| pooled mean IoU | this model | RandomForest baseline (per pixel, same chips) |",
        "|---|---|---|",
        f"| validation | {fmt(summary['best_val_iou'])} | "
        f"{fmt(summary['baseline_rf_val_mean_iou'])} |",
        f"| test | {fmt(summary['test_mean_iou'])} | "
        f"{fmt(summary['baseline_rf_test_mean_iou'])} |", "",
        f"Champion before this run: version {summary['champion_version'] or '–'}, pooled test "
        f"mean IoU on this run's test chips "
        f"{fmt(summary['champion_test_mean_iou_same_chips'])}."])


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
