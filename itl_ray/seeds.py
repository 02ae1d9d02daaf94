"""Each stage's own seed, derived from the trial's seed and the stage's name.

A trial is a pure function of its config, also when it resumes from any checkpoint. So no stage
may depend on random draws made before it (a resumed process never made them): each stage seeds
its own generators from ``stage_seed(trial seed, stage name)`` and leaves torch's global
generator as it found it. The value is a hash, the same in every process, on every machine and
under any ``PYTHONHASHSEED`` (Python's ``hash()`` of a string is salted per process, so it is not
used).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

SEED_BITS = 63  # torch.manual_seed and torch.Generator take any non-negative int below 2**64


def stage_seed(seed: int, stage: str) -> int:
    """The seed of ``stage`` (e.g. "pretrain", "detection") in a trial seeded ``seed``: the first
    63 bits of SHA-256 over ``"<seed>/<stage>"``, a non-negative int below 2**63. Different stages
    get unrelated seeds; the same pair always the same one."""
    digest = hashlib.sha256(f"{int(seed)}/{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside: torch's global generators (the CPU's and every visible CUDA device's) seeded with
    ``seed``, for the draws no explicit generator can take (dropout, a new layer's initialisation).
    On exit they are as they were before (``torch.random.fork_rng``), so the next stage's numbers
    do not depend on how many draws this one made."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
