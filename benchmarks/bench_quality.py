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

Usage: python benchmarks/bench_quality.py [--sets enmap s2] [--set loss=ce ...] [--seeds 1]
Choose recipes on the validation columns only; the test columns are for the final table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: epochs a user would give for each set (the CLI default is SpecDeepMap's 1)
EPOCHS = {"enmap": 50, "s2": 30}


#: Dataset Maker class weighting (a split parameter; --class-weighting changes it)
CLASS_WEIGHTING = {"value": "one-minus-share"}


def prepare_enmap(data: Path, work: str) -> str:
    """Dataset folder of the shipped EnMAP chips, split 60/20/20."""
    from specdeepmap.splitting import SplitParams, make_dataset

    out = os.path.join(work, "enmap-ds")
    make_dataset(str(data / "enmap_potsdam"),
                 SplitParams(60, 20, 20, class_weighting=CLASS_WEIGHTING["value"]),
                 out_folder=out)
    return out


def prepare_s2(data: Path, work: str) -> str:
    """Chip the Sentinel-2 scene at 64 px and split it 70/15/15 in spatial blocks."""
    from specdeepmap.chipping import ChipParams, chip_scene
    from specdeepmap.splitting import SplitParams, make_dataset

    folder = data / "s2l1c_brandenburg_osm"
    chips = os.path.join(work, "s2-chips")
    chip_scene(str(folder / "s2l1c_T33UUU_20170216_13b_10m.tif"),
               str(folder / "osm_landuse_labels_10m.tif"), chips,
               ChipParams((64, 64), (64, 64)))
    make_dataset(chips, SplitParams(70, 15, 15, strategy="spatial-blocks",
                                     class_weighting=CLASS_WEIGHTING["value"]))
    return chips


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


def run_set(name: str, dataset: str, work: str, epochs: int, overrides: dict, seed: int,
            tta: bool) -> dict:
    """Train (with the baseline) and score on validation and test; return the figures."""
    from specdeepmap.baseline import summary_metrics
    from specdeepmap.data import read_dataset_folder
    from specdeepmap.evaluation import evaluate_model
    from specdeepmap.training import TrainConfig, train

    info = read_dataset_folder(dataset)
    run = os.path.join(work, f"{name}-run-{seed}")
    start = time.perf_counter()
    result = train(TrainConfig(**({"dataset": dataset, "out": run, "epochs": epochs,
                                   "device": "cpu", "seed": seed, "registered_model": None,
                                   "tracking_uri": f"sqlite:///{work}/mlflow.db"}
                                  | overrides)))
    seconds = time.perf_counter() - start
    scores, other, versus = {}, {}, {}
    forest = {s: summary_metrics(result.baseline, s) for s in ("validation", "test")}
    for split in ("validation", "test"):
        for use_tta, target in ((tta, scores), (not tta, other)):
            report = evaluate_model(os.path.join(dataset, f"{split}_files.csv"),
                                    result.model_file, os.path.join(run, split), device="cpu",
                                    tta=use_tta, baseline=forest[split], log_to_mlflow=False)
            target[split] = report.metrics
            if use_tta == tta:
                versus[split] = report.versus_baseline
    print(f"{name} seed {seed}: TTA {'off' if tta else 'on'} instead: val "
          f"{other['validation'].mean_iou:.3f}, test {other['test'].mean_iou:.3f}", flush=True)
    return {"chips": (len(info.train), len(info.validation), len(info.test)),
            "deep": scores, "deep_seconds": seconds, "versus": versus, "forest": forest,
            "forest_seconds": result.baseline["fit_seconds"], "classes": info.class_values}


def main() -> None:
    """Prepare the sets, train, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["enmap", "s2"], choices=["enmap", "s2"])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                        help="TrainConfig overrides, e.g. loss=ce augmentation=d4-rotate")
    parser.add_argument("--epochs", type=int, default=None, help="Override both sets' epochs.")
    parser.add_argument("--seeds", type=int, default=3,
                        help="Training seeds per set (the RandomForest's seed too).")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="Seeds run are first-seed … first-seed + seeds − 1.")
    parser.add_argument("--tta", action="store_true",
                        help="Score with D4 TTA (the figures without it are printed too).")
    parser.add_argument("--verbose", action="store_true", help="Also per-class val IoU.")
    parser.add_argument("--class-weighting", default="one-minus-share",
                        choices=["one-minus-share", "inverse-frequency"])
    args = parser.parse_args()
    CLASS_WEIGHTING["value"] = args.class_weighting
    import logging

    logging.disable(logging.WARNING)
    data = Path(args.data)
    work = tempfile.mkdtemp(prefix="bench-quality-")
    overrides = parse_overrides(args.overrides)
    print(f"overrides: {overrides or 'none (defaults)'}; TTA in scoring: {args.tta}")
    header = ("set | chips train/val/test | model | val mean IoU | test mean IoU | test OA | "
              "test per-class IoU | train s | test: deep − forest (90 % interval)")
    rows, means = [], []
    for name in args.sets:
        dataset = prepare_enmap(data, work) if name == "enmap" else prepare_s2(data, work)
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r = run_set(name, dataset, work, args.epochs or EPOCHS[name], overrides, seed,
                        args.tta)
            runs.append(r)
            for model, metrics, seconds in (
                    (f"deep (seed {seed})", r["deep"], r["deep_seconds"]),
                    (f"RandomForest (seed {seed})", r["forest"], r["forest_seconds"])):
                test = metrics["test"]
                per_class = " ".join(f"{c}:{v:.2f}" for c, v in
                                     zip(r["classes"], np.nan_to_num(test.iou)))
                if args.verbose:
                    per_class += " (val " + " ".join(
                        f"{c}:{v:.2f}" for c, v in zip(r["classes"], np.nan_to_num(
                            metrics["validation"].iou))) + ")"
                versus = r["versus"]["test"] if model.startswith("deep") else None
                rows.append(f"{name} | {'/'.join(map(str, r['chips']))} | {model} | "
                            f"{metrics['validation'].mean_iou:.3f} | {test.mean_iou:.3f} | "
                            f"{test.overall_accuracy:.3f} | {per_class} | {seconds:.0f} | "
                            + (f"{versus.difference:+.3f} ({versus.low:+.3f} to "
                               f"{versus.high:+.3f}, {versus.verdict})" if versus else ""))
                print(rows[-1], flush=True)
        for model in ("deep", "forest"):
            val = [r[model]["validation"].mean_iou for r in runs]
            test = [r[model]["test"].mean_iou for r in runs]
            means.append(f"{name} | {model} | {np.mean(val):.3f} ({min(val):.3f}–{max(val):.3f})"
                         f" | {np.mean(test):.3f} ({min(test):.3f}–{max(test):.3f}) | "
                         f"{np.mean([r[model]['test'].overall_accuracy for r in runs]):.3f}")
        gap = np.mean([r["deep"]["test"].mean_iou - r["forest"]["test"].mean_iou for r in runs])
        verdicts = [r["versus"]["test"].verdict for r in runs if r["versus"]["test"]]
        means.append(f"{name} | deep − forest | | {gap:+.3f} (seeds the test chips call "
                     + ", ".join(f"{v}: {verdicts.count(v)}" for v in
                                 ("better", "undecided", "worse")) + ") | ")
    print()
    print(header)
    print("|".join("---" for _ in header.split("|")))
    print("\n".join(rows))
    print(f"\nMean over {args.seeds} seed(s) (range)")
    print("set | model | val mean IoU | test mean IoU | test OA")
    print("--- | --- | --- | --- | ---")
    print("\n".join(means))


if __name__ == "__main__":
    main()
