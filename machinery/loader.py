"""loader.py: reading a Hugging Face model folder, every field and tensor checked, so that a bad
folder is one line naming the file and the field or tensor (a ModelError), before a run starts
rather than hours into it. model.py's Config.from_hf and load_model call it; quant.py streams
its 4-bit weights through load_state."""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from model import ACTIVATIONS, SUPPORTED, Config, ModelError, create, rope_inv_freq


def read_config(path):
    """Read a Hugging Face config.json (a folder or the file itself). Anything wrong with it,
    a bad field or fields that contradict each other, is a ModelError naming the file and field."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ModelError(f"{file}: missing (need a Hugging Face model folder with config.json)")
    c = read_json_object(file)
    archs = c.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ModelError(f"{file}: field 'architectures' must be a list of names, got {archs!r}")
    arch = (archs or ["?"])[0]
    if arch not in SUPPORTED:
        raise ModelError(f"{file}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)})")
    for key, ok in (("attention_bias", False), ("mlp_bias", False)):
        if c.get(key, ok) != ok:
            raise ModelError(f"{file}: {key}={c[key]!r} is not supported (need {ok!r})")
    gemma = arch == "Gemma2ForCausalLM"

    REQUIRED = object()  # num(): a field with no default

    def num(key, default=REQUIRED, kind=int, nullable=False):
        # a field that must be a positive number; a missing one takes transformers' default, and
        # null is kept where transformers gives it a meaning (no window, no soft-capping, ...)
        if key not in c:
            if default is REQUIRED:
                raise ModelError(f"{file}: missing field {key!r}")
            return default
        v = c[key]
        if v is None and nullable:
            return None
        ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not v > 0 or (kind is float and not math.isfinite(v)):
            what = "a positive integer" if kind is int else "a positive number"
            raise ModelError(f"{file}: field {key!r} must be {what}, got {v!r}")
        return v

    # Gemma2Config reads hidden_activation (a stray hidden_act in its config.json is unused).
    act_key = "hidden_activation" if gemma else "hidden_act"
    act = c.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in ACTIVATIONS:
        raise ModelError(f"{file}: {act_key}={act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    rs = c.get("rope_scaling")
    if rs is not None and not isinstance(rs, dict):
        raise ModelError(f"{file}: field 'rope_scaling' must be an object or null, got {rs!r}")
    if rs is not None and rs.get("rope_type", rs.get("type")) not in ("llama3", "default"):
        raise ModelError(f"{file}: rope_scaling type {rs.get('rope_type', rs.get('type'))!r} is not supported")
    if rs is not None and rs.get("rope_type", rs.get("type")) == "default":
        rs = None
    for key in ("factor", "low_freq_factor", "high_freq_factor") if rs is not None else ():
        v = rs.get(key)  # rope_inv_freq needs all three: caught here, not when the model is built
        if v is None:
            raise ModelError(f"{file}: missing field 'rope_scaling.{key}'")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ModelError(f"{file}: field 'rope_scaling.{key}' must be a positive number, got {v!r}")
    if rs is not None and not rs["high_freq_factor"] > rs["low_freq_factor"]:
        raise ModelError(f"{file}: rope_scaling.high_freq_factor must be larger than low_freq_factor")
    vocab, dim, layers = num("vocab_size"), num("hidden_size"), num("num_hidden_layers")
    n_heads, ffn = num("num_attention_heads"), num("intermediate_size")
    n_kv = num("num_key_value_heads", None, nullable=True) or n_heads
    head_dim = num("head_dim", None, nullable=True)
    if head_dim is None and not gemma:
        if dim % n_heads:  # head_dim would be cut down and q_proj would no longer fit hidden_size
            raise ModelError(f"{file}: hidden_size {dim} is not divisible by num_attention_heads {n_heads} "
                             "(and no head_dim is given)")
        head_dim = dim // n_heads
    head_dim = head_dim or 256  # Gemma2Config's default
    if n_heads % n_kv:
        raise ModelError(f"{file}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    if head_dim % 2:
        raise ModelError(f"{file}: head_dim {head_dim} is odd (rotary embeddings rotate pairs of dimensions)")
    tie = c.get("tie_word_embeddings", gemma)  # Gemma2Config ties by default, and save_pretrained
    if not isinstance(tie, bool):              # leaves a default out of config.json
        raise ModelError(f"{file}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
    window = num("sliding_window", None, nullable=True) if arch == "MistralForCausalLM" else None
    gemma_fields = {}
    if gemma:  # missing keys take Gemma2Config's defaults, as transformers does
        types = c.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        if not isinstance(types, list) or len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ModelError(f"{file}: layer_types must give each of the {layers} layers "
                             "sliding_attention or full_attention")
        window = num("sliding_window", 4096, nullable=True)
        gemma_fields = dict(
            layer_types=tuple(types),
            query_pre_attn_scalar=num("query_pre_attn_scalar", 256, float, nullable=True),
            attn_logit_softcapping=num("attn_logit_softcapping", 50.0, float, nullable=True),
            final_logit_softcapping=num("final_logit_softcapping", 30.0, float, nullable=True))
    return Config(
        vocab_size=vocab, dim=dim, n_layers=layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        ffn_dim=ffn, rope_theta=float(num("rope_theta", 10000.0, float)),
        rope_scaling=rs, norm_eps=num("rms_norm_eps", 1e-6, float),
        tie_embeddings=tie,
        max_seq_len=num("max_position_embeddings", 4096),
        sliding_window=window,
        arch=arch, hidden_act=act, **gemma_fields,
    )


def read_json_object(file):
    """A JSON object from a model folder's file (config.json, the safetensors index); anything
    else, or a file that cannot be read, is a one-line ModelError naming the file (and line)."""
    try:
        raw = Path(file).read_bytes()
    except OSError as e:
        raise ModelError(f"{file}: cannot read ({e.strerror or e})") from None
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ModelError(f"{file}:{line}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{file}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def checkpoint_files(path):
    """The safetensors files of a HF folder: the index's shards, or model.safetensors."""
    return list(checkpoint_index(path))


