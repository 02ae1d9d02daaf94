"""Readers for the datasets' real on-disk layouts, one module per format.

A dataset root may be a local path or any URI that pyarrow's file systems open (``file://``,
``s3://``, ``gs://``); ``Root`` hides the difference. Each reader validates the layout first and
raises ``UserError`` naming what it expected, so a wrong path fails before anything is written.
Readers return plain records (paths inside the root, labels, boxes); ``itl_ray.prepare`` turns
them into shards, and trials read only the shards.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from itl_ray.errors import UserError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class LabeledImage:
    """One image file (its path inside the root's file system) and its class name (a wnid for
    ImageNet, a scene path like ``/a/abbey`` for SUN397)."""

    path: str
    label: str


class Root:
    """A dataset root folder on a pyarrow file system: list folders, test paths, read files.

    ``location``: a local path or a URI (``s3://bucket/ILSVRC2012``); ``what`` names the dataset
    in error messages. Raises UserError when the URI cannot be opened or the folder does not
    exist. Paths passed to the methods are full paths on the file system (``path`` builds them)."""

    def __init__(self, location: str | Path, what: str):
        from pyarrow import fs

        self.location = str(location)
        self.what = what
        if "://" in self.location:
            try:
                self.fs, self.base = fs.FileSystem.from_uri(self.location)
            except Exception as error:  # pyarrow raises several types for a bad or unreachable URI
                raise UserError(f"{what} root {self.location!r} cannot be opened ({error}); check the URI") from None
        else:
            self.fs = fs.LocalFileSystem()
            self.base = str(Path(self.location).expanduser().resolve())
        self.base = self.base.rstrip("/") or "/"
        self._listings: dict[str, set[str]] = {}
        if not self.is_dir(self.base):
            state = "is a file, not a folder" if self.fs.get_file_info(self.base).type == fs.FileType.File else "does not exist"
            raise UserError(f"{what} folder {self.location!r} {state}; point the command or the config's "
                            "data path at the dataset's root")

    def path(self, *parts: str) -> str:
        """The full path of ``parts`` (joined with /) under the root."""
        return posixpath.join(self.base, *parts)

    def relative(self, path: str) -> str:
        """A full path relative to the root."""
        return posixpath.relpath(path, self.base)

    def _type(self, path: str):
        return self.fs.get_file_info(path).type

    def is_dir(self, path: str) -> bool:
        """Whether the full ``path`` is a folder."""
        from pyarrow import fs

        return self._type(path) == fs.FileType.Directory

    def is_file(self, path: str) -> bool:
        """Whether the full ``path`` is a file."""
        from pyarrow import fs

        return self._type(path) == fs.FileType.File

    def entries(self, folder: str) -> list[tuple[str, bool]]:
        """(name, is_folder) of the entries of ``folder``, sorted by name."""
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(folder, recursive=False))
        return sorted((info.base_name, info.type == fs.FileType.Directory) for info in infos)

    def files_under(self, relative: str) -> set[str]:
        """Every file below ``relative`` (paths relative to the root), from one recursive listing:
        far cheaper than a test per file on an object store."""
        from pyarrow import fs

        key = relative.strip("/")
        if key not in self._listings:
            infos = self.fs.get_file_info(fs.FileSelector(self.path(key), recursive=True, allow_not_found=True))
            self._listings[key] = {self.relative(info.path) for info in infos if info.type == fs.FileType.File}
        return self._listings[key]

    def read_bytes(self, path: str) -> bytes:
        """The whole file at the full ``path``; OSError (pyarrow's) when it cannot be read."""
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def read_text(self, path: str) -> str:
        """The file as UTF-8 text, undecodable bytes replaced."""
        return self.read_bytes(path).decode("utf-8", errors="replace")

    def required(self, relative: str, what: str) -> str:
        """The full path of ``relative`` when it exists; a UserError saying what was expected there."""
        path = self.path(relative)
        if self._type(path).name == "NotFound":
            raise UserError(f"expected {what} at {self.display(path)}, which does not exist: is the {self.what} "
                            "root right?")
        return path

    def display(self, path: str) -> str:
        """``path`` as the user would write it (with the URI's scheme for remote roots)."""
        if "://" in self.location:
            return self.location.rstrip("/") + "/" + self.relative(path)
        return path


def read_lines(text: str) -> list[str]:
    """Non-empty stripped lines of a text file's contents."""
    return [line.strip() for line in text.splitlines() if line.strip()]
