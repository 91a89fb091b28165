"""Training throughput: does the data loader keep up with the model?

U-Net/ResNet-18 on 13-band 224 × 224 chips (generated demo scene, chipped and split by the
library, read from GeoTIFF chips through :class:`specdeepmap.data.ChipDataset` with
normalisation and augmentation). Prints samples/s of

* ``loader``: iterating the DataLoader alone;
* ``model``: forward + backward + Adam step on one batch held in memory;
* ``together``: the training loop fed by the loader;

for each number of loader workers, and the ratio together / model (goal ≥ 0.9).

``--arithmetic`` measures instead what one optimiser step of the recipe's network (learned
spectral front-end, U-Net/ResNet-18 at the encoder depth its chip size gets, Dice + CE, Adam)
costs in each memory format and arithmetic the Trainer can run: float32 in PyTorch's default
layout (the baseline, measured in the same round), channels-last (what training runs since
2026-12-06), bf16 autocast (``--precision bf16-mixed``), both, and channels-last with batch
renormalisation (``--norm renorm``, the default under 16 chips a batch since 2026-12-07), on
chips the size of the shared sets' (S2 64 px × 13 bands, EnMAP 32 px × 224 bands, the
tutorial-like 96 px).

``--memory`` measures what keeping decoded chips in memory (``ChipDataset``'s
``memory_bytes``, since 2026-12-06) gives the loader: samples/s over three epochs of 128
draws, each chip read from disk on every use (the baseline, in the same round) against kept
after its first use, on the generated 224² chips and the shared EnMAP chips (224 bands,
32 px; skipped when ``../shared/data`` is absent).

Usage: python benchmarks/bench_training.py [--device cpu] [--batch-size 8] [--repeats 3]
       [--arithmetic | --memory]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

#: the shared real data (``../shared/data``), where present
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
    parser.add_argument(
        "--arithmetic",
        action="store_true",
        help="Time one step of the recipe's network per memory format and arithmetic.",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="Loader samples/s with chips read from disk every time against kept in memory.",
    )
    args = parser.parse_args()
    if args.arithmetic:
        arithmetic_table(args)
        return
    if args.memory:
        memory_table(args)
        return
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


def memory_table(args: argparse.Namespace) -> None:
    """Loader samples/s, chips read from disk on every use (baseline) against kept in memory
    after their first use; three epochs of 128 draws per measurement (the figures of
    docs/benchmarks.md were measured so).
    """
    from specdeepmap.data import ChipDataset, Normalization, read_dataset_folder

    cases = [("generated, 224 px, 13 bands", build_dataset(tempfile.mkdtemp())[0].pairs)]
    enmap = DATA / "enmap_potsdam"
    if enmap.is_dir():
        cases.append(("EnMAP, 32 px, 224 bands", read_dataset_folder(str(enmap)).train))
    lookup = np.arange(256)
    print(f"\nLoader, batch {args.batch_size}, 3 epochs of 128 draws, workers 0")
    print("chips | chip files | read every use, samples/s | kept, samples/s | kept / read (range)")
    print("--- | --- | --- | --- | ---")
    for name, pairs in cases:
        rates: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(args.repeats):
            for kept in (0, 1):
                budget = 2**31 if kept else 0
                dataset = ChipDataset(pairs, Normalization(), lookup, True, memory_bytes=budget)
                sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=128)
                loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
                start = time.perf_counter()
                for _ in range(3):
                    for _batch in loader:
                        pass
                rates[kept].append(3 * 128 / (time.perf_counter() - start))
        ratios = [k / r for k, r in zip(rates[1], rates[0], strict=True)]
        print(
            f"{name} | {len(pairs)} | {_spread(rates[0])} | {_spread(rates[1])} | "
            f"{np.median(ratios):.1f}× ({min(ratios):.1f}–{max(ratios):.1f})"
        )
    print(f"medians (range) of {args.repeats} rounds")


#: (name, bands, chip px, classes incl. unlabelled): chips like the shared sets'
ARITHMETIC_CASES = (("S2", 13, 64, 9), ("EnMAP", 224, 32, 7), ("S2 tutorial-like", 13, 96, 9))
#: (name, channels-last, bf16 autocast, batch renormalisation); the first is the baseline
ARITHMETIC_MODES = (
    ("float32", False, False, False),
    ("float32, channels-last", True, False, False),
    ("bf16-mixed", False, True, False),
    ("bf16-mixed, channels-last", True, True, False),
    ("float32, channels-last, batch renormalisation", True, False, True),
)


def arithmetic_table(args: argparse.Namespace) -> None:
    """Seconds per optimiser step of the recipe's network in each mode of
    :data:`ARITHMETIC_MODES`, on random chips of each case; medians of ``args.repeats``
    rounds, every mode timed in every round, ratios against float32 in its own round.
    """
    from specdeepmap.inference import resolve_device
    from specdeepmap.losses import DiceCELoss
    from specdeepmap.model_config import ModelConfig
    from specdeepmap.models import encoder_depth_for

    device = resolve_device(args.device)
    loss_fn = DiceCELoss()
    print(
        f"\nOne optimiser step of the recipe's network, batch {args.batch_size}, device "
        f"{device}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    )
    print("chips | mode | ms per step | speed-up over float32 (range)")
    print("--- | --- | --- | ---")
    for name, bands, size, classes in ARITHMETIC_CASES:
        config = ModelConfig(
            architecture="unet",
            backbone="resnet18",
            in_channels=bands,
            num_classes=classes,
            spectral_channels=32,
            encoder_depth=encoder_depth_for("unet", size, -1),  # the recipe's rule
            class_values=list(range(1, classes)),
            tile_size=[size, size],
        )
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch_size, bands, size, size, generator=generator).to(device)
        y = torch.randint(0, classes, (args.batch_size, size, size), generator=generator)
        y = y.to(device)
        times: dict[str, list[float]] = {mode[0]: [] for mode in ARITHMETIC_MODES}
        for _ in range(args.repeats):
            for mode, *how in ARITHMETIC_MODES:
                times[mode].append(_step_seconds(config, x, y, loss_fn, device, *how, args.steps))
        base = times[ARITHMETIC_MODES[0][0]]
        for mode, *_ in ARITHMETIC_MODES:
            ratios = [b / t for b, t in zip(base, times[mode], strict=True)]
            print(
                f"{name}: {size} px, {bands} bands | {mode} | "
                f"{1000 * float(np.median(times[mode])):.0f} | {np.median(ratios):.2f}× "
                f"({min(ratios):.2f}–{max(ratios):.2f})"
            )
    print(f"medians (range) of {args.repeats} rounds, {args.steps} steps each after 3 warm-up")


def _step_seconds(
    config, x, y, loss_fn, device, channels_last: bool, bf16: bool, renorm: bool, steps: int
):
    """Seconds per step of a fresh network (the same start in every mode); ``renorm``: its
    batch norms as :class:`~specdeepmap.batch_renorm.BatchRenorm2d` with the clips open.
    """
    from specdeepmap.batch_renorm import D_MAX, R_MAX, set_clips, to_batch_renorm
    from specdeepmap.models import build_network

    torch.manual_seed(0)
    network = build_network(config).to(device).train()
    if renorm:
        to_batch_renorm(network)
        set_clips(network, R_MAX, D_MAX)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = network(x)
        loss_fn(logits.float(), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _spread(values: list[float]) -> str:
    return f"{np.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


if __name__ == "__main__":
    main()
