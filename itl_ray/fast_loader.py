"""The fast input pipeline: batches of prepared images for pretraining, decoded and cropped in
batches, on the GPU where there is one.

``FastLoader`` (pipeline ``fast``, the default; the torchvision pipeline in
``torchvision_loader.py`` cuts the same crops the plain way, for comparison)
  1. Plan. Each epoch, the main thread draws the order and every image's crop and flip from one
     seeded generator before anything is decoded (``crop_plans``).
  2. Pixels, from one of three sources:
     - cache: a set that fits ``cache_gib`` is decoded once into uint8 squares (shorter side
       resized to 256/227 of the crop, center square: Caffe's ImageNet recipe, as
       ``images.load_squares``), kept on the training device; batches are cut from it (the demo's
       subsets go this way).
     - CPU threads: ``workers`` threads decode the JPEG bytes (torchvision.io's decoder releases the
       GIL: two threads decode twice as fast as one), apply the plan row (``crop_plans.crop_image``)
       and write into the batch's memory, ``prefetch`` batches ahead of the training step. The
       bytes are views of the memory-mapped shards (``image_rows.ShardBytes``): nothing is copied
       before decoding.
     - GPU: a producer thread, on its own CUDA stream, decodes each batch's JPEG list with nvJPEG
       (``torchvision.io.decode_jpeg(list, device="cuda")``) and crops, resizes and flips the whole
       batch in a few gathers (``resample.resample``). A share of each batch (``cpu_decode_share``)
       goes to the CPU threads instead, so host cores and the GPU decode side by side; their crops
       reach the GPU from pinned memory by non-blocking copies on the same stream. The training
       stream waits on an event per batch, so batch n+1 is decoded while batch n trains.
  Batches come out in channels_last memory when asked (on CUDA).

Where the time goes on a CPU (this project's 2-core machine, measured): JPEG decode dominates and
grows with the stored size (500x375: about 1 ms per image; 97x73: 0.1 ms), so shards prepared at
the shorter side the crops need (256 for 227 px, 72 for 64 px) are the main saving; PIL decodes
these small images at half torchvision.io's speed; a uint8 antialiased resize costs 0.04-0.3 ms;
Python costs a few microseconds per image. Decoding beside a CPU training step must not share its
cores: torch's OpenMP threads spin at barriers, and such steps ran up to 10x slower on a busy
machine (see ``FastLoader.decodes_while_training``). On a GPU, nvJPEG runs on the SMs that train
(../shared/reference/ANCHORS.md: SM-only decode caps AlexNet near 12.7k img/s at 256 px), hence
the CPU share and the option of smaller shards.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from itl_ray.crop_plans import AUGMENTATIONS, crop_image, epoch_plan, source_boxes
from itl_ray.errors import UserError
from itl_ray.image_rows import ImageRows, ShardBytes
from itl_ray.images import center_square, decode_rgb, normalize, normalize_, resize_short_side, short_side_for
from itl_ray.resample import pinned_for, resample, to_device


def _name(rows: np.ndarray, index: int, folder) -> str:
    return f"row {rows[index]} of {folder}"


def _check_size(image: torch.Tensor, height: int, width: int, name: str) -> None:
    if image.shape[1] != height or image.shape[2] != width:
        raise UserError(f"image {name} is {image.shape[2]}x{image.shape[1]} px, but the manifest says "
                        f"{width}x{height}; prepare its dataset again")


def _decode_crops(views: list[torch.Tensor], rows: np.ndarray, folder, heights: np.ndarray, widths: np.ndarray,
                  plans: np.ndarray, flips: np.ndarray, size: int, out: torch.Tensor) -> None:
    """Worker thread: decode images and apply their plan rows (``crop_image``) into ``out``
    (k x 3 x size x size uint8)."""
    for index, data in enumerate(views):
        try:
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as error:
            raise UserError(f"cannot decode image {_name(rows, index, folder)} ({error}); prepare its dataset "
                            "again") from None
        _check_size(image, heights[index], widths[index], _name(rows, index, folder))
        out[index].copy_(crop_image(image, plans[index], bool(flips[index]), size))


def _decode_squares(views: list[torch.Tensor], rows: np.ndarray, folder, side: int, out: torch.Tensor) -> None:
    """Worker thread: decode, resize the shorter side to ``side`` and center-square
    (``images.load_squares``) into ``out`` (k x 3 x side x side uint8)."""
    for index, data in enumerate(views):
        out[index] = center_square(resize_short_side(decode_rgb(data, _name(rows, index, folder)), side), side)


def _recorded(stream) -> torch.cuda.Event | None:
    """An event marking the work queued so far on a CUDA ``stream`` (None without one)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def default_workers(device: torch.device) -> int:
    """Decode threads (or DataLoader processes) when the setting is 0. GPU: all cores but two (those
    run the training and producer threads). CPU: a quarter of torch's threads, at least one (decoding
    stored shards costs a fraction of a CPU training step; see ``decodes_while_training``)."""
    if device.type == "cuda":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores - 2)
    return max(1, round(torch.get_num_threads() / 4))


