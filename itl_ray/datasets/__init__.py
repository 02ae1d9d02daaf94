"""Readers for the datasets' real on-disk layouts, one module per format.

Each reader validates the layout first and raises ``UserError`` naming what it expected, so a
wrong path fails before any training starts. Readers return plain records; decoding happens in
``itl_ray.loader``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itl_ray.errors import UserError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class LabeledImage:
    """One image file and its class name (a wnid for ImageNet, a scene name for SUN397)."""

    path: str
    label: str


def existing_dir(root: str | Path, what: str) -> Path:
    """``root`` as a Path when it is a folder; a UserError naming ``what`` otherwise."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"{what} folder {str(root)!r} does not exist; point the config's data path at it")
    return path


def required(path: Path, what: str) -> Path:
    """``path`` when it exists; a UserError saying what was expected there otherwise."""
    if not path.exists():
        raise UserError(f"expected {what} at {path}, which does not exist: is the dataset root right?")
    return path


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
