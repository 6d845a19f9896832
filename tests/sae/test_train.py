"""SAE training: known answers on synthetic data, the sparse paths against dense references,
the shuffled stream, checkpoints and resume, and bad input."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import sparse_data, write_store
from safetensors import safe_open
from safetensors.torch import save_file

from samesheep.core.config import TrainConfig, settings_hash
from samesheep.core.errors import SamesheepError
from samesheep.data.store import TokenFilter, open_store
from samesheep.sae.model import (
    AUXK_K,
    AUXK_SHARE,
    BATCHTOPK_CAP,
    EncodeSettings,
    Sae,
    SaeConfig,
    StepSettings,
    TopKEncode,
    fvu_of,
    sparse_from_dense,
    train_forward,
)
from samesheep.sae.training import (
    CHECKPOINT,
    STEER_GAIN,
    STEER_LIMIT,
    batch_stream,
    filter_counts,
    input_statistics,
    lr_factor,
    new_state,
    steer,
    train_sae,
    train_step,
)


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        expansion_factor=4,
        k=4,
        batch_tokens=256,
        buffer_tokens=1024,
        threads=1,
        dtype="float32",
        device="cpu",
        train_tokens=256 * 40,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A store of 3-sparse combinations of 64 random unit directions in 64 dimensions."""
    data, dirs = sparse_data(24_000, d=64, n_dirs=64, k=3)
    folder = tmp_path_factory.mktemp("store") / "acts"
    write_store(folder, {"train": data[:20_000], "heldout": data[20_000:]}, shard_tokens=2000)
    return open_store(folder), dirs


def heldout_fvu(sae: Sae, store) -> float:
    x = torch.cat([s.acts[s.mask()] for s in store.shards("heldout")]).float()
    with torch.no_grad():
        err = (sae(x) - x).pow(2).sum()
    return float(err / (x - x.mean(0)).pow(2).sum())


def test_topk_recovers_the_true_directions(synthetic, tmp_path):
    store, dirs = synthetic
    cfg = small_cfg(expansion_factor=2, k=3, train_tokens=256 * 300, lr=0.01, seed=1)
    sae, summary = train_sae(store, cfg, tmp_path / "train", "key")
    assert heldout_fvu(sae, store) < 0.02
    cos = (dirs @ F.normalize(sae.W_dec.detach(), dim=1).T).max(dim=1).values
    assert (cos > 0.9).float().mean() > 0.9, cos
    assert summary["steps"] == 300 and summary["epochs"] > 1


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "relu"])
def test_other_architectures_learn_at_the_target_l0(synthetic, tmp_path, arch):
    """Every architecture reconstructs held-out data at about the L0 it was given (k for
    batchtopk, the steered target for jumprelu and relu)."""
    store, _ = synthetic
    cfg = small_cfg(architecture=arch, train_tokens=256 * 150, k=4)
    sae, _ = train_sae(store, cfg, tmp_path, "k")
    assert heldout_fvu(sae, store) < 0.3
    x = torch.cat([s.acts[s.mask()] for s in store.shards("heldout")]).float()
    acts = sae.encode(x)
    l0 = float((acts > 0).float().sum(1).mean())
    assert 4 * 0.7 < l0 < 4 * 1.3, l0


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_calibration_starts_at_the_target_l0(synthetic, arch):
    """Thresholds (jumprelu) or biases (relu) set from a sample: on new tokens of the same
    data every latent fires, and L0 is about the target."""
    store, _ = synthetic
    x = torch.cat([s.acts[s.mask()] for s in store.shards("train")]).float()
    sae = Sae(SaeConfig(arch, 64, 512))
    sae.initialize(torch.Generator().manual_seed(0), x.mean(0))
    sae.calibrate(x[:8000], 10.0)
    acts = sae.encode(x[8000:16000])
    assert float((acts > 0).float().sum(1).mean()) == pytest.approx(10, rel=0.15)
    assert (acts > 0).any(0).all()


