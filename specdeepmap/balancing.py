"""Class-balanced assignment of chips (or blocks of chips) to train/validation/test sets.

SpecDeepMap draws up to 100 000 random permutations and keeps the one with the lowest mean
Wasserstein distance between the sets' class histograms. Its histogram assumes classes 1..N and
its distance compares proportion values, not class distributions. Here:

* items carry a count vector over any class values (columns), and a size in chips;
* the objective is the squared difference between each set's class shares and the shares of the
  whole dataset, plus penalties for a set holding less than ``min_share`` of a class's pixels
  and (for items of unequal size) for missing the requested number of chips per set;
* the search starts from a seeded random assignment with the requested chip counts and improves
  it by vectorised local search: each step scores a few thousand random swaps (and, for items of
  unequal size, moves) at once and applies the best one, until no candidate improves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

#: loss below which no restart is tried (all class shares within ~0.3 percentage points)
GOOD_ENOUGH = 1e-5


@dataclass(frozen=True)
class SplitQuality:
    """How similar the sets' class distributions are."""

    max_share_gap_pp: float  #: largest class-share difference between two sets, percentage points
    js_divergence: float  #: largest Jensen-Shannon divergence between two sets (bits)
    min_share_ok: bool  #: every set holds at least ``min_share`` of every class's pixels

    def sentence(self) -> str:
        """The two figures as the split's log states them."""
        return (
            f"largest class-share gap {self.max_share_gap_pp:.2f} pp, "
            f"Jensen-Shannon divergence {self.js_divergence:.2e}"
        )


def set_counts(n_items: int, fractions: tuple[float, ...]) -> list[int]:
    """Chips per set as SpecDeepMap computes them: ceil for test/validation, the rest for train.

    ``fractions`` is (train, validation, test); the sum may be below 1 (chips left unused).
    """
    train, val, test = fractions
    n_test = int(np.ceil(n_items * test)) if test > 0 else 0
    n_val = int(np.ceil(n_items * val)) if val > 0 else 0
    n_train = min(int(np.ceil(n_items * train)), n_items - n_test - n_val)
    return [max(n_train, 0), n_val, n_test]


def shares(hist: np.ndarray) -> np.ndarray:
    """Row-normalised class shares (rows of zeros stay zero)."""
    total = hist.sum(axis=-1, keepdims=True)
    return np.divide(hist, total, out=np.zeros_like(hist, dtype=np.float64), where=total > 0)


def quality(
    counts: np.ndarray, assignment: np.ndarray, n_sets: int, min_share: float
) -> SplitQuality:
    """Measure a split: share gap, Jensen-Shannon divergence and the minimum-share rule."""
    hist = np.stack([counts[assignment == s].sum(axis=0) for s in range(n_sets)]).astype(float)
    used = hist.sum(axis=1) > 0
    p = shares(hist[used])
    gap = float((p.max(axis=0) - p.min(axis=0)).max() * 100) if len(p) else 0.0
    js = 0.0
    for a in range(len(p)):
        for b in range(a + 1, len(p)):
            js = max(js, _js_divergence(p[a], p[b]))
    totals = counts.sum(axis=0)
    ok = bool((hist[used] >= min_share * totals[None, :] - 1e-9).all())
    return SplitQuality(max_share_gap_pp=gap, js_divergence=js, min_share_ok=ok)


def _js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


