"""Model quality on the real data sets: the deep model against the per-pixel RandomForest.

For each real set in ``../shared/data`` it runs the pipeline through the functions a user
calls (the CLI's defaults unless ``--set`` overrides them):

* EnMAP Potsdam (224 bands, 30 m): the 18 shipped 32² chips, units of one chip (they all
  touch: one scene cut into a band of chips);
* Sentinel-2 L1C Brandenburg (13 bands, 10 m) with OpenStreetMap labels: chipped at 64 px
  (coverage 50 %), units of 4 × 4 chips (spatial blocks).

**A held-out part per set** (:func:`holdout`, since 2026-12-05): a fifth of the chips on one
side of the scene (the side whose class shares are closest to the whole set's; S2: with the
development chips that touch it left out as a buffer). Only ``--final`` scores it. Every
other mode uses the development chips alone, so that no recipe is chosen on the chips that
report it. (The recipe's earlier experiments, before that date, saw every chip: the
held-out figures are free of choices made since, and of the final report's, not of theirs.)

Modes:

* default, a development split: the development units dealt into five parts stratified by
  their main class (:func:`deal`), one validates, one tests, three train;
* ``--folds K``: cross-validation over the development units (fold k tests, fold k + 1
  validates, the rest trains; every development chip is a test chip once); both models'
  confusion matrices of all K runs are pooled per split. ``--save-matrices FILE`` keeps
  every chip's matrices, so that intervals can be recomputed without training
  (``--pool-matrices FILE``: each seed's difference and the seeds pooled);
* ``--final``: train on the development units (a fifth validates, for the checkpoint) and
  score the held-out part: the figures to publish.
* ``--grid``: the grid over users' settings (:data:`GRID`, since 2026-12-05): per set, the
  benchmark's cell and cells that change one setting a user picks (batch size, label
  coverage of the chips, the split's strategy, a tutorial-like chipping) or several. Each
  cell is cross-validated on its own development chips (those clear of the held-out part,
  which is the same ground in every cell): the units dealt into five parts, ``--folds``
  (default 2; 3 before training drew 256 chips an epoch) of them tested in turn, one seed
  by default; the table gives deep − forest per cell with its interval (S2: over squares
  of 256 px, the same ground in every cell) and names the worst cell. ``--cells`` picks
  cells by number; ``--jobs`` (default 2) runs that many cells at a time, each in its own
  process with its share of the cores.

The Trainer fits the RandomForest baseline itself (every run does); both models are scored on
the same chips with the same pooled confusion matrix. Prints, per set: chips per split, pooled
mean IoU on validation and test, overall accuracy, per-class IoU, wall time, and the deep
model's test mean IoU minus the forest's with its 90 % paired bootstrap interval
(``specdeepmap.comparison``: whether the test chips can tell the two apart). The bootstrap
draws whole units: in the Tester, groups of touching chips and the split's blocks; in
``--folds``, the split's units (S2 blocks; EnMAP chips, which all touch, so its interval is
narrower than the truth). The interval's sentence counts the units.

Usage: python benchmarks/bench_quality.py [--sets enmap s2] [--set loss=ce ...] [--seeds 1]
       [--folds 6 [--save-matrices FILE] | --final | --grid [--cells 0 1 ...] [--jobs 2]
       | --pool-matrices FILE]
Choose recipes on the development modes' validation columns only; their test columns are for
checking, the ``--final`` table is for publishing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from specdeepmap.params import SplitParams

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: epochs a user would give for each set (the CLI default is SpecDeepMap's 1)
EPOCHS = {"enmap": 50, "s2": 30}


#: Dataset Maker class weighting (a split parameter; --class-weighting changes it)
CLASS_WEIGHTING = {"value": "one-minus-share"}


def enmap_split() -> SplitParams:
    """The EnMAP chips' split parameters: units of one chip (its 18 chips all touch)."""
    from specdeepmap.params import SplitParams

    # SpecDeepMap's split by name: the 18 chips all touch, so a split without leakage would
    # keep 4 training chips and the default falls back to this one anyway (docs/leakage.md)
    return SplitParams(
        train_percent=60,
        validation_percent=20,
        test_percent=20,
        strategy="balanced",
        class_weighting=CLASS_WEIGHTING["value"],
    )


def s2_split() -> SplitParams:
    """The Sentinel-2 chips' split parameters: units of 4 x 4 chips (spatial blocks)."""
    from specdeepmap.params import SplitParams

    return SplitParams(
        train_percent=70,
        validation_percent=15,
        test_percent=15,
        strategy="spatial-blocks",
        class_weighting=CLASS_WEIGHTING["value"],
    )


def prepare_enmap(data: Path, work: str) -> str:
    """The shipped EnMAP chip folder."""
    return str(data / "enmap_potsdam")


