"""Band normalisation: how raw pixel values become network inputs.

Its own module because training, evaluation and the mapper all apply it, and the mapper
should not import the Dataset Maker's table machinery (pandas) to do so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Normalization:
    """How raw pixel values become network inputs: ``((x / scaler) - mean) / std``.

    Pixels equal to ``nodata`` (in every band) and bands without statistics (NaN, e.g. bands
    that are nodata everywhere) become 0, i.e. the band mean, instead of injecting NaN.
    """

    scaler: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    nodata: float | None = None

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Normalise a (bands, rows, cols) or (batch, bands, rows, cols) array to float32."""
        band_axis = image.ndim - 3
        invalid = None
        if self.nodata is not None and not (
            isinstance(self.nodata, float) and math.isnan(self.nodata)
        ):
            invalid = np.all(image == self.nodata, axis=band_axis, keepdims=True)
        x = image.astype(np.float32, copy=True)
        if self.scaler:
            x *= np.float32(1.0 / self.scaler)
        if self.mean is not None:
            shape = [1] * x.ndim
            shape[band_axis] = -1
            mean, std, missing = self.band_terms(x.shape[band_axis])
            # bands without statistics become 0: scale 0, offset 0
            scale = np.where(missing, 0, 1 / std).astype(np.float32)
            x -= mean.astype(np.float32).reshape(shape)
            x *= scale.reshape(shape)
        if image.dtype.kind == "f":  # integer inputs cannot hold NaN or infinity
            np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if invalid is not None:
            np.copyto(x, 0, where=np.broadcast_to(invalid, x.shape))
        return x

    def band_terms(self, bands: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, std, missing) per band as float64 arrays, for code that applies this
        normalisation elsewhere (an ONNX graph, SpecDeepMap's ``Normalize``): bands without
        statistics (NaN, or a std of 0) are flagged in ``missing`` and given mean 0 and
        std 1; without statistics at all every band is mean 0, std 1, not missing.
        """
        if self.mean is None or self.std is None:
            return np.zeros(bands), np.ones(bands), np.zeros(bands, bool)
        mean = np.asarray(self.mean, np.float64)
        std = np.asarray(self.std, np.float64)
        missing = ~np.isfinite(mean) | ~np.isfinite(std) | (std == 0)
        return np.where(missing, 0.0, mean), np.where(missing, 1.0, std), missing

    def to_dict(self) -> dict:
        """Plain data for a checkpoint (NaN becomes None)."""

        def clean(values):
            return (
                None
                if values is None
                else [None if not math.isfinite(v) else float(v) for v in values]
            )

        return {
            "scaler": self.scaler,
            "mean": clean(self.mean),
            "std": clean(self.std),
            "nodata": None
            if self.nodata is None or (isinstance(self.nodata, float) and math.isnan(self.nodata))
            else float(self.nodata),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        """Inverse of :meth:`to_dict`."""

        def restore(values):
            return (
                None if values is None else tuple(float("nan") if v is None else v for v in values)
            )

        return cls(
            scaler=data.get("scaler"),
            mean=restore(data.get("mean")),
            std=restore(data.get("std")),
            nodata=data.get("nodata"),
        )