def checkpoint_index(path):
    """{shard file: [tensor names the index puts there]} (for a single model.safetensors: None,
    since the file itself is the only list)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"{index}: field 'weight_map' must map each tensor name to a shard file name")
        if not weight_map:
            raise ModelError(f"{index}: field 'weight_map' is empty")
        files = {}
        for name, shard in weight_map.items():
            if not (path / shard).is_file():
                raise ModelError(f"{index}: shard {shard} (holding {name}) is missing")
            files.setdefault(path / shard, []).append(name)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {single: None}
    if single.exists():
        raise ModelError(f"{single}: not a file")
    raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_checkpoint(path):
    """Yield (name, tensor, file) one tensor at a time, so peak memory stays ~one tensor."""
    from safetensors import safe_open
    for file in checkpoint_files(path):
        try:
            f = safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelError(f"{file}: cannot read safetensors header ({e})") from None
        with f:
            for name in f.keys():
                yield name, f.get_tensor(name), file


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of what load_state can cast


def check_headers(path):
    """Read every shard's header (no tensor data), so a missing, damaged or mismatched file is
    reported before a run starts, not hours into it: each header must be readable, hold the
    tensors the index puts in it, and together the shards must hold exactly the tensors and
    shapes config.json asks for (load_state's rules), in floating point."""
    from safetensors import safe_open
    path = Path(path)
    cfg = read_config(path)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in create(cfg).named_parameters()}
    index = path / "model.safetensors.index.json"
    seen = {}
    for file, listed in checkpoint_index(path).items():
        try:
            with safe_open(str(file), framework="pt") as f:
                header = {name: f.get_slice(name) for name in f.keys()}
                header = {name: (tuple(sl.get_shape()), sl.get_dtype()) for name, sl in header.items()}
        except Exception as e:
            why = e.args[0] if e.args and isinstance(e.args[0], str) else str(e) or type(e).__name__
            raise ModelError(f"{file}: cannot read safetensors header ({why.splitlines()[0]})") from None
        for name in listed or ():
            if name not in header:
                raise ModelError(f"{index}: names tensor {name} in {file.name}, which does not hold it")
        for name, (shape, dtype) in header.items():
            key = hf_name(name)
            if key == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: the head is the embedding (load_state skips it too)
            if key not in want:
                raise ModelError(f"{file}: unexpected tensor {name} (not part of the model config.json describes)")
            if key in seen:
                raise ModelError(f"{file}: tensor {name} is also in {seen[key].name}")
            if shape != want[key]:
                raise ModelError(f"{file}: tensor {name} has shape {shape}, config.json asks for {want[key]}")
            if dtype not in FLOAT_DTYPES:
                raise ModelError(f"{file}: tensor {name} has dtype {dtype}; need F32, F16 or BF16 "
                                 "(quantized checkpoints are not supported)")
            seen[key] = file
    missing = [k if k == "lm_head.weight" else f"model.{k}" for k in want
               if k not in seen and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing:
        where = index if index.exists() else path / "model.safetensors"
        raise ModelError(f"{where}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def hf_name(name):
    """Checkpoint tensor name -> our parameter name (HF nests the body under "model.")."""
    return name[len("model."):] if name.startswith("model.") else name


def load_state(model, path, dtype=torch.float32, device="cpu", convert=None, tensors=None):
    """Stream a checkpoint into a model built on the meta device.

    device: a device, or a function of the tensor's name giving its device (a pipeline split,
    see pipeline.device_map). convert(name, tensor, device) -> bool lets a caller (quant.py)
    take a tensor itself, e.g. to quantize a linear weight as it arrives; returning False
    falls back to a plain copy. tensors: (name, tensor, file) to load instead of path's files
    (random weights of a given shape, pipeline.random_tensors).
    Missing, unexpected and mis-shaped tensors are errors naming the tensor and the file.
    """
    params = dict(model.named_parameters())
    where = device if callable(device) else (lambda key: device)
    seen = set()
    for name, t, file in tensors if tensors is not None else iter_checkpoint(path):
        key = hf_name(name)
        if key == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # tied: the head is the embedding; some exporters save it anyway
        if key not in params:
            raise ModelError(f"{file}: unexpected tensor {name}")
        if tuple(t.shape) != tuple(params[key].shape):
            raise ModelError(f"{file}: tensor {name} has shape {tuple(t.shape)}, "
                             f"expected {tuple(params[key].shape)}")
        seen.add(key)
        if convert is not None and convert(key, t, where(key)):
            continue
        mod_name, _, p_name = key.rpartition(".")
        mod = model.get_submodule(mod_name)
        setattr(mod, p_name, nn.Parameter(t.to(device=where(key), dtype=dtype), requires_grad=False))
    missing = [k for k in params if k not in seen and not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing:
        raise ModelError(f"{path}: missing tensor model.{missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if model.cfg.tie_embeddings:
        emb, head_dev = model.embed_tokens.weight, torch.device(where("lm_head.weight"))
        # Split over devices, the head's device gets its own frozen copy of the tied matrix.
        model.lm_head.weight = emb if emb.device == head_dev else nn.Parameter(emb.detach().to(head_dev), requires_grad=False)
    model.inv_freq = rope_inv_freq(model.cfg).to(where("embed_tokens.weight"))
    return model
