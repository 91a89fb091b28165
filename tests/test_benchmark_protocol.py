"""The quality benchmark's protocol: the held-out part is never seen by a development mode.

``benchmarks/bench_quality.py`` publishes only its ``--final`` figures, measured on a held-out
part of each set; its other modes (a development split, the cross-validation folds) must
never train, validate or test on a held-out chip or on the buffer around it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _chips(folder: str, csv: str) -> set[str]:
    frame = pd.read_csv(os.path.join(folder, csv))
    return {os.path.basename(p) for p in frame["image"]}


def test_the_held_out_part_stays_out_of_every_development_mode(dataset, tmp_path):
    import bench_quality

    from specdeepmap.leakage import TEST, TRAIN, UNUSED, touching_pairs
    from specdeepmap.params import SplitParams
    from specdeepmap.splitting import chip_class_counts

    chips = str(dataset / "chips")
    params = SplitParams(strategy="spatial-blocks", block_size=2, scaler=10000)
    frame = chip_class_counts(chips)
    sets = bench_quality.holdout("s2", frame, params)
    held = set(frame["chip"][sets == TEST])
    development = set(frame["chip"][sets == TRAIN])
    assert len(held) >= bench_quality.HOLDOUT_SHARE * len(frame)
    assert (sets == UNUSED).any()  # the buffer
    # no development chip touches a held-out chip (S2's buffer)
    for i, j in touching_pairs(frame):
        assert {sets[i], sets[j]} != {TRAIN, TEST}
    # every class of the set is in the held-out part
    columns = bench_quality.class_columns(frame)
    assert (frame.loc[sets == TEST, columns].sum() > 0).all()
    # whole blocks: no block is split between held-out and development chips
    blocks = frame["x"] // 64 * 1000 + frame["y"] // 64
    assert not set(blocks[sets == TEST]) & set(blocks[sets == TRAIN])

    folds = bench_quality.fold_datasets("s2", chips, params, 3, str(tmp_path))
    tested = set()
    for folder in folds:
        used = set().union(
            *(_chips(folder, f"{s}_files.csv") for s in ("train", "validation", "test"))
        )
        assert used <= development, "a fold uses a held-out or buffer chip"
        tested |= _chips(folder, "test_files.csv")
    assert tested == development  # every development chip is tested once
    dev = bench_quality.split_dataset("s2", chips, params, str(tmp_path), final=False)
    used = set().union(*(_chips(dev, f"{s}_files.csv") for s in ("train", "validation", "test")))
    assert used <= development
    final = bench_quality.split_dataset("s2", chips, params, str(tmp_path), final=True)
    assert _chips(final, "test_files.csv") == held
    assert _chips(final, "train_files.csv") | _chips(final, "validation_files.csv") == development
    # deterministic: the same part every run
    assert np.array_equal(sets, bench_quality.holdout("s2", frame, params))
