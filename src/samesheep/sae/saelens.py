"""SAEs on disk in SAELens 6.x layout: cfg.json and sae_weights.safetensors.

The weights are SAELens' (W_enc [d_in, d_sae]) with samesheep's input_scale folded in, since
SAELens applies no scaling on load; cfg.json's top-level "samesheep" field, which SAELens
ignores, keeps what is needed to rebuild the unfolded samesheep SAE. Folders SAELens wrote
("standard", "topk" and "jumprelu" SAEs) load too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..core.errors import SamesheepError
from ..core.files import atomic_path, write_json
from .model import ARCHITECTURES, Sae, SaeConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT = 1
# SAELens runs its pre-6.0 config conversion on load (which drops our metadata) unless
# metadata.sae_lens_version is at least 6.0.0 (handle_config_defaulting). We write the first
# version of the layout we follow rather than an installed one: sae_lens is no dependency.
SAE_LENS_VERSION = "6.0.0"
TO_SAE_LENS = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}
FROM_SAE_LENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
# After the ReLU a threshold <= 0 acts as 0; it becomes float32's smallest normal number so
# that log_threshold stays finite (only activations in (0, 1.2e-38] are then dropped).
MIN_THRESHOLD = torch.finfo(torch.float32).tiny


def save_sae(sae: Sae, folder: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Write `folder`/cfg.json and `folder`/sae_weights.safetensors, each atomically.
    `metadata` (model_name, hook_name, ...) goes to cfg.json's "metadata"."""
    cfg = sae.cfg
    s = float(cfg.input_scale)
    if not (math.isfinite(s) and s > 0):
        raise SamesheepError(f"cannot save an SAE whose input_scale is {s}")
    with torch.no_grad():
        # Folded in float64 and rounded once; load_sae unfolds the same way.
        tensors = {
            "W_enc": _f32(sae.W_enc.double().T * s),
            "b_enc": _f32(sae.b_enc),
            "W_dec": _f32(sae.W_dec.double() / s),
            "b_dec": _f32(sae.b_dec.double() / s),
        }
        if cfg.architecture in ("jumprelu", "batchtopk"):
            tensors["threshold"] = _f32(sae.threshold)  # exactly what samesheep compares to
    for name, t in tensors.items():
        if not t.isfinite().all():
            raise SamesheepError(f"cannot save an SAE whose {name} has non-finite values")
    sl_cfg: dict[str, Any] = {
        "architecture": TO_SAE_LENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_training_version": None,  # else SAELens claims it trained the SAE
            **(metadata or {}),
            "sae_lens_version": SAE_LENS_VERSION,
        },
        "samesheep": {
            "architecture": cfg.architecture,
            "k": int(cfg.k),
            "input_scale": s,
            "bandwidth": float(cfg.bandwidth),
            "format": FORMAT,
        },
    }
    if cfg.architecture == "topk":
        sl_cfg |= {"k": int(cfg.k), "rescale_acts_by_decoder_norm": False}
    folder = Path(folder)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / CFG_FILE, sl_cfg)  # last: a folder with a cfg.json is complete


def read_sae_config(folder: str | Path) -> SaeConfig:
    """The configuration of the SAE in `folder`, from its cfg.json alone (no weights read)."""
    path = Path(folder) / CFG_FILE
    return _config(_read_json(path), path)[0]


