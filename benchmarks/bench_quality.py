"""Model quality on the real data sets: the deep model against the per-pixel RandomForest.

For each real set in ``../shared/data`` it runs the pipeline through the functions a user
calls (the CLI's defaults unless ``--set`` overrides them):

* EnMAP Potsdam (224 bands, 30 m): the 18 shipped 32² chips, split 60/20/20 (balanced; at
  80/10/10 a set would hold 2 chips);
* Sentinel-2 L1C Brandenburg (13 bands, 10 m) with OpenStreetMap labels: chipped at 64 px and
  split 70/15/15 with spatial blocks, so neighbouring chips do not leak between sets.

The Trainer fits the RandomForest baseline itself (every run does); both models are scored on
the same chips with the same pooled confusion matrix. Prints, per set: chips per split, pooled
mean IoU on validation and test, overall accuracy, per-class IoU, wall time, and the deep
model's test mean IoU minus the forest's with its 90 % paired bootstrap interval over the test
chips (``specdeepmap.comparison``: whether the test chips can tell the two apart).

``--folds K`` measures by cross-validation instead: the chips (S2: the spatial blocks) are
dealt into K folds, stratified by each chip's main class; run k tests on fold k, validates on
fold k + 1 and trains on the rest, so every chip is a test chip exactly once (and a
validation chip once). Both models' confusion matrices of all K runs are pooled per split,
and the test difference is bootstrapped over all the chips: on a set as small as EnMAP's
(4 test chips in one split) that is the only way to measure a difference of a few
hundredths. It costs K trainings per seed.

Usage: python benchmarks/bench_quality.py [--sets enmap s2] [--set loss=ce ...] [--seeds 1]
       [--folds 6]
Choose recipes on the validation columns only; the test columns are for the final table.
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
    """The EnMAP chips' split (SpecDeepMap's: its 18 chips all touch)."""
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
    """The Sentinel-2 chips' split (4 x 4 spatial blocks)."""
    from specdeepmap.params import SplitParams

    return SplitParams(
        train_percent=70,
        validation_percent=15,
        test_percent=15,
        strategy="spatial-blocks",
        class_weighting=CLASS_WEIGHTING["value"],
    )


def prepare_enmap(data: Path, work: str) -> tuple[str, str]:
    """(chip folder, dataset folder) of the shipped EnMAP chips, split 60/20/20."""
    from specdeepmap.splitting import make_dataset

    out = os.path.join(work, "enmap-ds")
    make_dataset(str(data / "enmap_potsdam"), enmap_split(), out_folder=out)
    return str(data / "enmap_potsdam"), out


def prepare_s2(data: Path, work: str) -> tuple[str, str]:
    """Chip the Sentinel-2 scene at 64 px and split it 70/15/15 in spatial blocks."""
    from specdeepmap.chipping import chip_scene
    from specdeepmap.params import ChipParams
    from specdeepmap.splitting import make_dataset

    folder = data / "s2l1c_brandenburg_osm"
    chips = os.path.join(work, "s2-chips")
    chip_scene(
        str(folder / "s2l1c_T33UUU_20170216_13b_10m.tif"),
        str(folder / "osm_landuse_labels_10m.tif"),
        chips,
        ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64),
    )
    make_dataset(chips, s2_split())
    return chips, chips


#: per set: how its chips are prepared (chip folder, dataset folder) and split
SETS = {"enmap": (prepare_enmap, enmap_split), "s2": (prepare_s2, s2_split)}


def fold_datasets(name: str, chips: str, params: SplitParams, folds: int, work: str) -> list[str]:
    """K dataset folders of one chip folder for cross-validation (fold k tests, fold k + 1
    validates, the rest trains). Chips, or the spatial blocks ``params`` groups them in, are
    dealt round-robin in the order of their main class (the class of which they hold the
    largest share of all its pixels), in a random order within a class, so that rare classes
    spread over the folds.
    """
    from specdeepmap.chipping import COUNT_PREFIX
    from specdeepmap.splitting import chip_class_counts, split_units, write_split

    frame = chip_class_counts(chips)
    units = split_units(frame, params)
    columns = [c for c in frame.columns if c.startswith(COUNT_PREFIX) and c != f"{COUNT_PREFIX}0"]
    counts = np.zeros((units.max() + 1, len(columns)))
    np.add.at(counts, units, frame[columns].to_numpy(np.float64))
    if len(counts) < folds:
        raise SystemExit(f"{name}: {len(counts)} chips or blocks cannot make {folds} folds")
    main_class = np.argmax(counts / np.maximum(counts.sum(axis=0), 1), axis=1)
    order = np.random.default_rng(params.seed).permutation(len(counts))
    order = order[np.argsort(main_class[order], kind="stable")]
    fold_of = np.empty(len(counts), np.int64)
    fold_of[order] = np.arange(len(counts)) % folds
    out = []
    for k in range(folds):
        sets = np.where(fold_of == k, 2, np.where(fold_of == (k + 1) % folds, 1, 0))[units]
        folder = os.path.join(work, f"{name}-fold-{k}")
        write_split(chips, frame, sets, params, out_folder=folder)
        out.append(folder)
    return out


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

    split = SETS[name][1]()
    datasets = fold_datasets(name, chips, split, args.folds, work)
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
                paired_bootstrap(pooled["test"][model], pooled["test"]["forest"])
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
                    f", {versus.verdict}, {versus.chips} chips)"
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
        "--tta",
        action="store_true",
        help="Score with D4 TTA (the figures without it are printed too).",
    )
    parser.add_argument("--verbose", action="store_true", help="Also per-class val IoU.")
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
        chips, dataset = SETS[name][0](data, work)
        if args.folds:
            means.extend(cross_validate(name, chips, args, overrides, work))
            continue
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
                        f"{versus.high:+.3f}, {versus.verdict})"
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
