"""SAEs saved in SAELens' layout: SAELens computes what samesheep computes, samesheep reads
back what it wrote and what SAELens wrote, and bad folders fail with one clear line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import sae_lens  # in the test extra: these checks fail, never skip, where it is missing
import torch
from safetensors.torch import load_file, save_file

from samesheep.core.constants import ARCHITECTURES
from samesheep.core.errors import SamesheepError
from samesheep.sae.model import Sae, SaeConfig
from samesheep.sae.saelens import load_sae, save_sae

D_IN, D_SAE, K, SCALE = 16, 64, 5, 0.37
META = {"model_name": "tiny", "hook_name": "blocks.12.hook_resid_post", "context_size": 128}


def make_sae(arch: str, scale: float = SCALE, seed: int = 0) -> Sae:
    """A random SAE whose biases, thresholds and decoder are all non-trivial."""
    g = torch.Generator().manual_seed(seed)
    sae = Sae(SaeConfig(arch, D_IN, D_SAE, k=K, input_scale=scale, bandwidth=0.03))
    sae.initialize(g, data_mean=torch.randn(D_IN, generator=g))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(D_SAE, D_IN, generator=g))
        sae.b_enc.copy_(0.2 * torch.randn(D_SAE, generator=g))
        sae.log_threshold.copy_(torch.empty(D_SAE).uniform_(0.1, 0.8, generator=g).log())
        sae.batch_threshold.fill_(0.45)
    return sae


def raw_inputs(scale: float = SCALE, n: int = 200, seed: int = 1) -> torch.Tensor:
    """Raw activations: about unit scale (plus the data mean) once multiplied by `scale`."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D_IN, generator=g) * 1.5 + torch.randn(D_IN, generator=g)) / scale


def assert_sparse_not_trivial(acts: torch.Tensor) -> None:
    frac = (acts > 0).float().mean().item()
    assert 0.01 < frac < 0.9, frac


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sae_lens_computes_the_same_function(tmp_path: Path, arch: str) -> None:
    sae = make_sae(arch)
    save_sae(sae, tmp_path / "sae", metadata=META)
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    expected_cls = {
        "topk": sae_lens.TopKSAE,
        "batchtopk": sae_lens.JumpReLUSAE,
        "jumprelu": sae_lens.JumpReLUSAE,
        "relu": sae_lens.StandardSAE,
    }[arch]
    assert type(theirs) is expected_cls
    if arch == "topk":
        assert theirs.cfg.k == K
    # The metadata survives, so SAELens did not run its pre-6.0 conversion.
    assert theirs.cfg.metadata.hook_name == META["hook_name"]
    assert theirs.cfg.metadata.context_size == 128
    x = raw_inputs()
    with torch.no_grad():
        acts, out = sae.encode(x), sae(x)
        their_acts, their_out = theirs.encode(x), theirs(x)
    assert_sparse_not_trivial(acts)
    if arch == "topk":
        assert ((acts > 0).sum(-1) <= K).all()
    torch.testing.assert_close(their_acts, acts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(their_out, out, atol=1e-4 / SCALE, rtol=1e-4)


def test_saved_files(tmp_path: Path) -> None:
    save_sae(make_sae("topk"), tmp_path, metadata=META)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk"
    assert cfg["k"] == K and isinstance(cfg["k"], int)
    assert cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"
    assert cfg["metadata"]["hook_name"] == META["hook_name"]
    assert cfg["samesheep"] == {
        "architecture": "topk",
        "k": K,
        "input_scale": SCALE,
        "bandwidth": 0.03,
        "format": 1,
    }
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {
        "W_enc": (D_IN, D_SAE),
        "b_enc": (D_SAE,),
        "W_dec": (D_SAE, D_IN),
        "b_dec": (D_IN,),
    }
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]

    save_sae(make_sae("batchtopk"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg
    assert cfg["samesheep"]["architecture"] == "batchtopk"
    threshold = load_file(tmp_path / "sae_weights.safetensors")["threshold"]
    assert (threshold == 0.45).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip(tmp_path: Path, arch: str) -> None:
    sae = make_sae(arch)
    if sae.unit_decoder:
        sae.normalize_decoder()
    save_sae(sae, tmp_path)
    back = load_sae(tmp_path, d_in=D_IN)
    assert back.cfg == sae.cfg
    used = ["W_enc", "b_enc", "W_dec", "b_dec"]
    used += {"jumprelu": ["log_threshold"], "batchtopk": ["batch_threshold"]}.get(arch, [])
    for name in used:  # up to a float32 rounding of the folded weights
        mine, theirs = getattr(back, name), getattr(sae, name)
        torch.testing.assert_close(mine, theirs, atol=1e-7, rtol=3e-7, msg=name)
    if arch == "batchtopk":
        assert torch.equal(back.batch_threshold, torch.tensor(0.45))
    assert back.log_threshold.requires_grad == (arch == "jumprelu")
    if sae.unit_decoder:
        torch.testing.assert_close(back.W_dec.norm(dim=1), torch.ones(D_SAE))
    x = raw_inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(x), sae(x), atol=1e-5 / SCALE, rtol=1e-5)


def test_round_trip_scale_one_is_exact(tmp_path: Path) -> None:
    sae = make_sae("relu", scale=1.0)
    save_sae(sae, tmp_path)
    back = load_sae(tmp_path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name


def randomize(sl_sae, seed: int = 2, thresholds: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sl_sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if thresholds:  # some <= 0, which must act as no threshold at all
            t = torch.empty(D_SAE).uniform_(0.05, 0.5, generator=g)
            t[:8] = 0.0
            t[8:12] = -0.2
            sl_sae.threshold.copy_(t)


def foreign(kind: str, **cfg):
    cls, cfg_cls = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
    }[kind]
    sl_sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg))
    randomize(sl_sae, thresholds=kind == "jumprelu")
    return sl_sae