def load_sae(
    folder: str | Path, device: torch.device | str = "cpu", d_in: int | None = None
) -> Sae:
    """The SAE in `folder` (written by save_sae or by SAELens); `d_in`, if given, is the width
    of the activations it will be applied to."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SamesheepError(f"SAE folder {folder} does not exist")
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg, sl_arch, b_dec_to_input = _config(_read_json(cfg_path), cfg_path)
    if d_in is not None and d_in != cfg.d_in:
        raise SamesheepError(
            f"SAE at {folder} expects d_in={cfg.d_in} but the model's layer has {d_in}"
        )
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if sl_arch == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    w = _read_weights(weights_path, shapes)
    s = cfg.input_scale
    b_enc = w["b_enc"].double()
    if not b_dec_to_input:  # SAELens then encodes x @ W_enc + b_enc; samesheep subtracts b_dec
        b_enc += w["b_dec"].double() @ w["W_enc"].double()
    if cfg.architecture == "batchtopk" and not (w["threshold"] == w["threshold"][0]).all():
        raise SamesheepError(
            f"{weights_path}: a batchtopk SAE has one threshold, but these differ by latent"
        )
    sae = Sae(cfg, device=device)
    with torch.no_grad():  # unfolded in float64, one tensor at a time
        sae.W_enc.copy_(w["W_enc"].double().T / s)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w["W_dec"].double() * s)
        sae.b_dec.copy_(w["b_dec"].double() * s)
        if cfg.architecture == "jumprelu":
            sae.log_threshold.copy_(w["threshold"].double().clamp_min(MIN_THRESHOLD).log())
        elif cfg.architecture == "batchtopk":
            sae.batch_threshold.copy_(w["threshold"][0])
    return sae


def _f32(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SamesheepError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SamesheepError(f"{path} is not readable JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise SamesheepError(f"{path} is not a JSON object")
    return data


def _config(raw: dict[str, Any], where: Path) -> tuple[SaeConfig, str, bool]:
    """(samesheep config, SAELens architecture, apply_b_dec_to_input) of a cfg.json."""
    meta = raw.get("metadata")
    version = raw.get("sae_lens_version")
    if not version and isinstance(meta, dict):
        version = meta.get("sae_lens_version")
    major = re.match(r"\d+", str(version or ""))
    pre_6 = major is None or int(major.group()) < 6
    arch = raw.get("architecture", "standard" if pre_6 else None)
    k = raw.get("k")
    reshape = raw.get("reshape_activations", "none")
    normalize = raw.get("normalize_activations", "none")
    if pre_6:  # as SAELens' handle_pre_6_0_config reads it
        fn = raw.get("activation_fn_str", raw.get("activation_fn")) or "relu"
        if fn == "topk":
            arch, k = "topk", (raw.get("activation_fn_kwargs") or {}).get("k")
        elif fn != "relu":
            raise SamesheepError(f"{where}: activation function {fn!r} is not supported")
        if "hook_z" in str(raw.get("hook_name", raw.get("hook_point", ""))):
            reshape = raw.get("reshape_activations", "hook_z")
        if normalize is None or normalize is False:
            normalize = "none"
    if arch not in FROM_SAE_LENS:
        raise SamesheepError(
            f"{where}: SAE architecture {arch!r} is not supported (only standard, topk, jumprelu)"
        )
    if normalize != "none":
        raise SamesheepError(
            f"{where}: normalize_activations={normalize!r} cannot be reproduced (only 'none')"
        )
    if reshape != "none":
        raise SamesheepError(f"{where}: reshape_activations={reshape!r} is not supported")
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm", False):
        raise SamesheepError(f"{where}: rescale_acts_by_decoder_norm=true is not supported")
    b_dec_to_input = raw.get("apply_b_dec_to_input", True)
    if not isinstance(b_dec_to_input, bool):
        raise SamesheepError(f"{where}: apply_b_dec_to_input must be true or false")
    fields: dict[str, Any] = {
        "architecture": FROM_SAE_LENS[arch],
        "d_in": _int(raw.get("d_in"), "d_in", where),
        "d_sae": _int(raw.get("d_sae"), "d_sae", where),
        "bandwidth": _number(
            raw.get("jumprelu_bandwidth", SaeConfig.bandwidth), "bandwidth", where
        ),
    }
    if arch == "topk":
        fields["k"] = _int(k, "k", where)
    own = raw.get("samesheep")
    if own is not None:
        if not isinstance(own, dict) or own.get("format") != FORMAT:
            raise SamesheepError(f'{where}: unknown "samesheep" field (format {FORMAT} expected)')
        if own.get("architecture") not in ARCHITECTURES or TO_SAE_LENS[own["architecture"]] != arch:
            raise SamesheepError(
                f"{where}: samesheep architecture {own.get('architecture')!r} "
                f"does not match architecture {arch!r}"
            )
        fields |= {
            "architecture": own["architecture"],
            "k": _int(own.get("k"), "samesheep k", where),
            "input_scale": _number(own.get("input_scale"), "samesheep input_scale", where),
            "bandwidth": _number(own.get("bandwidth"), "samesheep bandwidth", where),
        }
        if arch == "topk" and fields["k"] != _int(k, "k", where):
            raise SamesheepError(f"{where}: k={k} disagrees with samesheep k={fields['k']}")
    try:
        return SaeConfig(**fields), arch, b_dec_to_input
    except SamesheepError as e:
        raise SamesheepError(f"{where}: {e}") from None


def _int(value: Any, name: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SamesheepError(f"{where}: {name} must be a positive integer, not {value!r}")
    return value


def _number(value: Any, name: str, where: Path) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise SamesheepError(f"{where}: {name} must be a positive number, not {value!r}")
    return float(value)


def _read_weights(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The tensors of `shapes` from `path` (on the CPU), checked."""
    if not path.is_file():
        raise SamesheepError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SamesheepError(
            f"{path} is not a readable safetensors file ({_one_line(e)})"
        ) from None
    sf = tensors.pop("scaling_factor", None)  # old SAELens files: ignored when all ones
    if sf is not None and not (sf == 1).all():
        raise SamesheepError(f"{path}: a scaling_factor other than 1 is not supported")
    missing = sorted(shapes.keys() - tensors.keys())
    extra = sorted(tensors.keys() - shapes.keys())
    if missing or extra:
        what = "; ".join(
            f"{label} {', '.join(names)}"
            for label, names in (("missing", missing), ("unexpected", extra))
            if names
        )
        raise SamesheepError(f"{path}: wrong tensors ({what})")
    out = {}
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise SamesheepError(
                f"{path}: {name} has shape {list(t.shape)}, but cfg.json's sizes give {list(shape)}"
            )
        if not t.is_floating_point() or not t.isfinite().all():
            raise SamesheepError(f"{path}: {name} has non-finite or non-float values")
        out[name] = t
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
