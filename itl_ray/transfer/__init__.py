"""The transfer evaluations, one module each: (pretrained backbone, data, config) -> metrics.

Each fine-tunes the whole pretrained network on its task, as the study did; induction accuracy
classifies by nearest neighbours on the pretrained fc7 features instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class StageOutput:
    """What a transfer stage returns: ``metrics`` (percent for AP and accuracy) and ``per_image``,
    its per-image test scores as Arrow tables keyed by file stem (e.g. "sun397_predictions"), which
    the trial writes to ``<workdir>/per_image/<stem>.parquet``."""

    metrics: dict[str, float]
    per_image: dict[str, pa.Table] = field(default_factory=dict)