@pytest.mark.parametrize(
    ("kind", "cfg", "arch"),
    [
        ("standard", {}, "relu"),
        ("topk", {"k": K}, "topk"),
        ("jumprelu", {}, "jumprelu"),
        ("jumprelu", {"apply_b_dec_to_input": False}, "jumprelu"),
        ("standard", {"apply_b_dec_to_input": False}, "relu"),
    ],
)
def test_loads_sae_lens_folders(tmp_path: Path, kind: str, cfg: dict, arch: str) -> None:
    sl_sae = foreign(kind, **cfg)
    sl_sae.save_model(tmp_path)
    assert "samesheep" not in json.loads((tmp_path / "cfg.json").read_text())
    sae = load_sae(tmp_path, d_in=D_IN)
    assert sae.cfg.architecture == arch and sae.cfg.input_scale == 1.0
    if arch == "topk":
        assert sae.cfg.k == K
    if arch == "jumprelu":
        assert sae.log_threshold.isfinite().all()
    x = raw_inputs(scale=1.0)
    with torch.no_grad():
        acts = sae.encode(x)
        assert_sparse_not_trivial(acts)
        torch.testing.assert_close(acts, sl_sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), sl_sae(x), atol=1e-5, rtol=1e-5)


def test_loads_pre_6_topk_cfg(tmp_path: Path) -> None:
    sl_sae = foreign("topk", k=K)
    sl_sae.save_model(tmp_path)
    old = {  # what SAELens 5.x wrote for a TopK SAE
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "hook_point": "blocks.3.hook_resid_post",
        "model_name": "tiny",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    sae = load_sae(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", K)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)  # SAELens reads it the same way
    assert theirs.cfg.k == K
    x = raw_inputs(scale=1.0)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), sl_sae(x), atol=1e-5, rtol=1e-5)


# ---- bad folders ----


DELETE = object()


def edit_cfg(**changes):
    """Set (or DELETE) cfg.json fields; "a__b" names field b of field a."""

    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "cfg.json").read_text())
        for key, value in changes.items():
            *parents, name = key.split("__")
            target = cfg
            for part in parents:
                target = target[part]
            if value is DELETE:
                del target[name]
            else:
                target[name] = value
        (folder / "cfg.json").write_text(json.dumps(cfg))

    return edit


def edit_weights(fn):
    def edit(folder: Path) -> None:
        path = folder / "sae_weights.safetensors"
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, path)

    return edit


def truncate(folder: Path) -> None:
    path = folder / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