def prepare_s2(data: Path, work: str) -> str:
    """Chip the Sentinel-2 scene at 64 px (coverage 50 %); the chip folder."""
    from specdeepmap.chipping import chip_scene
    from specdeepmap.params import ChipParams

    folder = data / "s2l1c_brandenburg_osm"
    chips = os.path.join(work, "s2-chips")
    chip_scene(
        str(folder / "s2l1c_T33UUU_20170216_13b_10m.tif"),
        str(folder / "osm_landuse_labels_10m.tif"),
        chips,
        ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64),
    )
    return chips


#: per set: how its chips are prepared (the chip folder) and split (units, class weighting)
SETS = {"enmap": (prepare_enmap, enmap_split), "s2": (prepare_s2, s2_split)}


#: share of each set's chips held out for the final report (at least this many)
HOLDOUT_SHARE = 0.2
#: per set: whether the development chips that touch a held-out chip are left out (a buffer).
#: EnMAP's 18 chips all touch (one 30 m scene cut into a band of chips): a buffer would take
#: a third of what is left, so its held-out chips touch development chips, and the report
#: says how many
HOLDOUT_BUFFER = {"enmap": False, "s2": True}


def class_columns(frame) -> list[str]:
    """The label-count columns of a chip table, background left out."""
    from specdeepmap.chipping import COUNT_PREFIX

    return [c for c in frame.columns if c.startswith(COUNT_PREFIX) and c != f"{COUNT_PREFIX}0"]


def holdout(name: str, frame, params: SplitParams) -> np.ndarray:
    """The final held-out part of a set: 0 development, 2 held out, 3 buffer (unused).

    A spatially compact part: the split's units (S2: spatial blocks; EnMAP: chips) farthest
    east, west, south or north, taken until they hold :data:`HOLDOUT_SHARE` of the chips;
    of the four, the one whose class shares are closest to the whole set's (largest gap in
    percentage points), with every class present. No choice of recipe looks at it: the
    cross-validation (``--folds``) runs on the development chips only, and ``--final`` trains
    on them and scores the held-out chips once. Deterministic: the same chips every run.
    """
    from specdeepmap.leakage import TEST, TRAIN, UNUSED, touching_other_sets, touching_pairs
    from specdeepmap.splitting import split_units

    units = split_units(frame, params)
    counts = frame[class_columns(frame)].to_numpy(np.float64)
    share = counts.sum(axis=0) / counts.sum()
    centre = {
        axis: np.bincount(units, frame[axis].to_numpy(np.float64)) / np.bincount(units)
        for axis in ("x", "y")
    }
    best, best_gap = None, np.inf
    for axis, sign in (("x", 1), ("x", -1), ("y", 1), ("y", -1)):
        across = centre["y" if axis == "x" else "x"]
        order = np.lexsort((across, -sign * centre[axis]))  # farthest first, then in a line
        chips_in = np.cumsum(np.bincount(units)[order])
        taken = order[: int(np.searchsorted(chips_in, HOLDOUT_SHARE * len(frame))) + 1]
        held = np.isin(units, taken)
        held_counts = counts[held].sum(axis=0)
        if (held_counts == 0).any() or held.all():
            continue
        gap = np.abs(held_counts / held_counts.sum() - share).max() * 100
        if gap < best_gap:
            best, best_gap = held, gap
    if best is None:
        raise SystemExit(f"{name}: no side of the scene holds every class: no held-out part")
    sets = np.where(best, TEST, TRAIN)
    if HOLDOUT_BUFFER[name]:
        sets[touching_other_sets(sets, touching_pairs(frame), TRAIN, (TEST,))] = UNUSED
    return sets


def deal(frame, params: SplitParams, keep: np.ndarray, folds: int, name: str) -> np.ndarray:
    """Fold of every chip (−1 where ``keep`` is False): the kept chips' units dealt
    round-robin in the order of their main class (the class of which they hold the largest
    share of all its pixels), in a random order within a class, so that rare classes spread
    over the folds.
    """
    from specdeepmap.splitting import split_units

    units = split_units(frame, params)
    counts = np.zeros((units.max() + 1, len(class_columns(frame))))
    np.add.at(counts, units[keep], frame[class_columns(frame)].to_numpy(np.float64)[keep])
    present = np.unique(units[keep])
    if len(present) < folds:
        raise SystemExit(f"{name}: {len(present)} chips or blocks cannot make {folds} folds")
    main_class = np.argmax(counts / np.maximum(counts.sum(axis=0), 1), axis=1)
    order = np.random.default_rng(params.seed).permutation(present)
    order = order[np.argsort(main_class[order], kind="stable")]
    fold_of = np.full(len(counts), -1, np.int64)
    fold_of[order] = np.arange(len(order)) % folds
    return np.where(keep, fold_of[units], -1)


