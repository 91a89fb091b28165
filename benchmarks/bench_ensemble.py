"""What an ensemble (``specdeepmap train --ensemble N``) costs at mapping time.

Maps one generated 13-band scene with the mapping benchmark's U-Net/ResNet-18 model (random
weights: speed does not depend on them) and with an ensemble of N networks of the same
architecture, at each precision, each measurement in a fresh process with GDAL_CACHEMAX
pinned (``bench_mapping.run``). Prints map seconds, the ratio to one network at the same
precision and to one fp32 network, and peak RSS.

Usage: python benchmarks/bench_ensemble.py [--size 2048] [--members 3]
       [--precisions fp32 int8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

from bench_mapping import make_model, run  # noqa: E402


def make_ensemble(single: str, members: int, path: str) -> str:
    """An ensemble file of ``members`` networks built like ``single``'s (random weights)."""
    import torch

    from specdeepmap.inference import export_model_file, read_model_file
    from specdeepmap.models import EnsembleSegmentation, build_network

    config, _ = read_model_file(single)
    torch.manual_seed(1)
    ensemble = EnsembleSegmentation([build_network(config) for _ in range(members)])
    return export_model_file(config.model_copy(update={"ensemble": members}), ensemble, path)


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from specdeepmap.sample_data import generate_scene

    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as work:
        scene = generate_scene(os.path.join(work, "scene"), args.size, args.size, seed=2).image_uri
        single = make_model(os.path.join(work, "single.pt"))
        ensemble = make_ensemble(single, args.members, os.path.join(work, "ensemble.pt"))
        seconds: dict[tuple[str, int], float] = {}
        rss: dict[tuple[str, int], float] = {}
        for precision in args.precisions:
            for members, model in ((1, single), (args.members, ensemble)):
                runs = [
                    run(f"map:{precision}", scene, model, os.path.join(work, "out.tif"), "cpu")
                    for _ in range(args.repeats)
                ]
                seconds[precision, members] = statistics.median(r["seconds"] for r in runs)
                rss[precision, members] = max(r["peak_rss_mb"] for r in runs)
    reference = seconds.get(("fp32", 1))
    print(
        f"{args.size}² scene, 13 bands, U-Net/ResNet-18, {os.cpu_count()} cores, "
        f"median of {args.repeats} runs\n"
    )
    print("precision | networks | map s | × one network | × one fp32 network | peak RSS MB")
    print("--- | --- | --- | --- | --- | ---")
    for (precision, members), value in seconds.items():
        one = seconds[precision, 1]
        vs_fp32 = f"{value / reference:.2f}" if reference else "–"
        print(
            f"{precision} | {members} | {value:.1f} | {value / one:.2f} | {vs_fp32} | "
            f"{rss[precision, members]:.0f}"
        )


if __name__ == "__main__":
    main()
