"""Model card: what a model version was trained on, what it expects, how well it does and how
it was trained, for the reviewer who decides in the MLflow UI whether it maps production scenes.

The card is Markdown: ``model_card/model_card.md`` in the version's MLflow run (with the
confusion matrix and sample prediction panels beside it) and, shortened to its summary, the
model version's description. :func:`dataset_facts` also gives the dataset's digest, which
training logs with ``mlflow.log_input`` so the run's page shows the dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from specdeepmap import storage
from specdeepmap.chipping import COUNT_PREFIX, read_manifests
from specdeepmap.classes import ClassSchema, schema_from_config
from specdeepmap.comparison import Difference
from specdeepmap.data import resolve_row
from specdeepmap.leakage import Leakage, read_split_leakage
from specdeepmap.model_config import ModelConfig
from specdeepmap.splitting import read_csv

CARD_FOLDER = "model_card"
SPLITS = ("train", "validation", "test")


def dataset_facts(dataset: str) -> dict:
    """Chips per split, class shares per split, chip and split parameters and a digest of the
    chip manifests and split CSVs (the same chips give the same digest).
    """
    digest = hashlib.sha256()
    frames = {}
    for split in SPLITS:
        uri = storage.join(dataset, f"{split}_files.csv")
        if storage.exists(uri):
            text = storage.read_text(uri)
            digest.update(text.encode())
            frames[split] = pd.read_csv(io.StringIO(text))
    manifests = read_manifests(dataset)
    if manifests is not None:
        digest.update(manifests.sort_values(["scene", "y", "x"]).to_csv(index=False).encode())
    split_uri = storage.join(dataset, "split.json")
    split_params = (
        json.loads(storage.read_text(split_uri)).get("params", {})
        if storage.exists(split_uri)
        else {}
    )
    facts = {
        "uri": dataset,
        "digest": digest.hexdigest()[:16],
        "chips": {s: len(f) for s, f in frames.items()},
        "split_params": split_params,
        "class_shares": {},
        "chip_params": {},
        "scenes": [],
    }
    if manifests is not None:
        counts = manifests.set_index("mask")[
            [c for c in manifests.columns if c.startswith(COUNT_PREFIX) and c != "count_0"]
        ]
        for split, frame in frames.items():
            chosen = counts.reindex(frame["mask"]).sum()
            total = chosen.sum()
            if total > 0:
                facts["class_shares"][split] = {
                    int(c[len(COUNT_PREFIX) :]): float(v / total) for c, v in chosen.items()
                }
        first = manifests.iloc[0]
        facts["chip_params"] = {
            "tile_size": [int(first["tile_x"]), int(first["tile_y"])],
            "step": [int(first["stride_x"]), int(first["stride_y"])],
            "min_coverage": float(first["min_coverage"])
            if "min_coverage" in manifests and not pd.isna(first["min_coverage"])
            else None,
        }
        facts["scenes"] = sorted(manifests["scene"].unique().tolist())
    leakage = read_split_leakage(dataset)
    if leakage is not None:
        facts["leakage"] = leakage.to_dict()
    return facts


def dataset_frame(dataset: str) -> pd.DataFrame:
    """The chips of a dataset with their split (what ``mlflow.log_input`` records)."""
    rows = []
    for split in SPLITS:
        uri = storage.join(dataset, f"{split}_files.csv")
        if storage.exists(uri):
            rows.append(read_csv(uri).assign(split=split))
    return (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=["image", "mask", "split"])
    )


def escape_md(text: object) -> str:
    """User text (class and band names, paths) made inert in Markdown and HTML.

    No tags, no links, no emphasis, no table breaks; control characters and newlines become spaces.
    """
    text = re.sub(r"[\x00-\x1f\x7f]", " ", str(text))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else escape_md(value)


def _code(text: object) -> str:
    """Text for inside a Markdown code span (no backticks, no line breaks)."""
    return re.sub(r"[\x00-\x1f\x7f`]", "'", str(text))


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _band_stat(values, i: int) -> float | None:
    """A band's mean or std (None where the band has no valid pixels or no statistics)."""
    return None if values is None or values[i] is None else float(values[i])