def fold_datasets(
    name: str,
    chips: str,
    params: SplitParams,
    folds: int,
    work: str,
    keep: np.ndarray | None = None,
    tag: str = "",
    parts: int | None = None,
) -> list[str]:
    """K dataset folders of one set's development chips for cross-validation: the units
    dealt into ``parts`` parts (default K, :func:`deal`); fold k tests part k, validates on
    part k + 1 and trains on the rest (K < ``parts``: only the first K folds, so that fewer
    runs still train on as many chips). The held-out part and its buffer are in none of them
    (``keep``: the development chips, by default those of :func:`holdout`). With
    ``balanced-groups`` the training chips that touch a validation or test chip are left
    out, as the Dataset Maker leaves them out.
    """
    from specdeepmap.leakage import (
        TEST,
        TRAIN,
        UNUSED,
        VALIDATION,
        touching_other_sets,
        touching_pairs,
    )
    from specdeepmap.splitting import chip_class_counts, write_split

    frame = chip_class_counts(chips)
    if keep is None:
        keep = holdout(name, frame, params) == TRAIN
    parts = parts or folds
    fold = deal(frame, params, keep, parts, name)
    pairs = touching_pairs(frame)
    out = []
    for k in range(folds):
        sets = np.select(
            [fold < 0, fold == k, fold == (k + 1) % parts], [UNUSED, TEST, VALIDATION], TRAIN
        )
        if params.strategy == "balanced-groups":
            sets[touching_other_sets(sets, pairs, TRAIN, (VALIDATION, TEST))] = UNUSED
        folder = os.path.join(work, f"{name}{tag}-fold-{k}")
        write_split(chips, frame, sets, params, out_folder=folder, pairs=pairs)
        out.append(folder)
    return out


def split_dataset(name: str, chips: str, params: SplitParams, work: str, final: bool) -> str:
    """One split of a set. ``final``: the development chips train (a fifth of their units
    validates, for the checkpoint) and the held-out part tests; else the development chips
    alone, a fifth of their units validating and a fifth testing (a development split, for
    choices).
    """
    from specdeepmap.leakage import TEST, TRAIN, UNUSED, VALIDATION
    from specdeepmap.splitting import chip_class_counts, write_split

    frame = chip_class_counts(chips)
    sets = holdout(name, frame, params)
    fold = deal(frame, params, sets == TRAIN, 5, name)
    if final:
        sets = np.where(sets == TRAIN, np.where(fold == 0, VALIDATION, TRAIN), sets)
    else:
        sets = np.select([fold < 0, fold == 0, fold == 1], [UNUSED, VALIDATION, TEST], TRAIN)
    folder = os.path.join(work, f"{name}-{'final' if final else 'development'}")
    report = write_split(chips, frame, sets, params, out_folder=folder)
    print(
        f"{name} {'final (held-out part tests)' if final else 'development'} split: "
        f"{report.chips}; test chips touching training chips: "
        f"{report.leakage['test']['touching_chips']}",
        flush=True,
    )
    return folder


def save_matrices(
    path: str, name: str, seed: int, classes: list, units: dict, pooled: dict
) -> None:
    """Add one set's and seed's per-chip confusion matrices (both models, validation and
    test) and the chips' bootstrap units to a JSON file, so that an interval can be
    recomputed (another unit, level or seed of the draws) without training again.
    """
    import json

    record = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    record[f"{name}/seed-{seed}"] = {
        "classes": [int(c) for c in classes],
        "units": {chip: int(u) for chip, u in units.items()},
        "matrices": {
            split: {
                model: {chip: np.asarray(m).tolist() for chip, m in chips.items()}
                for model, chips in models.items()
                if chips
            }
            for split, models in pooled.items()
        },
    }
    Path(path).write_text(json.dumps(record))