BAD = {
    "no cfg": (lambda f: (f / "cfg.json").unlink(), r"cfg\.json is missing"),
    "no weights": (
        lambda f: (f / "sae_weights.safetensors").unlink(),
        r"sae_weights\.safetensors is missing",
    ),
    "corrupt json": (write("cfg.json", '{"d_in": 16,'), r"cfg\.json is not readable JSON"),
    "json list": (write("cfg.json", "[]"), r"cfg\.json is not a JSON object"),
    "truncated weights": (truncate, r"safetensors is not a readable safetensors file"),
    "garbage weights": (
        write("sae_weights.safetensors", "garbage"),
        r"not a readable safetensors file",
    ),
    "missing tensor": (edit_weights(lambda t: t.pop("threshold")), r"missing threshold"),
    "extra tensor": (
        edit_weights(lambda t: t.update(b_mag=torch.zeros(D_SAE))),
        r"unexpected b_mag",
    ),
    "wrong shape": (
        edit_weights(lambda t: t.update(W_enc=t["W_enc"].T.contiguous())),
        r"W_enc has shape \[64, 16\], but cfg\.json's sizes give \[16, 64\]",
    ),
    "cfg d_sae disagrees": (
        edit_cfg(d_sae=32),
        r"W_enc has shape \[16, 64\], but cfg\.json's sizes give \[16, 32\]",
    ),
    "nan weights": (
        edit_weights(lambda t: t["W_dec"].__setitem__((3, 4), math.nan)),
        r"W_dec has non-finite",
    ),
    "gated": (edit_cfg(architecture="gated"), r"architecture 'gated' is not supported"),
    "no architecture": (edit_cfg(architecture=DELETE), r"architecture None is not supported"),
    "layer norm": (
        edit_cfg(normalize_activations="layer_norm"),
        r"normalize_activations='layer_norm' cannot be reproduced",
    ),
    "hook_z": (edit_cfg(reshape_activations="hook_z"), r"reshape_activations='hook_z'"),
    "bad d_in": (edit_cfg(d_in="16"), r"d_in must be a positive integer, not '16'"),
    "samesheep format": (edit_cfg(samesheep__format=2), r"unknown \"samesheep\" field"),
    "samesheep arch": (
        edit_cfg(samesheep__architecture="relu"),
        r"samesheep architecture 'relu' does not match architecture 'jumprelu'",
    ),
    "samesheep scale": (
        edit_cfg(samesheep__input_scale=0),
        r"samesheep input_scale must be a positive number, not 0",
    ),
    "old pre-6 metadata": (
        edit_cfg(metadata__sae_lens_version="5.9.0", activation_fn_str="tanh-relu"),
        r"activation function 'tanh-relu' is not supported",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_jumprelu_folders(tmp_path: Path, case: str) -> None:
    spoil, match = BAD[case]
    save_sae(make_sae("jumprelu"), tmp_path)
    load_sae(tmp_path)  # fine before
    spoil(tmp_path)
    with pytest.raises(SamesheepError, match=match) as err:
        load_sae(tmp_path)
    assert "\n" not in str(err.value)


BAD_TOPK = {
    "no k": (edit_cfg(k=DELETE, samesheep=DELETE), r"k must be a positive integer, not None"),
    "float k": (edit_cfg(k=5.0, samesheep=DELETE), r"k must be a positive integer, not 5\.0"),
    "k too big": (edit_cfg(k=65, samesheep=DELETE), r"cfg\.json: k = 65 must lie between"),
    "k disagrees": (edit_cfg(k=6), r"k=6 disagrees with samesheep k=5"),
    "rescale": (
        edit_cfg(rescale_acts_by_decoder_norm=True),
        r"rescale_acts_by_decoder_norm=true is not supported",
    ),
    "pre-6 topk without k": (
        edit_cfg(metadata=DELETE, activation_fn="topk", samesheep=DELETE),
        r"k must be a positive integer, not None",
    ),
}


@pytest.mark.parametrize("case", BAD_TOPK)
def test_bad_topk_folders(tmp_path: Path, case: str) -> None:
    spoil, match = BAD_TOPK[case]
    save_sae(make_sae("topk"), tmp_path)
    load_sae(tmp_path)
    spoil(tmp_path)
    with pytest.raises(SamesheepError, match=match):
        load_sae(tmp_path)


def test_bad_batchtopk_threshold(tmp_path: Path) -> None:
    save_sae(make_sae("batchtopk"), tmp_path)
    edit_weights(lambda t: t["threshold"].__setitem__(7, 0.5))(tmp_path)
    with pytest.raises(SamesheepError, match=r"a batchtopk SAE has one threshold"):
        load_sae(tmp_path)
    edit_cfg(samesheep=DELETE)(tmp_path)  # as a plain SAELens JumpReLU SAE it is fine
    assert load_sae(tmp_path).cfg.architecture == "jumprelu"


def test_missing_folder_and_wrong_width(tmp_path: Path) -> None:
    with pytest.raises(SamesheepError, match=r"SAE folder .*nowhere does not exist"):
        load_sae(tmp_path / "nowhere")
    save_sae(make_sae("relu"), tmp_path)
    with pytest.raises(
        SamesheepError,
        match=re.escape(f"SAE at {tmp_path} expects d_in=16 but the model's layer has 32"),
    ):
        load_sae(tmp_path, d_in=32)


def test_save_refuses_broken_saes(tmp_path: Path) -> None:
    sae = make_sae("relu", scale=0.0)
    with pytest.raises(SamesheepError, match=r"input_scale is 0\.0"):
        save_sae(sae, tmp_path)
    sae = make_sae("relu")
    with torch.no_grad():
        sae.b_dec[0] = math.inf
    with pytest.raises(SamesheepError, match=r"b_dec has non-finite values"):
        save_sae(sae, tmp_path)
    assert not any(tmp_path.iterdir())
