"""Training throughput: does the data loader keep up with the model?

U-Net/ResNet-18 on 13-band 224 × 224 chips (generated demo scene, chipped and split by the
library, read from GeoTIFF chips through :class:`specdeepmap.data.ChipDataset` with
normalisation and augmentation). Prints samples/s of

* ``loader``: iterating the DataLoader alone;
* ``model``: forward + backward + Adam step on one batch held in memory;
* ``together``: the training loop fed by the loader;

for each number of loader workers, and the ratio together / model (goal ≥ 0.9).

Usage: python benchmarks/bench_training.py [--device cpu] [--batch-size 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader


def build_dataset(folder: str) -> tuple:
    """Chip a generated 1792² scene into 64 chips of 224², split it, return the datasets."""
    from specdeepmap.chipping import chip_scene
    from specdeepmap.data import ChipDataset, Normalization, read_dataset_folder
    from specdeepmap.params import ChipParams, SplitParams
    from specdeepmap.sample_data import generate_scene
    from specdeepmap.splitting import make_dataset

    scene = generate_scene(os.path.join(folder, "scene"), 1792, 1792, seed=4)
    chip_scene(
        scene.image_uri,
        scene.label_uri,
        os.path.join(folder, "chips"),
        ChipParams(tile_x=224, tile_y=224, step_x=224, step_y=224, min_coverage=0),
    )
    make_dataset(
        os.path.join(folder, "chips"),
        SplitParams(train_percent=80, validation_percent=10, test_percent=10, scaler=10000),
    )
    info = read_dataset_folder(os.path.join(folder, "chips"))
    lookup = np.zeros(256, np.int64)
    for i, v in enumerate(info.class_values, start=1):
        lookup[v] = i
    norm = Normalization(info.scaler, info.band_mean, info.band_std, 0)
    return ChipDataset(info.train, norm, lookup, augment=True), len(info.class_values) + 1


def main() -> None:
    """Measure loader, model and both together; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Rounds; each measures the model alone (the baseline) and then every loader "
        "setting, so both are repeated alike; medians (range) are printed.",
    )
    args = parser.parse_args()
    from specdeepmap.inference import resolve_device
    from specdeepmap.models import ModelSpec, build_model

    device = resolve_device(args.device)
    dataset, classes = build_dataset(tempfile.mkdtemp(prefix="bench-training-"))
    model = build_model(ModelSpec("unet", "resnet18", 13, classes)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=0)
    bs, steps = args.batch_size, args.steps

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    x0, y0 = next(iter(DataLoader(dataset, batch_size=bs)))
    step(x0, y0)
    sync()

    def model_alone() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step(x0, y0)
        sync()
        return steps * bs / (time.perf_counter() - start)

    def loader(workers: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=bs,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def rate(workers: int, train: bool) -> float:
        start = time.perf_counter()
        n = 0
        while n < steps:
            for x, y in loader(workers):
                if train:
                    step(x, y)
                n += 1
                if n == steps:
                    break
        sync()
        return steps * bs / (time.perf_counter() - start)

    model_rates, loader_rates, together_rates = [], {w: [] for w in args.workers}, {}
    for _ in range(args.repeats):
        model_rates.append(model_alone())
        for workers in args.workers:
            loader_rates[workers].append(rate(workers, train=False))
            together_rates.setdefault(workers, []).append(rate(workers, train=True))

    print(
        f"\nTraining throughput, U-Net/ResNet-18, 13 bands, 224², batch {bs}, device {device}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    )
    print(
        "loader workers | loader samples/s | model samples/s | together samples/s | together/model"
    )
    print("--- | --- | --- | --- | ---")
    model_rate = float(np.median(model_rates))
    for workers in args.workers:
        together = float(np.median(together_rates[workers]))
        ratios = [t / m for t, m in zip(together_rates[workers], model_rates, strict=True)]
        print(
            f"{workers} | {_spread(loader_rates[workers])} | {_spread(model_rates)} | "
            f"{_spread(together_rates[workers])} | {together / model_rate:.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f})"
        )
    print(f"medians (range) of {args.repeats} rounds; the ratio's range is per round")


def _spread(values: list[float]) -> str:
    return f"{np.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


if __name__ == "__main__":
    main()
