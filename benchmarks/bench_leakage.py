"""Spatial leakage and the deep-versus-forest comparison on the shared Sentinel-2 scene.

The scene is cut into adjacent 64 px chips (step 64: neighbours touch) at two label-coverage
thresholds and split four ways, each trained with the recipe's defaults (the Trainer fits the
per-pixel RandomForest itself) and both models scored on the same test chips:

* 10 % coverage (a dense chip set), batch 8, 80/10/10: SpecDeepMap's ``balanced`` split over
  single chips (the baseline of this table), then the default ``balanced-groups``;
* 50 % coverage, batch 2, 70/15/15: ``spatial-blocks`` of 4 × 4 chips (what
  ``bench_quality.py`` uses for S2), then ``balanced-groups``.

Printed per case: chips per set, training chips left out as the buffer, the share of test
chips (and test pixels) that touch a training chip, the class-share gap, pooled test mean IoU
of both models and the deep model's difference with its 90 % paired bootstrap interval over
the test chips (resampled in groups of touching chips, the units counted); the last column is
the forest's test IoU as a ratio of its figure on the baseline split (how much of the
forest's score the leak gave it).

Usage: python benchmarks/bench_leakage.py [--epochs 30] [--seed 0] [--cases 1 2 3 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: (coverage %, batch size, split percentages, strategy)
CASES = {
    1: (10, 8, (80, 10, 10), "balanced"),
    2: (10, 8, (80, 10, 10), "balanced-groups"),
    3: (50, 2, (70, 15, 15), "spatial-blocks"),
    4: (50, 2, (70, 15, 15), "balanced-groups"),
}


def chips_at(coverage: int, work: str) -> str:
    """The S2 scene cut into adjacent 64 px chips at ``coverage`` % (cut once per run)."""
    from specdeepmap.chipping import chip_scene
    from specdeepmap.params import ChipParams

    folder = DATA / "s2l1c_brandenburg_osm"
    out = os.path.join(work, f"chips-{coverage}")
    if not os.path.isdir(out):
        chip_scene(
            str(folder / "s2l1c_T33UUU_20170216_13b_10m.tif"),
            str(folder / "osm_landuse_labels_10m.tif"),
            out,
            ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64, min_coverage=coverage),
        )
    return out


def main() -> None:
    """Split, train and score each case; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, nargs="+", default=list(CASES))
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the benchmark needs the shared real data")
    from bench_quality import run_set

    from specdeepmap.console import configure_console
    from specdeepmap.params import SplitParams
    from specdeepmap.splitting import make_dataset

    configure_console(False)
    work = tempfile.mkdtemp(prefix="bench-leakage-")
    rows, baseline_forest = [], None
    for case in args.cases:
        coverage, batch, percent, strategy = CASES[case]
        chips = chips_at(coverage, work)
        dataset = os.path.join(work, f"case-{case}")
        split = make_dataset(
            chips, SplitParams(*percent, scaler=10000, strategy=strategy), out_folder=dataset
        )
        result = run_set(
            "s2",
            dataset,
            work,
            args.epochs,
            {"batch_size": batch},
            args.seed,
            tta=False,
            tag=f"-case-{case}",
        )
        deep, forest = result["deep"]["test"].mean_iou, result["forest"]["test"].mean_iou
        versus = result["versus"]["test"]
        baseline_forest = baseline_forest or forest
        test = split.leakage["test"]
        rows.append(
            f"| {case} | {coverage} % | {batch} | {'/'.join(map(str, percent))} | "
            f"{split.strategy} | {'/'.join(map(str, result['chips']))} | "
            f"{split.buffer_chips} | {test['touching_chips']}/{test['chips']} "
            f"({test['pixel_share']:.0%}) | {split.max_share_gap_pp:.1f} | {deep:.3f} | "
            f"{forest:.3f} | {versus.difference:+.3f} ({versus.low:+.3f} to "
            f"{versus.high:+.3f}; {versus.units} units) | {forest / baseline_forest:.2f} |"
        )
        print(rows[-1], flush=True)
    print(
        f"\nSentinel-2, 64 px chips, step 64, {args.epochs} epochs, seed {args.seed}; "
        "pooled test mean IoU on each case's own test chips\n"
    )
    print(
        "| case | coverage | batch | split % | strategy | chips train/val/test | buffer | "
        "test chips touching train (pixels) | class-share gap (pp) | deep | forest | "
        "deep − forest (90 % interval over groups of touching test chips) | "
        "forest ÷ case 1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
