"""Images of a VOC split decoded and scaled in worker threads, a few at a time, in a given order:
how the detection and action stages read their images, so that memory does not grow with the
dataset.

The consumer hands ``ImageStream.images`` a plan, an iterable of (image index, flip) pairs, and
takes ``ScaledImage`` values back in that order. At most ``ahead`` images are being decoded or
waiting at any time (``peak_waiting`` records the most there were); the encoded bytes are read
from the memory-mapped shards by the worker that decodes them. Workers decode (JPEG, torchvision),
scale with Fast R-CNN's rule (``fast_rcnn_scale``; ``images.resize_uint8``) and flip; nothing they
do draws a random number, so results do not depend on the number of workers or on timing.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from itl_ray.datasets.voc import VocSplit
from itl_ray.errors import UserError
from itl_ray.images import decode_rgb, resize_uint8


def fast_rcnn_scale(height: int, width: int, size: int, max_size: int) -> float:
    """The factor Fast R-CNN scales an image by: its shorter side to ``size`` px, unless the longer
    side would then round to more than ``max_size`` px, in which case the longer side to
    ``max_size`` (fast-rcnn lib/utils/blob.py, ``prep_im_for_blob``; 600 and 1000 in
    lib/fast_rcnn/config.py ``__C.TRAIN.SCALES``/``__C.TRAIN.MAX_SIZE``, lines 38 and 41)."""
    scale = size / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Height and width (px, at least 1) of an image scaled by ``scale``, rounded as OpenCV's
    ``cv2.resize(fx=scale, fy=scale)`` rounds them."""
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class ScaledImage:
    """One image of the split as a stage feeds it to the network."""

    index: int  # position in the split
    pixels: torch.Tensor  # uint8 3 x H x W, scaled (and mirrored left-right when ``flipped``)
    scale: float  # scaled size / stored size, the same for both axes
    flipped: bool


def default_workers(device: torch.device) -> int:
    """Decode threads when the runtime setting is 0: on a GPU machine all cores but two (those run
    the training step and the main thread); on a CPU one thread beside the training step (decoding
    costs a small fraction of a CPU step)."""
    if device.type == "cuda":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores - 2)
    return 1


def _one_thread() -> None:
    """Worker initializer: torch ops in a decode thread (resize, flip) use that thread alone, not an
    OpenMP team of torch's size each."""
    torch.get_num_threads()
    torch.set_num_threads(1)


class ImageStream:
    """Decodes images of ``split`` in ``workers`` threads, at most ``ahead`` ahead of the consumer,
    each scaled by ``fast_rcnn_scale(size, max_size)``. Use as a context manager (the threads stop
    on exit)."""

    def __init__(self, split: VocSplit, size: int, max_size: int, workers: int, ahead: int):
        if workers < 1 or ahead < 1:
            raise ValueError(f"ImageStream needs workers >= 1 and ahead >= 1, got {workers} and {ahead}")
        self.split, self.size, self.max_size, self.ahead = split, size, max_size, ahead
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="itl-decode", initializer=_one_thread)
        self.peak_waiting = 0  # the most images decoded or being decoded but not yet taken at once
        self.decoded = 0  # images decoded so far

    def __enter__(self) -> "ImageStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (an image being decoded is finished and dropped)."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _decode(self, index: int, flip: bool) -> ScaledImage:
        image = self.split.images[index]
        pixels = decode_rgb(self.split.encoded(index), f"{image.image_id} of {self.split.name}")
        height, width = pixels.shape[-2:]
        if (height, width) != (image.height, image.width):
            raise UserError(f"image {image.image_id} of {self.split.name} is {width}x{height} px, but its manifest "
                            f"says {image.width}x{image.height}; prepare its dataset again")
        scale = fast_rcnn_scale(height, width, self.size, self.max_size)
        new_height, new_width = scaled_size(height, width, scale)
        scaled = pixels if (new_height, new_width) == (height, width) else resize_uint8(pixels, new_height, new_width)
        return ScaledImage(index, scaled.flip(-1) if flip else scaled, scale, flip)

    def images(self, plan: Iterable[tuple[int, bool]]) -> Iterator[ScaledImage]:
        """The planned images, decoded, in plan order. The plan is read ``ahead`` items ahead of
        what has been taken; an image's decoding error (UserError) is raised when it is taken."""
        plan = iter(plan)
        waiting: deque[Future] = deque()
        exhausted = False
        while True:
            while not exhausted and len(waiting) < self.ahead:
                step = next(plan, None)
                if step is None:
                    exhausted = True
                    break
                index, flip = step
                waiting.append(self.pool.submit(self._decode, int(index), bool(flip)))
                self.peak_waiting = max(self.peak_waiting, len(waiting))
            if not waiting:
                return
            image = waiting.popleft().result()
            self.decoded += 1
            yield image