def test_steering_moves_the_coefficient_towards_the_target_l0():
    assert steer(0.01, 32.0, 32.0) == pytest.approx(0.01)
    assert steer(0.01, 64.0, 32.0) > 0.01 > steer(0.01, 16.0, 32.0)
    # log-space steps, at most STEER_LIMIT a step (an L0 of 0 does not divide by zero)
    assert steer(0.01, 1e6, 32.0) == pytest.approx(0.01 * math.exp(STEER_LIMIT))
    assert steer(0.01, 0.0, 32.0) == pytest.approx(0.01 * math.exp(-STEER_LIMIT))
    assert steer(0.01, 32 * math.e**0.5, 32.0) == pytest.approx(0.01 * math.exp(0.5 * STEER_GAIN))


def test_relu_is_steered_unless_its_coefficient_is_fixed(synthetic):
    store, _ = synthetic
    x = next(batch_stream(store, small_cfg(), TokenFilter())).float()
    fixed = small_cfg(architecture="relu", sparsity_coefficient=0.05)
    state = new_state(fixed, 64, 1.0, torch.zeros(64), torch.device("cpu"))
    train_step(state, x, fixed, torch.float32, 10)
    assert state.coefficient == 0.05
    steered = small_cfg(architecture="relu")
    state = new_state(steered, 64, 1.0, torch.zeros(64), torch.device("cpu"))
    start = state.coefficient
    train_step(state, x, steered, torch.float32, 10)
    assert state.coefficient != start


@pytest.mark.parametrize("l0_side", ["above", "below"])
def test_jumprelu_penalty_pulls_l0_towards_the_target(l0_side):
    """JumpReLU's penalty is (L0 / target - 1)^2: its gradient raises the thresholds of
    latents in the estimator's band where L0 lies above the target, and lowers them below."""
    g = torch.Generator().manual_seed(0)
    sae = Sae(SaeConfig("jumprelu", 16, 64, bandwidth=0.5))
    sae.initialize(g, torch.zeros(16))
    with torch.no_grad():
        sae.log_threshold.fill_(math.log(0.5))
    x = torch.randn(200, 16, generator=g)
    l0 = float((sae.pre_acts(x) > 0.5).sum(1).float().mean())
    target = l0 / 2 if l0_side == "above" else l0 * 2
    grads = []
    for c in (1.0, 0.0):  # the penalty's gradient alone: with it, less without it
        out = train_forward(sae, x, StepSettings(sparsity_coefficient=c, target_l0=target))
        grads.append(torch.autograd.grad(out.loss, sae.log_threshold)[0])
    assert out.sparsity == pytest.approx((l0 / target - 1) ** 2, rel=1e-6)
    grad = grads[0] - grads[1]
    assert grad.abs().sum() > 0
    assert (grad <= 0).all() if l0_side == "above" else (grad >= 0).all()