@dataclass(frozen=True)
class CardScores:
    """The figures a model card's summary shows beside the model; any may be unknown (None).

    The validation IoU chose the checkpoint (the best of ``val_epochs`` validated epochs,
    their median ``val_median``), so on a few validation chips it overstates the model; the
    test figures compare it fairly with the forest and the champion, on the same chips.
    """

    val: float | None = None  #: pooled validation mean IoU of the chosen checkpoint
    test: float | None = None  #: pooled test mean IoU
    baseline_val: float | None = None  #: the RandomForest's, same validation chips
    baseline_test: float | None = None  #: the RandomForest's, same test chips
    baseline_forest: str | None = None  #: which forest (:func:`baseline.describe_forest`)
    baseline_difference: Difference | None = None  #: this model − the forest, test chips
    champion_version: str | None = None
    champion_test: float | None = None  #: the champion's on the same test chips
    champion_difference: Difference | None = None  #: this model − the champion
    alias: str | None = None  #: the alias the version got after training
    alias_reason: str = ""
    run_id: str | None = None
    val_epochs: int = 0
    val_median: float | None = None


def summary(config: ModelConfig, facts: dict, scores: CardScores) -> str:
    """The card's summary (the model version's description): what the model is, its scores
    beside the RandomForest's and the champion's on the same chips, and the alias it got.

    The validation IoU chose the checkpoint (the best of the validated epochs), so on a few
    validation chips it overstates the model: on the shared EnMAP set the best epoch scored
    0.04 above the median one, while test IoU hardly differed between epochs. The card says
    so beside the median, and points to the test chips for the comparison with the forest,
    which was not chosen on them.
    """
    classes = schema_from_config(config)
    names = ", ".join(escape_md(classes.name(v)) for v in config.class_values)
    bands = config.band_names or []
    band_text = f"{config.in_channels} bands" + (
        f" ({escape_md(bands[0])} … {escape_md(bands[-1])})" if len(bands) > 1 else ""
    )
    champion = scores.champion_version
    lines = [
        f"**{config.architecture} / {config.backbone}** for "
        f"{len(config.class_values)} classes ({names}) from {band_text}, "
        f"{config.tile_size[0]} × {config.tile_size[1]} px chips.",
        "",
    ]
    header = ["pooled mean IoU", "this model", "RandomForest (same chips)"]
    rows = [
        ["validation", scores.val, scores.baseline_val],
        ["test", scores.test, scores.baseline_test],
    ]
    if champion:
        header.append(f"champion v{champion} (same chips)")
        rows[0].append(None)
        rows[1].append(scores.champion_test)
    lines += _table(header, rows) + [""]
    if scores.baseline_forest:
        lines += [f"The RandomForest: {scores.baseline_forest}.", ""]  # our words
    for difference, other in (
        (scores.baseline_difference, "the RandomForest"),
        (scores.champion_difference, f"champion v{champion}"),
    ):
        if difference:
            lines += [difference.sentence("This model", other), ""]
    if facts.get("leakage"):  # how honest the comparison is
        leakage = Leakage.from_dict(facts["leakage"])
        lines += [
            ("**The split leaks**: " if leakage.leaks else "Split: ") + leakage.sentence(),
            "",
        ]
    if scores.val_median is not None and scores.val_epochs > 1:
        lines += [
            f"The validation IoU chose this checkpoint, the best of {scores.val_epochs}"
            f" validated epochs (their median: {_fmt(scores.val_median)}), so it "
            "overstates the model on these chips; the test chips, used neither in "
            "training nor in choosing, compare it fairly with the forest.",
            "",
        ]
    if scores.alias:
        lines.append(
            f"Alias after training: **{scores.alias}**"
            + (f" ({scores.alias_reason})" if scores.alias_reason else "")
            + "."
        )
    chips = facts.get("chips", {})
    lines.append(
        f"Trained on `{_code(facts.get('uri'))}` (digest `{facts.get('digest')}`; chips "
        f"train/validation/test {'/'.join(str(chips.get(s, 0)) for s in SPLITS)})"
        + (f", MLflow run `{scores.run_id}`" if scores.run_id else "")
        + f". Full model card: run artifact `{CARD_FOLDER}/model_card.html` (with its images; "
        "`model_card.md`: the text)."
    )
    return "\n".join(lines)


