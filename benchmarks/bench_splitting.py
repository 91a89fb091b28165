"""Dataset Maker benchmark: our balanced split vs SpecDeepMap's random permutation search.

The default split (``balanced-groups``) is timed on the same chips laid out edge to edge, so
that every chip touches its neighbours and the split must keep the sets apart.

For synthetic chip histograms (7 classes, skewed frequencies, 1–3 classes per chip) it runs our
search, then SpecDeepMap's search (random permutations scored by the mean 1-D Wasserstein
distance of the sets' normalised histograms, fed as sample values, with its 1 % rule) for the
same wall time, and prints split quality (largest class-share gap between sets in percentage
points, Jensen–Shannon divergence) and time.

Usage: python benchmarks/bench_splitting.py [--chips 255 100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import wasserstein_distance

from specdeepmap.balancing import assign, quality, set_counts


def synthetic_counts(n: int, k: int = 7, seed: int = 0) -> np.ndarray:
    """Chip histograms: skewed class frequencies, 1–3 classes per chip, 256² px chips."""
    rng = np.random.default_rng(seed)
    freq = rng.dirichlet(np.ones(k) * 0.7)
    counts = np.zeros((n, k))
    n_classes = rng.integers(1, 4, size=n)
    for i in range(n):
        cls = rng.choice(k, size=n_classes[i], replace=False, p=freq)
        counts[i, cls] = np.round(rng.dirichlet(np.ones(n_classes[i])) * rng.integers(32768, 65537))
    return counts


def permutation_search(
    counts: np.ndarray, seconds: float, seed: int = 42, min_share: float = 0.01
) -> tuple[np.ndarray | None, int]:
    """SpecDeepMap's Dataset Maker search, for a time budget instead of a trial count."""
    rng = np.random.default_rng(seed)
    n = len(counts)
    n_train, n_val, n_test = set_counts(n, (0.8, 0.1, 0.1))
    totals = counts.sum(axis=0)
    best, best_score, trials = None, np.inf, 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        trials += 1
        order = rng.permutation(n)
        parts = [
            order[:n_test],
            order[n_test : n_test + n_val],
            order[n_test + n_val : n_test + n_val + n_train],
        ]
        hists = [counts[p].sum(axis=0) for p in parts]
        if any((h < min_share * totals).any() for h in hists):
            continue
        p_test, p_val, p_train = (h / h.sum() for h in hists)
        score = np.mean(
            [
                wasserstein_distance(p_test, p_train),
                wasserstein_distance(p_val, p_train),
                wasserstein_distance(p_test, p_val),
            ]
        )
        if score < best_score:
            best_score, best = score, order
    if best is None:
        return None, trials
    sets = np.full(n, 3)
    sets[best[:n_test]] = 2
    sets[best[n_test : n_test + n_val]] = 1
    sets[best[n_test + n_val : n_test + n_val + n_train]] = 0
    return sets, trials


def main() -> None:
    """Run both searches per dataset size and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, nargs="+", default=[255, 100_000])
    args = parser.parse_args()
    print("\nDataset Maker split, 80/10/10, 7 classes, same wall time for both searches")
    header = (
        "chips",
        "method",
        "seconds",
        "trials",
        "largest gap (pp)",
        "JS divergence",
        "1 % rule",
    )
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for n in args.chips:
        counts = synthetic_counts(n)
        start = time.perf_counter()
        ours = assign(counts, (0.8, 0.1, 0.1), seed=42)
        elapsed = time.perf_counter() - start
        q = quality(counts, ours, 3, 0.01)
        print(
            f"{n} | balanced local search | {elapsed:.3f} | – | {q.max_share_gap_pp:.3f} | "
            f"{q.js_divergence:.2e} | {q.min_share_ok}"
        )
        theirs, trials = permutation_search(counts, elapsed)
        if theirs is None:
            print(
                f"{n} | random permutations (SpecDeepMap) | {elapsed:.3f} | {trials} | "
                "no feasible split | – | False"
            )
        else:
            q = quality(counts, theirs, 3, 0.01)
            print(
                f"{n} | random permutations (SpecDeepMap) | {elapsed:.3f} | {trials} | "
                f"{q.max_share_gap_pp:.3f} | {q.js_divergence:.2e} | {q.min_share_ok}"
            )
        grouped(counts)


def grouped(counts: np.ndarray) -> None:
    """The default split of the same chips laid out edge to edge on a square grid.

    Every chip touches its neighbours; timed is the whole path, from finding touching chips to
    the buffer.
    """
    import pandas as pd

    from specdeepmap.params import SplitParams
    from specdeepmap.splitting import split_chips

    n = len(counts)
    side = int(np.ceil(np.sqrt(n)))
    frame = pd.DataFrame(
        {
            "scene": "s",
            "x": (np.arange(n) % side) * 256,
            "y": (np.arange(n) // side) * 256,
            "tile_x": 256,
            "tile_y": 256,
        }
    )
    for k in range(counts.shape[1]):
        frame[f"count_{k + 1}"] = counts[:, k]
    start = time.perf_counter()
    choice = split_chips(frame, list(range(1, counts.shape[1] + 1)), SplitParams())
    elapsed = time.perf_counter() - start
    q = choice.quality
    buffer = int((choice.sets == 3).sum())
    print(
        f"{n} | balanced-groups, chips on a grid ({buffer} left out as buffer) | "
        f"{elapsed:.3f} | – | {q.max_share_gap_pp:.3f} | {q.js_divergence:.2e} | "
        f"{q.min_share_ok}"
    )


if __name__ == "__main__":
    main()