def test_batchtopk_gradient_equals_dense_autograd():
    """The sparse BatchTopK path (candidates through the sparse TopK encoder, a global top-k
    among them) equals the dense reference, loss and gradients, where no token holds more
    than BATCHTOPK_CAP * k of the batch's kept activations."""
    torch.manual_seed(0)
    sae = Sae(SaeConfig("batchtopk", 16, 64, k=5))
    sae.initialize(torch.Generator().manual_seed(0), torch.randn(16))
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(40, 16)
    out = train_forward(sae, x, StepSettings())
    fast = torch.autograd.grad(out.loss, list(sae.parameters())[:4])
    pre = sae.pre_acts(x).relu()
    top = pre.flatten().topk(5 * 40).indices
    mask = torch.zeros(40 * 64, dtype=torch.bool).index_fill_(0, top, True).view(40, 64)
    assert int(mask.sum(1).max()) <= BATCHTOPK_CAP * 5  # the cap does not bind here
    acts = pre * mask
    loss = fvu_of(acts @ sae.W_dec + sae.b_dec - x, x)
    ref = torch.autograd.grad(loss, list(sae.parameters())[:4])
    assert float(out.fvu) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert out.l0 == pytest.approx(float((acts > 0).sum()) / 40)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class DenseJumpReLU(torch.autograd.Function):
    """The dense reference: z * H(z - theta), the threshold's gradient by the rectangle-kernel
    straight-through estimator."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.eps / 2).float()
        return grad * (pre > theta), (-(theta / ctx.eps) * near * grad).sum(0), None


class DenseStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).float()

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.eps / 2).float()
        return None, (-(1.0 / ctx.eps) * near * grad).sum(0), None


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_sparse_threshold_paths_equal_dense_autograd(arch):
    """JumpReLU's and ReLU's training forward (only the entries above the threshold, or in
    the estimator's band, ever held) gives the loss and every gradient of the dense
    computation, including the thresholds' straight-through gradients."""
    torch.manual_seed(0)
    sae = Sae(SaeConfig(arch, 16, 64, bandwidth=0.3))
    sae.initialize(torch.Generator().manual_seed(0), torch.randn(16))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)  # decoder norms other than 1 (relu's L1)
        sae.log_threshold.copy_(torch.rand(64).add(0.5).log())
    x = torch.randn(1100, 16)  # more tokens than one encoder chunk
    s = StepSettings(sparsity_coefficient=0.01, target_l0=10.0)
    params = [p for p in sae.parameters() if p.requires_grad]
    out = train_forward(sae, x, s)
    fast = torch.autograd.grad(out.loss, params)
    pre = sae.pre_acts(x)
    if arch == "jumprelu":
        theta = sae.log_threshold.exp()
        acts = DenseJumpReLU.apply(pre, theta, 0.3)
        penalty = (DenseStep.apply(pre, theta, 0.3).sum(1).mean() / 10.0 - 1).pow(2)
    else:
        acts = pre.relu()
        penalty = (acts * sae.W_dec.norm(dim=1)).sum(1).mean()
    fvu = fvu_of(acts @ sae.W_dec + sae.b_dec - x, x)
    ref = torch.autograd.grad(fvu + 0.01 * penalty, params)
    assert float(out.loss) == pytest.approx(float(fvu + 0.01 * penalty), rel=1e-5)
    assert out.l0 == pytest.approx(float((acts > 0).sum()) / 1100)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_topk_encoder_gradient_equals_dense_autograd():
    torch.manual_seed(0)
    sae = Sae(SaeConfig("topk", 16, 64, k=5))
    sae.initialize(torch.Generator().manual_seed(0), torch.randn(16))
    with torch.no_grad():
        sae.b_enc.normal_()
    x, w = torch.randn(40, 16), torch.randn(40, 5)
    how = EncodeSettings(torch.float32, k=5, chunk=16)
    vals, idx = TopKEncode.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, how)
    params = [sae.W_enc, sae.b_enc, sae.b_dec]
    fast = torch.autograd.grad((vals * w).sum(), params)
    dense = F.linear(x - sae.b_dec, sae.W_enc, sae.b_enc).gather(1, idx).relu()
    ref = torch.autograd.grad((dense * w).sum(), params)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert (vals == dense).all()


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_sparse_and_dense_decoding_agree(arch):
    sae = Sae(SaeConfig(arch, 16, 64, k=6, input_scale=0.3))
    sae.initialize(torch.Generator().manual_seed(0), torch.randn(16))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.batch_threshold.fill_(0.2)
    x = torch.randn(30, 16) * 5
    acts = sae.encode(x)
    assert 0 < int((acts > 0).sum()) < acts.numel()
    dense = sae.decode(acts)
    codes = sae.encode_sparse(x)
    assert torch.equal(codes.to_dense(64), acts)
    assert torch.equal(sparse_from_dense(acts).to_dense(64), acts)
    assert (codes.values > 0).all() and codes.offsets[-1] == codes.values.numel()
    torch.testing.assert_close(sae.decode_sparse(codes), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), dense, rtol=1e-5, atol=1e-5)
    # chunked: more tokens than one encoder chunk, and a token with no active latent
    many = torch.cat([torch.randn(700, 16) * 5, sae.b_dec.detach()[None] / 0.3 - 1e3])
    assert torch.equal(sae.encode_sparse(many).to_dense(64), sae.encode(many))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_auxk_trains_dead_latents_encoder_and_decoder(arch):
    sae = Sae(SaeConfig(arch, 16, 64, k=4))
    sae.initialize(torch.Generator().manual_seed(0), torch.zeros(16))
    with torch.no_grad():
        sae.log_threshold.fill_(math.log(5.0))  # jumprelu: most pre-activations lie below
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    out = train_forward(sae, torch.randn(50, 16), StepSettings(dead=dead, auxk_alpha=1.0))
    assert out.auxk > 0
    out.loss.backward()
    assert sae.W_enc.grad[:10].abs().sum() > 0 and sae.W_dec.grad[:10].abs().sum() > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [1, 10, 64])
