"""How sure a set of test chips makes the difference between two models' mean IoU.

Two models scored on the same few chips differ by chance as well as by skill: on the shared
EnMAP set (4 test chips) one training recipe's test mean IoU spans 0.02–0.04 over seeds. A
reviewer comparing a model with the RandomForest baseline, or a new version with the champion,
needs to know whether the test chips can tell the two apart.

The paired bootstrap over chips answers that (Efron & Tibshirani 1993; the usual resampling
unit in segmentation benchmarks, since a chip's pixels are not independent of each other):
draw as many chips as the test set has, with replacement; pool both models' confusion
matrices over the drawn chips; take the difference of their mean IoUs. Over many draws the
differences give an interval. Both models see the same draws, so what the chips share (an
easy or a hard chip) cancels out of the difference. An interval that excludes 0 says the
test chips favour one model; one that spans 0 says they cannot tell (the usual case with a
handful of chips, whatever the point estimate). The interval says nothing about chips unlike
the test set's, and with very few chips it is too narrow (resampling 4 chips gives 35 distinct
draws, none unlike those 4): below :data:`FEW_CHIPS` the sentence says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from specdeepmap.errors import InputMismatchError
from specdeepmap.metrics import mean_iou

#: resamples of the test chips (measured over ten seeds of the draws: the interval's ends
#: moved by up to 0.007 on the shared S2 set's 12 test chips, 0.012 on EnMAP's 4)
RESAMPLES = 2000
#: the interval's coverage
LEVEL = 0.90
#: below this many chips the bootstrap interval understates the uncertainty
FEW_CHIPS = 10


@dataclass
class Difference:
    """Mean IoU of model A minus model B on the same chips, with a bootstrap interval."""

    difference: float  #: on all the chips (pooled matrices), A − B
    low: float  #: lower end of the interval
    high: float  #: upper end
    level: float  #: the interval's coverage, e.g. 0.9
    chips: int  #: test chips
    share_a_better: float  #: share of resamples where A scored higher
    #: independent units resampled: groups of neighbouring chips (touching, or in one spatial
    #: block of the split: a chip's neighbours share its fields and woods, so they are not
    #: independent draws); ``chips`` when not grouped
    units: int | None = None

    @property
    def verdict(self) -> str:
        """``better`` or ``worse`` (A against B) when the interval excludes 0, else
        ``undecided``; always ``undecided`` with a single independent unit, whose resamples
        are all the same draw (the interval collapses onto the difference and says nothing).
        """
        if (self.units if self.units is not None else self.chips) < 2:
            return "undecided"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "undecided"

    def sentence(self, a: str, b: str) -> str:
        """The difference in words, e.g. for a model card."""
        units = self.units if self.units is not None else self.chips
        where = (
            f"{self.level:.0%} interval over {self.chips} resampled test chips"
            if units == self.chips
            else (
                f"{self.level:.0%} interval over {units} resampled "
                f"groups of neighbouring test chips ({self.chips} chips)"
            )
        )
        text = (
            f"{a} scores {self.difference:+.3f} mean IoU against {b} "
            f"({where}: {self.low:+.3f} to {self.high:+.3f}); "
        )
        if units < 2:
            text += "one independent unit cannot tell the two apart."
        elif self.verdict == "undecided":
            text += "the test chips cannot tell the two apart."
        else:
            text += f"the test chips favour {a if self.verdict == 'better' else b}."
        if units < FEW_CHIPS:
            what = "test chips" if units == self.chips else "independent groups of test chips"
            text += f" With only {units} {what} the interval is narrower than the true uncertainty."
        return text

    def to_dict(self) -> dict:
        """Plain data, with the verdict."""
        return asdict(self) | {"verdict": self.verdict}

    @classmethod
    def from_dict(cls, data: dict) -> Difference:
        """Back from :meth:`to_dict`."""
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def paired_bootstrap(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    units: dict[str, object] | None = None,
) -> Difference:
    """The difference of two models' pooled mean IoU on the same chips, with its interval.

    Args:
        a: each chip's (K, K) confusion matrix of the first model (arrays or nested lists, as
            in the Tester's JSON), keyed by chip name.
        b: the same for the second model: the same chips and classes.
        resamples: bootstrap draws.
        level: coverage of the (percentile) interval.
        seed: the draws' random seed (the result is reproducible).
        units: the independent unit of each chip (e.g. its group of touching chips,
            :func:`specdeepmap.leakage.chip_units`): the chips of a unit are drawn together
            (a block bootstrap). Default: every chip is its own unit.

    Raises:
        InputMismatchError: the two models were not scored on the same chips.
    """
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise InputMismatchError(
            f"The two models were scored on different chips (e.g. "
            f"{', '.join(missing[:3])}): no paired comparison"
        )
    if not a:
        raise InputMismatchError("No chips to compare the two models on")
    names = sorted(a)
    ma = np.stack([np.asarray(a[n], np.int64) for n in names])
    mb = np.stack([np.asarray(b[n], np.int64) for n in names])
    if ma.shape != mb.shape:
        raise InputMismatchError(
            f"The two models' confusion matrices differ in shape "
            f"({ma.shape[1:]} and {mb.shape[1:]})"
        )
    chips = len(names)
    if units:
        keys = [units.get(name, ("chip", name)) for name in names]
        index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        rows = np.array([index[key] for key in keys])
        ma = np.stack([ma[rows == u].sum(axis=0) for u in range(len(index))])
        mb = np.stack([mb[rows == u].sum(axis=0) for u in range(len(index))])
    n = len(ma)
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, 250):  # bounded memory: 250 draws × chips at a time
        draws = rng.integers(0, n, (min(250, resamples - start), n))
        weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)
        differences.append(
            mean_iou(np.einsum("rn,nkl->rkl", weights, ma))
            - mean_iou(np.einsum("rn,nkl->rkl", weights, mb))
        )
    diffs = np.concatenate(differences)
    diffs = diffs[np.isfinite(diffs)]
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    point = float(mean_iou(ma.sum(axis=0)) - mean_iou(mb.sum(axis=0)))
    return Difference(
        difference=point,
        low=float(low),
        high=float(high),
        level=level,
        chips=chips,
        share_a_better=float(np.mean(diffs > 0)),
        units=n,
    )
