"""Prove that two runs wrote the same outputs (e.g. before and after a refactor).

Usage: python scripts/same_outputs.py RUN_A RUN_B

Walks both run directories (leaving out report/, hidden files such as temporaries, and the
top-level timings.json and config.toml, which names its own run directory) and compares:

- *.safetensors and *.parquet: byte-identical (sha256); a safetensors file also counts as
  the same where only the order of its header's entries differs (the writer serializes
  its metadata from a hash map) and its tensor data are byte-identical;
- *.json: loaded and compared recursively, exactly (floats included), except values under
  timing keys (seconds, timings_s, tokens_per_second, ..._s, ..._seconds, elapsed, wall,
  time...) and except that either run directory's path inside a string counts as the same;
- everything else (jsonl, txt, toml in folders, ...): byte-identical;
- a file on one side only is a difference.

Prints one line per difference, then a summary line; exits 0 when the same, 1 when
different, 2 on bad arguments. Uses only files on disk (no samesheep imports), so it works
on runs written by any version of the code.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SKIP_TOP_DIRS = {"report"}
SKIP_TOP_FILES = {"timings.json", "config.toml"}
HASHED = {".safetensors": "safetensors", ".parquet": "parquet"}
KINDS = ("safetensors", "parquet", "json", "other")
PLACEHOLDER = "<RUN_DIR>"
MAX_KEY_DIFFS = 10
"""JSON key differences listed per file (the rest are counted in one more line)."""

TIMING_NAMES = {
    "seconds",
    "second",
    "secs",
    "elapsed",
    "wall",
    "walltime",
    "wall_time",
    "time",
    "times",
    "timing",
    "timings",
    "duration",
    "durations",
    "tokens_per_second",
    "tok_per_s",
    "tokens_per_s",
    "throughput",
    "start_time",
    "end_time",
    "timestamp",
    "mtime",
}
TIMING_PATTERN = re.compile(
    r"(_s|_seconds|_secs|_ms|_per_second|_per_s|_time|_times|_timings|_elapsed|_wall)$"
    r"|^(time|timing|elapsed|wall|duration)"
)


def is_timing_key(key: str) -> bool:
    """Whether a JSON key names a duration, a throughput or a clock reading."""
    k = str(key).lower()
    return k in TIMING_NAMES or bool(TIMING_PATTERN.search(k))


def kind_of(path: Path) -> str:
    if path.suffix in HASHED:
        return HASHED[path.suffix]
    return "json" if path.suffix == ".json" else "other"


def files_of(run: Path) -> dict[str, Path]:
    """{relative posix path: path} of the files that count in a run directory."""
    out = {}
    for p in run.rglob("*"):
        rel = p.relative_to(run)
        if any(part.startswith(".") for part in rel.parts):
            continue  # temporaries (".name.pid.tmp", ".tmpXXXX", ".layers.X.toml")
        if rel.parts[0] in SKIP_TOP_DIRS and len(rel.parts) > 1:
            continue
        if len(rel.parts) == 1 and rel.name in SKIP_TOP_FILES:
            continue
        if p.is_file():
            out[rel.as_posix()] = p
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_difference(a: Path, b: Path) -> int:
    """Offset of the first differing byte (the shorter length where one is a prefix)."""
    offset = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ba, bb = fa.read(1 << 16), fb.read(1 << 16)
            if ba != bb:
                n = min(len(ba), len(bb))
                i = next((i for i in range(n) if ba[i] != bb[i]), n)
                return offset + i
            if not ba:
                return -1
            offset += len(ba)


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int] | None:
    """(header, where the tensor data starts) of a safetensors file, or None if damaged."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(path.stat().st_size - 8, 100_000_000):
                return None
            return json.loads(f.read(n)), 8 + n
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _data_sha256(path: Path, start: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safetensors_differ(a: Path, b: Path) -> str | None:
    """None where two safetensors files are byte-identical, or hold the same header (the
    same tensors, dtypes, shapes, offsets and metadata, whatever order the writer put the
    metadata in: safetensors writes it from a hash map, so two runs of the same code may
    order it differently) and byte-identical tensor data; else what differs."""
    why = _bytes_differ(a, b)
    if why is None:
        return None
    ha, hb = _safetensors_header(a), _safetensors_header(b)
    if ha is None or hb is None:
        return (
            why
            + (" (A is not a readable safetensors file)" if ha is None else "")
            + (" (B is not a readable safetensors file)" if hb is None else "")
        )
    (head_a, start_a), (head_b, start_b) = ha, hb
    if head_a != head_b:
        keys = sorted(k for k in set(head_a) | set(head_b) if head_a.get(k) != head_b.get(k))
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        return f"{why}: header differs at {shown}"
    if _data_sha256(a, start_a) != _data_sha256(b, start_b):
        return f"{why}: tensor data differ"
    return None


def _bytes_differ(a: Path, b: Path) -> str | None:
    """None where the files are byte-identical, else what differs."""
    sa, sb = a.stat().st_size, b.stat().st_size
    if sa == sb and sha256(a) == sha256(b):
        return None
    at = _first_difference(a, b)
    size = f"{sa:,} vs {sb:,} bytes" if sa != sb else f"{sa:,} bytes"
    return f"bytes differ ({size}, first at byte {at:,})"


class _Paths:
    """Replaces either run directory's path, as given or resolved, by one placeholder."""

    def __init__(self, *runs: Path) -> None:
        forms = set()
        for r in runs:
            for form in (str(r), str(r.absolute()), str(r.resolve())):
                forms.add(form.rstrip("/") or "/")
        self.forms = sorted(forms, key=len, reverse=True)  # /tmp/x2 before /tmp/x

    def __call__(self, s: str) -> str:
        for form in self.forms:
            if form in s:
                s = s.replace(form, PLACEHOLDER)
        return s


def _show(v: Any) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, float) else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _key_path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def _same_scalar(a: Any, b: Any, norm: _Paths) -> bool:
    if type(a) is not type(b):  # 1 vs 1.0, True vs 1: not the same output
        return False
    if isinstance(a, float):
        return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
    if isinstance(a, str):
        return a == b or norm(a) == norm(b)
    return a == b