def model_card(
    config: ModelConfig,
    facts: dict,
    scores: CardScores,
    training: dict,
    test: dict | None = None,
    images: list[str] | None = None,
) -> str:
    """The whole card (Markdown).

    Args:
        config: the model file's config (bands, normalisation, classes, architecture).
        facts: :func:`dataset_facts`.
        scores: as for :func:`summary`.
        training: recipe switches and run facts (epochs, wall time, device, software).
        test: the Tester's ``test_metrics.json`` summary (per-class rows), if tested.
        images: file names of images beside the card (confusion matrix, prediction panels).
    """
    classes = schema_from_config(config)
    lines = ["# Model card", "", "## Summary", "", summary(config, facts, scores), ""]
    lines += _data_section(facts, classes, list(config.class_values))
    lines += _input_section(config)
    lines += _results_section(test, classes, list(config.class_values))
    for image in images or []:
        lines += ["", f"![{image}]({image})"]
    lines += ["", "## Training", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in training.items()]
    lines += [
        f"- weights: {config.weights}, frozen encoder: {config.freeze_backbone}",
        f"- spectral front-end channels: {config.spectral_channels}, encoder "
        f"depth: {config.encoder_depth}",
        f"- software: specdeepmap {config.version}",
    ]
    return "\n".join(lines) + "\n"


def _data_section(facts: dict, classes: ClassSchema, values: list[int]) -> list[str]:
    """The dataset: where it is, its digest, scenes, chip and split parameters, class shares
    per split and chips per split.
    """
    lines = [
        "## Data",
        "",
        f"- dataset: `{_code(facts.get('uri'))}`, digest `{facts.get('digest')}` (chip "
        "manifests and split CSVs)",
        f"- scenes: {', '.join(f'`{_code(s)}`' for s in facts.get('scenes', [])) or '–'}",
        f"- chip parameters: {json.dumps(facts.get('chip_params', {}))}",
        f"- split parameters: {json.dumps(facts.get('split_params', {}))}",
        "",
    ]
    shares = facts.get("class_shares", {})
    if shares:
        lines += _table(
            ["class", "value", *[f"{s} share" for s in SPLITS if s in shares]],
            [
                [
                    classes.name(v),
                    v,
                    *[f"{shares[s].get(v, 0.0):.1%}" for s in SPLITS if s in shares],
                ]
                for v in values
            ],
        ) + [""]
    chips = facts.get("chips", {})
    return lines + _table(["split", "chips"], [[s, chips.get(s, 0)] for s in SPLITS]) + [""]


def _input_section(config: ModelConfig) -> list[str]:
    """What a scene must be for this model: bands, dtype, chip size, scaler, statistics."""
    norm = config.normalization
    bands = config.band_names or [f"band {i + 1}" for i in range(config.in_channels)]
    mean, std = norm.get("mean"), norm.get("std")
    lines = [
        "## Input contract",
        "",
        f"- {config.in_channels} bands, dtype {config.dtype or '–'}, chips of "
        f"{config.tile_size[0]} × {config.tile_size[1]} px",
        f"- scaler: {norm.get('scaler')} (pixel values are divided by it first); "
        f"nodata: {norm.get('nodata')}",
        "",
    ]
    return lines + _table(
        ["band", "name", "mean", "std"],
        [[i + 1, name, _band_stat(mean, i), _band_stat(std, i)] for i, name in enumerate(bands)],
    )


def _results_section(test: dict | None, classes: ClassSchema, values: list[int]) -> list[str]:
    """The Tester's figures, per class beside the RandomForest's, when the version was tested."""
    lines = ["", "## Results", ""]
    if not test:
        return lines + ["Not tested yet (the training pipeline tests every version)."]
    lines += [
        f"Test mean IoU **{_fmt(test.get('mean_iou_pooled'))}** pooled over "
        f"pixels, {_fmt(test.get('mean_iou_per_chip_specdeepmap'))} per-chip mean "
        f"(SpecDeepMap's), overall accuracy {_fmt(test.get('overall_accuracy'))}.",
        "",
    ]
    per_class = {r["Class"]: r for r in test.get("per_class", [])}
    baseline = test.get("baseline_rf_iou") or [None] * len(values)
    return lines + _table(
        ["class", "value", "IoU", "precision", "recall", "RandomForest IoU"],
        [
            [
                classes.name(v),
                v,
                per_class.get(v, {}).get("IoU"),
                per_class.get(v, {}).get("Precision"),
                per_class.get(v, {}).get("Recall"),
                b,
            ]
            for v, b in zip(values, baseline, strict=True)
        ],
    )