def test_auxk_loss_is_scaled_by_the_share_of_dead_latents(arch, n_dead):
    """AuxK's weight is min(dead / AUXK_K, 1), as in sparsify: one dead latent gets 1/128
    of the weight, not all of it. Checked against the loss computed by hand."""
    g = torch.Generator().manual_seed(0)
    sae = Sae(SaeConfig(arch, 16, 64, k=4))
    sae.initialize(g, torch.zeros(16))
    x = torch.randn(40, 16, generator=g)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=g)[:n_dead]] = True
    with torch.no_grad():
        out = train_forward(sae, x, StepSettings(dead=dead, auxk_alpha=1.0))
        recon = sae.decode_sparse(sae.encode_sparse(x)) if arch == "topk" else None
        if arch == "batchtopk":
            pre = sae.pre_acts(x).relu()
            top = pre.flatten().topk(4 * 40).indices
            acts = torch.zeros(40 * 64).index_fill_(0, top, 1).view(40, 64) * pre
            recon = acts @ sae.W_dec + sae.b_dec
        rows = math.ceil(40 * AUXK_SHARE)
        pre_dead = torch.where(dead, sae.pre_acts(x[:rows]), -torch.inf)
        vals, idx = pre_dead.topk(min(AUXK_K, n_dead), dim=1)
        e_hat = (torch.zeros(rows, 64).scatter_(1, idx, vals.relu())) @ sae.W_dec
        err = (recon - x)[:rows]
        want = min(n_dead / AUXK_K, 1.0) * float(fvu_of(e_hat + err, x[:rows]))
    assert out.auxk == pytest.approx(want, rel=1e-4)
    assert out.auxk > 0


def test_batchtopk_threshold_is_updated_by_the_step_not_the_forward(synthetic):
    store, _ = synthetic
    cfg = small_cfg(architecture="batchtopk")
    state = new_state(cfg, 64, 1.0, torch.zeros(64), torch.device("cpu"))
    x = next(batch_stream(store, cfg, TokenFilter())).float()
    out = train_forward(state.sae, x, StepSettings())
    assert float(state.sae.batch_threshold) == 0 and out.threshold > 0
    train_step(state, x, cfg, torch.float32, 10)
    assert float(state.sae.batch_threshold) > 0


def test_bfloat16_encoder_stays_close_to_float32(synthetic, tmp_path):
    store, _ = synthetic
    fvus = {}
    for dtype in ("float32", "bfloat16"):
        sae, _ = train_sae(store, small_cfg(dtype=dtype), tmp_path / dtype, "k")
        fvus[dtype] = heldout_fvu(sae, store)
    assert abs(fvus["bfloat16"] - fvus["float32"]) < 0.05 * fvus["float32"] + 1e-3


