"""Single images as uint8 tensors: decode, resize, square, crop, normalise.

The transfer stages and the loaders share these helpers, so that every stage sees an image the
same way: decoded to RGB uint8 3xHxW, resized with antialiased bilinear interpolation computed in
float and rounded to the nearest level (``resize_uint8``), normalised with ImageNet's channel
means and standard deviations (``normalize``).

Crop sizes follow Caffe's ImageNet recipe, the study's: images stored at 256 px, 227 px crops cut
from them (``CAFFE_SHORT_SIDE``, ``CAFFE_CROP``); at other crop sizes the same ratio holds
(``short_side_for``), so images prepared at that shorter side are cropped and never resampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

from itl_ray.errors import UserError

# Caffe's ImageNet recipe: images resized to 256 px (examples/imagenet/create_imagenet.sh,
# RESIZE_HEIGHT=256 RESIZE_WIDTH=256), random 227 px crops (models/bvlc_reference_caffenet/
# train_val.prototxt, ``transform_param { crop_size: 227 }``). Caffe warps the whole image to
# 256x256; this project keeps the aspect ratio (shorter side 256, centre square): an assumption.
CAFFE_SHORT_SIDE = 256  # px
CAFFE_CROP = 227  # px

# ImageNet's channel means and standard deviations (the usual torchvision values, in 0..1 units),
# shaped 1x3x1x1 to broadcast over an Nx3xHxW batch.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

_SCALED: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (255 * MEAN, 255 * STD) there


def decode_rgb(data: bytes | torch.Tensor, name: str) -> torch.Tensor:
    """One encoded image (JPEG, PNG, ...: bytes, or a 1-d uint8 tensor of them) as uint8 3xHxW RGB.

    Raises UserError naming the image (``name``) when it cannot be decoded."""
    encoded = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(encoded, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as error:
        raise UserError(f"cannot decode image {name} ({error}); prepare its dataset again") from None


def resize_uint8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A uint8 3xHxW image resized to ``height`` x ``width`` px: antialiased bilinear (half-pixel
    centres, as ``F.interpolate(align_corners=False)``) computed in float32, rounded to the nearest
    level. The transfer stages and the loaders' cached squares resize this way.

    (The fast loader's per-image crops use torch's uint8 kernel instead, as torchvision's transforms
    on uint8 tensors do: a fixed-point version of the same filter, within one level of this one and
    3-4 times faster; see ``crop_plans.crop_image``.)"""
    resized = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def resize_short_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 3xHxW image resized (``resize_uint8``) so its shorter side is ``size`` px; the longer
    side keeps the aspect ratio, rounded to whole pixels."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    return resize_uint8(image, max(size, round(height * scale)), max(size, round(width * scale)))