def pool_saved_matrices(path: str) -> None:
    """Each seed's test figures from a :func:`save_matrices` file, then the seeds pooled:
    every seed's chips in one paired bootstrap, a unit's chips of every seed resampled
    together (a seed is a new draw of the model, not of the ground).
    """
    import json

    from specdeepmap.comparison import paired_bootstrap
    from specdeepmap.metrics import metrics_from_matrix

    record = json.loads(Path(path).read_text())
    print("set | seed | deep test mean IoU | forest | deep − forest (90 % interval; units)")
    print("--- | --- | --- | --- | ---")
    for name in sorted({key.split("/seed-")[0] for key in record}):
        pooled, units, gaps = {"deep": {}, "forest": {}}, {}, []
        seeds = sorted(int(k.split("/seed-")[1]) for k in record if k.startswith(f"{name}/"))
        for seed in seeds:
            entry = record[f"{name}/seed-{seed}"]
            test = {
                model: {chip: np.asarray(m) for chip, m in entry["matrices"]["test"][model].items()}
                for model in ("deep", "forest")
            }
            scores = {
                model: metrics_from_matrix(sum(m.values()), entry["classes"], m).mean_iou
                for model, m in test.items()
            }
            versus = paired_bootstrap(test["deep"], test["forest"], units=entry["units"])
            gaps.append(versus.difference)
            print(
                f"{name} | {seed} | {scores['deep']:.3f} | {scores['forest']:.3f} | "
                f"{versus.difference:+.3f} ({versus.low:+.3f} to {versus.high:+.3f}; "
                f"{versus.units})"
            )
            for model in pooled:
                pooled[model] |= {f"{chip}@{seed}": m for chip, m in test[model].items()}
            units |= {f"{chip}@{seed}": u for chip, u in entry["units"].items()}
        versus = paired_bootstrap(pooled["deep"], pooled["forest"], units=units)
        print(
            f"{name} | {len(seeds)} seeds pooled (mean of seeds {np.mean(gaps):+.3f}, range "
            f"{min(gaps):+.3f} to {max(gaps):+.3f}) | | | {versus.difference:+.3f} "
            f"({versus.low:+.3f} to {versus.high:+.3f}; {versus.units}; {versus.verdict})"
        )


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs as TrainConfig keyword arguments (ints, floats, bools, strings)."""
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        if value in ("true", "false"):
            value = value == "true"
        out[key] = value
    return out


def run_set(
    name: str,
    dataset: str,
    work: str,
    epochs: int,
    overrides: dict,
    seed: int,
    tta: bool,
    tag: str = "",
    other_tta: bool = True,
) -> dict:
    """Train (with the baseline) and score on validation and test; return the figures.

    ``other_tta``: also score with test-time augmentation the other way and print it (the
    grid leaves it out: with TTA on, eight passes over the chips for a figure it never shows).
    """
    from specdeepmap.baseline import summary_metrics
    from specdeepmap.data import read_dataset_folder
    from specdeepmap.evaluation import evaluate_model
    from specdeepmap.params import EvaluateParams
    from specdeepmap.training import TrainConfig, train

    info = read_dataset_folder(dataset)
    run = os.path.join(work, f"{name}{tag}-run-{seed}")
    start = time.perf_counter()
    result = train(
        TrainConfig(
            **(
                {
                    "dataset": dataset,
                    "out": run,
                    "epochs": epochs,
                    "device": "cpu",
                    "seed": seed,
                    "registered_model": None,
                    "tracking_uri": f"sqlite:///{work}/mlflow.db",
                }
                | overrides
            )
        )
    )
    seconds = time.perf_counter() - start
    scores, other, versus = {}, {}, {}
    forest = {s: summary_metrics(result.baseline, s) for s in ("validation", "test")}
    for split in ("validation", "test"):
        for use_tta, target in ((tta, scores), (not tta, other))[: 2 if other_tta else 1]:
            report = evaluate_model(
                os.path.join(dataset, f"{split}_files.csv"),
                result.model_file,
                os.path.join(run, split),
                EvaluateParams(device="cpu", tta=use_tta),
                baseline=forest[split],
                log_to_mlflow=False,
            )
            target[split] = report.metrics
            if use_tta == tta:
                versus[split] = report.versus_baseline
    teacher_file, teacher = os.path.join(run, "ensemble.pt"), None  # with distill=true
    if os.path.exists(teacher_file):
        teacher = {
            split: evaluate_model(
                os.path.join(dataset, f"{split}_files.csv"),
                teacher_file,
                os.path.join(run, f"teacher-{split}"),
                EvaluateParams(device="cpu", tta=tta),
                log_to_mlflow=False,
            ).metrics
            for split in ("validation", "test")
        }
    if other_tta:
        print(
            f"{name}{tag} seed {seed}: TTA {'off' if tta else 'on'} instead: val "
            f"{other['validation'].mean_iou:.3f}, test {other['test'].mean_iou:.3f}",
            flush=True,
        )
    return {
        "chips": (len(info.train), len(info.validation), len(info.test)),
        "deep": scores,
        "deep_seconds": seconds,
        "versus": versus,
        "forest": forest,
        "forest_seconds": result.baseline["fit_seconds"],
        "classes": info.class_values,
        "teacher": teacher,
    }


def pool_folds(
    name: str,
    datasets: list[str],
    work: str,
    epochs: int,
    overrides: dict,
    seed: int,
    tta: bool,
    tag: str = "",
    other_tta: bool = True,
) -> tuple[dict, dict, list]:
    """Train and score every fold of one seed; both models' (and a teacher's) per-chip
    confusion matrices of all folds pooled per split, seconds per model, and the classes.
    """
    pooled = {split: {"deep": {}, "forest": {}, "teacher": {}} for split in ("validation", "test")}
    seconds = {"deep": 0.0, "forest": 0.0, "teacher": 0.0}
    for k, dataset in enumerate(datasets):
        r = run_set(name, dataset, work, epochs, overrides, seed, tta, f"{tag}-fold-{k}", other_tta)
        for split, model in itertools.product(pooled, ("deep", "forest", "teacher")):
            if r[model]:
                pooled[split][model].update(r[model][split].chip_matrices)
        seconds["deep"] += r["deep_seconds"]
        seconds["forest"] += r["forest_seconds"]
        print(
            f"{name}{tag} fold {k} seed {seed}: chips {'/'.join(map(str, r['chips']))}, "
            f"test deep {r['deep']['test'].mean_iou:.3f}, forest "
            f"{r['forest']['test'].mean_iou:.3f}",
            flush=True,
        )
    return pooled, seconds, r["classes"]


def cross_validate(
    name: str, chips: str, args: argparse.Namespace, overrides: dict, work: str
) -> list[str]:
    """Run every fold for every seed; return one table row per seed and model, pooled over
    all folds' test chips.
    """
    from specdeepmap.comparison import paired_bootstrap
    from specdeepmap.metrics import metrics_from_matrix
    from specdeepmap.splitting import chip_class_counts, split_units

    split = SETS[name][1]()
    datasets = fold_datasets(name, chips, split, args.folds, work)
    # the bootstrap's unit is the fold's unit: a chip's spatial block where the split used
    # blocks (S2), else the chip (EnMAP's 18 chips all touch: one scene, one true unit)
    frame = chip_class_counts(chips)
    units = dict(zip(frame["chip"], split_units(frame, split).tolist(), strict=True))
    out = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        pooled, seconds, classes = pool_folds(
            name, datasets, work, args.epochs or EPOCHS[name], overrides, seed, args.tta
        )
        if args.save_matrices:
            save_matrices(args.save_matrices, name, seed, classes, units, pooled)
        val, metrics = (
            {
                model: metrics_from_matrix(sum(chip.values()), classes, chip)
                for model, chip in pooled[split].items()
                if chip
            }
            for split in ("validation", "test")
        )
        for model in metrics:
            test = metrics[model]
            versus = (
                paired_bootstrap(pooled["test"][model], pooled["test"]["forest"], units=units)
                if model != "forest"
                else None
            )
            per_class = " ".join(
                f"{c}:{v:.2f}" for c, v in zip(classes, np.nan_to_num(test.iou), strict=True)
            )
            out.append(
                f"{name} | {args.folds} folds, seed {seed} | {model} | "
                f"{val[model].mean_iou:.3f} | "
                f"{test.mean_iou:.3f} | {test.overall_accuracy:.3f} | {per_class} | "
                f"{seconds[model]:.0f} | "
                + (
                    f"{versus.difference:+.3f} ({versus.low:+.3f} to {versus.high:+.3f}"
                    f", {versus.verdict}, {versus.chips} chips in {versus.units} units)"
                    if versus
                    else ""
                )
            )
            print(out[-1], flush=True)
    return out


@dataclass(frozen=True)
class Cell:
    """One cell of the grid over users' settings: how the chips are cut, split and trained.

    A field left at its default keeps the benchmark's setting for the set (:data:`SETS`).
    """

    name: str
    #: S2: (chip size px, step px, minimum labelled share %) of the Raster Splitter
    chipping: tuple[int, int, float] | None = None
    #: EnMAP: only the shipped chips with at least this labelled share (%)
    min_coverage: float = 0
    #: the Dataset Maker's strategy (balanced, balanced-groups, spatial-blocks)
    strategy: str | None = None
    #: TrainConfig overrides, as (field, value) pairs
    train: tuple[tuple[str, object], ...] = ()


#: The grid over users' settings (``--grid``): one setting changed at a time from the
#: benchmark's cell, then the settings a new user combined (issue of 2026-12-05). S2's scene
#: labels 31 % of its pixels, so no chip larger than 96 px reaches 50 % coverage and none
#: at all 75 %: the tutorial's full coverage is not possible on it. EnMAP's 18 shipped chips
#: cannot be cut again (the image scene is not shipped): its coverage cells keep the chips
#: above a threshold.
GRID = {
    "s2": (
        Cell("benchmark: 64 px, coverage 50 %, spatial blocks, batch 8"),
        Cell("batch 2 (SpecDeepMap's)", train=(("batch_size", 2),)),
        Cell("batch 16", train=(("batch_size", 16),)),
        Cell("coverage 25 %", chipping=(64, 64, 25)),
        Cell("coverage 10 %", chipping=(64, 64, 10)),
        Cell("balanced-groups split (the Dataset Maker's default)", strategy="balanced-groups"),
        Cell("balanced split (SpecDeepMap's, neighbours leak)", strategy="balanced"),
        Cell("tutorial-like: 96 px, step 120, coverage 50 %", chipping=(96, 120, 50)),
        Cell(
            "a user's: coverage 10 %, balanced-groups, batch 8",
            chipping=(64, 64, 10),
            strategy="balanced-groups",
            train=(("batch_size", 8),),
        ),
    ),
    "enmap": (
        Cell("benchmark: 18 chips (cut at 10 %), balanced, batch 8"),
        Cell("batch 2 (SpecDeepMap's)", train=(("batch_size", 2),)),
        Cell("batch 16", train=(("batch_size", 16),)),
        Cell("coverage 20 %", min_coverage=20),
        Cell("coverage 30 %", min_coverage=30),
    ),
}
#: S2's bootstrap unit in the grid: a square of this many pixels (4 x 4 of the benchmark's
#: 64 px chips), the same ground in every cell whatever its chips or split
GRID_BLOCK_PX = 256
#: the grid's development units are dealt into this many parts; ``--folds`` of them are
#: tested (2 by default: 40 % of the development chips tested, each run training on 60 %;
#: 3 folds kept the hour until training drew 256 chips an epoch, docs/benchmarks.md)
GRID_PARTS = 5


def overlaps(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], margin: int = 0) -> np.ndarray:
    """Whether each window of ``a`` (x0, y0, x1, y1 arrays) overlaps any window of ``b``
    grown by ``margin`` pixels (1: touching counts).
    """
    ax0, ay0, ax1, ay1 = (v[:, None] for v in a)
    bx0, by0, bx1, by1 = (v[None, :] for v in b)
    hit = (ax0 < bx1 + margin) & (bx0 - margin < ax1) & (ay0 < by1 + margin) & (by0 - margin < ay1)
    return hit.any(axis=1)


def cell_development(name: str, cell: Cell, frame, benchmark_frame) -> np.ndarray:
    """The development chips of a cell: the chips of ``frame`` clear of the set's held-out
    part (decided once, on the benchmark's chips, so every cell holds out the same ground):
    none overlaps a held-out or buffer chip, none touches a held-out chip; on EnMAP, with at
    least ``cell.min_coverage`` % labelled pixels.
    """
    from specdeepmap.leakage import TEST, TRAIN, UNUSED, chip_extents

    sets = holdout(name, benchmark_frame, SETS[name][1]())
    if cell.chipping is None:  # the set's own chips
        keep = frame["chip"].isin(benchmark_frame["chip"][sets == TRAIN]).to_numpy()
    else:
        windows = np.stack(chip_extents(benchmark_frame)[1:])
        mine = tuple(chip_extents(frame)[1:])
        keep = ~overlaps(mine, tuple(windows[:, sets == UNUSED]))
        keep &= ~overlaps(mine, tuple(windows[:, sets == TEST]), margin=1)
    from specdeepmap.chipping import COUNT_PREFIX

    labelled = frame[class_columns(frame)].to_numpy(np.float64).sum(axis=1)
    total = labelled + frame[f"{COUNT_PREFIX}0"].to_numpy(np.float64)
    return keep & (labelled / total * 100 >= cell.min_coverage)


def grid_units(name: str, frame) -> dict[str, int]:
    """Bootstrap units of the grid: on S2 squares of :data:`GRID_BLOCK_PX` (by a chip's
    origin); on EnMAP the chips (they all touch: its intervals are narrower than the truth).
    """
    if name != "s2":
        return {chip: i for i, chip in enumerate(frame["chip"])}
    keys = frame["x"] // GRID_BLOCK_PX * 100_000 + frame["y"] // GRID_BLOCK_PX
    return dict(zip(frame["chip"], np.unique(keys, return_inverse=True)[1].tolist(), strict=True))


def cell_chips(name: str, cell: Cell, data: Path, work: str, benchmark: str) -> str:
    """The chip folder of a cell: the set's own (``benchmark``) unless the cell cuts the S2
    scene again (once per chipping: cells that share one share its folder).
    """
    if cell.chipping is None:
        return benchmark
    from specdeepmap.chipping import chip_scene
    from specdeepmap.params import ChipParams

    size, step, coverage = cell.chipping
    chips = os.path.join(work, f"{name}-chips-{size}-{step}-{coverage:g}")
    if not os.path.exists(chips):
        folder = data / "s2l1c_brandenburg_osm"
        chip_scene(
            str(folder / "s2l1c_T33UUU_20170216_13b_10m.tif"),
            str(folder / "osm_landuse_labels_10m.tif"),
            chips,
            ChipParams(tile_x=size, tile_y=size, step_x=step, step_y=step, min_coverage=coverage),
        )
    return chips


def _grid_worker(threads: int, class_weighting: str) -> None:
    """A grid worker process: its torch threads, the run's class weighting, quiet logs."""
    import logging

    import torch

    torch.set_num_threads(threads)
    CLASS_WEIGHTING["value"] = class_weighting
    logging.disable(logging.WARNING)


def run_cell(
    name: str,
    index: int,
    cell: Cell,
    args: argparse.Namespace,
    chips: str,
    benchmark_chips: str,
    work: str,
):
    """Cross-validate one cell (``args.folds`` folds, ``args.seeds`` seeds, all pooled) on its
    development chips (``chips``; ``benchmark_chips``: the set's own, which decide the
    held-out part); the table row and the deep − forest difference. Its runs are tracked
    in a SQLite file of its own, so that cells run in parallel processes never share one.
    """
    from specdeepmap.comparison import paired_bootstrap
    from specdeepmap.metrics import metrics_from_matrix
    from specdeepmap.splitting import chip_class_counts

    frame = chip_class_counts(chips)
    keep = cell_development(name, cell, frame, chip_class_counts(benchmark_chips))
    split = SETS[name][1]()
    if cell.strategy:
        split = split.model_copy(update={"strategy": cell.strategy})
    tag = f"-cell-{index}"
    datasets = fold_datasets(
        name, chips, split, args.folds, work, keep=keep, tag=tag, parts=GRID_PARTS
    )
    overrides = (
        {"tracking_uri": f"sqlite:///{work}/mlflow-{name}{tag}.db"}
        | parse_overrides(args.overrides)
        | dict(cell.train)
    )
    pooled = {part: {"deep": {}, "forest": {}} for part in ("validation", "test")}
    seconds = 0.0
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        runs, took, classes = pool_folds(
            name,
            datasets,
            work,
            args.epochs or EPOCHS[name],
            overrides,
            seed,
            args.tta,
            tag,
            other_tta=False,
        )
        for part, model in itertools.product(pooled, ("deep", "forest")):
            pooled[part][model].update({f"{c}@{seed}": m for c, m in runs[part][model].items()})
        seconds += took["deep"]
    units = grid_units(name, frame)
    seeded = {key: units[key.rsplit("@", 1)[0]] for key in pooled["test"]["deep"]}
    test = {
        model: metrics_from_matrix(sum(m.values()), classes, m)
        for model, m in pooled["test"].items()
    }
    versus = paired_bootstrap(pooled["test"]["deep"], pooled["test"]["forest"], units=seeded)
    if args.seeds > 1:  # each seed's own pooled figures, beside the seeds pooled
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            mine = {
                model: {k: m for k, m in pooled["test"][model].items() if k.endswith(f"@{seed}")}
                for model in ("deep", "forest")
            }
            deep, forest = (
                metrics_from_matrix(sum(mine[m].values()), classes, mine[m]).mean_iou
                for m in ("deep", "forest")
            )
            print(f"{name} cell {index} seed {seed}: deep {deep:.3f}, forest {forest:.3f}")
    row = (
        f"{name} | {cell.name} | {int(keep.sum())} | {test['deep'].mean_iou:.3f} | "
        f"{test['forest'].mean_iou:.3f} | {versus.difference:+.3f} ({versus.low:+.3f} to "
        f"{versus.high:+.3f}) | {versus.verdict}, {versus.units} units | {seconds / 60:.0f}"
    )
    print(row, flush=True)
    return row, versus


def run_grid(args: argparse.Namespace, data: Path, work: str) -> None:
    """Every cell of :data:`GRID` for the chosen sets (``--cells`` picks by number), ``--jobs``
    cells at a time, then the table of deep − forest per cell and the worst cell.

    The chips are cut first, in this process; each cell then runs in a worker process with
    its share of the cores as torch threads (two cells of one thread each on 2 cores: a
    small network's step leaves a second thread idle much of the time, a second process
    does not).
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    start = time.perf_counter()
    cells = [
        (name, index, cell)
        for name in args.sets
        for index, cell in enumerate(GRID[name])
        if not args.cells or index in args.cells
    ]
    benchmark = {name: SETS[name][0](data, work) for name in args.sets}
    chips = [cell_chips(name, cell, data, work, benchmark[name]) for name, _, cell in cells]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(
        args.jobs,
        mp_context=get_context("spawn"),
        initializer=_grid_worker,
        initargs=(threads, CLASS_WEIGHTING["value"]),
    ) as pool:
        futures = [
            pool.submit(run_cell, name, index, cell, args, folder, benchmark[name], work)
            for (name, index, cell), folder in zip(cells, chips, strict=True)
        ]
        results = [future.result() for future in futures]
    rows, worst = [], {}
    for (name, _, cell), (row, versus) in zip(cells, results, strict=True):
        rows.append(row)
        if name not in worst or versus.difference < worst[name][1].difference:
            worst[name] = (cell.name, versus)
    print(
        f"\nGrid over users' settings: {args.folds} folds, seed(s) {args.first_seed}–"
        f"{args.first_seed + args.seeds - 1}, development chips only, pooled test figures; "
        f"{args.jobs} cell(s) at a time, {threads} torch thread(s) each; "
        f"{(time.perf_counter() - start) / 60:.0f} min in all"
    )
    print(
        "set | cell | development chips | deep mean IoU | forest mean IoU | "
        "deep − forest (90 % interval) | verdict | deep training min (its process)"
    )
    print("|".join("---" for _ in range(8)))
    print("\n".join(rows))
    for name, (cell, versus) in worst.items():
        print(f"{name}: worst cell '{cell}': {versus.sentence('the deep model', 'the forest')}")


def main() -> None:
    """Prepare the sets, train, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["enmap", "s2"], choices=["enmap", "s2"])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        help="TrainConfig overrides, e.g. loss=ce augmentation=d4-rotate",
    )
    parser.add_argument("--epochs", type=int, default=None, help="Override both sets' epochs.")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="Training seeds per set (the RandomForest's seed too); default 3, with --grid 1.",
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="Seeds run are first-seed … first-seed + seeds − 1.",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=0,
        help="Cross-validate over K folds of the chips instead of one split.",
    )
    parser.add_argument(
        "--final",
        action="store_true",
        help="The final report: train on the development chips, test on the held-out part "
        "(no choice may be made on its figures).",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="Score with D4 TTA (the figures without it are printed too).",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="The grid over users' settings (GRID): each cell cross-validated over the "
        "development chips (--folds, default 2), deep − forest per cell, the worst named.",
    )
    parser.add_argument(
        "--cells", nargs="*", type=int, default=[], help="--grid: only these cells (0, 1, …)."
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="--grid: cells run at a time, each in its own process with its share of the "
        "cores as torch threads (default 2; 1: one after the other on every core).",
    )
    parser.add_argument("--verbose", action="store_true", help="Also per-class val IoU.")
    parser.add_argument(
        "--save-matrices",
        default=None,
        help="--folds: write every chip's confusion matrices and units to this JSON file.",
    )
    parser.add_argument(
        "--pool-matrices",
        help="Read a --save-matrices file instead of training: each seed's deep − forest "
        "on the test chips and all its seeds pooled (a unit's chips of every seed drawn "
        "together).",
    )
    parser.add_argument(
        "--class-weighting",
        default="one-minus-share",
        choices=["one-minus-share", "inverse-frequency"],
    )
    args = parser.parse_args()
    if args.pool_matrices:
        pool_saved_matrices(args.pool_matrices)
        return
    CLASS_WEIGHTING["value"] = args.class_weighting
    import logging

    logging.disable(logging.WARNING)
    data = Path(args.data)
    work = tempfile.mkdtemp(prefix="bench-quality-")
    args.seeds = args.seeds or (1 if args.grid else 3)
    overrides = parse_overrides(args.overrides)
    print(f"overrides: {overrides or 'none (defaults)'}; TTA in scoring: {args.tta}")
    header = (
        "set | chips train/val/test | model | val mean IoU | test mean IoU | test OA | "
        "test per-class IoU | train s | test: deep − forest (90 % interval)"
    )
    if args.grid:
        args.folds = min(args.folds or 2, GRID_PARTS)
        run_grid(args, data, work)
        return
    rows, means = [], []
    for name in args.sets:
        chips = SETS[name][0](data, work)
        if args.folds:
            means.extend(cross_validate(name, chips, args, overrides, work))
            continue
        dataset = split_dataset(name, chips, SETS[name][1](), work, args.final)
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r = run_set(name, dataset, work, args.epochs or EPOCHS[name], overrides, seed, args.tta)
            runs.append(r)
            for model, metrics, seconds in (
                (f"deep (seed {seed})", r["deep"], r["deep_seconds"]),
                (f"RandomForest (seed {seed})", r["forest"], r["forest_seconds"]),
                (f"its teacher ensemble (seed {seed})", r["teacher"], 0),
            ):
                if metrics is None:  # no teacher: the run did not distill
                    continue
                test = metrics["test"]
                per_class = " ".join(
                    f"{c}:{v:.2f}"
                    for c, v in zip(r["classes"], np.nan_to_num(test.iou), strict=True)
                )
                if args.verbose:
                    per_class += (
                        " (val "
                        + " ".join(
                            f"{c}:{v:.2f}"
                            for c, v in zip(
                                r["classes"], np.nan_to_num(metrics["validation"].iou), strict=True
                            )
                        )
                        + ")"
                    )
                versus = r["versus"]["test"] if model.startswith("deep") else None
                rows.append(
                    f"{name} | {'/'.join(map(str, r['chips']))} | {model} | "
                    f"{metrics['validation'].mean_iou:.3f} | {test.mean_iou:.3f} | "
                    f"{test.overall_accuracy:.3f} | {per_class} | {seconds:.0f} | "
                    + (
                        f"{versus.difference:+.3f} ({versus.low:+.3f} to "
                        f"{versus.high:+.3f}, {versus.verdict}, {versus.units} units)"
                        if versus
                        else ""
                    )
                )
                print(rows[-1], flush=True)
        for model in ("deep", "forest"):
            val = [r[model]["validation"].mean_iou for r in runs]
            test = [r[model]["test"].mean_iou for r in runs]
            means.append(
                f"{name} | {model} | {np.mean(val):.3f} ({min(val):.3f}–{max(val):.3f})"
                f" | {np.mean(test):.3f} ({min(test):.3f}–{max(test):.3f}) | "
                f"{np.mean([r[model]['test'].overall_accuracy for r in runs]):.3f}"
            )
        gap = np.mean([r["deep"]["test"].mean_iou - r["forest"]["test"].mean_iou for r in runs])
        verdicts = [r["versus"]["test"].verdict for r in runs if r["versus"]["test"]]
        means.append(
            f"{name} | deep − forest | | {gap:+.3f} (seeds the test chips call "
            + ", ".join(f"{v}: {verdicts.count(v)}" for v in ("better", "undecided", "worse"))
            + ") | "
        )
    if rows:
        print()
        print(header)
        print("|".join("---" for _ in header.split("|")))
        print("\n".join(rows))
    if args.folds:
        print(f"\nCross-validation: every chip tested once, pooled over {args.folds} folds")
        print(
            "set | runs | model | val mean IoU | test mean IoU | test OA | "
            "test per-class IoU | train s | test: deep − forest (90 % interval)"
        )
        print("|".join("---" for _ in range(9)))
        print("\n".join(means))
        return
    print(f"\nMean over {args.seeds} seed(s) (range)")
    print("set | model | val mean IoU | test mean IoU | test OA")
    print("--- | --- | --- | --- | ---")
    print("\n".join(means))


if __name__ == "__main__":
    main()
