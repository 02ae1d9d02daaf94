"""The torchvision pipeline (pretraining's ``pipeline: torchvision``), kept for comparison with the
fast one: a torch Dataset over the shard rows, PIL decode, torchvision.transforms (resize, crop,
flip, to tensor, normalize) in DataLoader worker processes, fed the same crop plan as the fast
loader, so both cut the same windows of the same images.
"""

from __future__ import annotations

import io
from typing import Callable, Iterator

import numpy as np
import torch

from itl_ray.crop_plans import AUGMENTATIONS, epoch_plan
from itl_ray.errors import UserError
from itl_ray.image_rows import ImageRows
from itl_ray.images import MEAN, STD
from itl_ray.shards import Prepared


class ShardRowsDataset(torch.utils.data.Dataset):
    """Shard rows decoded with PIL and transformed with torchvision.transforms, one image per item.

    An item key is (position, *plan row, flip): resize to the plan's size, cut its window, resize
    that to the resolution, flip (see PLAN_COLUMNS)."""

    def __init__(self, folder: str, kind: str, rows: np.ndarray, resolution: int):
        self.folder, self.kind, self.rows, self.resolution = folder, kind, rows, resolution
        self._data: Prepared | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        position, resized_h, resized_w, top, left, height, width, flip = key
        if self._data is None:  # opened in the worker process that uses it
            self._data = Prepared(self.folder, self.kind)
        (data,) = self._data.read([self.rows[position]])
        image = Image.open(io.BytesIO(data)).convert("RGB")
        size = self.resolution
        if image.size != (resized_w, resized_h):
            image = TF.resize(image, [resized_h, resized_w])
        image = TF.crop(image, top, left, height, width)
        if (height, width) != (size, size):
            image = TF.resize(image, [size, size])
        if flip:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), MEAN.flatten().tolist(), STD.flatten().tolist())


class _EpochBatches:
    """The DataLoader's batch sampler: the current epoch's batches of item keys."""

    def __init__(self):
        self.batches: list[list[tuple]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchvisionLoader:
    """The same batches as ``FastLoader`` (same plan), made the plain way: PIL + torchvision
    transforms in DataLoader worker processes (``workers``; 0 decodes in this process)."""

    def __init__(self, images: ImageRows, resolution: int, batch_size: int, device: torch.device, *,
                 augment: str = "crop", train: bool = True, workers: int = 0, prefetch: int = 2,
                 channels_last: bool = False, log: Callable[[str], None] = print):
        if augment not in AUGMENTATIONS:
            raise UserError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        self.images, self.resolution, self.batch_size = images, resolution, batch_size
        self.device, self.augment, self.train = torch.device(device), augment, train
        self.channels_last = channels_last
        self.heights, self.widths = images.sizes()
        self.sampler = _EpochBatches()
        dataset = ShardRowsDataset(str(images.data.folder), images.data.info["kind"], images.rows, resolution)
        self.workers = workers
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=max(1, prefetch) if workers > 0 else None,
            generator=torch.Generator().manual_seed(0),  # keeps the global generator (dropout) untouched
        )

    @property
    def decodes_while_training(self) -> bool:
        """True when DataLoader processes decode on the cores a CPU training step uses."""
        return self.workers > 0 and self.device.type == "cpu"

    def describe(self) -> str:
        """One line for the log: the image count and the DataLoader processes."""
        return f"torchvision pipeline ({len(self.images)} images, PIL + transforms, {self.workers} DataLoader workers)"

    def close(self) -> None:
        """Stop the DataLoader's worker processes (also on leaving a ``with`` block)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def epoch(self, generator: torch.Generator | None = None,
              start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches, as ``FastLoader.epoch`` makes them (same order, crops and flips for
        the same generator, from batch ``start`` on), on the device; images in channels_last memory
        when asked."""
        count = len(self.images)
        order, plans, flips = epoch_plan(self.heights, self.widths, self.augment, self.resolution, self.batch_size,
                                         self.train, generator)
        keys = [(int(position), *(int(value) for value in plan), bool(flip))
                for position, plan, flip in zip(order, plans, flips)]
        first = start * self.batch_size
        self.sampler.batches = [keys[at : at + self.batch_size] for at in range(first, count, self.batch_size)]
        return self._batches(order, first)

    def _batches(self, order, start: int = 0):
        for images in self.loader:
            stop = start + len(images)
            labels = torch.from_numpy(self.images.labels[order[start:stop]])
            start = stop
            if self.device.type == "cuda":
                images = images.to(self.device, non_blocking=True)
                labels = labels.pin_memory().to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels
