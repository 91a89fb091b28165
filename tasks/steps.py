"""Prefect tasks: one per pipeline step, each a few lines around a core function."""

from __future__ import annotations

import json
from dataclasses import replace

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.tasks import exponential_backoff

from specdeepmap import registry, storage
from specdeepmap.baseline import summary_metrics
from specdeepmap.chipping import ChipReport, chip_scene
from specdeepmap.evaluation import TestFigures, evaluate_model
from specdeepmap.leakage import Leakage
from specdeepmap.metrics import never_predicted
from specdeepmap.model_card import escape_md, publish_model_card
from specdeepmap.monitoring import log_scenes
from specdeepmap.params import ChipParams, MapParams, SplitParams
from specdeepmap.publishing import SceneProducts, map_scene_products
from specdeepmap.registry import ChampionScore, Promotion
from specdeepmap.splitting import SplitReport, check_split_before_chipping, make_dataset
from specdeepmap.training import TrainConfig, TrainResult, train

#: the event a suspect map emits (automations react to it: see prefect.yaml)
SUSPECT_EVENT = "specdeepmap.map.suspect"


def retry_transient(task, task_run, state) -> bool:
    """Retry what a retry can fix (network, timeouts, throttling, 5xx), never bad input."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - classified by the storage layer
        return storage.is_transient(error)
    return False


RETRIES = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
)
# Re-runs skip finished work in the core itself (chips and maps that exist are kept), which
# stays right when outputs are deleted or scenes are added; a Prefect input-hash cache would
# not notice either. Results are persisted so a retried flow run can reuse finished tasks.
PERSIST = dict(persist_result=True)


def _table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape_md(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@task(name="check labels", **RETRIES)
def check_labels_task(label_uris: list[str], chip: ChipParams, split: SplitParams) -> int:
    """Before chipping: the labels hold two classes or more and admit a split that meets the
    class-share rule (else the run stops here, with the reason, and nothing is written).
    """
    windows = check_split_before_chipping(label_uris, chip, split)
    get_run_logger().info("Labels checked: %d chip windows, a valid split exists", windows)
    return windows


@task(name="chip scene", **RETRIES, **PERSIST)
def chip_task(
    image_uri: str, label_uri: str, out_uri: str, params: ChipParams, classes_uri: str | None = None
) -> ChipReport:
    """Raster Splitter on one scene; artifact: chip counts and class distribution."""
    report = chip_scene(image_uri, label_uri, out_uri, params, classes_uri=classes_uri)
    total = sum(v for k, v in report.class_counts.items() if k) or 1
    names = report.class_names
    create_markdown_artifact(
        key="chips",
        description=f"Chips of {image_uri}",
        markdown=f"**{report.chips} chips** in `{out_uri}` ({report.written} new, "
        f"{report.reused} kept, {report.below_coverage} below coverage)\n\n"
        + _table(
            [
                (k, names.get(k, k), v, f"{v / total:.1%}")
                for k, v in sorted(report.class_counts.items())
                if k
            ],
            ("value", "class", "pixels", "share"),
        ),
    )
    return report


@task(name="split dataset", **RETRIES, **PERSIST)
def split_task(chip_folder: str, params: SplitParams) -> SplitReport:
    """Dataset Maker; artifact: chips per set and split quality."""
    report = make_dataset(chip_folder, params)
    leakage = Leakage.from_dict(report.leakage)
    create_markdown_artifact(
        key="split",
        description=f"Split of {chip_folder}",
        markdown=_table([(k, v) for k, v in report.chips.items()], ("set", "chips"))
        + f"\n\nLargest class-share gap **{report.max_share_gap_pp:.2f} pp**, "
        f"Jensen-Shannon divergence {report.js_divergence:.2e} (strategy {report.strategy})."
        f"\n\n**Spatial leakage**: {leakage.sentence()}"
        + (
            f" {report.buffer_chips} chips touching a validation or test chip were left out of "
            "training."
            if report.buffer_chips
            else ""
        )
        + "".join(f"\n\n- warning: {escape_md(w)}" for w in report.warnings),
    )
    return report


@task(name="train model", **RETRIES, **PERSIST)
def train_task(config: TrainConfig) -> TrainResult:
    """Deep Learning Trainer; artifact: best validation IoU and the registered version."""
    result = train(config)
    rows = [("best val IoU (pooled; it chose the checkpoint)", f"{result.best_val_iou:.4f}")]
    if result.val_epoch_median is not None:
        rows.append(
            (
                f"median val IoU of the {result.val_epochs} validated epochs",
                f"{result.val_epoch_median:.4f}",
            )
        )
    if result.member_val_ious:  # an ensemble
        rows.append(
            ("members' best val IoU", ", ".join(f"{v:.4f}" for v in result.member_val_ious))
        )
    if result.distilled_from_val_iou is not None:
        rows.append(
            (
                "val IoU of the ensemble it was distilled from",
                f"{result.distilled_from_val_iou:.4f}",
            )
        )
    if result.baseline_mean_iou("validation") is not None:
        rows.append(
            ("RandomForest baseline val IoU", f"{result.baseline_mean_iou('validation'):.4f}")
        )
    rows += [
        ("epochs", result.epochs_run),
        ("MLflow run", result.run_id),
        ("model", result.model_uri),
        ("checkpoint", result.best_checkpoint),
    ]
    create_markdown_artifact(
        key="training", description="Training result", markdown=_table(rows, ("", ""))
    )
    return result


@task(name="evaluate model", **RETRIES, **PERSIST)
def evaluate_task(
    test_csv: str, model_uri: str, out_uri: str, run_id: str | None, baseline: dict | None = None
) -> TestFigures:
    """Deep Learning Tester; artifact: per-class metrics beside the RandomForest baseline's
    (``baseline``: :meth:`BaselineResult.summary`). Returns the figures the next steps use.
    """
    forest = summary_metrics(baseline, "test")
    report = evaluate_model(test_csv, model_uri, out_uri, mlflow_run_id=run_id, baseline=forest)
    m = report.metrics
    forest_iou = forest.iou if forest is not None else [float("nan")] * len(m.class_values)
    text = (
        f"Mean IoU **{m.mean_iou:.4f}** (pooled pixels), "
        f"{report.per_chip_mean_iou:.4f} (per-chip mean, SpecDeepMap)"
    )
    if forest is not None:
        text += f"; RandomForest baseline **{forest.mean_iou:.4f}** on the same chips"
    if report.versus_baseline is not None:
        text += ". " + report.versus_baseline.sentence("The model", "the RandomForest")
    if report.split_leakage is not None and report.split_leakage.leaks:
        text += f"\n\n**The split leaks**: {report.split_leakage.sentence()}"
    missing = never_predicted(m)
    if missing:
        text += "\n\n¹ never predicted on these chips: its precision is 0 (no prediction of it)"
    rows = [
        (
            f"{c} {escape_md(report.class_names.get(c, ''))}".strip(),
            f"{i:.3f}",
            f"{b:.3f}",
            f"{p:.3f}" + ("¹" if c in missing else ""),
            f"{r:.3f}",
        )
        for c, i, b, p, r in zip(
            m.class_values, m.iou, forest_iou, m.precision, m.recall, strict=True
        )
    ]
    create_markdown_artifact(
        key="evaluation",
        description=f"Test metrics of {model_uri}",
        markdown=text
        + "\n\n"
        + _table(rows, ("class", "IoU", "RandomForest IoU", "precision", "recall")),
    )
    return TestFigures.of(report, forest)


@task(name="score champion", **RETRIES)
def champion_task(
    name: str,
    test_csv: str,
    new_model_uri: str,
    out_uri: str,
    new_evaluation_uri: str | None = None,
) -> ChampionScore:
    """The current champion scored on the new run's test chips (fair comparison); with the
    new model's Tester output folder, also the difference with its interval over the chips.
    """
    chips = units = None
    if new_evaluation_uri:
        tested = json.loads(
            storage.read_text(storage.join(new_evaluation_uri, "test_metrics.json"))
        )
        chips, units = tested.get("chip_confusion_matrices"), tested.get("chip_units")
    score = registry.score_champion(
        name, test_csv, new_model_uri, out_uri, new_chip_matrices=chips, chip_units=units
    )
    if score.mean_iou is None and score.version is not None:
        get_run_logger().warning("Champion not compared: %s", score.reason)
    return score


@task(name="promote model")
def promote_task(
    name: str,
    version: str,
    tested: TestFigures,
    champion: ChampionScore,
    min_improvement: float = 0.0,
    mode: str = "auto",
) -> Promotion:
    """Apply the promotion rule (champion on the same test chips, margin, baseline) in
    ``mode`` auto, approval or none; artifact: the comparison, with how sure the test chips
    make each difference. The promotion's alias is None in mode none.
    """
    decision = registry.promote_if_better(
        name,
        version,
        tested.mean_iou,
        tested.forest_mean_iou,
        champion.mean_iou,
        min_improvement,
        mode,
    )
    alias = {"auto": decision.alias, "approval": registry.CHALLENGER}.get(mode)

    def fmt(value):
        return "–" if value is None else f"{value:.4f}"

    comparison = _table(
        [
            (f"version {version} (new)", fmt(tested.mean_iou)),
            (
                f"champion version {champion.version or '–'}",
                fmt(champion.mean_iou) + (f" ({champion.reason})" if champion.reason else ""),
            ),
            ("RandomForest baseline", fmt(tested.forest_mean_iou)),
            ("required margin over the champion", f"{min_improvement:.3f}"),
        ],
        ("pooled test mean IoU on the new run's test chips", ""),
    )
    sentences = [
        difference.sentence(f"Version {version}", other)
        for difference, other in (
            (champion.difference, "the champion"),
            (tested.versus_forest, "the RandomForest"),
        )
        if difference
    ]
    if tested.split_leakage is not None and tested.split_leakage.leaks:
        sentences.append(
            "**The split leaks**, so these test figures overstate every model on "
            "new areas: " + tested.split_leakage.sentence()
        )
    if sentences:
        comparison += "\n\n" + "\n".join(f"- {s}" for s in sentences)
    create_markdown_artifact(
        key="promotion",
        description=f"Promotion of {name} version {version}",
        markdown=f"Version {version}: **{alias or 'no alias'}** (mode {mode}; the rule says "
        f"{decision.alias}: {decision.reason}).\n\n{comparison}",
    )
    get_run_logger().info(
        "%s version %s: %s (mode %s; rule: %s)",
        name,
        version,
        alias or "no alias",
        mode,
        decision.reason,
    )
    return Promotion(alias, decision.reason, comparison)


@task(name="model card", **RETRIES)
def model_card_task(
    name: str,
    result: TrainResult,
    dataset: str,
    evaluation_uri: str,
    tested: TestFigures,
    champion: ChampionScore,
    promotion: Promotion,
) -> str:
    """The version's model card with its test results, prediction panels and comparison;
    its summary becomes the version's description.
    """
    scores = replace(
        result.card_scores(),
        test=tested.mean_iou,
        baseline_test=tested.forest_mean_iou,
        baseline_difference=tested.versus_forest,
        champion_version=champion.version,
        champion_test=champion.mean_iou,
        champion_difference=champion.difference,
        alias=promotion.alias or "none",
        alias_reason=promotion.reason,
    )
    champion = champion.version
    others = (
        {f"champion v{champion}": f"models:/{name}/{champion}"}
        if champion and str(champion) != str(result.model_version)
        else None
    )
    return publish_model_card(
        name,
        result.model_version,
        result.run_id,
        result.model_file,
        dataset,
        scores,
        result.card_table(),
        evaluation_uri,
        storage.join(dataset, "test_files.csv"),
        others=others,
    )


@task(name="map scene", **RETRIES)
def map_scene_task(
    input_uri: str,
    model_uri: str,
    output_uri: str,
    params: MapParams,
    mask_uris: list[str] | None = None,
    quarantine: bool = True,
) -> SceneProducts:
    """Deep Learning Mapper on one scene, with its verdict; a suspect map goes to quarantine
    (with ``quarantine``) and is announced as the Prefect event ``specdeepmap.map.suspect``.
    """
    products = map_scene_products(
        input_uri,
        model_uri,
        output_uri,
        params,
        mask=params.quality_mask(mask_uris or []),
        quarantine=quarantine,
    )
    if products.skipped:
        get_run_logger().warning("%s not mapped: %s", input_uri, products.skipped)
    elif products.verdict == "suspect":
        get_run_logger().warning("%s: suspect map (%s)", input_uri, "; ".join(products.reasons))
        emit_event(
            event=SUSPECT_EVENT,
            resource={
                "prefect.resource.id": f"specdeepmap.map.{products.classes}",
                "prefect.resource.name": storage.basename(products.classes),
            },
            payload={
                "scene": input_uri,
                "model": model_uri,
                "map": products.classes,
                "quarantined": products.quarantined,
                "reasons": products.reasons,
                "scores": products.scores,
            },
        )
    rows = [
        (k, v)
        for k, v in products.to_dict().items()
        if k not in ("scores", "class_shares") and v is not None
    ]
    create_markdown_artifact(
        key="map",
        description=f"Map of {input_uri}",
        markdown=_table([(k, escape_md(str(v))) for k, v in rows], ("output", "value")),
    )
    return products


@task(name="log scenes to MLflow", **RETRIES)
def monitor_task(model_uri: str, products: list[SceneProducts]) -> str | None:
    """One step per mapped scene in the model version's MLflow monitoring run."""
    if not model_uri.startswith("models:/") or not products:
        return None  # a model file has no registry version to monitor
    from specdeepmap.inference import load_model

    class_values = load_model(model_uri, "cpu").class_values
    return log_scenes(model_uri, products, class_values)


__all__ = [
    "check_labels_task",
    "chip_task",
    "split_task",
    "train_task",
    "evaluate_task",
    "champion_task",
    "promote_task",
    "model_card_task",
    "map_scene_task",
    "monitor_task",
]
