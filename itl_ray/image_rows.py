"""What a loader reads: images of a prepared dataset chosen by manifest row, each with its class
index, and their JPEG bytes as tensors viewing the memory-mapped shards (no copy)."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from itl_ray.shards import Prepared


@dataclass(frozen=True)
class ImageRows:
    """Images of a prepared dataset chosen by manifest row, each with its class index.

    ``rows`` and ``labels`` are converted to 1-d int64 arrays of one length (ValueError otherwise);
    a subset is such a list of rows, never a copy of the images."""

    data: Prepared
    rows: np.ndarray  # manifest rows (int64)
    labels: np.ndarray  # class index per row (int64)

    def __post_init__(self):
        rows, labels = np.asarray(self.rows, dtype=np.int64), np.asarray(self.labels, dtype=np.int64)
        if rows.ndim != 1 or rows.shape != labels.shape:
            raise ValueError(f"ImageRows: {rows.shape} rows but {labels.shape} labels")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.rows)

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored (heights, widths) in px of the images, int64 arrays in row order, from the manifest."""
        manifest = self.data.manifest
        return (manifest.column("height").to_numpy()[self.rows].astype(np.int64),
                manifest.column("width").to_numpy()[self.rows].astype(np.int64))


_READONLY_WARNED = False
_READONLY_LOCK = threading.Lock()


def _quiet_readonly_warning() -> None:
    """torch warns once per process that a tensor over read-only memory (the memory-mapped shards)
    must not be written; these tensors are only decoded. Spend that one warning here, silenced."""
    global _READONLY_WARNED
    with _READONLY_LOCK:
        if not _READONLY_WARNED:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                readonly = np.zeros(1, dtype=np.uint8)
                readonly.flags.writeable = False
                torch.from_numpy(readonly)
            _READONLY_WARNED = True


class ShardBytes:
    """JPEG bytes of manifest rows as uint8 tensors viewing the memory-mapped shards (``Prepared.views``)."""

    def __init__(self, data: Prepared):
        self.data = data

    def views(self, rows: np.ndarray) -> list[torch.Tensor]:
        """1-d uint8 tensors viewing the rows' JPEG bytes, in the order given (read-only memory:
        the decoders only read them)."""
        _quiet_readonly_warning()
        return [torch.from_numpy(view) for view in self.data.views(rows)]
