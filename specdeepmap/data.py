"""Training data: the dataset folder's CSVs, chip reading, normalisation and augmentation.

A dataset folder is what ``specdeepmap split`` writes (SpecDeepMap's format): three file lists,
``Summary_train_val.csv`` and optionally ``Normalize_Bands.csv``. Rows are relative to the
folder of the CSV unless they are absolute URIs. Chips on S3 are copied into a local cache on
first read, so later epochs read local files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import rasterio
import torch
from torch.utils.data import Dataset

from specdeepmap import storage
from specdeepmap.augmentation import Augmentation, augment_pair, spectral_jitter
from specdeepmap.errors import EmptyDatasetError, InputMismatchError, MissingInputError
from specdeepmap.normalization import Normalization
from specdeepmap.splitting import CSV_NAMES, NORMALIZE_CSV, SUMMARY_CSV, check_image_chips, read_csv


@dataclass(frozen=True)
class DatasetInfo:
    """What the dataset folder says about the data."""

    folder: str
    train: list[tuple[str, str]]
    validation: list[tuple[str, str]]
    test: list[tuple[str, str]]
    class_values: list[int]
    class_weights: list[float]
    background: bool
    scaler: float | None
    band_mean: tuple[float, ...] | None
    band_std: tuple[float, ...] | None


def read_chip_list(uri: str) -> list[tuple[str, str]]:
    """The (image, mask) URIs a chip list CSV names.

    The lists are ``train_files.csv``, ``test_files.csv`` … with SpecDeepMap's columns
    ``image,mask``; relative paths are resolved against the CSV's folder.

    Raises:
        InputMismatchError: the CSV does not start with the columns ``image,mask``.
    """
    frame = read_csv(uri)
    if list(frame.columns[:2]) != ["image", "mask"]:
        raise InputMismatchError(
            f"{uri} must start with the columns image,mask (SpecDeepMap's chip lists); it has "
            f"{', '.join(map(str, frame.columns)) or 'none'}"
        )
    folder = storage.parent(uri)
    return [
        (resolve_row(folder, str(i)), resolve_row(folder, str(m)))
        for i, m in zip(frame["image"], frame["mask"], strict=True)
    ]


def resolve_row(folder: str, row: str) -> str:
    """URI of a CSV row: absolute URIs stay, relative ones are joined to the CSV's folder."""
    if storage.is_s3(row) or os.path.isabs(row) or row.startswith("file://"):
        return row
    return storage.join(folder, row)


def read_dataset_folder(folder: str, normalize: bool = True) -> DatasetInfo:
    """Read the CSVs of a dataset folder; errors name the missing or broken file."""
    required = [CSV_NAMES["train"], CSV_NAMES["validation"], SUMMARY_CSV]
    if normalize:
        required.append(NORMALIZE_CSV)
    for name in required:
        if not storage.exists(storage.join(folder, name)):
            hint = (
                (" (run `specdeepmap split` with normalisation on, or train with --no-normalize)")
                if name == NORMALIZE_CSV
                else " (run `specdeepmap split`)"
            )
            raise MissingInputError(f"{storage.join(folder, name)} is missing{hint}")
    lists = {}
    for key, name in CSV_NAMES.items():
        uri = storage.join(folder, name)
        if not storage.exists(uri):
            lists[key] = []
            continue
        lists[key] = read_chip_list(uri)
    if not lists["train"]:
        raise EmptyDatasetError(f"{storage.join(folder, CSV_NAMES['train'])} lists no chips")
    if not lists["validation"]:
        raise EmptyDatasetError(
            f"{storage.join(folder, CSV_NAMES['validation'])} lists no "
            "chips: training needs a validation set"
        )
    summary = read_csv(storage.join(folder, SUMMARY_CSV))
    class_values = [int(v) for v in summary["Class ID"]]
    scaler_value = summary["Scaler"].iloc[0]
    scaler = None if pd.isna(scaler_value) or str(scaler_value) == "None" else float(scaler_value)
    background = str(summary["Ignored Background : Class Zero"].iloc[0]).strip() == "Yes"
    mean = std = None
    if normalize:
        stats = read_csv(storage.join(folder, NORMALIZE_CSV))
        mean, std = tuple(stats["mean"].astype(float)), tuple(stats["std"].astype(float))
    return DatasetInfo(
        folder=folder,
        train=lists["train"],
        validation=lists["validation"],
        test=lists["test"],
        class_values=class_values,
        class_weights=[float(w) for w in summary["Class Train Weight"]],
        background=background,
        scaler=scaler,
        band_mean=mean,
        band_std=std,
    )


def chip_properties(pairs: list[tuple[str, str]]) -> tuple[int, int, int, float | None, str]:
    """(bands, height, width, nodata, dtype) shared by all chips; raises on any difference.

    Reads only the headers of the chips (:func:`specdeepmap.splitting.check_image_chips`).
    """
    bands, height, width = check_image_chips([image for image, _ in pairs])
    with storage.open_raster(pairs[0][0]) as src:
        nodata, dtype = src.nodata, src.dtypes[0]
    return bands, height, width, nodata, dtype


def band_names(image_uri: str) -> list[str]:
    """Band names of a raster: its band descriptions, or ``band N`` where it has none."""
    with storage.open_raster(image_uri) as src:
        return [d or f"band {i}" for i, d in enumerate(src.descriptions, start=1)]


