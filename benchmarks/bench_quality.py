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
  every chip's matrices, so that intervals can be recomputed without training;
* ``--final``: train on the development units (a fifth validates, for the checkpoint) and
  score the held-out part: the figures to publish.

The Trainer fits the RandomForest baseline itself (every run does); both models are scored on
the same chips with the same pooled confusion matrix. Prints, per set: chips per split, pooled
mean IoU on validation and test, overall accuracy, per-class IoU, wall time, and the deep
model's test mean IoU minus the forest's with its 90 % paired bootstrap interval
(``specdeepmap.comparison``: whether the test chips can tell the two apart). The bootstrap
draws whole units: in the Tester, groups of touching chips and the split's blocks; in
``--folds``, the split's units (S2 blocks; EnMAP chips, which all touch, so its interval is
narrower than the truth). The interval's sentence counts the units.

Usage: python benchmarks/bench_quality.py [--sets enmap s2] [--set loss=ce ...] [--seeds 1]
       [--folds 6 [--save-matrices FILE] | --final]
Choose recipes on the development modes' validation columns only; their test columns are for
checking, the ``--final`` table is for publishing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
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


def fold_datasets(name: str, chips: str, params: SplitParams, folds: int, work: str) -> list[str]:
    """K dataset folders of one set's development chips for cross-validation (fold k tests,
    fold k + 1 validates, the rest trains; :func:`deal`). The held-out part and its buffer
    are in none of them.
    """
    from specdeepmap.leakage import TEST, TRAIN, UNUSED, VALIDATION
    from specdeepmap.splitting import chip_class_counts, write_split

    frame = chip_class_counts(chips)
    fold = deal(frame, params, holdout(name, frame, params) == TRAIN, folds, name)
    out = []
    for k in range(folds):
        sets = np.select(
            [fold < 0, fold == k, fold == (k + 1) % folds], [UNUSED, TEST, VALIDATION], TRAIN
        )
        folder = os.path.join(work, f"{name}-fold-{k}")
        write_split(chips, frame, sets, params, out_folder=folder)
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
) -> dict:
    """Train (with the baseline) and score on validation and test; return the figures."""
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
        for use_tta, target in ((tta, scores), (not tta, other)):
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


def cross_validate(
    name: str, chips: str, args: argparse.Namespace, overrides: dict, work: str
) -> list[str]:
    """Run every fold for every seed; return one table row per seed and model, pooled over
    all folds' test chips.
    """
    from specdeepmap.comparison import paired_bootstrap
    from specdeepmap.evaluation import metrics_from_matrix
    from specdeepmap.splitting import chip_class_counts, split_units

    split = SETS[name][1]()
    datasets = fold_datasets(name, chips, split, args.folds, work)
    # the bootstrap's unit is the fold's unit: a chip's spatial block where the split used
    # blocks (S2), else the chip (EnMAP's 18 chips all touch: one scene, one true unit)
    frame = chip_class_counts(chips)
    units = dict(zip(frame["chip"], split_units(frame, split).tolist(), strict=True))
    out = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        pooled = {
            split: {"deep": {}, "forest": {}, "teacher": {}} for split in ("validation", "test")
        }
        seconds = {"deep": 0.0, "forest": 0.0, "teacher": 0.0}
        for k, dataset in enumerate(datasets):
            r = run_set(
                name,
                dataset,
                work,
                args.epochs or EPOCHS[name],
                overrides,
                seed,
                args.tta,
                tag=f"-fold-{k}",
            )
            for split, model in itertools.product(pooled, ("deep", "forest", "teacher")):
                if r[model]:
                    pooled[split][model].update(r[model][split].chip_matrices)
            seconds["deep"] += r["deep_seconds"]
            seconds["forest"] += r["forest_seconds"]
            print(
                f"{name} fold {k} seed {seed}: chips {'/'.join(map(str, r['chips']))}, "
                f"test deep {r['deep']['test'].mean_iou:.3f}, forest "
                f"{r['forest']['test'].mean_iou:.3f}",
                flush=True,
            )
        classes = r["classes"]
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
        "--seeds", type=int, default=3, help="Training seeds per set (the RandomForest's seed too)."
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
    parser.add_argument("--verbose", action="store_true", help="Also per-class val IoU.")
    parser.add_argument(
        "--save-matrices",
        default=None,
        help="--folds: write every chip's confusion matrices and units to this JSON file.",
    )
    parser.add_argument(
        "--class-weighting",
        default="one-minus-share",
        choices=["one-minus-share", "inverse-frequency"],
    )
    args = parser.parse_args()
    CLASS_WEIGHTING["value"] = args.class_weighting
    import logging

    logging.disable(logging.WARNING)
    data = Path(args.data)
    work = tempfile.mkdtemp(prefix="bench-quality-")
    overrides = parse_overrides(args.overrides)
    print(f"overrides: {overrides or 'none (defaults)'}; TTA in scoring: {args.tta}")
    header = (
        "set | chips train/val/test | model | val mean IoU | test mean IoU | test OA | "
        "test per-class IoU | train s | test: deep − forest (90 % interval)"
    )
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