def test_lr_schedule_known_values():
    f = [lr_factor(s, 100, 0.1, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5) and f[99] > 0
    assert lr_factor(0, 10, 0.0, 0.0) == 1.0


@pytest.mark.parametrize("buffer_tokens", [3000, 50_000])
def test_stream_is_seeded_and_visits_every_kept_token_once_per_pass(synthetic, buffer_tokens):
    """Also with a buffer larger than the stored tokens (the default settings on the default
    corpus), where the buffer once took in the next pass before emitting anything."""
    store, _ = synthetic
    cfg = small_cfg(batch_tokens=128, buffer_tokens=buffer_tokens)
    kept, _ = filter_counts(store, TokenFilter())
    assert kept == 20_000 - 20_000 // 50  # position 0 of each window is special
    per_pass = kept // 128  # what is left at the end of a pass (less than a batch) is dropped
    stream = batch_stream(store, cfg, TokenFilter())
    passes = [torch.cat(list(itertools.islice(stream, per_pass))) for _ in range(3)]
    for p in passes:  # every pass: no row twice, every kept row but the remainder
        assert torch.unique(p, dim=0).shape[0] == p.shape[0] == per_pass * 128
    again = torch.cat(list(itertools.islice(batch_stream(store, cfg, TokenFilter()), per_pass)))
    assert torch.equal(passes[0], again)
    every = torch.cat([s.acts[s.mask()] for s in store.shards("train")])
    assert torch.isin(passes[0][:, 0], every[:, 0]).all()
    assert torch.unique(torch.cat(passes), dim=0).shape[0] == kept  # remainders differ
    assert not torch.equal(passes[0], passes[1])
    reseeded = small_cfg(batch_tokens=128, buffer_tokens=buffer_tokens, seed=5)
    other = list(itertools.islice(batch_stream(store, reseeded, TokenFilter()), per_pass))
    assert not torch.equal(passes[0], torch.cat(other))


def test_input_scale_gives_mean_squared_norm_d(synthetic):
    store, _ = synthetic
    scale, mean = input_statistics(store, TokenFilter())
    x = torch.cat([s.acts[s.mask()] for s in store.shards("train")]).double() * scale
    assert x.pow(2).sum(1).mean().item() == pytest.approx(64, rel=1e-4)
    torch.testing.assert_close(mean.double(), x.mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_checkpoint_resume_in_process_gives_the_same_weights(synthetic, tmp_path, arch):
    """(relu: the steered sparsity coefficient is part of the checkpoint.)"""
    store, _ = synthetic
    cfg = small_cfg(train_tokens=256 * 30, checkpoint_seconds=0, architecture=arch)
    ref, _ = train_sae(store, cfg, tmp_path / "a", "key")
    short = cfg
    # A run stopped after 12 steps (a checkpoint on every step), then resumed:
    work = tmp_path / "b"
    import samesheep.sae.training as train_mod

    real_step = train_mod.train_step
    calls = {"n": 0}

    def stop_after_12(*a, **k):
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    train_mod.train_step = stop_after_12
    try:
        with pytest.raises(KeyboardInterrupt):
            train_sae(store, short, work, "key")
    finally:
        train_mod.train_step = real_step
    resumed, summary = train_sae(store, short, work, "key")
    assert summary["resumed"]
    for name, p in ref.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name


KILL_SCRIPT = """
import sys, torch
from pathlib import Path
from samesheep.core.config import TrainConfig
from samesheep.data.store import open_store
from samesheep.sae.training import train_sae
from safetensors.torch import save_file
cfg = TrainConfig(expansion_factor=4, k=4, batch_tokens=256, buffer_tokens=1024, threads=1,
                  dtype="float32", device="cpu", train_tokens=256 * 600, checkpoint_seconds=0)
sae, summary = train_sae(open_store(sys.argv[1]), cfg, Path(sys.argv[2]), "key")
save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, sys.argv[3])
print("resumed" if summary["resumed"] else "fresh")
"""


def _run(store, work: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(store.folder), str(work), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_sigkill_at_a_random_moment_then_resume_gives_the_same_weights(synthetic, tmp_path):
    from safetensors.torch import load_file

    store, _ = synthetic
    ref_run = _run(store, tmp_path / "ref", tmp_path / "ref.safetensors")
    assert ref_run.communicate()[0].strip() == "fresh" and ref_run.returncode == 0
    work = tmp_path / "killed"
    proc = _run(store, work, tmp_path / "killed.safetensors")
    deadline = time.time() + 60
    while not (work / CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.05 + 0.3 * torch.rand(()).item())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.safetensors").exists(), "killed too late to test resuming"
    again = _run(store, work, tmp_path / "killed.safetensors")
    # it continued from the checkpoint (a silent restart would give the same weights too)
    assert again.communicate()[0].strip() == "resumed" and again.returncode == 0
    ref, got = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "killed.safetensors")
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_corrupt_checkpoint_is_an_error_and_another_key_starts_over(synthetic, tmp_path):
    store, _ = synthetic
    cfg = small_cfg(train_tokens=256 * 3)
    train_sae(store, cfg, tmp_path, "key")
    (tmp_path / CHECKPOINT).write_bytes(b"\x00" * 100)
    with pytest.raises(SamesheepError, match=r"checkpoint .* is corrupt"):
        train_sae(store, cfg, tmp_path, "key")
    # A finished run's final checkpoint is resumed (with nothing left to do) under its key,
    # and ignored under another key.
    _, first = train_sae(store, cfg, tmp_path / "other", "key")
    _, again = train_sae(store, cfg, tmp_path / "other", "key")
    assert not first["resumed"] and again["resumed"]
    _, summary = train_sae(store, cfg, tmp_path / "other", "another key")
    assert not summary["resumed"]


def test_a_checkpoint_of_another_dtype_starts_over_and_says_why(synthetic, tmp_path, capsys):
    """A checkpoint made computing in bfloat16 never continues in float32 (as it would on a
    machine where "auto" resolves otherwise): training starts over, and says so in a line."""
    store, _ = synthetic
    work = tmp_path / "w"
    _, summary = train_sae(store, small_cfg(train_tokens=256 * 3, dtype="bfloat16"), work, "key")
    assert summary["dtype"] == "bfloat16"
    capsys.readouterr()
    _, summary = train_sae(store, small_cfg(train_tokens=256 * 3, dtype="float32"), work, "key")
    assert not summary["resumed"] and summary["dtype"] == "float32"
    said = " ".join(capsys.readouterr().err.split())
    assert "written computing in bfloat16" in said and "starts over" in said
    _, summary = train_sae(store, small_cfg(train_tokens=256 * 3, dtype="float32"), work, "key")
    assert summary["resumed"]


def test_a_checkpoint_of_another_device_starts_over_and_says_why(synthetic, tmp_path, capsys):
    """A checkpoint computed on another kind of device (a GPU) cannot continue exactly on
    this one: training starts over and says so in a line, never a silent mix."""
    store, _ = synthetic
    work = tmp_path / "w"
    cfg = small_cfg(train_tokens=256 * 6, dtype="float32", checkpoint_seconds=0)
    train_sae(store, cfg, work, "key")
    path = work / CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    # The same checkpoint as a CUDA machine would have written it (its key names the device).
    made_on = {"dtype": "float32", "device": "cuda"}
    meta = {**meta, **made_on, "key": settings_hash("key", "float32", "cuda")}
    save_file(tensors, str(path), metadata=meta)
    capsys.readouterr()
    _, summary = train_sae(store, cfg, work, "key")
    said = " ".join(capsys.readouterr().err.split())
    assert not summary["resumed"]
    assert "written computing in cuda; this run computes in cpu" in said, said
    assert "starts over" in said


def test_bad_input(synthetic, tmp_path):
    store, _ = synthetic
    with pytest.raises(SamesheepError, match="k = 500 must lie between 1 and the width 256"):
        train_sae(store, small_cfg(k=500), tmp_path, "k")
    with pytest.raises(SamesheepError, match="unknown SAE architecture 'gated'"):
        train_sae(store, small_cfg(architecture="gated"), tmp_path, "k")
    with pytest.raises(SamesheepError, match="fewer than one batch"):
        train_sae(store, small_cfg(batch_tokens=10**6), tmp_path, "k")
    data, _ = sparse_data(3000)
    data[1234, 3] = float("nan")
    bad = write_store(tmp_path / "nan", {"train": data}, shard_tokens=1000)
    with pytest.raises(SamesheepError, match=r"NaN or infinite activations in .*train-00001"):
        train_sae(open_store(bad), small_cfg(), tmp_path / "w", "k")
