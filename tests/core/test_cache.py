"""The one up-to-date check (core/cache) and the removal of killed processes' temporaries
(core/files): known answers on files made here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from samesheep.core.cache import damaged, digest, load_done, mark_done, unmark
from samesheep.core.files import pid_temporary, remove_dead_temporaries


def finished(tmp_path):
    """A folder whose done marker vouches for two files (one in a subfolder)."""
    (tmp_path / "sub").mkdir(exist_ok=True)
    a, b = tmp_path / "a.bin", tmp_path / "sub" / "b.bin"
    a.write_bytes(bytes(range(256)) * 4)
    b.write_bytes(b"hello")
    marker = tmp_path / "summary.json"
    mark_done(marker, {"key": "k1", "value": 3}, [a, b])
    return marker, a, b


def test_a_finished_piece_is_done_under_its_key_only(tmp_path):
    marker, _, _ = finished(tmp_path)
    record = load_done(marker, "k1")
    assert record["value"] == 3
    assert set(record["digests"]) == {"a.bin", os.path.join("sub", "b.bin")}
    assert record["digests"]["a.bin"]["bytes"] == 1024
    assert load_done(marker, "k2") is None
    assert damaged(tmp_path, record["digests"]) == []


def test_a_damaged_or_missing_file_undoes_the_piece(tmp_path):
    marker, a, b = finished(tmp_path)
    data = bytearray(a.read_bytes())
    data[500] ^= 0xFF  # same size, one byte changed
    a.write_bytes(bytes(data))
    assert load_done(marker, "k1") is None
    assert damaged(tmp_path, json.loads(marker.read_text())["digests"]) == ["a.bin"]
    marker, a, b = finished(tmp_path)
    b.write_bytes(b"hel")  # truncated
    assert load_done(marker, "k1") is None
    marker, a, b = finished(tmp_path)
    b.unlink()
    assert load_done(marker, "k1") is None


def test_a_damaged_missing_or_removed_marker_means_not_done(tmp_path):
    marker, _, _ = finished(tmp_path)
    marker.write_text('{"key": "k1", "val')
    assert load_done(marker, "k1") is None
    marker, _, _ = finished(tmp_path)
    unmark(marker)
    assert not marker.exists() and load_done(marker, "k1") is None
    unmark(marker)  # twice is fine


def test_digest_is_sha256_and_size(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2
    assert digest(p) == {"bytes": 3, "sha256": sha}


def test_dead_processes_temporaries_are_removed_and_live_ones_kept(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(gone.stdout)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    dead_file = tmp_path / "deep" / "er" / f".summary.json.{dead}.tmp"
    dead_file.write_text("half")
    dead_dir = tmp_path / f".report.{dead}.tmp"
    (dead_dir / "data").mkdir(parents=True)
    (dead_dir / "data" / "x.js").write_text("half")
    live = pid_temporary(tmp_path / "deep", "layers.toml")
    live.write_text("mine")
    other = tmp_path / ".notes.tmp"  # no process id: not ours to judge
    other.write_text("?")
    removed = remove_dead_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead_file, dead_dir])
    assert not dead_file.exists() and not dead_dir.exists()
    assert live.exists() and other.exists()
    assert live.name == f".layers.toml.{os.getpid()}.tmp"