def principal_axes(
    dataset: ChipDataset, count: int, max_pixels: int = 100_000, seed: int = 0
) -> np.ndarray:
    """The ``count`` leading principal axes (count × bands, unit rows) of the normalised
    spectra of the dataset's chips: every valid pixel, labelled or not (at most
    ``max_pixels``, spread evenly over the chips). Fewer rows when there are fewer bands.
    """
    rng = np.random.default_rng(seed)
    per_chip = max(1, max_pixels // max(1, len(dataset)))
    samples = []
    for image_uri, _ in dataset.pairs:
        raw = dataset._read(image_uri)
        pixels = dataset.normalization.apply(raw).reshape(raw.shape[0], -1).T
        if dataset.normalization.nodata is not None:
            pixels = pixels[~np.all(raw == dataset.normalization.nodata, axis=0).ravel()]
        samples.append(pixels[rng.permutation(len(pixels))[:per_chip]])
    x = np.concatenate(samples).astype(np.float64)
    x -= x.mean(axis=0)
    _, _, axes = np.linalg.svd(x, full_matrices=False)
    return axes[:count].astype(np.float32)


#: bytes of decoded chips a :class:`ChipDataset` keeps in memory (the Trainer shares them
#: out among its loader workers, each of which keeps its own): a small training set is drawn
#: many times an epoch, and decoding a GeoTIFF chip costs more than the network's step on
#: small chips (EnMAP's 224-band 32 px chips: 60 % of a training run)
CHIP_MEMORY_BYTES = 2 * 1024**3


class ChipDataset(Dataset):
    """Image/label chip pairs as (float32 C×H×W tensor, int64 H×W class-index tensor).

    Label values are mapped to contiguous class indices through ``lookup`` (a 256-entry
    table); values not in the table become the ignore index. With augmentation on (training),
    each chip gets a random D4 element (and optionally a free rotation) and, if
    ``spectral_jitter``, a random spectral gain (:mod:`specdeepmap.augmentation`).

    Each chip file is decoded once and kept, read-only, while the kept arrays stay within
    ``memory_bytes``; later files are read from disk on every use. Normalisation and
    augmentation run on every use, so what an item returns does not depend on the cache.
    """

    def __init__(
        self,
        pairs: list[tuple[str, str]],
        normalization: Normalization,
        lookup: np.ndarray,
        augment: bool = False,
        cache_dir: str | None = None,
        augmentation: Augmentation = "d4",
        spectral_jitter: bool = False,
        pseudo_labels: list[np.ndarray] | None = None,
        memory_bytes: int = CHIP_MEMORY_BYTES,
    ):
        self.pairs = pairs
        self.memory_bytes = memory_bytes
        self._memory: dict[str, np.ndarray] = {}  # file URI → its decoded array, read-only
        self._memory_used = 0
        #: per chip, label values for its unlabelled pixels (0: none), e.g. a forest's
        self.pseudo_labels = pseudo_labels
        self.normalization = normalization
        self.lookup = lookup
        self.augment = augment
        self.augmentation = augmentation
        self.spectral_jitter = spectral_jitter
        # default: the user's private cache (0700, refused when others may write to it),
        # never a predictable shared folder whose files would be trusted
        self.cache_dir = cache_dir or storage.private_cache_dir("chips")
        mean, std = normalization.mean, normalization.std
        if mean is None:
            self._offset = None  # no per-band statistics: x = r / scaler, a gain is a gain
        else:
            mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
            ok = np.isfinite(mean) & np.isfinite(std) & (std > 0)
            self._offset = np.where(ok, mean / np.where(ok, std, 1), 0.0)

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, uri: str) -> np.ndarray:
        """The decoded chip file ``uri`` (bands, rows, cols); read-only when kept."""
        kept = self._memory.get(uri)
        if kept is not None:
            return kept
        path = storage.cached_local_copy(uri, self.cache_dir)
        with rasterio.open(path) as src:
            array = src.read()
        if self._memory_used + array.nbytes <= self.memory_bytes:
            array.setflags(write=False)  # shared by every later use: never changed in place
            self._memory[uri] = array
            self._memory_used += array.nbytes
        return array

    def class_indices(self, index: int) -> np.ndarray:
        """The (H, W) class-index chip of pair ``index`` (label values through the lookup)."""
        return self.lookup[self._read(self.pairs[index][1])[0].astype(np.int64).clip(0, 255)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_uri = self.pairs[index][0]
        raw = self._read(image_uri)
        image = self.normalization.apply(raw)
        mask = self.class_indices(index)
        if self.pseudo_labels is not None:
            pseudo = self.lookup[self.pseudo_labels[index].clip(0, 255)]
            mask = np.where(pseudo > 0, pseudo, mask)
        if self.augment and self.spectral_jitter:
            valid = None
            if self.normalization.nodata is not None:
                valid = ~np.all(raw == self.normalization.nodata, axis=0)
            offset = self._offset if self._offset is not None else np.zeros(len(image))
            # seeded from torch, so Lightning's seed_everything makes runs repeatable
            rng = np.random.default_rng(int(torch.randint(2**31 - 1, ())))
            spectral_jitter(image, offset, valid, rng)
        x, y = torch.from_numpy(image), torch.from_numpy(mask)
        if self.augment:
            x, y = augment_pair(x, y, self.augmentation)
        return x, y
