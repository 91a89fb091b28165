"""A verdict per mapped scene: does the scene look like what the model was trained on?

A model carries its training statistics (per-band mean and standard deviation after the
scaler, :class:`~specdeepmap.normalization.Normalization`) and, since 2026-12, a reference of
its own output on its validation chips (class shares and the share of low-confidence pixels,
:func:`output_reference`). The mapper accumulates the same figures for the scene it maps
(:class:`SceneStatistics` and :class:`OutputStatistics`, on regular samples of the valid,
unmasked pixels; :mod:`specdeepmap.scene_quality`) and :func:`judge` compares them:

* **input**: each band's mean shift in training standard deviations (the median over the
  bands, robust to a single odd band), and a straight-line fit of the scene's band means
  against the training means across the bands, ``scene = gain × training + offset``: a
  processing-baseline offset (Sentinel-2's +1000 of January 2022) gives an offset with a gain
  near 1, reflectance delivered as 0–1 instead of × 10 000 a gain near 0.0001, another
  sensor's calibration a gain away from 1;
* **output**: the map's class shares against the model's on its validation chips
  (Jensen–Shannon divergence, base 2: 0 same shares, 1 disjoint) and the share of pixels whose
  top-class probability is below :data:`LOW_CONFIDENCE`, against the same share on the
  validation chips.

Thresholds (:data:`THRESHOLDS`) were chosen on the shared Sentinel-2 scene (docs/drift.md):
its halves and quadrants against each other stay far inside them (median band shift ≤ 0.8,
gain 0.81–1.09, offset ≤ 6 % of the mean level, label class shares JS ≤ 0.06), while +1000 on
every band (median shift 3.5, offset 75 %), the scene as 0–1 reflectance (gain 0.0001) and a
gain of 2 (2.17) are far outside. They are general statistics, not tuned to one sensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

#: a pixel whose top-class probability is below this counts as low-confidence
LOW_CONFIDENCE = 0.5
#: a scene is suspect when any of these is exceeded (docs/drift.md says how they were chosen)
THRESHOLDS = {
    "median_band_shift": 2.0,  # median over bands of |scene mean - training mean| / training std
    "gain_low": 0.67,  # band means' gain against training outside [gain_low, gain_high]
    "gain_high": 1.5,
    "offset": 0.25,  # |offset| / median training band mean
    "class_share_js": 0.2,  # Jensen-Shannon divergence of class shares (base 2)
    "low_confidence_extra": 0.25,  # low-confidence share above the validation chips' by this
}


@dataclass
class SceneStatistics:
    """Per-band count, sum and sum of squares of a scene's valid pixels (after the scaler)."""

    bands: int
    scaler: float | None = None
    count: np.ndarray = field(init=False)
    total: np.ndarray = field(init=False)
    squares: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.count = np.zeros(self.bands)
        self.total = np.zeros(self.bands)
        self.squares = np.zeros(self.bands)

    def add(self, pixels: np.ndarray) -> None:
        """Add valid pixels, (bands, n) raw values (a sample of the scene's)."""
        sample = pixels.reshape(self.bands, -1).astype(np.float64)
        if self.scaler:
            sample = sample / self.scaler
        finite = np.isfinite(sample)
        sample = np.where(finite, sample, 0.0)
        self.count += finite.sum(axis=1)
        self.total += sample.sum(axis=1)
        self.squares += (sample * sample).sum(axis=1)

    @property
    def mean(self) -> np.ndarray:
        """Per-band mean (NaN where no pixel was seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / self.count, np.nan)

    @property
    def std(self) -> np.ndarray:
        """Per-band standard deviation (NaN where no pixel was seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            var = self.squares / self.count - self.mean**2
        return np.sqrt(np.clip(var, 0, None))


@dataclass
class OutputStatistics:
    """Class counts and low-confidence count of a map's classified pixels."""

    classes: int
    counts: np.ndarray = field(init=False)
    low_confidence: int = 0
    confidence_total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.classes, np.int64)

    def add(self, index: np.ndarray, confidence: np.ndarray, classified: np.ndarray) -> None:
        """Add pixels: class index 0..K-1, top-class probability, and which are classified."""
        self.counts += np.bincount(index[classified].ravel(), minlength=self.classes)
        self.low_confidence += int(np.count_nonzero(confidence[classified] < LOW_CONFIDENCE))
        self.confidence_total += float(np.sum(confidence[classified], dtype=np.float64))

    @property
    def pixels(self) -> int:
        """Classified pixels counted."""
        return int(self.counts.sum())

    @property
    def shares(self) -> np.ndarray:
        """Class shares of the classified pixels."""
        return self.counts / max(1, self.pixels)

    @property
    def mean_confidence(self) -> float:
        """Mean top-class probability of the classified pixels."""
        return self.confidence_total / max(1, self.pixels)

    @property
    def low_confidence_share(self) -> float:
        """Share of classified pixels below :data:`LOW_CONFIDENCE`."""
        return self.low_confidence / max(1, self.pixels)