@dataclass(frozen=True)
class Rules:
    """What a JSON comparison leaves out besides the timing keys: keys on either side
    (ignore), and keys B may hold where A has none (added: fields a change adds on purpose,
    such as the done markers' file digests)."""

    ignore: frozenset[str] = frozenset()
    added: frozenset[str] = frozenset()


def compare_json(a: Any, b: Any, norm: _Paths, rules: Rules = Rules(), at: str = "") -> list[str]:
    """Key paths where two loaded JSON documents differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        ka = {norm(str(k)): k for k in a}
        kb = {norm(str(k)): k for k in b}
        for k in sorted(set(ka) | set(kb)):
            here = _key_path(at, k)
            if is_timing_key(k) or k in rules.ignore:
                continue
            if k not in ka and k in rules.added:
                continue
            if k not in kb:
                out.append(f"{here}: only in A ({_show(a[ka[k]])})")
            elif k not in ka:
                out.append(f"{here}: only in B ({_show(b[kb[k]])})")
            else:
                out += compare_json(a[ka[k]], b[kb[k]], norm, rules, here)
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = []
        if len(a) != len(b):
            out.append(f"{at or '<top>'}: list of {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            out += compare_json(x, y, norm, rules, _key_path(at, i))
        return out
    if _same_scalar(a, b, norm):
        return []
    return [f"{at or '<top>'}: {_show(a)} != {_show(b)}"]


def _load_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"not valid JSON ({type(e).__name__}: {str(e)[:80]})"


def differences(run_a: Path, run_b: Path, rules: Rules = Rules()) -> tuple[list[str], Counter]:
    """(one line per difference, counts): the counts hold the files compared by kind
    ("safetensors", "parquet", "json", "other"), "files" (their total) and "different"
    (how many of them differ). rules: the JSON keys left out besides the timing keys."""
    run_a, run_b = Path(run_a), Path(run_b)
    fa, fb = files_of(run_a), files_of(run_b)
    norm = _Paths(run_a, run_b)
    lines: list[str] = []
    counts: Counter = Counter({k: 0 for k in KINDS})
    for rel in sorted(set(fa) | set(fb)):
        kind = kind_of(Path(rel))
        counts[kind] += 1
        found: list[str] = []
        if rel not in fb:
            found = [f"{rel}: only in A ({run_a})"]
        elif rel not in fa:
            found = [f"{rel}: only in B ({run_b})"]
        elif kind == "json":
            (ja, ea), (jb, eb) = _load_json(fa[rel]), _load_json(fb[rel])
            if ea or eb:
                if ea and eb:
                    why = _bytes_differ(fa[rel], fb[rel])
                    found = [f"{rel}: {why} (neither is valid JSON)"] if why else []
                else:
                    found = [f"{rel}: {'A' if ea else 'B'} is {ea or eb}"]
            else:
                keys = compare_json(ja, jb, norm, rules)
                found = [f"{rel}: {k}" for k in keys[:MAX_KEY_DIFFS]]
                if len(keys) > MAX_KEY_DIFFS:
                    found.append(f"{rel}: ... and {len(keys) - MAX_KEY_DIFFS} more keys differ")
        else:
            same = _safetensors_differ if kind == "safetensors" else _bytes_differ
            why = same(fa[rel], fb[rel])
            found = [f"{rel}: {why}"] if why else []
        if found:
            counts["different"] += 1
            lines += found
    counts["files"] = sum(counts[k] for k in KINDS)
    return lines, counts


def summary_line(counts: Counter) -> str:
    if counts["different"]:
        return f"DIFFERENT: {counts['different']} of {counts['files']} files"
    kinds = ", ".join(f"{counts[k]} {k}" for k in KINDS)
    return f"same: {counts['files']} files ({kinds})"


USAGE = "usage: python scripts/same_outputs.py [--allow-added KEY[,KEY...]] RUN_A RUN_B"


def main(argv: list[str]) -> int:
    added: frozenset[str] = frozenset()
    if argv[:1] == ["--allow-added"] and len(argv) > 1:
        added, argv = frozenset(argv[1].split(",")), argv[2:]
    if len(argv) != 2 or any(a.startswith("-") for a in argv):
        print(USAGE, file=sys.stderr)
        return 2
    runs = [Path(a) for a in argv]
    for r in runs:
        if not r.is_dir():
            print(f"same_outputs: error: {r} is not a directory", file=sys.stderr)
            return 2
    lines, counts = differences(*runs, Rules(added=added))
    for line in lines:
        print(line)
    print(summary_line(counts))
    return 1 if counts["different"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