def center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window of a 3xHxW image (H, W >= size; a view, no copy)."""
    height, width = image.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size]


def load_squares(images: list[bytes], size: int) -> torch.Tensor:
    """Decode encoded images, resize each so its shorter side is ``size`` px and cut the central
    square: uint8 Nx3xSxS (S = ``size``). Raises UserError for an image that cannot be decoded."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for index, data in enumerate(images):
        out[index] = center_square(resize_short_side(decode_rgb(data, f"#{index}"), size), size)
    return out


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 Nx3xHxW (0..255) -> float32, ImageNet-normalised: (x / 255 - MEAN) / STD per channel."""
    return (batch.float() / 255.0 - MEAN.to(batch.device)) / STD.to(batch.device)


def normalize_(batch: torch.Tensor) -> torch.Tensor:
    """In place: float Nx3xHxW in 0..255 -> ImageNet-normalised, as ``normalize`` (the constants
    are moved to each device once). Returns ``batch``."""
    if batch.device not in _SCALED:
        _SCALED[batch.device] = ((MEAN * 255).to(batch.device), (STD * 255).to(batch.device))
    mean, std = _SCALED[batch.device]
    return batch.sub_(mean).div_(std)


def random_crops(batch: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``crop`` x ``crop`` window and a random horizontal flip (probability 1/2) per image
    of a uint8 Nx3xHxW batch, drawn from ``generator``: uint8 Nx3xCxC (C = ``crop``)."""
    count, _, height, width = batch.shape
    tops = torch.randint(0, height - crop + 1, (count,), generator=generator)
    lefts = torch.randint(0, width - crop + 1, (count,), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    out = torch.empty((count, 3, crop, crop), dtype=batch.dtype)
    for index in range(count):
        window = batch[index, :, tops[index] : tops[index] + crop, lefts[index] : lefts[index] + crop]
        out[index] = window.flip(-1) if flips[index] else window
    return out


def center_crops(batch: torch.Tensor, crop: int) -> torch.Tensor:
    """The central ``crop`` x ``crop`` window of each image of an Nx3xHxW batch (a view)."""
    height, width = batch.shape[-2:]
    top, left = (height - crop) // 2, (width - crop) // 2
    return batch[:, :, top : top + crop, left : left + crop]


def short_side_for(resolution: int) -> int:
    """Shorter side (px) an image is resized to before ``resolution`` px crops: Caffe's ratio,
    256 for 227 (``CAFFE_SHORT_SIDE`` / ``CAFFE_CROP``), rounded to whole pixels (72 for 64, 253
    for 224). Images prepared at this shorter side are cropped as stored: no resampling, and in
    particular no upsampling (ImageNet's default ``itl-ray prepare`` side is 256, the crop 227)."""
    return round(resolution * CAFFE_SHORT_SIDE / CAFFE_CROP)


class SquareImages:
    """Images of a prepared dataset as ``load_squares`` makes them (shorter side ``size`` px,
    centre square: uint8 3 x size x size), decoded when a batch is asked for, so memory holds a
    batch, not the dataset: ``squares[positions]`` (a 1-d int64 tensor or a slice of positions in
    ``rows``) -> uint8 B x 3 x size x size, the same as indexing ``load_squares`` of all of them.

    ``data``: anything with ``read(rows) -> list[bytes]`` (``shards.Prepared``); ``rows``: its rows.
    ``threads`` decode a batch side by side (torchvision.io's decoder releases the GIL; each thread
    runs torch ops on itself alone). When the decoded squares of all rows fit ``cache_bytes`` they
    are decoded once, at the first batch, and kept (the mini-benchmark's sets; real SUN397 at 256
    px needs 3.9 GB for a partition's training images, so it streams). Use it as a context manager,
    or ``close()`` it, to stop the threads. Raises UserError naming the row of an image that cannot
    be decoded."""

    def __init__(self, data, rows, size: int, threads: int = 1, cache_bytes: int = 0):
        self.data, self.rows, self.size = data, [int(row) for row in rows], size
        self.threads = max(1, threads)
        self.cacheable = len(self.rows) * 3 * size * size <= cache_bytes
        self._cache: torch.Tensor | None = None
        self._pool = None

    def __len__(self) -> int:
        return len(self.rows)

    def __enter__(self) -> "SquareImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the decode threads (the cache, if any, stays)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _start_pool(self):
        from concurrent.futures import ThreadPoolExecutor
        import threading

        before = torch.get_num_threads()
        started = threading.Barrier(self.threads)

        def single_threaded():
            torch.get_num_threads()  # settle this thread's count, so that the next line sticks
            torch.set_num_threads(1)

        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="itl-squares", initializer=single_threaded)
        for future in [self._pool.submit(started.wait) for _ in range(self.threads)]:
            future.result()
        torch.set_num_threads(before)  # the count of threads started later is process-wide

    def _decode(self, rows: list[int]) -> torch.Tensor:
        out = torch.empty((len(rows), 3, self.size, self.size), dtype=torch.uint8)

        def one(index: int, data) -> None:
            image = decode_rgb(data, f"row {rows[index]}")
            out[index] = center_square(resize_short_side(image, self.size), self.size)

        encoded = self.data.read(rows)
        if self.threads == 1 or len(rows) < 2 * self.threads:
            for index, data in enumerate(encoded):
                one(index, data)
            return out
        if self._pool is None:
            self._start_pool()
        for future in [self._pool.submit(one, index, data) for index, data in enumerate(encoded)]:
            future.result()
        return out

    def __getitem__(self, positions) -> torch.Tensor:
        if isinstance(positions, slice):
            positions = torch.arange(len(self.rows))[positions]
        positions = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        if self.cacheable:
            if self._cache is None:
                self._cache = self._decode(self.rows)
            return self._cache[positions]
        return self._decode([self.rows[int(position)] for position in positions])