@dataclass
class Verdict:
    """``ok`` or ``suspect``, the reasons in words, and the scores they rest on."""

    status: str
    reasons: list[str]
    scores: dict[str, float | None]

    @property
    def suspect(self) -> bool:
        """Whether the map should not be trusted."""
        return self.status == "suspect"

    def sentence(self) -> str:
        """One line: the verdict and its reasons."""
        if not self.reasons:
            return "ok: the scene and its map look like the model's training data"
        return f"{self.status}: " + "; ".join(self.reasons)

    def to_dict(self) -> dict:
        """Plain data for JSON and STAC."""
        return asdict(self) | {"thresholds": THRESHOLDS}


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence of two distributions, base 2 (0 equal, 1 disjoint)."""
    p = np.asarray(p, np.float64) / max(np.sum(p), 1e-12)
    q = np.asarray(q, np.float64) / max(np.sum(q), 1e-12)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _bands(indices: np.ndarray) -> str:
    """'bands 1–13' or 'bands 2, 5' (1-based)."""
    numbers = [int(i) + 1 for i in indices]
    if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"bands {numbers[0]}–{numbers[-1]}"
    return ("band " if len(numbers) == 1 else "bands ") + ", ".join(map(str, numbers))


def input_drift(scene: SceneStatistics, mean: list, std: list) -> tuple[list[str], dict]:
    """Reasons and scores of the scene's band statistics against the training ones."""
    trained_mean, trained_std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    seen = scene.mean
    usable = np.isfinite(trained_mean) & np.isfinite(trained_std) & (trained_std > 0)
    usable &= np.isfinite(seen)
    if not usable.any():
        return [], {"median_band_shift": None, "gain": None, "offset": None}
    shift = (seen - trained_mean) / np.where(usable, trained_std, 1)
    median_shift = float(np.median(np.abs(shift[usable])))
    reasons, scores = [], {"median_band_shift": round(median_shift, 3)}
    gain = offset = intercept = None
    if usable.sum() >= 2 and np.ptp(trained_mean[usable]) > 0:
        gain, intercept = np.polyfit(trained_mean[usable], seen[usable], 1)
        level = float(np.median(np.abs(trained_mean[usable]))) or 1.0
        offset = float(intercept) / level
        scores |= {"gain": round(float(gain), 4), "offset": round(offset, 4)}
    else:
        scores |= {"gain": None, "offset": None}
    if gain is not None and not THRESHOLDS["gain_low"] <= gain <= THRESHOLDS["gain_high"]:
        reasons.append(
            f"band values are scaled by {gain:.3g} against training (e.g. reflectance as "
            "0–1 instead of scaled integers, or another calibration)"
        )
    elif offset is not None and abs(offset) > THRESHOLDS["offset"]:
        moved = np.flatnonzero(usable & (np.abs(shift) > 1))
        difference = float(intercept) * (scene.scaler or 1)  # in the scene's own units
        reasons.append(
            f"{_bands(moved if moved.size else np.flatnonzero(usable))} are shifted by "
            f"{difference:+.4g} against training (e.g. a new processing baseline)"
        )
    elif median_shift > THRESHOLDS["median_band_shift"]:
        far = np.flatnonzero(usable & (np.abs(shift) > THRESHOLDS["median_band_shift"]))
        reasons.append(
            f"{_bands(far)} lie more than {THRESHOLDS['median_band_shift']:g} training "
            f"standard deviations from their training means (median {median_shift:.1f})"
        )
    return reasons, scores


def output_drift(output: OutputStatistics, reference: dict | None) -> tuple[list[str], dict]:
    """Reasons and scores of the map's class shares and confidence against the model's own on
    its validation chips (``reference``: :func:`output_reference`; None for older models).
    """
    low = output.low_confidence_share
    scores: dict[str, float | None] = {"low_confidence_share": round(low, 4)}
    if not reference or output.pixels == 0:
        return [], scores | {"class_share_js": None, "reference_low_confidence_share": None}
    js = js_divergence(output.shares, reference["class_shares"])
    expected = float(reference["low_confidence_share"])
    scores |= {"class_share_js": round(js, 4), "reference_low_confidence_share": expected}
    reasons = []
    if js > THRESHOLDS["class_share_js"]:
        reasons.append(
            f"class shares differ from the model's on its validation chips (Jensen–Shannon "
            f"{js:.2f} > {THRESHOLDS['class_share_js']:g})"
        )
    if low > expected + THRESHOLDS["low_confidence_extra"] and low > 2 * expected:
        reasons.append(
            f"{low:.0%} of pixels below {LOW_CONFIDENCE:g} confidence; "
            f"{expected:.0%} on the validation chips"
        )
    return reasons, scores


def judge(
    scene: SceneStatistics,
    output: OutputStatistics,
    normalization: dict,
    reference: dict | None,
    masked_share: float = 0.0,
) -> Verdict:
    """The verdict of a mapped scene against what the model was trained on: its
    ``normalization`` (the band statistics of its training pixels) and ``reference`` (its
    outputs on the validation chips), both from its model file (:class:`ModelConfig`).
    """
    normalization = normalization or {}
    reasons, scores = [], {}
    if normalization.get("mean") and normalization.get("std"):
        found, scored = input_drift(scene, normalization["mean"], normalization["std"])
        reasons += found
        scores |= scored
    found, scored = output_drift(output, reference)
    reasons += found
    scores |= scored | {"masked_share": round(masked_share, 4)}
    scores = {k: (None if v is None or not math.isfinite(v) else v) for k, v in scores.items()}
    return Verdict("suspect" if reasons else "ok", reasons, scores)


def output_reference(batches: Iterable[np.ndarray]) -> dict:
    """What a model's outputs look like on its validation chips: class shares and the share
    of low-confidence pixels (``batches``: (N, K, H, W) class probabilities each).
    """
    stats = None
    for probabilities in batches:
        stats = stats or OutputStatistics(probabilities.shape[1])
        index = probabilities.argmax(axis=1)
        stats.add(index, probabilities.max(axis=1), np.ones_like(index, bool))
    if stats is None:
        return {}
    return {
        "class_shares": [round(float(s), 6) for s in stats.shares],
        "low_confidence_share": round(stats.low_confidence_share, 6),
        "low_confidence_below": LOW_CONFIDENCE,
    }
