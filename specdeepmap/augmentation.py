"""Augmentation for training and test-time augmentation (TTA) for prediction.

Remote-sensing chips have no 'up': every flip and quarter turn of a chip (the dihedral group
D4, eight elements) is as plausible as the original, and applying one to image and label
together keeps them aligned pixel for pixel, without the interpolation and blank corners of an
arbitrary rotation. Spectral jitter multiplies each chip's spectra by a random gain (overall
brightness and a small per-band part), which mimics illumination and calibration differences
between scenes. At prediction time the network's class probabilities are averaged over the
eight D4 views (each mapped back), which removes orientation-dependent errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

#: train-time geometric augmentation: D4 (flips + quarter turns), D4 plus a free rotation up to
#: ±45° (the Trainer's former default: flips and rotation), or none
Augmentation = Literal["d4", "d4-rotate", "none"]

#: the eight elements of D4 as (quarter turns, flip left-right first)
D4 = tuple((k, flip) for flip in (False, True) for k in range(4))


def d4_apply(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Apply one D4 element to the last two axes: optional left-right flip, then ``k`` turns."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def d4_invert(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Undo :func:`d4_apply` (turn back, then flip)."""
    if k:
        x = torch.rot90(x, -k, dims=(-2, -1))
    return x.flip(-1) if flip else x


def random_d4(
    image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random D4 element applied to a (C, H, W) image and its (H, W) mask."""
    k, flip = D4[int(torch.randint(8, (), generator=generator))]
    return d4_apply(image, k, flip).contiguous(), d4_apply(mask, k, flip).contiguous()


def random_rotation(
    image: torch.Tensor, mask: torch.Tensor, max_angle: float = 45.0, ignore_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotation up to ±``max_angle``°: bilinear for the image (corners 0, the band mean after
    normalisation), nearest for the mask (corners the ignore index).
    """
    import torchvision.transforms.v2.functional as tvf
    from torchvision.transforms import InterpolationMode

    angle = float((torch.rand(()) * 2 - 1) * max_angle)
    image = tvf.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
    mask = tvf.rotate(
        mask[None], angle, interpolation=InterpolationMode.NEAREST, fill=float(ignore_index)
    )[0]
    return image, mask


def augment_pair(
    image: torch.Tensor, mask: torch.Tensor, mode: Augmentation = "d4", ignore_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random geometric augmentation applied alike to a normalised image and its mask."""
    if mode == "none":
        return image, mask
    image, mask = random_d4(image, mask)
    if mode == "d4-rotate":
        image, mask = random_rotation(image, mask, ignore_index=ignore_index)
    return image, mask


def spectral_jitter(
    image: np.ndarray,
    offset: np.ndarray,
    valid: np.ndarray | None,
    rng: np.random.Generator,
    brightness: float = 0.1,
    per_band: float = 0.02,
) -> np.ndarray:
    """Multiply a chip's raw spectra by a random gain, computed on the normalised image.

    With ``x = (r − μ) / σ`` (after the scaler), a gain ``g`` on the raw values ``r`` gives
    ``g·x + (g − 1)·μ/σ``; ``offset`` is ``μ/σ`` per band (0 without statistics). The gain is
    one brightness factor per chip (uniform in 1 ± ``brightness``) times a per-band factor
    (normal, std ``per_band``). Invalid (nodata) pixels stay 0.

    Args:
        image: normalised (C, H, W) float32 chip, changed in place and returned.
        offset: (C,) ``μ/σ`` of each band.
        valid: (H, W) bool, False where the chip is nodata (None: all valid).
        rng: random generator.
        brightness: half-width of the chip's brightness factor.
        per_band: std of the per-band factor.
    """
    gain = (1 + rng.uniform(-brightness, brightness)) * rng.normal(1.0, per_band, len(offset))
    gain = gain.astype(np.float32)[:, None, None]
    jittered = image * gain + (gain - 1) * offset.astype(np.float32)[:, None, None]
    if valid is not None:
        jittered *= valid[None]
    image[...] = jittered
    return image


def cutmix(
    images: torch.Tensor,
    masks: torch.Tensor,
    probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix for segmentation: each chip of a batch, with ``probability``, gets a random box
    (a quarter to three quarters of each side) copied from another chip of the batch, pixels
    and labels alike (French et al. 2020). Objects then appear in new surroundings, which a
    network trained on a few chips would otherwise learn by heart. Returns new tensors.
    """
    n, _, height, width = images.shape
    images, masks = images.clone(), masks.clone()
    if n < 2:
        return images, masks
    source = torch.roll(torch.arange(n), 1)  # every chip takes from another one
    originals, original_masks = images.clone(), masks.clone()
    for i in range(n):
        if float(torch.rand((), generator=generator)) >= probability:
            continue
        h, w = (
            int(side * (0.25 + 0.5 * float(torch.rand((), generator=generator))))
            for side in (height, width)
        )
        top = int(torch.randint(height - h + 1, (), generator=generator))
        left = int(torch.randint(width - w + 1, (), generator=generator))
        j = int(source[i])
        images[i, :, top : top + h, left : left + w] = originals[
            j, :, top : top + h, left : left + w
        ]
        masks[i, top : top + h, left : left + w] = original_masks[j, top : top + h, left : left + w]
    return images, masks


def band_dropout(
    images: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero each band of each chip with ``probability`` and scale the others by
    ``1 / (1 − probability)`` (dropout over whole bands, ``torch.nn.Dropout2d``'s rule).

    On normalised inputs a zeroed band holds its mean. Neighbouring bands of a spectrometer
    are strongly correlated, so a network can learn to lean on a few of them; forced to do
    without random ones it spreads its weight over all, as a RandomForest's random feature
    subsets do. Returns a new tensor; the expectation of every band is unchanged.
    """
    if not probability:
        return images
    keep = torch.rand(images.shape[:2], generator=generator, device="cpu") >= probability
    scale = keep.to(images.dtype) / (1.0 - probability)
    return images * scale.to(images.device)[:, :, None, None]


def tta_d4(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Average of ``predict`` over the eight D4 views of an (N, C, H, W) batch.

    Each view's output (N, K, H', W') is mapped back to the original orientation before
    averaging, so the result has the shape of ``predict(x)``. Eight forward passes.
    """
    total = None
    for k, flip in D4:
        out = d4_invert(predict(d4_apply(x, k, flip)), k, flip)
        total = out if total is None else total + out
    return total / len(D4)
