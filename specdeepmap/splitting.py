"""Dataset Maker: balanced train/validation/test CSVs, class weights and band statistics.

Reads a chip folder (``images/`` and ``labels/`` with identical names, as the Raster Splitter
writes) and writes, with SpecDeepMap's names and columns:

* ``train_files.csv``, ``validation_files.csv``, ``test_files.csv``: ``image,mask`` rows with
  paths relative to the folder;
* ``Summary_train_val.csv``: per-class pixel counts and shares of each set, the class training
  weight, the scaler and the background flag (plus the achieved split quality);
* ``Normalize_Bands.csv``: per-band mean and std of the training chips (after the scaler,
  nodata excluded), computed in one streaming pass with float64 accumulators;
* ``split.json``: the parameters, the split quality and the code version.

SpecDeepMap's defects fixed here: the class inventory covers every chip (not just the first
file), any class values work (not only 1..N), chips are listed in sorted order (the same split
on every machine), nodata is excluded before scaling, and the balancing search compares class
distributions, reaches a closer match and reports it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from specdeepmap import __version__, storage
from specdeepmap.balancing import assign, quality, set_counts
from specdeepmap.chipping import (
    CHIP_NAME,
    COUNT_PREFIX,
    label_to_classes,
    label_windows,
    read_manifests,
)
from specdeepmap.errors import (
    EmptyDatasetError,
    InputMismatchError,
    InvalidLabelError,
    MissingInputError,
    SplitInfeasibleError,
    UnreadableInputError,
)
from specdeepmap.leakage import (
    TEST,
    TRAIN,
    UNUSED,
    VALIDATION,
    Leakage,
    measure,
    spatial_blocks,
    touch_groups,
    touching_other_sets,
    touching_pairs,
)
from specdeepmap.params import ChipParams, SplitParams

log = logging.getLogger(__name__)

SET_NAMES = ("train", "validation", "test")
CSV_NAMES = {
    "train": "train_files.csv",
    "validation": "validation_files.csv",
    "test": "test_files.csv",
}
SUMMARY_CSV = "Summary_train_val.csv"
NORMALIZE_CSV = "Normalize_Bands.csv"
LEAKAGE_CSV = "Split_leakage.csv"
STRATEGIES = ("balanced-groups", "balanced", "spatial-blocks")


@dataclass
class SplitReport:
    """What :func:`make_dataset` wrote and how good the split is."""

    folder: str
    chips: dict[str, int]
    class_values: list[int]
    background: bool
    max_share_gap_pp: float
    js_divergence: float
    class_weights: dict[int, float]
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  #: legal but surprising inputs
    #: validation and test chips touching a training chip (:meth:`Leakage.to_dict`)
    leakage: dict = field(default_factory=dict)
    #: training chips left out because they touch a validation or test chip
    buffer_chips: int = 0
    strategy: str = ""  #: the strategy that chose the sets (see SplitChoice.note)


def chip_class_counts(folder: str, workers: int = 4) -> pd.DataFrame:
    """One row per chip pair: ``chip``, ``scene``, ``x``, ``y`` and ``count_<value>`` columns.

    Uses the chipper's manifests where they cover the chips on disk, and reads the label chips
    otherwise (chips made by SpecDeepMap itself have no manifest).
    """
    label_uris = storage.list_files(storage.join(folder, "labels"), ".tif")
    image_names = {
        storage.basename(u) for u in storage.list_files(storage.join(folder, "images"), ".tif")
    }
    if not label_uris and not image_names:
        raise EmptyDatasetError(
            f"No chips in {folder}: expected images/*.tif and labels/*.tif "
            "(run `specdeepmap chip` first)"
        )
    names = [storage.basename(u) for u in label_uris]
    missing = sorted(image_names - set(names))
    if missing:
        raise MissingInputError(
            f"{len(missing)} image chip(s) in {folder}/images have no label "
            f"chip in {folder}/labels, e.g. {missing[0]}"
        )
    orphans = sorted(set(names) - image_names)
    if orphans:
        raise MissingInputError(
            f"{len(orphans)} label chip(s) in {folder}/labels have no image "
            f"chip in {folder}/images, e.g. {orphans[0]}"
        )
    manifest = read_manifests(folder)
    if manifest is not None and set(names) <= set(manifest["chip"]):
        frame = manifest[manifest["chip"].isin(names)].drop_duplicates("chip", keep="last")
        return frame.sort_values("chip").reset_index(drop=True)

    def count(uri: str) -> dict:
        with storage.open_raster(uri) as src:
            labels = label_to_classes(src.read(1), src.nodata)
            width, height = src.width, src.height
        values, counts = np.unique(labels, return_counts=True)
        match = CHIP_NAME.match(storage.basename(uri))
        row = {
            "chip": storage.basename(uri),
            "tile_x": width,
            "tile_y": height,
            "scene": match["scene"] if match else "",
            "x": int(match["x"]) if match else 0,
            "y": int(match["y"]) if match else 0,
        }
        row.update({f"{COUNT_PREFIX}{int(v)}": int(n) for v, n in zip(values, counts, strict=True)})
        return row

    with storage.gdal_env(), ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(count, label_uris))
    frame = pd.DataFrame(rows)
    columns = [c for c in frame.columns if c.startswith(COUNT_PREFIX)]
    frame[columns] = frame[columns].fillna(0).astype("int64")
    return frame


def _class_columns(frame: pd.DataFrame) -> tuple[list[int], bool]:
    values = sorted(
        int(c[len(COUNT_PREFIX) :]) for c in frame.columns if c.startswith(COUNT_PREFIX)
    )
    background = 0 in values and int(frame[f"{COUNT_PREFIX}0"].sum()) > 0
    return [v for v in values if v != 0], background


def split_units(
    frame: pd.DataFrame, params: SplitParams, pairs: np.ndarray | None = None
) -> np.ndarray:
    """The unit each chip is assigned with (0, 1, …).

    The chip itself (``balanced``), its spatial block (``spatial-blocks``), or its group of touching
    chips (``balanced-groups``, :func:`group_units`); the chips of a unit always go to the same set.
    """
    if params.strategy == "balanced":
        return np.arange(len(frame))
    if params.strategy == "balanced-groups":
        return group_units(frame, params, pairs)
    return spatial_blocks(frame, params.block_size)


def max_group_size(frame: pd.DataFrame, params: SplitParams) -> int:
    """The most chips one unit of ``balanced-groups`` may hold at first.

    Half the smallest evaluation set (at least 4), so that every set can be made of several units.
    """
    evaluation = [p for p in (params.validation_percent, params.test_percent) if p > 0]
    smallest = min(evaluation) / 100 if evaluation else 1.0
    return max(4, int(len(frame) * smallest / 2))


def group_units(
    frame: pd.DataFrame,
    params: SplitParams,
    pairs: np.ndarray | None = None,
    max_group: int | None = None,
) -> np.ndarray:
    """Units of ``balanced-groups``.

    Chips connected through touching chips form a group; a group larger than ``max_group`` chips
    (default :func:`max_group_size`) is cut into square blocks of the chip grid (``b`` × ``b``
    steps, ``b² ≤ max_group``). Chips that touch across a cut are separated afterwards by leaving
    the training side out (:func:`_assign_units`).
    """
    groups = touch_groups(frame, pairs)
    max_group = max_group_size(frame, params) if max_group is None else max_group
    large = np.bincount(groups)[groups] > max_group
    if not large.any():
        return groups
    b = max(1, math.isqrt(max_group))
    tile_x = frame["tile_x"].to_numpy(np.int64) if "tile_x" in frame else np.full(len(frame), 256)
    step_x = (
        frame["stride_x"].fillna(0).to_numpy(np.int64)
        if "stride_x" in frame
        else np.zeros(len(frame), np.int64)
    )
    step_y = (
        frame["stride_y"].fillna(0).to_numpy(np.int64)
        if "stride_y" in frame
        else np.zeros(len(frame), np.int64)
    )
    step_x = np.where(step_x > 0, step_x, tile_x)
    step_y = np.where(step_y > 0, step_y, step_x)
    bx = frame["x"].to_numpy(np.int64) // (b * step_x)
    by = frame["y"].to_numpy(np.int64) // (b * step_y)
    keys = [
        (int(g), int(x), int(y)) if cut else (int(g), -1, -1)
        for g, x, y, cut in zip(groups, bx, by, large, strict=True)
    ]
    return pd.factorize(pd.Series(keys))[0]


#: ``balanced-groups`` keeps at least this share of the training chips a plain split gives;
#: below it (chips too few and too close, e.g. 18 touching chips) it splits as ``balanced``
#: and says so, since a model trained on a third of the chips is worse than a leaky figure
MIN_TRAINING_KEPT = 0.5


@dataclass(frozen=True)
class SplitChoice:
    """The sets :func:`split_chips` chose, their quality, and the strategy that chose them."""

    sets: np.ndarray
    quality: object
    strategy: str
    pairs: np.ndarray  #: the touching chip pairs (:func:`touching_pairs`), found once
    note: str | None = None  #: why another strategy than the one asked for was used


def split_chips(frame: pd.DataFrame, class_values: list[int], params: SplitParams) -> SplitChoice:
    """Set index (0 train, 1 validation, 2 test, 3 unused) of every chip, and its quality.

    ``balanced-groups`` assigns whole groups of touching chips (cutting only groups too large
    to balance, along the chip grid, and keeping touching units on one side where the class
    balance allows: :func:`specdeepmap.balancing.assign` with the units' adjacency), then
    leaves out the training chips that touch a validation or test chip. When the classes are
    too concentrated for that, it cuts the groups finer, down to single chips, and keeps the
    split that leaks least (then loses fewest training chips): a class whose every chip
    touches another set's keeps just enough training chips for the class-share rule, and the
    leak that remains is measured and reported (:mod:`specdeepmap.leakage`). When even that
    keeps fewer than :data:`MIN_TRAINING_KEPT` of the training chips, the plain split is used
    with a note.
    """
    pairs = touching_pairs(frame)
    if params.strategy != "balanced-groups":
        sets, achieved = _assign_units(
            frame, class_values, params, split_units(frame, params), pairs
        )
        return SplitChoice(sets, achieved, params.strategy, pairs)
    labelled = frame[[f"{COUNT_PREFIX}{v}" for v in class_values]].to_numpy().sum(axis=1)
    best, error, limit = None, None, max_group_size(frame, params)
    while True:
        try:
            sets, achieved = _assign_units(
                frame, class_values, params, group_units(frame, params, pairs, limit), pairs
            )
        except SplitInfeasibleError as failed:
            error = failed
        else:
            leak = measure(frame, sets, labelled, pairs)
            score = (
                leak.validation.touching_pixels + leak.test.touching_pixels,
                int((sets == UNUSED).sum()),
            )
            if best is None or score < best[0]:
                best = (score, sets, achieved)
            if score[0] == 0:
                break
        if limit <= 1:
            break
        limit //= 2
        log.info("Cutting groups of touching chips into blocks of at most %d chip(s)", limit)
    wanted = set_counts(len(frame), params.fractions)[0]
    kept = int((best[1] == TRAIN).sum()) if best else 0
    if best is not None and kept >= MIN_TRAINING_KEPT * wanted:
        return SplitChoice(best[1], best[2], params.strategy, pairs)
    plain = params.model_copy(update={"strategy": "balanced"})
    sets, achieved = _assign_units(frame, class_values, plain, split_units(frame, plain), pairs)
    why = (
        f"a split without spatial leakage would keep only {kept} of {wanted} training chips"
        if best is not None
        else f"no split without spatial leakage exists ({error})"
    )
    return SplitChoice(
        sets,
        achieved,
        "balanced",
        pairs,
        note=(
            f"{why}: split as 'balanced' (SpecDeepMap's) instead, with the leakage reported. Cut "
            "the chips with a step larger than the tile, or add scenes, for an honest split"
        ),
    )


def unit_adjacency(items: np.ndarray, pairs: np.ndarray):
    """(units, units) sparse matrix: how many touching chip pairs join two units."""
    from scipy.sparse import coo_matrix

    n = int(items.max()) + 1
    a, b = items[pairs[:, 0]], items[pairs[:, 1]]
    keep = a != b
    a, b = a[keep], b[keep]
    ones = np.ones(2 * len(a))
    return coo_matrix((ones, (np.r_[a, b], np.r_[b, a])), shape=(n, n)).tocsr()


def _buffer(
    sets: np.ndarray, counts: np.ndarray, pairs: np.ndarray, min_share: float
) -> np.ndarray:
    """Leave out the training chips that touch a validation or test chip.

    Where that would leave a class below ``min_share`` of its pixels in training, keep the touching
    chips richest in that class until it is not (the least leak the class-share rule allows).
    """
    touching = touching_other_sets(sets, pairs, TRAIN, (VALIDATION, TEST))
    sets = sets.copy()
    sets[touching] = UNUSED
    need = min_share * counts.sum(axis=0) - 1e-9
    held = counts[sets == TRAIN].sum(axis=0)
    for c in range(counts.shape[1]):
        candidates = [int(i) for i in np.flatnonzero(touching) if counts[i, c] > 0]
        candidates.sort(key=lambda i: -counts[i, c])
        for i in candidates:
            if held[c] >= need[c]:
                break
            if sets[i] == UNUSED:
                sets[i] = TRAIN
                held += counts[i]
    return sets


def _assign_units(
    frame: pd.DataFrame,
    class_values: list[int],
    params: SplitParams,
    items: np.ndarray,
    pairs: np.ndarray,
) -> tuple[np.ndarray, object]:
    """Assign units (chips, blocks or groups.

    ``items``) to sets with the class-balancing search; with ``balanced-groups``, leave out the
    training chips that touch a validation or test chip. Raises :class:`SplitInfeasibleError` when
    the class-share rule cannot hold.
    """
    counts = frame[[f"{COUNT_PREFIX}{v}" for v in class_values]].to_numpy(np.float64)
    fractions = params.fractions
    n_items = items.max() + 1
    item_counts = np.zeros((n_items, counts.shape[1]))
    np.add.at(item_counts, items, counts)
    sizes = np.bincount(items, minlength=n_items).astype(float)
    n_sets = sum(f > 0 for f in fractions)
    for k, value in enumerate(class_values):
        holders = int((item_counts[:, k] > 0).sum())
        if holders < n_sets:
            unit = {"balanced": "chip(s)", "spatial-blocks": "spatial block(s)"}.get(
                params.strategy, "chip(s)"
            )
            raise SplitInfeasibleError(
                f"Class {value} occurs in only {holders} {unit}, too rare to appear in each of "
                f"the {n_sets} sets: add data with class {value}, merge it into another class "
                "or relabel it as 0 (unlabelled)."
            )
    item_sets = assign(
        item_counts,
        fractions,
        seed=params.seed,
        min_share=params.min_class_share,
        sizes=sizes,
        max_seconds=params.max_search_seconds,
        adjacency=unit_adjacency(items, pairs) if params.strategy == "balanced-groups" else None,
    )
    sets = item_sets[items]
    if params.strategy == "balanced-groups":  # the buffer: no evaluation chip touches training
        sets = _buffer(sets, counts, pairs, params.min_class_share)
    achieved = quality(counts, sets, 3, params.min_class_share)
    if not achieved.min_share_ok:
        totals = counts.sum(axis=0)
        for s, name in enumerate(SET_NAMES):
            if not (sets == s).any():
                continue
            held = counts[sets == s].sum(axis=0)
            short = np.flatnonzero(held < params.min_class_share * totals)
            if len(short):
                value = class_values[short[0]]
                raise SplitInfeasibleError(
                    f"No split gives the {name} set {params.min_class_share:.0%} of the pixels "
                    f"of class {value} (best: {held[short[0]] / totals[short[0]]:.2%}): the "
                    "class is too rare or too concentrated in a few chips. Add data, merge or "
                    "relabel the class, or change the percentages."
                )
    return sets, achieved


def check_split_before_chipping(
    label_uris: list[str], chip: ChipParams, params: SplitParams
) -> int:
    """Refuse, before any chip is cut, a split the labels cannot give: the label rasters'
    chip windows (:func:`specdeepmap.chipping.label_windows`) must hold at least two classes
    and admit a split that meets the class-share rule. Returns the number of windows kept.
    """
    frame = pd.concat([label_windows(uri, chip) for uri in label_uris], ignore_index=True)
    where = ", ".join(label_uris)
    if frame.empty:
        raise EmptyDatasetError(
            f"No chip window of {where} reaches the minimum labelled share "
            f"of {chip.min_coverage} %: lower min_coverage or check the "
            "labels"
        )
    class_values, _ = _class_columns(frame)
    if len(class_values) < 2:
        raise InvalidLabelError(
            f"The labels of {where} hold a single class "
            f"({class_values}) in the chips that would be kept: "
            "segmentation needs at least two classes"
        )
    try:
        split_chips(frame, class_values, params)  # the sets are chosen again after chipping
    except SplitInfeasibleError as error:
        raise SplitInfeasibleError(
            f"Checked before chipping {where} with chips of {chip.tile_size[0]} px: {error}"
        ) from None
    return len(frame)


def class_weights(train_counts: np.ndarray, method: str) -> np.ndarray:
    """Per-class training weights.

    ``one-minus-share`` is SpecDeepMap's ``1 − n_c / Σ n``; ``inverse-frequency`` is
    ``Σ n / (K · n_c)`` (scikit-learn's "balanced"). Classes absent from training get 0.
    """
    total = train_counts.sum()
    present = train_counts > 0
    if method == "inverse-frequency":
        k = max(int(present.sum()), 1)
        weights = np.where(present, total / (k * np.maximum(train_counts, 1)), 0.0)
    else:
        weights = np.where(present, 1.0 - train_counts / max(total, 1), 0.0)
    return weights


def band_statistics(
    image_uris: list[str], scaler: float | None, workers: int = 4
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Per-band mean and population std over all valid pixels of the chips, in one pass.

    Each chip contributes (count, mean, M2) per band in float64, merged with Chan's parallel
    update, so the result is exact without a second pass or a cancelling sum of squares.
    Pixels equal to the band's nodata value are excluded (compared before scaling). Bands that
    are nodata everywhere get NaN.
    """
    if not image_uris:
        raise EmptyDatasetError("No training chips to compute band statistics from")

    def chip_moments(uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None]:
        with storage.open_raster(uri) as src:
            data = src.read().astype(np.float64)
            nodata = src.nodata
        data = data.reshape(data.shape[0], -1)
        valid = np.isfinite(data)
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            valid &= data != nodata
        if scaler:
            data /= scaler
        n = valid.sum(axis=1).astype(np.float64)
        total = np.where(valid, data, 0.0).sum(axis=1)
        mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
        m2 = np.where(valid, (data - mean[:, None]) ** 2, 0.0).sum(axis=1)
        return n, mean, m2, nodata

    count = mean = m2 = None
    nodata = None
    with storage.gdal_env(), ThreadPoolExecutor(workers) as pool:
        for n_b, mean_b, m2_b, chip_nodata in pool.map(chip_moments, image_uris):
            nodata = chip_nodata  # the chips share their nodata value: the last one's is kept
            if count is None:
                count, mean, m2 = n_b, mean_b, m2_b
                continue
            if len(n_b) != len(count):
                raise EmptyDatasetError(
                    f"Image chips have {len(count)} and {len(n_b)} bands: "
                    "all chips of a dataset must have the same bands"
                )
            merged = count + n_b
            delta = mean_b - mean
            safe = np.where(merged > 0, merged, 1)
            mean = mean + delta * n_b / safe
            m2 = m2 + m2_b + delta**2 * count * n_b / safe
            count = merged
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(m2 / count)
    mean = np.where(count > 0, mean, np.nan)
    std = np.where(count > 0, std, np.nan)
    return mean, std, nodata


def _rows(chips: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({"image": "images/" + chips, "mask": "labels/" + chips})


def _format_scaler(scaler: float | None) -> str:
    if not scaler:
        return "None"
    return str(int(scaler)) if float(scaler).is_integer() else str(scaler)


def summary_table(
    frame: pd.DataFrame,
    sets: np.ndarray,
    class_values: list[int],
    background: bool,
    params: SplitParams,
    achieved,
) -> pd.DataFrame:
    """``Summary_train_val.csv`` as SpecDeepMap writes it, plus two split-quality columns."""
    counts = frame[[f"{COUNT_PREFIX}{v}" for v in class_values]].to_numpy(np.int64)
    table = {"Class ID": class_values}
    per_set = {}
    for s, (title, name) in enumerate(zip(("Train", "Validation", "Test"), SET_NAMES, strict=True)):
        held = counts[sets == s].sum(axis=0)
        per_set[name] = held
        total = held.sum()
        table[f"{title} Count"] = held
        table[f"{title} Percentage"] = np.round(held / total * 100, 2) if total else 0.0
    table["Class Train Weight"] = np.round(
        class_weights(per_set["train"], params.class_weighting), 4
    )
    table["Scaler"] = _format_scaler(params.scaler)
    table["Ignored Background : Class Zero"] = "Yes" if background else "No"
    table["Max Class Share Gap (pp)"] = round(achieved.max_share_gap_pp, 4)
    table["Jensen-Shannon Divergence"] = round(achieved.js_divergence, 6)
    return pd.DataFrame(table)


def normalize_table(mean: np.ndarray, std: np.ndarray, scaler: float | None) -> pd.DataFrame:
    """``Normalize_Bands.csv``: SpecDeepMap's column order (std before mean), 1-based bands."""
    table = pd.DataFrame({"Band_Number": np.arange(1, len(mean) + 1), "std": std, "mean": mean})
    if scaler:
        table["std and mean already scaled by scaler"] = _format_scaler(scaler)
    return table


def make_dataset(
    folder: str,
    params: SplitParams = SplitParams(),
    out_folder: str | None = None,
    workers: int = 4,
    progress: Callable[[str], None] | None = None,
) -> SplitReport:
    """Split a chip folder into train/validation/test sets (Dataset Maker).

    Args:
        folder: chip folder URI holding ``images/`` and ``labels/``.
        params: percentages, seed, scaler, normalisation, strategy and weighting.
        out_folder: where the CSVs go; defaults to ``folder``. CSV rows are relative to the
            folder the CSV lies in (SpecDeepMap's convention), so a different output folder
            gets absolute chip URIs instead.
        workers: threads reading chips.
        progress: optional callback receiving a short status line per stage.

    Returns:
        A :class:`SplitReport`.
    """
    started = time.perf_counter()
    say = progress or (lambda message: None)
    say("reading class counts")
    frame = chip_class_counts(folder, workers)
    class_values, background = _class_columns(frame)
    counts = frame[[f"{COUNT_PREFIX}{v}" for v in class_values]].to_numpy()
    if not class_values or counts.sum() == 0:
        raise EmptyDatasetError(
            f"The label chips in {folder}/labels hold no labelled pixels "
            "(every value is 0 = unlabelled)"
        )
    if len(class_values) == 1:
        raise InvalidLabelError(
            f"The label chips in {folder}/labels hold a single class (value {class_values[0]}; "
            "0 is unlabelled): a segmentation model needs at least two classes to tell apart. "
            "Label the other land covers too."
        )
    say(f"checking {len(frame)} image chips")
    check_image_chips([storage.join(folder, "images", c) for c in frame["chip"]], workers)
    say(f"balancing {len(frame)} chips over classes {class_values}")
    choice = split_chips(frame, class_values, params)
    if choice.note:
        log.warning(choice.note)
        say(f"warning: {choice.note}")
    return write_split(
        folder,
        frame,
        choice.sets,
        params,
        out_folder,
        workers,
        progress,
        started,
        notes=[choice.note] if choice.note else [],
        strategy=choice.strategy,
        pairs=choice.pairs,
    )


def write_split(
    folder: str,
    frame: pd.DataFrame,
    sets: np.ndarray,
    params: SplitParams,
    out_folder: str | None = None,
    workers: int = 4,
    progress: Callable[[str], None] | None = None,
    started: float | None = None,
    notes: list[str] | None = None,
    strategy: str | None = None,
    pairs: np.ndarray | None = None,
) -> SplitReport:
    """Write the CSVs, band statistics and ``split.json`` of a chosen split.

    :func:`make_dataset` chooses the sets; a caller that chooses them otherwise (the folds of
    a cross-validation) writes them here in the same formats.

    Args:
        folder: chip folder URI holding ``images/`` and ``labels/``.
        frame: :func:`chip_class_counts` of the folder.
        sets: set index of every row of ``frame`` (0 train, 1 validation, 2 test, 3 unused).
        params: the scaler, normalisation and class weighting (percentages are not used).
        out_folder: as in :func:`make_dataset`.
        workers: as in :func:`make_dataset`.
        progress: as in :func:`make_dataset`.
        started: ``time.perf_counter()`` when the work began (for the report's seconds).
        notes: warnings the choice of the sets gave (kept with the others).
        strategy: the strategy that chose the sets, when not ``params.strategy``.
        pairs: the chips' :func:`touching_pairs`, when already found.
    """
    started = time.perf_counter() if started is None else started
    out_folder = out_folder or folder
    say = progress or (lambda message: None)
    class_values, background = _class_columns(frame)
    counts = frame[[f"{COUNT_PREFIX}{v}" for v in class_values]].to_numpy(np.float64)
    achieved = quality(counts, sets, 3, params.min_class_share)
    log.info("Split quality: %s", achieved.sentence())
    pairs = touching_pairs(frame) if pairs is None else pairs
    leakage = measure(frame, sets, counts.sum(axis=1), pairs)
    used = strategy or params.strategy
    buffer_chips = (
        int(touching_other_sets(sets, pairs, UNUSED, (VALIDATION, TEST)).sum())
        if used == "balanced-groups"
        else 0
    )
    warnings = [
        *(notes or []),
        *split_warnings(sets, params),
        *leakage_warnings(leakage, buffer_chips, used, len(frame)),
    ]
    _say_warnings(warnings, say)
    summary = summary_table(frame, sets, class_values, background, params, achieved)
    texts = _split_texts(folder, out_folder, frame, sets, summary, leakage, params, workers, say)
    outputs = {}
    for key, (name, text) in texts.items():
        outputs[key] = storage.join(out_folder, name)
        storage.write_text(outputs[key], text)
    weights = dict(zip(class_values, summary["Class Train Weight"].astype(float), strict=True))
    report = SplitReport(
        folder=folder,
        chips={n: int((sets == s).sum()) for s, n in enumerate(SET_NAMES)},
        class_values=class_values,
        background=background,
        max_share_gap_pp=achieved.max_share_gap_pp,
        js_divergence=achieved.js_divergence,
        class_weights=weights,
        outputs=outputs,
        seconds=time.perf_counter() - started,
        warnings=warnings,
        leakage=leakage.to_dict(),
        buffer_chips=buffer_chips,
        strategy=used,
    )
    record = {"params": params.model_dump(), "report": asdict(report), "version": __version__}
    outputs["run"] = storage.join(out_folder, "split.json")
    storage.write_text(outputs["run"], json.dumps(record, indent=2, default=str))
    _log_split(report.chips, len(frame))
    return report


def _split_texts(
    folder: str,
    out_folder: str,
    frame: pd.DataFrame,
    sets: np.ndarray,
    summary: pd.DataFrame,
    leakage: Leakage,
    params: SplitParams,
    workers: int,
    say: Callable[[str], None],
) -> dict[str, tuple[str, str]]:
    """Every file of the split by key: (file name, CSV text). Everything is computed before
    anything is written, so a failure (a corrupt chip met by the band statistics) leaves the
    previous split whole instead of new lists beside old statistics.
    """
    chips = frame["chip"]
    prefix = "" if out_folder == folder else folder.rstrip("/") + "/"
    texts = {}
    for s, name in enumerate(SET_NAMES):
        rows = _rows(chips[sets == s].sort_values())
        if prefix:
            rows = prefix + rows
        texts[name] = (CSV_NAMES[name], rows.to_csv(index=False, lineterminator="\n"))
    texts["summary"] = (SUMMARY_CSV, summary.to_csv(index=False, lineterminator="\n"))
    texts["leakage"] = (
        LEAKAGE_CSV,
        leakage_table(leakage).to_csv(index=False, lineterminator="\n"),
    )
    if params.normalize:
        say("computing band statistics")
        train_uris = [storage.join(folder, "images", c) for c in chips[sets == 0].sort_values()]
        mean, std, _ = band_statistics(train_uris, params.scaler, workers)
        texts["normalize"] = (
            NORMALIZE_CSV,
            normalize_table(mean, std, params.scaler).to_csv(index=False, lineterminator="\n"),
        )
    return texts


def _say_warnings(warnings: list[str], say: Callable[[str], None]) -> None:
    for message in warnings:
        log.warning(message)
        say(f"warning: {message}")


def _log_split(chips: dict[str, int], total: int) -> None:
    """SpecDeepMap's closing line: each set's chips and share."""
    parts = [
        f"{title} dataset: {chips[n]} images ({chips[n] / total:.2%})"
        for title, n in zip(("Training", "Validation", "Test"), SET_NAMES, strict=True)
        if chips[n]
    ]
    log.info("Final dataset split: %s.", ", ".join(parts))


def leakage_table(leakage: Leakage) -> pd.DataFrame:
    """``Split_leakage.csv``.

    Per evaluation set, its chips and labelled pixels that touch a training chip (the companion of
    ``Summary_train_val.csv``).
    """
    rows = []
    for name, part in (("Validation", leakage.validation), ("Test", leakage.test)):
        rows.append(
            {
                "Set": name,
                "Chips": part.chips,
                "Chips Touching Train": part.touching_chips,
                "Chip Share (%)": round(part.chip_share * 100, 2),
                "Labelled Pixels": part.labelled_pixels,
                "Pixels In Touching Chips": part.touching_pixels,
                "Pixel Share (%)": round(part.pixel_share * 100, 2),
            }
        )
    return pd.DataFrame(rows)


def leakage_warnings(leakage: Leakage, buffer_chips: int, strategy: str, total: int) -> list[str]:
    """What a user should know about the split's spatial separation.

    ``strategy`` is the strategy that chose the sets.
    """
    out = []
    if leakage.leaks and strategy == "balanced-groups":
        out.append(
            f"spatial leakage: {leakage.sentence()} Some classes occur only in chips "
            "that touch each other's: a few were kept in training for the class-share "
            "rule"
        )
    elif leakage.leaks:
        out.append(
            f"spatial leakage: {leakage.sentence()} Strategy '{strategy}' "
            "assigns chips that touch to different sets; the default 'balanced-groups' "
            "keeps them apart (or cut chips with a step larger than the tile)"
        )
    if buffer_chips:
        out.append(
            f"{buffer_chips} of {total} chips touch a validation or test chip and are "
            "left out of training (the buffer that keeps the sets apart)"
        )
    return out


def check_image_chips(uris: list[str], workers: int = 4) -> tuple[int, int, int]:
    """Open the header of every image chip (all sets, not only those read for statistics):
    an unreadable chip, or one whose bands or size differ from the others, is refused here
    with its name, instead of breaking training or testing later. Returns the chips'
    (bands, height, width).
    """

    def header(uri: str) -> tuple[int, int, int]:
        try:
            with storage.open_raster(uri) as src:
                return src.count, src.height, src.width
        except UnreadableInputError:
            raise
        except Exception as error:  # noqa: BLE001 - GDAL's errors for a broken file
            if storage.is_transient(error):
                raise
            raise UnreadableInputError(
                f"Image chip {uri} cannot be read as a raster ({type(error).__name__}: {error})"
            ) from error

    with storage.gdal_env(), ThreadPoolExecutor(workers) as pool:
        shapes = list(pool.map(header, uris))
    for uri, shape in zip(uris, shapes, strict=True):
        if shape != shapes[0]:
            raise InputMismatchError(
                f"Image chip {uri} has {shape[0]} bands of {shape[1]} x {shape[2]} px, "
                f"{uris[0]} has {shapes[0][0]} bands of {shapes[0][1]} x {shapes[0][2]} px: all "
                "chips of a dataset must match"
            )
    return shapes[0]


def split_warnings(sets: np.ndarray, params: SplitParams) -> list[str]:
    """Legal but surprising outcomes of a split, said out loud."""
    out = []
    total = len(sets)
    unused = int((sets == 3).sum())
    percent = params.train_percent + params.validation_percent + params.test_percent
    if percent < 100 - 1e-9:
        out.append(
            f"train + validation + test = {percent:g} %: {unused} of {total} chips are "
            "left out of every set"
        )
    for s, name in enumerate(SET_NAMES):
        wanted = (params.train_percent, params.validation_percent, params.test_percent)[s]
        n = int((sets == s).sum())
        if wanted > 0 and n < 3:
            out.append(
                f"the {name} set holds only {n} chip(s) of {total}: its IoU will be "
                "noisy; more chips (a smaller tile or step) give sounder figures"
            )
    return out


def read_csv(uri: str) -> pd.DataFrame:
    """Read one of the dataset CSVs (any URI)."""
    return pd.read_csv(io.StringIO(storage.read_text(uri)))
