"""A tiny random Llama with a byte-level BPE tokenizer, written as a GGUF file for tests."""

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Ordered merges in GPT-2's byte alphabet ("Ġ" is a space); each merged token joins the vocabulary.
MERGES = [
    "Ġ t",
    "h e",
    "Ġt he",
    "i n",
    "e r",
    "a n",
    "Ġ a",
    "o n",
    "r e",
    "Ġ s",
    "e n",
    "Ġ w",
    "o u",
    "a t",
    "Ġ o",
    "i s",
    "Ġ i",
    "e s",
    "Ġ c",
    "in g",
    "e d",
    "Ġ b",
    "Ġ f",
    "o r",
    "Ġ p",
    "a r",
    "Ġ m",
    "l l",
    "Ġa n",
    "Ġan d",
    "Ġo f",
    "Ġt o",
    "Ġi n",
    "Ġ h",
    "Ġ d",
    "Ġ T",
    "Ġ S",
    "Ġ l",
    "a l",
]
EOS = "<|endoftext|>"


def byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable stand-in for each byte 0..255, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_tokens() -> list[str]:
    merged = list(dict.fromkeys(m.replace(" ", "") for m in MERGES))
    return [*byte_alphabet(), *merged, EOS]


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation (transformers undoes it on load)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_llama_gguf(
    folder: Path, seed: int = 0, tied: bool = False
) -> tuple[Path, LlamaForCausalLM]:
    """Write tiny.gguf into folder; return its path and the float32 LlamaForCausalLM it encodes.

    tied=True leaves output.weight out, as llama.cpp does for tied embeddings.
    """
    tokens = tiny_tokens()
    eos_id = len(tokens) - 1
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # random norm weights, so a mix-up of norms would show in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)

    path = Path(folder) / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(eos_id)
    w.add_eos_token_id(eos_id)
    w.add_add_bos_token(False)

    names = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp leaves output.weight out when it is the embedding
        array = tensor.numpy()
        stem = name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            _, _, layer, stem = stem.split(".", 3)
            out = f"blk.{layer}.{names[stem]}.weight"
        else:
            out = f"{names[stem]}.weight"
        if stem == "self_attn.q_proj":
            array = llama_permute(array, config.num_attention_heads)
        elif stem == "self_attn.k_proj":
            array = llama_permute(array, config.num_key_value_heads)
        w.add_tensor(out, np.ascontiguousarray(array, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model
