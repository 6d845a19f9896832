"""The one up-to-date check every stage makes: a done marker, written last, holds the key of
the settings and inputs the work was made from and the size and SHA-256 of every file it
vouches for. Work is skipped only where the marker holds the same key and every file is
still what was written; anything else (no marker, another key, a damaged marker, a file gone,
truncated or changed) means the work is done again."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .files import read_json, write_json

FILES = "digests"
"""The marker's entry of the files it vouches for: {path relative to the marker's folder:
{"bytes": size, "sha256": digest}}."""


def digest(path: Path) -> dict[str, Any]:
    """A file's size and SHA-256."""
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": os.path.getsize(path), "sha256": sha}


def digests(folder: Path, paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """{path relative to `folder`: its digest} (a file beside `folder` is "../<name>")."""
    return {os.path.relpath(p, folder): digest(Path(p)) for p in paths}


def damaged(folder: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """The files (relative to `folder`) that are gone or differ from their recorded digest.
    The size is compared first, so a truncated file costs no read."""
    out = []
    for name, want in files.items():
        path = folder / name
        try:
            same = path.stat().st_size == want["bytes"] and digest(path) == want
        except OSError:
            same = False
        if not same:
            out.append(name)
    return out


def load_done(marker: Path, key: Any) -> dict[str, Any] | None:
    """The marker's record where it holds `key` and every file it vouches for is intact;
    else None: the work must be done (again)."""
    record = read_json(marker, corrupt_is_missing=True)
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    if damaged(marker.parent, record.get(FILES, {})):
        return None
    return record


def mark_done(marker: Path, record: dict[str, Any], files: Iterable[Path] = ()) -> dict[str, Any]:
    """Write the marker (last, atomically): `record` (holding its "key") and the digests of
    `files`. Returns what was written."""
    assert "key" in record, "a done marker needs the key its work was made under"
    done = {**record, FILES: digests(marker.parent, files)}
    write_json(marker, done)
    return done


def unmark(marker: Path) -> None:
    """Remove a marker before its work is redone: a run killed part way then finds no marker
    and cannot take the half-written files as done."""
    marker.unlink(missing_ok=True)