class _Objective:
    """Per-set loss, vectorised over many candidate histograms at once."""

    def __init__(
        self,
        counts: np.ndarray,
        sizes: np.ndarray,
        targets: np.ndarray,
        scored: np.ndarray,
        min_share: float,
    ):
        totals = counts.sum(axis=0).astype(np.float64)
        self.target_share = totals / max(totals.sum(), 1.0)
        self.min_pixels = min_share * totals
        self.scale = np.where(totals > 0, totals, 1.0)
        self.targets = targets.astype(np.float64)
        self.scored = scored
        self.n_total = float(sizes.sum())

    def loss(self, hist: np.ndarray, n: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Loss of sets ``s`` holding class counts ``hist`` (…, K) and ``n`` chips."""
        share_term = ((shares(hist) - self.target_share) ** 2).sum(axis=-1)
        shortfall = np.clip(self.min_pixels - hist, 0, None) / self.scale
        size_term = ((n - self.targets[s]) / self.n_total) ** 2
        return np.where(self.scored[s], share_term + 10.0 * shortfall.sum(axis=-1), 0.0) + size_term


#: weight of the cut term (touching chip pairs across training and evaluation, per chip):
#: losing 5 % of the chips to the buffer costs as much as a 3-point gap in one class's share
CUT_WEIGHT = 0.02
#: X[a, b] = 1 where chips of sets a and b may not touch (training against validation/test)
_CROSS = np.zeros((4, 4))
_CROSS[0, 1] = _CROSS[1, 0] = _CROSS[0, 2] = _CROSS[2, 0] = 1.0


def assign(
    counts: np.ndarray,
    fractions: tuple[float, float, float],
    seed: int = 42,
    min_share: float = 0.01,
    sizes: np.ndarray | None = None,
    max_seconds: float = 2.0,
    restarts: int = 16,
    adjacency=None,
) -> np.ndarray:
    """Assign items to sets 0 = train, 1 = validation, 2 = test, 3 = unused.

    Runs the local search from up to ``restarts`` random starts (all within ``max_seconds``)
    and keeps the best result: small datasets have many local optima, large ones need one run.

    Args:
        counts: (items, classes) labelled-pixel counts (class 0 excluded).
        fractions: requested (train, validation, test) shares of the chips, sum ≤ 1.
        seed: seed of the random starts and of the candidate draws.
        min_share: each non-empty set should hold at least this share of every class's pixels.
        sizes: chips per item (blocks of chips); ``None`` for one chip per item.
        max_seconds: time budget of the whole search.
        restarts: most random starts.
        adjacency: optional (items, items) sparse matrix of touching chip pairs between
            items; the search then also keeps touching items on one side of the
            training/evaluation divide (``CUT_WEIGHT`` per touching pair and chip), so that
            few training chips must be left out as a buffer.

    Returns:
        The set index of every item.
    """
    rng = np.random.default_rng(seed)
    deadline = time.perf_counter() + max_seconds
    best, best_loss = None, np.inf
    for _ in range(max(1, restarts)):
        remaining = deadline - time.perf_counter()
        if best is not None and remaining <= 0:
            break
        assignment, loss = _search(
            counts, fractions, rng, min_share, sizes, max(remaining, 0.05), adjacency=adjacency
        )
        if loss < best_loss:
            best, best_loss = assignment, loss
        if best_loss < GOOD_ENOUGH:
            break
    return best


def _search(
    counts: np.ndarray,
    fractions: tuple[float, float, float],
    rng: np.random.Generator,
    min_share: float,
    sizes: np.ndarray | None,
    max_seconds: float,
    candidates: int = 2048,
    patience: int = 30,
    adjacency=None,
) -> tuple[np.ndarray, float]:
    """One local search from a random start; returns the assignment and its total loss."""
    counts = np.asarray(counts, dtype=np.float64)
    n_items = len(counts)
    sizes = np.ones(n_items) if sizes is None else np.asarray(sizes, dtype=np.float64)
    equal_sizes = bool(np.all(sizes == sizes[0]))
    n_chips = int(sizes.sum())
    wanted = set_counts(n_chips, fractions)
    targets = np.array([*wanted, n_chips - sum(wanted)], dtype=np.float64)
    scored = np.array([targets[0] > 0, targets[1] > 0, targets[2] > 0, False])
    objective = _Objective(counts, sizes, targets, scored, min_share)

    assignment = _random_start(sizes, targets, rng)
    hist = np.stack([counts[assignment == s].sum(axis=0) for s in range(4)])
    n = np.array([sizes[assignment == s].sum() for s in range(4)])
    set_ids = np.arange(4)
    current = objective.loss(hist, n, set_ids)
    cut = _Cut(adjacency, assignment, n_chips) if adjacency is not None and adjacency.nnz else None
    active = [s for s in range(4) if targets[s] > 0 or n[s] > 0]
    pairs = [(a, b) for i, a in enumerate(active) for b in active[i + 1 :]]
    if not pairs:
        return assignment, float(current.sum())

    deadline = time.perf_counter() + max_seconds
    stale = 0
    while stale < patience and time.perf_counter() < deadline:
        members = [np.flatnonzero(assignment == s) for s in range(4)]
        pair_idx = rng.integers(len(pairs), size=candidates)
        a = np.array([pairs[k][0] for k in pair_idx])
        b = np.array([pairs[k][1] for k in pair_idx])
        # sample one item of set a and one of set b per candidate (-1 where a set is empty)
        i = _sample_members(members, a, rng)
        j = _sample_members(members, b, rng)
        # a swap exchanges i and j; a move (only for unequal sizes) sends i to b alone
        move = ((not equal_sizes) & (rng.random(candidates) < 0.5)) | (j < 0)
        valid = i >= 0
        hi = np.where(valid[:, None], counts[np.maximum(i, 0)], 0.0)
        hj = np.where((~move & (j >= 0))[:, None], counts[np.maximum(j, 0)], 0.0)
        si = np.where(valid, sizes[np.maximum(i, 0)], 0.0)
        sj = np.where(~move & (j >= 0), sizes[np.maximum(j, 0)], 0.0)
        new_a = objective.loss(hist[a] - hi + hj, n[a] - si + sj, a)
        new_b = objective.loss(hist[b] + hi - hj, n[b] + si - sj, b)
        delta = new_a + new_b - current[a] - current[b]
        if cut is not None:
            delta = delta + cut.delta(i, np.where(move, -1, j), a, b)
        delta[~valid] = np.inf
        if equal_sizes:
            delta[move] = np.inf
        best = int(np.argmin(delta))
        if not delta[best] < -1e-15:
            stale += 1
            continue
        stale = 0
        sa, sb = a[best], b[best]
        if cut is not None:
            cut.move(i[best], sa, sb)
            if not move[best]:
                cut.move(j[best], sb, sa)
        assignment[i[best]] = sb
        hist[sa] += hj[best] - hi[best]
        hist[sb] += hi[best] - hj[best]
        n[sa] += sj[best] - si[best]
        n[sb] += si[best] - sj[best]
        if not move[best]:
            assignment[j[best]] = sa
        current[[sa, sb]] = objective.loss(hist[[sa, sb]], n[[sa, sb]], np.array([sa, sb]))
    return assignment, float(current.sum()) + (cut.loss() if cut is not None else 0.0)


def _random_start(sizes: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fill the sets in a random item order up to their chip counts (``targets``)."""
    order = rng.permutation(len(sizes))
    assignment = np.searchsorted(np.cumsum(targets), np.cumsum(sizes[order]) - 0.5, side="right")
    result = np.empty(len(sizes), dtype=np.int64)
    result[order] = np.minimum(assignment, 3)
    return result


class _Cut:
    """The cut term.

    Touching chip pairs between training and evaluation items, kept as ``T[i, s]`` (pairs between
    item ``i`` and the items of set ``s``) so that a candidate's change is read off in O(1).
    """

    def __init__(self, adjacency, assignment: np.ndarray, n_chips: int):
        self.w = adjacency.tocsr()
        self.scale = CUT_WEIGHT / max(n_chips, 1)
        onehot = np.zeros((len(assignment), 4))
        onehot[np.arange(len(assignment)), assignment] = 1.0
        self.t = np.asarray(self.w @ onehot)
        self.assignment = assignment

    def delta(self, i: np.ndarray, j: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Change of the weighted cut when item ``i`` moves a→b and ``j`` (−1: none) b→a."""
        ii = np.maximum(i, 0)
        change = ((_CROSS[b] - _CROSS[a]) * self.t[ii]).sum(axis=1)
        swap = j >= 0
        jj = np.maximum(j, 0)
        change += np.where(swap, ((_CROSS[a] - _CROSS[b]) * self.t[jj]).sum(axis=1), 0.0)
        pair = np.asarray(self.w[ii, jj]).ravel()
        # the pair (i, j) itself: both moves above counted it as cut away; it stays as it was
        change += np.where(swap, 2 * pair * _CROSS[a, b], 0.0)
        return self.scale * change

    def move(self, item: int, source: int, target: int) -> None:
        """Item ``item`` moved from set ``source`` to ``target``."""
        column = self.w.getcol(int(item))
        rows = column.indices
        self.t[rows, source] -= column.data
        self.t[rows, target] += column.data

    def loss(self) -> float:
        """The weighted cut of the current assignment."""
        crossing = (self.t * _CROSS[self.assignment]).sum() / 2
        return self.scale * float(crossing)


def _sample_members(
    members: list[np.ndarray], sets: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    out = np.full(len(sets), -1, dtype=np.int64)
    for s in np.unique(sets):
        where = sets == s
        if len(members[s]):
            out[where] = members[s][rng.integers(len(members[s]), size=int(where.sum()))]
    return out
