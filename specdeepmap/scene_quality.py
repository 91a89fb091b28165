"""What the mapper does for trust while it streams a scene: it applies the quality mask to the
finished classes and counts what the drift verdict needs (:mod:`specdeepmap.drift`).

One :class:`SceneQuality` per mapped scene: :meth:`SceneQuality.read_mask` runs in the
reader thread beside the scene's own read, :meth:`SceneQuality.finish` on each block of
finished pixels, :meth:`SceneQuality.verdict` at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from specdeepmap import storage
from specdeepmap.drift import OutputStatistics, SceneStatistics, Verdict, judge
from specdeepmap.masks import MaskReader, QualityMask
from specdeepmap.model_config import ModelConfig

#: the quality JSON beside a map: ``MAP_quality.json`` for ``MAP.tif``
QUALITY_SUFFIX = "_quality.json"
#: every n-th pixel along rows and columns feeds the input / the output statistics
INPUT_STEP, OUTPUT_STEP = 8, 4


@dataclass
class SceneQuality:
    """Mask, counts and statistics of one scene being mapped."""

    bands: int
    classes: int
    scaler: float | None = None
    mask: QualityMask | None = None
    masked_value: int = 0
    reader: MaskReader | None = None
    masked: int = 0  #: pixels with data that the mask flagged
    data: int = 0  #: pixels with data (not nodata), masked or not
    #: time the mapping's main thread spent masking, counting and judging (the guard's cost
    #: on the critical path, measured by bench_mapping.py)
    seconds: float = 0.0
    #: time the reader thread spent reading the mask (beside the network's work)
    reader_seconds: float = 0.0
    scene: SceneStatistics = field(init=False)
    output: OutputStatistics = field(init=False)

    def __post_init__(self) -> None:
        self.scene = SceneStatistics(self.bands, self.scaler)
        self.output = OutputStatistics(self.classes)

    def read_mask(self, y: int, x0: int, x1: int, rows: int) -> np.ndarray | None:
        """The mask of a span of the scene (True: masked), or None without a mask."""
        if self.reader is None:
            return None
        started = time.perf_counter()
        flagged = self.reader.read(y, x0, x1, rows)
        self.reader_seconds += time.perf_counter() - started
        return flagged

    def finish(
        self,
        classes: np.ndarray,
        span: np.ndarray,
        flagged: np.ndarray | None,
        scores: np.ndarray,
    ) -> np.ndarray | None:
        """Mask and count a block of finished pixels; returns the masked pixels (bool), None
        without a mask.

        Args:
            classes: the block's class values, 0 where nodata; masked pixels get
                ``masked_value`` here.
            span: the block's input pixels (bands, rows, cols).
            flagged: the block's mask (True: masked), or None.
            scores: the blended class scores (K + 1, rows, cols), the last channel the
                blending weight sum.
        """
        started = time.perf_counter()
        masked = None
        if flagged is not None:  # full-resolution work only where there is a mask
            masked = flagged & (classes != 0)
            classes[masked] = self.masked_value
            self.masked += int(np.count_nonzero(masked))
        self.data += int(np.count_nonzero(classes))
        # the statistics on a regular sample: every INPUT_STEP-th pixel of the input, every
        # OUTPUT_STEP-th of the output, both ways (a 512 x 512 block gives 4 096 and 16 384)
        step = INPUT_STEP
        self.scene.add(span[:, ::step, ::step][:, _valid(classes, masked, step)])
        step = OUTPUT_STEP
        valid = _valid(classes, masked, step)
        sample = scores[:, ::step, ::step]
        k = sample.shape[0] - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = sample[:k].max(axis=0) / sample[k]
        self.output.add(sample[:k].argmax(axis=0), confidence, valid)
        self.seconds += time.perf_counter() - started
        return masked

    @property
    def masked_share(self) -> float:
        """Share of the pixels with data that the mask flagged."""
        return self.masked / max(1, self.data)

    def verdict(self, config: ModelConfig) -> Verdict:
        """The scene's verdict against the model's config."""
        started = time.perf_counter()
        verdict = judge(
            self.scene, self.output, config.normalization, config.reference, self.masked_share
        )
        self.seconds += time.perf_counter() - started
        return verdict

    def summary(self, verdict: Verdict) -> dict:
        """The quality JSON's content: verdict, reasons, scores, shares and the mask."""
        shares = self.output.shares
        return {
            "verdict": verdict.status,
            "reasons": verdict.reasons,
            "scores": verdict.scores,
            "thresholds": verdict.to_dict()["thresholds"],
            "masked_share": round(self.masked_share, 6),
            "masked_value": self.masked_value if self.mask else None,
            "mask": self._mask_summary(),
            "class_shares": [round(float(s), 6) for s in shares],
            "mean_confidence": round(self.output.mean_confidence, 4),
        }

    def _mask_summary(self) -> dict | None:
        """The mask's rasters and values, or the detector that made it (a temporary file)."""
        if self.mask is None:
            return None
        if self.mask.detector:
            return {"detector": self.mask.detector, "label": self.mask.label}
        return {
            "uris": list(self.mask.uris),
            "values": list(self.mask.values),
            "label": self.mask.label,
        }


def _valid(classes: np.ndarray, masked: np.ndarray | None, step: int) -> np.ndarray:
    """Every ``step``-th pixel both ways: classified and not masked."""
    valid = classes[::step, ::step] != 0
    if masked is not None:
        valid &= ~masked[::step, ::step]
    return valid


def write_quality(uri: str, summary: dict) -> str:
    """Write the quality JSON atomically; returns its URI."""
    storage.write_text(uri, json.dumps(summary, indent=2))
    return uri