def prediction_panels(
    test_csv: str,
    predictor,
    png_uri: str,
    count: int = 4,
    others: dict[str, object] | None = None,
) -> str | None:
    """A PNG of a few test chips: image (three bands), label, this model's prediction and, side
    by side, each of ``others`` (label → predictor, e.g. the champion's), in the classes'
    colours, with a legend of the class names. The chips shown are those with the most
    classes (ties: CSV order).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    frame = read_csv(test_csv)
    if frame.empty:
        return None
    folder = storage.parent(test_csv)
    pairs = [
        (resolve_row(folder, i), resolve_row(folder, m))
        for i, m in zip(frame["image"], frame["mask"], strict=True)
    ]
    labels = []
    for _, mask in pairs:
        with storage.open_raster(mask) as src:
            labels.append(src.read(1))
    order = sorted(range(len(pairs)), key=lambda i: -len(np.unique(labels[i][labels[i] > 0])))
    chosen = order[:count]
    images = []
    for i in chosen:
        with storage.open_raster(pairs[i][0]) as src:
            images.append(src.read())
    models = {"this model": predictor, **(others or {})}
    predictions = {name: model.predict_classes(np.stack(images)) for name, model in models.items()}
    classes: ClassSchema = predictor.classes
    columns = 2 + len(models)
    fig, axes = plt.subplots(
        len(chosen), columns, figsize=(2.5 * columns, 2.5 * len(chosen) + 0.6), squeeze=False
    )
    for row, i in enumerate(chosen):
        truth = labels[i]
        panels = [("image", _rgb(images[row], predictor)), ("label", _colour(truth, classes))]
        for name, predicted in predictions.items():  # unlabelled pixels are not judged
            panels.append((name, _colour(np.where(truth == 0, 0, predicted[row]), classes)))
        for col, (title, panel) in enumerate(panels):
            axes[row, col].imshow(panel, interpolation="nearest")
            axes[row, col].set_axis_off()
            axes[row, col].set_title(
                f"{title}: {storage.stem(pairs[i][0])}" if col == 0 else title, fontsize=7
            )
    legend = [
        Patch(color=np.array(classes.info(v).color) / 255, label=classes.name(v))
        for v in predictor.class_values
    ]
    fig.legend(handles=legend, loc="lower center", ncol=min(6, len(legend)), fontsize=7)
    fig.tight_layout(rect=(0, 0.6 / (2.5 * len(chosen) + 0.6), 1, 1))
    with storage.atomic_output(png_uri) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return png_uri


def _rgb(image: np.ndarray, predictor) -> np.ndarray:
    """Three bands, each stretched to its 2-98 % range (red, green, blue by band name where
    known, else three bands spread over the spectrum).
    """
    names = [n.upper() for n in predictor.config.band_names or []]
    wanted = ("B04", "B03", "B02")
    if all(w in names for w in wanted):
        picks = [names.index(w) for w in wanted]
    else:
        n = image.shape[0]
        picks = [min(n - 1, round(n * f)) for f in (0.6, 0.35, 0.1)] if n >= 3 else [0] * 3
    rgb = image[picks].astype(np.float32)
    low = np.percentile(rgb, 2, axis=(1, 2), keepdims=True)  # per band, as GIS quicklooks
    high = np.percentile(rgb, 98, axis=(1, 2), keepdims=True)
    return np.moveaxis(np.clip((rgb - low) / np.maximum(high - low, 1e-6), 0, 1), 0, -1)


def _colour(labels: np.ndarray, classes: ClassSchema) -> np.ndarray:
    out = np.full((*labels.shape, 3), 255, dtype=np.uint8)  # unlabelled: white
    for value in np.unique(labels[labels > 0]):
        out[labels == value] = classes.info(int(value)).color
    return out


def png_data_uri(path: str, max_width: int | None = None) -> str:
    """A PNG file as a ``data:`` URI, which MLflow's HTML view and Prefect's Markdown show
    without a file server behind them.

    With ``max_width``: a wider image is scaled down and stored with a 256-colour palette
    (class maps and panels are flat colours), so that it fits in a Prefect form or artifact.
    """
    import base64
    import io

    if max_width is None:
        with open(path, "rb") as handle:
            data = handle.read()
    else:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.width > max_width:
                height = round(image.height * max_width / image.width)
                image = image.resize((max_width, height), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.quantize(256).save(buffer, format="PNG", optimize=True)
            data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def panels_markdown(run_id: str, client=None, max_width: int = 900) -> str:
    """The card's prediction panels of a run (test chips: image, label, this version's map and
    the champion's side by side, with the class legend) as an embedded Markdown image, for a
    review request that shows the maps where the reviewer decides; '' when the run has none.
    """
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    with tempfile.TemporaryDirectory(prefix="specdeepmap-panels-") as folder:
        try:
            path = client.download_artifacts(run_id, f"{CARD_FOLDER}/prediction_panels.png", folder)
        except (MlflowException, OSError):
            return ""
        return (
            "**Test chips: the label, this version's map and the champion's, side by side**"
            f"\n\n![prediction panels]({png_data_uri(path, max_width)})"
        )


def card_html(card: str, folder: str) -> str:
    """The card as one HTML page with its images embedded (``data:`` URIs).

    MLflow's artifact view renders an HTML artifact, images and all, but shows a Markdown
    artifact as text, where ``![…](x.png)`` stays a file name; the HTML card is what a
    reviewer reads in the MLflow UI.
    """
    import html
    import os

    import markdown

    def inline(found: re.Match) -> str:
        path = os.path.join(folder, found.group(2))
        if not os.path.isfile(path):
            return found.group(0)
        return f"![{found.group(1)}]({png_data_uri(path)})"

    body = markdown.markdown(
        re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, card), extensions=["tables"]
    )
    title = html.escape(card.splitlines()[0].lstrip("# ")) if card else "Model card"
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60em;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
        "img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{style}</style></head><body>{body}</body></html>"
    )


def publish_model_card(
    name: str,
    version: str,
    run_id: str,
    model_uri: str,
    dataset: str,
    scores: CardScores,
    training: dict,
    test_folder: str | None = None,
    test_csv: str | None = None,
    facts: dict | None = None,
    client=None,
    others: dict[str, str] | None = None,
) -> str:
    """Write the card of a model version and show it in MLflow; returns the Markdown.

    The card and its images go to the run's ``model_card/`` artifacts (replacing an earlier
    card of the same run); its summary becomes the version's description. ``test_folder``
    (the Tester's output) adds the test results and confusion matrix, ``test_csv`` sample
    prediction panels (beside this model's, those of ``others``: label → model URI, e.g. the
    champion's). ``facts``: :func:`dataset_facts` when the caller has them already.
    """
    import tempfile

    import mlflow

    from specdeepmap.inference import load_model

    client = client or mlflow.MlflowClient()
    predictor = load_model(model_uri, "cpu")
    facts = facts or dataset_facts(dataset)
    test, images = None, []
    with tempfile.TemporaryDirectory(prefix="specdeepmap-card-") as folder:
        if test_folder:
            test = json.loads(storage.read_text(storage.join(test_folder, "test_metrics.json")))
            for image in ("confusion_matrix.png", "class_iou.png"):
                uri = storage.join(test_folder, image)
                if storage.exists(uri):
                    storage.download(uri, storage.join(folder, image))
                    images.append(image)
        compared = {label: load_model(uri, "cpu") for label, uri in (others or {}).items()}
        if test_csv and prediction_panels(
            test_csv, predictor, storage.join(folder, "prediction_panels.png"), others=compared
        ):
            images.append("prediction_panels.png")
        card = model_card(predictor.config, facts, scores, training, test, images)
        storage.write_text(storage.join(folder, "model_card.md"), card)
        storage.write_text(storage.join(folder, "model_card.html"), card_html(card, folder))
        client.log_artifacts(run_id, folder, artifact_path=CARD_FOLDER)
    client.update_model_version(name, version, description=summary(predictor.config, facts, scores))
    return card
