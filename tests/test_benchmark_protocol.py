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


def test_every_grid_cell_keeps_clear_of_the_held_out_ground(dataset, tmp_path):
    """A cell of the grid over users' settings cuts the scene its own way, but its chips never
    overlap the held-out part or its buffer, nor touch a held-out chip; with balanced-groups
    no training chip of a fold touches one of its validation or test chips.
    """
    import bench_quality

    from specdeepmap.chipping import chip_scene
    from specdeepmap.leakage import (
        TEST,
        TRAIN,
        UNUSED,
        VALIDATION,
        chip_extents,
        touching_pairs,
    )
    from specdeepmap.params import ChipParams
    from specdeepmap.sample_data import generate_scene
    from specdeepmap.splitting import chip_class_counts

    benchmark = chip_class_counts(str(dataset / "chips"))  # 32 px chips
    scene = generate_scene(str(tmp_path / "scene"), 384, 384, seed=5, field_size=48)
    chips = str(tmp_path / "cell-chips")
    chip_scene(
        scene.image_uri,
        scene.label_uri,
        chips,
        ChipParams(tile_x=48, tile_y=48, step_x=40, step_y=40, min_coverage=20),
    )
    frame = chip_class_counts(chips)
    cell = bench_quality.Cell("48 px, overlapping", chipping=(48, 40, 20))
    keep = bench_quality.cell_development("s2", cell, frame, benchmark)
    assert 0 < keep.sum() < len(frame)
    sets = bench_quality.holdout("s2", benchmark, bench_quality.s2_split())
    windows = np.stack(chip_extents(benchmark)[1:])
    mine = np.stack(chip_extents(frame)[1:])[:, keep]
    for code, margin in ((UNUSED, 0), (TEST, 1)):
        for x0, y0, x1, y1 in windows[:, sets == code].T:
            assert not (
                (mine[0] < x1 + margin)
                & (x0 - margin < mine[2])
                & (mine[1] < y1 + margin)
                & (y0 - margin < mine[3])
            ).any()
    split = bench_quality.s2_split().model_copy(update={"strategy": "balanced-groups"})
    split = split.model_copy(update={"scaler": 10000})
    folds = bench_quality.fold_datasets(
        "s2", chips, split, 3, str(tmp_path), keep=keep, tag="-cell", parts=5
    )
    assert len(folds) == 3
    names = frame["chip"].to_numpy()
    pairs = touching_pairs(frame)
    for folder in folds:
        role = {c: TRAIN for c in _chips(folder, "train_files.csv")}
        role |= {c: VALIDATION for c in _chips(folder, "validation_files.csv")}
        role |= {c: TEST for c in _chips(folder, "test_files.csv")}
        assert set(role) <= set(names[keep])
        assert role and TRAIN in role.values() and TEST in role.values()
        for i, j in pairs:
            a, b = role.get(names[i]), role.get(names[j])
            assert {a, b} not in ({TRAIN, TEST}, {TRAIN, VALIDATION})


def test_pooled_seeds_are_each_seeds_chips_drawn_by_unit(tmp_path, capsys):
    """``--pool-matrices``: one seed alone gives that seed's figure; two seeds pooled give
    the paired bootstrap over both seeds' chips, a unit's chips of both seeds drawn together.
    """
    import json

    import bench_quality

    from specdeepmap.comparison import paired_bootstrap

    rng = np.random.default_rng(3)
    record, chips = {}, [f"c{i}" for i in range(6)]
    units = {c: i // 2 for i, c in enumerate(chips)}  # three units of two chips
    for seed in (0, 1):
        test = {
            model: {c: rng.integers(0, 50, (2, 2)).tolist() for c in chips}
            for model in ("deep", "forest")
        }
        record[f"s2/seed-{seed}"] = {"classes": [1, 2], "units": units, "matrices": {"test": test}}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(record))
    bench_quality.pool_saved_matrices(str(path))
    lines = capsys.readouterr().out.splitlines()

    def as_arrays(seed, model):
        return {
            c: np.asarray(m)
            for c, m in record[f"s2/seed-{seed}"]["matrices"]["test"][model].items()
        }

    alone = paired_bootstrap(as_arrays(0, "deep"), as_arrays(0, "forest"), units=units)
    assert f"{alone.difference:+.3f} ({alone.low:+.3f} to {alone.high:+.3f}; 3)" in lines[2]
    both = {
        model: {f"{c}@{s}": m for s in (0, 1) for c, m in as_arrays(s, model).items()}
        for model in ("deep", "forest")
    }
    pooled = paired_bootstrap(
        both["deep"], both["forest"], units={f"{c}@{s}": units[c] for s in (0, 1) for c in chips}
    )
    assert f"{pooled.difference:+.3f} ({pooled.low:+.3f} to {pooled.high:+.3f}; 3;" in lines[-1]
