"""The transfer evaluations, one module each: (pretrained backbone, data, config, device, seed, log,
curve) -> ``StageOutput``.

Each fine-tunes the pretrained network on its task, as the study did; induction accuracy
classifies by nearest neighbours on the pretrained fc7 features instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

# curve(metrics, step): a stage's training curves (e.g. {"detection/loss": 0.71}, step = iteration).
Curve = Callable[[dict[str, float], int], None]


def no_curve(metrics: dict[str, float], step: int) -> None:
    """A ``Curve`` that records nothing (the default when a caller keeps no curves)."""


@dataclass(frozen=True)
class StageOutput:
    """What a transfer stage returns: ``metrics`` (percent for AP and accuracy; names as in
    ``itl_ray.metrics``) and ``per_image``, its per-image test scores as tables keyed by file stem
    (``voc07_det_detections``, ...); the trial writes each to ``per_image/<stem>.parquet``."""

    metrics: dict[str, float]
    per_image: dict[str, pa.Table] = field(default_factory=dict)