def _one_thread() -> None:
    """Decode thread initializer: torch ops in this thread (resize, flip, copy) run on it alone.
    Otherwise each decode thread would start an OpenMP team of torch's size (16 threads x 14
    decoders on a GPU node)."""
    torch.get_num_threads()  # settle this thread's own count first, so that the next line sticks
    torch.set_num_threads(1)


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    step = max(1, math.ceil(count / max(1, parts)))
    return [(start, min(count, start + step)) for start in range(0, count, step)]


class FastLoader:
    """Batches of ``images`` at ``resolution`` px: random crops and flips (``train``) or center crops.

    ``epoch(generator)`` yields (images, labels) on ``device``: images float Nx3xRxR,
    ImageNet-normalised (channels_last memory when ``channels_last``), labels int64."""

    def __init__(self, images: ImageRows, resolution: int, batch_size: int, device: torch.device, *,
                 augment: str = "crop", train: bool = True, workers: int = 0, prefetch: int = 4,
                 cache_gib: float = 2.0, cpu_decode_share: float = 0.5, channels_last: bool = False,
                 log: Callable[[str], None] = print):
        if augment not in AUGMENTATIONS:
            raise UserError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        self.images, self.resolution, self.batch_size = images, resolution, batch_size
        self.device, self.augment, self.train = torch.device(device), augment, train
        self.workers = workers or default_workers(self.device)
        self.prefetch = max(1, prefetch)
        self.cpu_decode_share = min(1.0, max(0.0, cpu_decode_share))
        self.channels_last = channels_last
        self.log = log
        self.side = short_side_for(resolution)
        self.heights, self.widths = images.sizes()
        self.reader = ShardBytes(images.data)
        self._pool: ThreadPoolExecutor | None = None
        self._gpu_decode = True  # nvJPEG works (until it fails once)
        self._producer = False  # tests: run the GPU path's producer on a CPU
        self.cache: torch.Tensor | None = None
        cache_bytes = len(images) * 3 * self.side * self.side
        if len(images) and cache_bytes <= cache_gib * 2**30:
            self.cache = self._fill_cache().to(self.device)

    # -- set-up and teardown
    @property
    def pool(self) -> ThreadPoolExecutor:
        """The decode threads, all started now, each running torch ops on itself alone."""
        if self._pool is None:
            before = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="itl-decode", initializer=_one_thread)
            started = threading.Barrier(self.workers)
            for future in [self._pool.submit(started.wait) for _ in range(self.workers)]:
                future.result()
            torch.set_num_threads(before)  # the count threads started later begin with is process-wide
        return self._pool

    def close(self) -> None:
        """Stop the decode threads (a loader is also a context manager that closes on exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def decodes_while_training(self) -> bool:
        """True when the decode threads compete with a CPU training step for cores. Training should
        then leave them theirs: torch's OpenMP threads spin at their barriers, and on a busy machine
        a step whose threads share cores with decoders was measured up to 10x slower."""
        return self.cache is None and self.device.type == "cpu"

    def describe(self) -> str:
        """One line for the log: the image count and where the pixels come from."""
        where = f"{self.workers} decode thread{'s' if self.workers > 1 else ''}"
        if self.cache is not None:
            source = f"decoded once, {self.cache.numel() / 2**20:.0f} MiB cached on {self.device.type}"
        elif self.device.type == "cuda":
            source = f"decoded every epoch: {self.cpu_decode_share:.0%} by {where}, the rest by nvJPEG on the GPU"
        else:
            source = f"decoded every epoch by {where}"
        return f"fast pipeline ({len(self.images)} images, {source})"

    def _fill_cache(self) -> torch.Tensor:
        count, rows, folder = len(self.images), self.images.rows, self.images.data.folder
        out = torch.empty((count, 3, self.side, self.side), dtype=torch.uint8)
        parts = _split(count, self.workers * 4) if count >= 256 and self.workers > 1 else [(0, count)]
        if len(parts) == 1:
            _decode_squares(self.reader.views(rows), rows, folder, self.side, out)
            return out
        futures = [self.pool.submit(_decode_squares, self.reader.views(rows[a:b]), rows[a:b], folder, self.side,
                                    out[a:b]) for a, b in parts]
        for future in futures:
            future.result()
        return out

    # -- one epoch
    def epoch(self, generator: torch.Generator | None = None,
              start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches: (images float Bx3xRxR, ImageNet-normalised, labels int64 B) on the
        device, ``batch_size`` per batch (the last may be smaller). Training draws the order, crops
        and flips from ``generator`` (required; ValueError without it); evaluation takes the images
        in order, center crops. ``start``: the first batch to make (a run resumed mid-epoch): the
        whole epoch is drawn all the same, so the generator ends where a full epoch leaves it, and
        the batches before ``start`` are not decoded. Raises UserError naming the row of an image
        that cannot be decoded or whose size differs from the manifest's."""
        count = len(self.images)
        if self.cache is not None:
            heights = widths = np.full(count, self.side, dtype=np.int64)
        else:
            heights, widths = self.heights, self.widths
        order, plans, flips = epoch_plan(heights, widths, self.augment, self.resolution, self.batch_size, self.train,
                                         generator)
        batches = [(first, min(count, first + self.batch_size)) for first in range(0, count, self.batch_size)]
        batches = batches[start:]
        if self.cache is not None:
            return self._cached(order, plans, flips, batches)
        if self.device.type == "cuda" or self._producer:
            return self._gpu(order, plans, flips, batches)
        return self._threads(order, plans, flips, batches)

    def _labels(self, positions: np.ndarray) -> torch.Tensor:
        return to_device(self.images.labels[positions], self.device)

    def _finish(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch.contiguous()

    def _cached(self, order, plans, flips, batches):
        size, side = self.resolution, self.side
        for start, stop in batches:
            positions = order[start:stop]
            if self.device.type == "cuda":  # one gather from the squares on the GPU
                squares = np.full(len(positions), side)
                boxes = source_boxes(plans[start:stop], squares, squares)
                batch = resample(self.cache.view(-1), positions * (3 * side * side), squares, squares, boxes,
                                 flips[start:stop], size)
                yield self._finish(normalize_(batch)), self._labels(positions)
                continue
            out = torch.empty((len(positions), 3, size, size), dtype=torch.uint8)
            for index, position in enumerate(positions):
                out[index] = crop_image(self.cache[position], plans[start + index], bool(flips[start + index]), size)
            yield self._finish(normalize(out)), self._labels(positions)

    def _submit_crops(self, positions, plans, flips, out) -> list:
        """Queue decode + crop of ``positions`` into ``out`` on the threads; returns the futures."""
        rows = self.images.rows[positions]
        views = self.reader.views(rows)
        heights, widths = self.heights[positions], self.widths[positions]
        return [self.pool.submit(_decode_crops, views[a:b], rows[a:b], self.images.data.folder, heights[a:b],
                                 widths[a:b], plans[a:b], flips[a:b], self.resolution, out[a:b])
                for a, b in _split(len(positions), self.workers)]

    def _threads(self, order, plans, flips, batches):
        """CPU: threads decode ``prefetch`` batches ahead of the one being trained on."""
        size = self.resolution
        pending: deque = deque()

        def submit(index):
            start, stop = batches[index]
            out = torch.empty((stop - start, 3, size, size), dtype=torch.uint8)
            return out, self._submit_crops(order[start:stop], plans[start:stop], flips[start:stop], out), start, stop

        try:
            for index in range(min(self.prefetch, len(batches))):
                pending.append(submit(index))
            for index in range(len(batches)):
                out, futures, start, stop = pending.popleft()
                if index + self.prefetch < len(batches):
                    pending.append(submit(index + self.prefetch))
                for future in futures:
                    future.result()
                yield self._finish(normalize(out)), self._labels(order[start:stop])
        finally:
            for _, futures, _, _ in pending:
                for future in futures:
                    future.cancel()

    # -- GPU: producer thread on its own stream
    def _gpu(self, order, plans, flips, batches):
        handoff: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(order, plans, flips, batches, handoff, stop),
                                    name="itl-gpu-batches", daemon=True)
        producer.start()
        try:
            for _ in batches:
                item = handoff.get()
                if isinstance(item, BaseException):
                    raise item
                images, labels, ready = item
                if ready is not None:  # the training stream waits for the data stream's batch
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(ready)
                    images.record_stream(stream)  # allocated on the data stream, used on this one
                    labels.record_stream(stream)
                yield images, labels
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    handoff.get(timeout=0.05)
                except queue.Empty:
                    pass
            producer.join()

    def _produce(self, order, plans, flips, batches, handoff: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    handoff.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            if self.device.type != "cuda":  # tests run this path on a CPU, without streams
                self._produce_on(None, order, plans, flips, batches, put, stop)
                return
            with torch.cuda.device(self.device):
                stream = torch.cuda.Stream(self.device)
                with torch.cuda.stream(stream):
                    self._produce_on(stream, order, plans, flips, batches, put, stop)
        except BaseException as error:  # handed to the training thread, which raises it
            put(error)

    def _produce_on(self, stream, order, plans, flips, batches, put, stop) -> None:
        """Make the epoch's batches on ``stream`` (current in this thread): the CPU share of batch n
        + ``prefetch`` is queued on the decode threads while the GPU decodes batch n."""
        size, device = self.resolution, self.device
        shares = [round((end - start) * self.cpu_decode_share) for start, end in batches]
        capacity = max(shares) if shares else 0
        ring = self.prefetch + 2
        # NHWC host buffers for the CPU share, viewed as NCHW (channels_last), pinned, used in turn.
        pinned = [pinned_for(torch.empty((capacity, size, size, 3), dtype=torch.uint8), device).permute(0, 3, 1, 2)
                  for _ in range(ring if capacity else 0)]
        copied: list = [None] * len(pinned)  # per buffer: the event after its last copy to the GPU
        pending: dict[int, list] = {}

        def submit(index):
            slot = index % ring
            if copied[slot] is not None:
                copied[slot].synchronize()  # the batch that used this buffer before has left it
            start, share = batches[index][0], shares[index]
            pending[index] = self._submit_crops(order[start : start + share], plans[start : start + share],
                                                flips[start : start + share], pinned[slot][:share])

        lookahead = self.prefetch
        try:
            for index in range(min(lookahead, len(batches))):
                if shares[index]:
                    submit(index)
            for index, (start, end) in enumerate(batches):
                if stop.is_set():
                    return
                if index + lookahead < len(batches) and shares[index + lookahead]:
                    submit(index + lookahead)
                share, count = shares[index], end - start
                batch = torch.empty((count, 3, size, size), dtype=torch.float32, device=device,
                                    memory_format=torch.channels_last)
                if share < count:
                    self._decode_on_gpu(order[start + share : end], plans[start + share : end],
                                        flips[start + share : end], batch[share:])
                if share:
                    for future in pending.pop(index):
                        future.result()
                    slot = index % ring
                    batch[:share].copy_(pinned[slot][:share].to(device, non_blocking=True))
                    copied[slot] = _recorded(stream)
                normalize_(batch)
                if not self.channels_last:
                    batch = batch.contiguous()
                if not put((batch, self._labels(order[start:end]), _recorded(stream))):
                    return
        finally:
            for futures in pending.values():
                for future in futures:
                    future.cancel()

    def _decode_on_gpu(self, positions, plans, flips, out) -> None:
        views = self.reader.views(self.images.rows[positions])
        heights, widths = self.heights[positions], self.widths[positions]
        decoded = None
        if self._gpu_decode:
            try:
                decoded = decode_jpeg(views, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as error:
                # A corrupt image fails on the CPU too (and raises there); otherwise nvJPEG is unusable.
                self._check_on_cpu(views, positions)
                self._gpu_decode = False
                self.log(f"loader: nvJPEG decode failed ({str(error).splitlines()[0][:120]}); decoding on the CPU")
        if decoded is None:  # decode on the CPU threads, crop there, copy over
            host = torch.empty((len(positions), 3, self.resolution, self.resolution), dtype=torch.uint8)
            for future in self._submit_crops(positions, plans, flips, host):
                future.result()
            out.copy_(pinned_for(host, self.device).to(self.device, non_blocking=True))
            return
        rows = self.images.rows[positions]
        for index, image in enumerate(decoded):
            _check_size(image, heights[index], widths[index], _name(rows, index, self.images.data.folder))
        flat = torch.cat([image.reshape(-1) for image in decoded])
        sizes = 3 * heights * widths
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        resample(flat, starts, heights, widths, source_boxes(plans, heights, widths), flips, self.resolution, out=out)

    def _check_on_cpu(self, views, positions) -> None:
        rows = self.images.rows[positions]
        for index, data in enumerate(views):
            try:
                decode_jpeg(data, mode=ImageReadMode.RGB)
            except RuntimeError as error:
                raise UserError(f"cannot decode image {_name(rows, index, self.images.data.folder)} ({error}); "
                                "prepare its dataset again") from None


