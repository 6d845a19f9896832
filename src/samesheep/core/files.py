"""Atomic file writes: every file appears complete under its name, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs

from .errors import SamesheepError

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place when the block ends cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pid_temporary(path.parent, path.name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create files private to their owner
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically, keys sorted, so equal data gives equal bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, corrupt_is_missing: bool = False) -> Any | None:
    """Read a JSON file, or None where it does not exist (or is damaged, if
    corrupt_is_missing: a stage's own state file is then rebuilt rather than trusted)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if corrupt_is_missing:
            return None
        raise SamesheepError(
            f"{path} is corrupt ({e}); delete it and run the stage again"
        ) from None


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete temporary files a killed process left behind: ours (".name.pid.tmp") and
    those of writers that stage files themselves (safetensors writes ".tmpXXXXXX")."""
    folder = Path(folder)
    if folder.is_dir():
        for pattern in (f".*{TMP_SUFFIX}", ".tmp*"):
            for p in folder.glob(pattern):
                if p.is_file():
                    p.unlink(missing_ok=True)


def pid_temporary(folder: Path, name: str) -> Path:
    """A temporary name beside `folder`'s files that says which process owns it
    (".name.<pid>.tmp"), so a later run can tell a killed process's leftover from a live
    one's (see remove_dead_temporaries)."""
    return Path(folder) / f".{name}.{os.getpid()}{TMP_SUFFIX}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_temporaries(root: str | Path) -> list[Path]:
    """Delete, anywhere below `root`, the temporary files and folders (".name.<pid>.tmp")
    of processes that are gone: what a killed run left part-written. A live process's (a
    stage running beside this one) are kept. Returns what was removed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in sorted(root.rglob(f".*{TMP_SUFFIX}"), key=lambda p: len(p.parts)):
        pid = p.name.removesuffix(TMP_SUFFIX).rpartition(".")[2]
        if not pid.isdigit() or _alive(int(pid)) or not p.exists():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def cache_dir() -> Path:
    """Where converted models and machine facts live ($SAMESHEEP_CACHE, else the user cache
    directory)."""
    if os.environ.get("SAMESHEEP_CACHE"):
        return Path(os.environ["SAMESHEEP_CACHE"])
    return Path(platformdirs.user_cache_dir("samesheep"))
