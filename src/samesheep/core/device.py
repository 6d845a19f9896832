"""Device and dtype, chosen in one place, and the machine's measured matmul rates."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass
from functools import cache

import torch

from .errors import SamesheepError
from .files import cache_dir, read_json, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@cache
def cpu_model() -> str:
    """The CPU's model name, as the OS reports it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_device(pref: str = "auto") -> torch.device:
    """The device to compute on: CUDA where present (for "auto"), else the CPU."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(pref)
    except RuntimeError:
        raise SamesheepError(f"unknown device {pref!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SamesheepError(f"device {pref!r} asked for, but torch sees no CUDA GPU")
    return device


BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})

BF16_MARGIN = 1.25
"""On a CPU, bfloat16 is chosen only where its measured matmul rate is at least this many
times float32's: it halves the precision, so it must buy real speed."""


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run fast here: on CUDA where the GPU supports them;
    on a CPU where it has bfloat16 instructions (AMX, AVX512-BF16, ARM BF16) and they
    measure at least BF16_MARGIN times float32's rate (see cpu_bf16_measured)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & BF16_FLAGS) and cpu_bf16_measured()


def _machine_key() -> str:
    """The machine, not the process: no thread count, which differs between a CLI run
    (set_threads) and a library caller and would give one machine two measurements that can
    disagree near the margin."""
    flags = ",".join(sorted(cpu_flags() & BF16_FLAGS))
    return f"{cpu_model()} | {flags} | torch {torch.__version__}"


RATE_ROUNDS = 4
"""Alternating measurements of each dtype in cpu_bf16_measured: a burst of work from a
neighbour on a shared machine once made float32 read far below its usual rate (and
bfloat16 look fast) when each dtype was measured once, one after the other."""


def _best_rates(*dtypes: torch.dtype) -> list[MatmulRate]:
    """Each dtype's best rate over RATE_ROUNDS rounds that measure them in turn, so that a
    slow spell of the machine cannot fall on one dtype's measurement alone (~0.1 s each)."""
    best: dict[torch.dtype, MatmulRate] = {}
    for _ in range(RATE_ROUNDS):
        for dtype in dtypes:
            rate = matmul_rate(dtype, n=1024, budget_s=0.1)
            if dtype not in best or rate.gflops > best[dtype].gflops:
                best[dtype] = rate
    return [best[d] for d in dtypes]


@cache
def cpu_bf16_measured() -> bool:
    """Whether this CPU's bfloat16 products beat float32 by BF16_MARGIN, measured once per
    machine (CPU model, flags, torch version) and remembered in the samesheep cache
    folder (machine.json). The flags alone do not tell: on an Intel Xeon with avx512_bf16
    and no AMX, bfloat16 products ran slower than float32's (measured: see
    benchmarks/RESULTS.md, 'Intel Xeon with avx512_bf16 but slow bfloat16'). Remembered,
    not measured each run, because the resolved dtype keys checkpoints and SAEs: a noisy
    measurement must not flip it and start training over. Delete machine.json to measure
    again."""
    path = cache_dir() / "machine.json"
    key = _machine_key()
    try:
        known = read_json(path, corrupt_is_missing=True)
    except OSError:
        known = None
    if not isinstance(known, dict):  # missing, damaged or unreadable: measured again
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("bf16_fast"), bool):
        return entry["bf16_fast"]
    f32, bf16 = _best_rates(torch.float32, torch.bfloat16)
    fast = bf16.gflops >= BF16_MARGIN * f32.gflops
    known[key] = {
        "bf16_fast": fast,
        "float32_gflops": round(f32.gflops, 1),
        "bfloat16_gflops": round(bf16.gflops, 1),
    }
    with contextlib.suppress(OSError):  # a read-only cache: measured again next time
        write_json(path, known)
    return fast


def choose_dtype(pref: str, device: torch.device) -> torch.dtype:
    """The compute dtype: "auto" means bfloat16 where the hardware runs it fast (fast_bf16),
    else float32."""
    if pref == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if pref not in DTYPES:
        raise SamesheepError(f"unknown dtype {pref!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[pref]


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16, and so on."""
    return str(dtype).removeprefix("torch.")


def set_threads(threads: int) -> int:
    """Use `threads` CPU threads (0: one per core available to this process); return the count."""
    n = threads
    if n <= 0:
        n = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    torch.set_num_threads(n)
    return n


@dataclass
class MatmulRate:
    """A measured matrix-product rate."""

    dtype: torch.dtype
    gflops: float
    n: int
    """Size of the square product measured."""
    capped: bool
    """Whether n was lowered from the size asked for, because one product took too long."""

    def describe(self) -> str:
        size = f"{self.n}^2" + (", size lowered to bound the time" if self.capped else "")
        return f"{dtype_name(self.dtype)} {self.gflops:,.0f} GFLOP/s ({size})"


def matmul_rate(
    dtype: torch.dtype, device: torch.device | None = None, n: int = 2048, budget_s: float = 2.0
) -> MatmulRate:
    """Measured GFLOP/s of an n x n matrix product in `dtype` (best of up to five runs).
    The size grows from 256 to n while one product takes under a fiftieth of budget_s, so
    a dtype the hardware runs slowly (bfloat16 on a CPU with only AVX2 runs single-threaded;
    measured: see benchmarks/RESULTS.md, 'Features stage, 2026-11-30') is measured on a
    smaller product, in about budget_s in all."""
    device = device or torch.device("cpu")

    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    size = min(256, n)
    warm_up = None  # the first product of a process pays for the library's set-up
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        if warm_up is None:
            warm_up = once(a, b)  # not a measurement, but part of the time spent
        first = once(a, b)
        if size >= n or first * 8 * 5 > budget_s:  # the next size takes ~8x longer
            break
        size *= 2
    best, spent = first, first + warm_up
    for _ in range(4):
        if spent > budget_s:
            break
        dt = once(a, b)
        best, spent = min(best, dt), spent + dt
    return MatmulRate(dtype, 2 * size**3 / best / 1e9, size, size < n)


def matmul_gflops(dtype: torch.dtype, device: torch.device | None = None, n: int = 2048) -> float:
    """Measured GFLOP/s of an n x n matrix product in `dtype` (see matmul_rate)."""
    return matmul_rate(dtype, device, n).gflops


def machine_lines(device: torch.device, threads: int) -> tuple[list[str], dict[str, MatmulRate]]:
    """(lines describing the machine, {"float32": rate, "bfloat16": rate}) for benchmarks:
    the CPU (or GPU), threads, torch, and both matmul rates measured now."""
    rates = {name: matmul_rate(DTYPES[name], device) for name in ("float32", "bfloat16")}
    lines = [f"CPU: {cpu_model()}  threads: {threads}  torch {torch.__version__}"]
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)}")
    fast = fast_bf16(device)
    lines.append(
        f"matmul: {rates['float32'].describe()}; {rates['bfloat16'].describe()}"
        + ("" if fast else "; no fast bfloat16 here, so bfloat16 sides are skipped")
    )
    return lines, rates
