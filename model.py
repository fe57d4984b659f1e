"""Our own Llama-family causal LM (Llama, Mistral, Gemma-2): config, modules, weight loading,
and the KV-cache sampler with its twin, the scorer of given tokens.

One file, read top to bottom: Config -> RMSNorm/RoPE -> Attention/MLP/Block -> Transformer
-> Gemma-2, a small extension beside the Llama block -> loading from a Hugging Face folder
-> generate() (on CUDA its decode step replayed as CUDA graphs, CapturedDecode) and
sequence_logps().
Module names follow Hugging Face's (q_proj, gate_proj, input_layernorm, ...) so a checkpoint
maps onto the model by stripping the "model." prefix, and LoRA adapter keys match PEFT's.
This file knows nothing about quantization or LoRA: those are module swaps applied to a built
model (quant.py, lora.py), as gpt-fast does; which library multiplies on CPU is kernels.py's.
It knows two things about device splits: a layer may live on another device than the one
before it, so the forward pass carries the activations over (`to_layer`), and a split model's
`stage_bounds` give CapturedDecode one graph per card. Which layers go where, and the
micro-batch schedule, are pipeline.py's.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class ModelError(ValueError):
    """A bad model folder or checkpoint: the message names the file and the tensor/field."""


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    ffn_dim: int = 14336
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "llama3", factor, low/high_freq_factor, ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 8192
    sliding_window: int | None = None  # Mistral v0.1; None = full attention
    arch: str = "LlamaForCausalLM"
    # Gemma-2 (the defaults leave Llama/Mistral as they are):
    layer_types: tuple | None = None   # "sliding_attention"/"full_attention" per layer; None: all alike
    hidden_act: str = "silu"           # Gemma: "gelu_pytorch_tanh" (GeGLU)
    query_pre_attn_scalar: float | None = None  # queries scaled by its -1/2 power; None: head_dim
    attn_logit_softcapping: float | None = None  # cap * tanh(logit / cap) on attention logits
    final_logit_softcapping: float | None = None  # ... and on the output logits

    def window(self, i):
        """Layer i's sliding window, or None for full attention."""
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, path):
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
        return cls(
            vocab_size=vocab, dim=dim, n_layers=layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            ffn_dim=ffn, rope_theta=float(num("rope_theta", 10000.0, float)),
            rope_scaling=rs, norm_eps=num("rms_norm_eps", 1e-6, float),
            tie_embeddings=tie,
            max_seq_len=num("max_position_embeddings", 4096),
            sliding_window=window,
            arch=arch, hidden_act=act, **gemma_fields,
        )


LLAMA3_8B = Config(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                   ffn_dim=14336, rope_theta=500000.0)  # the mission's model: its shapes, for plans and benchmarks


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def normed(self, x):
        # Normalise in float32, exactly as HF Llama does.
        h = x.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self.weight * self.normed(x).to(x.dtype)  # cast back before the weight, as HF


def rope_inv_freq(cfg: Config):
    """RoPE inverse frequencies, with Llama-3.1's long-context rescaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs.get("original_max_position_embeddings", cfg.max_seq_len)
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq, pos, dtype):
    """cos/sin of shape (B, 1, T, head_dim) for integer positions pos (B, T)."""
    freqs = pos[:, :, None].float() * inv_freq[None, None, :].float()
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # HF's "rotate half" layout: the two halves of each head are the (real, imag) pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """A preallocated cache (gpt-fast style): writes in place, never grows or copies."""

    def __init__(self, batch, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slot, k, v):
        if torch.is_tensor(slot):  # the static decode step (CapturedDecode): fixed shapes, the whole cache
            self.k.index_copy_(2, slot, k)
            self.v.index_copy_(2, slot, v)
            return self.k, self.v
        T = k.shape[2]
        self.k[:, :, slot:slot + T] = k
        self.v[:, :, slot:slot + T] = v
        return self.k[:, :, :slot + T], self.v[:, :, :slot + T]

    def rows(self, a, b):
        """Rows a..b-1 as a cache of their own that writes into this one (a view, no copy)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.k, view.v = self.k[a:b], self.v[a:b]
        return view

    def keep(self, idx):
        """Only these rows from now on (one copy: the sampler drops rows that are done)."""
        idx = idx.to(self.k.device)
        self.k, self.v = self.k[idx], self.v[idx]


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = kernels.Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.k_proj = kernels.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.v_proj = kernels.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.o_proj = kernels.Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.scale = None  # SDPA's 1/sqrt(head_dim)
        self.cache = None

    def forward(self, x, cos, sin, mask, slot=None):
        B, T, _ = x.shape
        qkv = kernels.fused_linears(self, "_packed_qkv", x, self.q_proj, self.k_proj, self.v_proj)
        q, k, v = qkv or (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slot is not None:
            k, v = self.cache.update(slot, k, v)
        y = self.attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, mask):
        # mask None means plain causal over an unpadded batch: SDPA's fast path, GQA inside the
        # kernel. With a mask (padded batches, always in generation) SDPA's GQA would rule out the
        # flash and memory-efficient kernels on CUDA (its math kernel runs in float32 and expands
        # K/V itself): there expand K/V here, in the compute dtype, as transformers does. The CPU
        # flash kernel takes GQA with a mask, with the same results: expanding there would copy
        # the whole KV cache in every layer at every decode step (measured: most of a step's time).
        gqa = self.n_kv_heads != self.n_heads
        if mask is not None and gqa and q.device.type != "cpu":
            rep = self.n_heads // self.n_kv_heads
            if q.shape[2] == 1:  # one query per row (decode): a KV head's rep query heads become rep query rows
                B, H, _, D = q.shape
                y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, rep, D), k, v, attn_mask=mask,
                                                   scale=self.scale)
                return y.reshape(B, H, 1, D)
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                              enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = kernels.Linear(cfg.dim, cfg.ffn_dim)
        self.up_proj = kernels.Linear(cfg.dim, cfg.ffn_dim)
        self.down_proj = kernels.Linear(cfg.ffn_dim, cfg.dim)
        self.hidden_act = cfg.hidden_act  # SwiGLU, or Gemma's GeGLU
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        g, u = kernels.fused_linears(self, "_packed_gate_up", x, self.gate_proj, self.up_proj) or (self.gate_proj(x), self.up_proj(x))
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return self.down_proj(GatedAct.apply(g, u, self.hidden_act))
        # contiguous: g may be a column slice of fused_linears' output, and on a strided input
        # silu/gelu take another kernel whose results differ in the last bit
        return self.down_proj(self.act(g.contiguous()) * u)


class GatedAct(torch.autograd.Function):
    """act(g) * u keeping only g and u for backward, not act(g) too: a third of the MLP's saved
    activations (ffn_dim floats per token per layer). act(g) is recomputed in backward, and the
    gradients are the ones autograd computes for act(g) * u, by the same operations."""

    @staticmethod
    def forward(ctx, g, u, act):
        ctx.save_for_backward(g, u)
        ctx.act = act
        return ACTIVATIONS[act](g) * u

    @staticmethod
    def backward(ctx, gy):
        g, u = ctx.saved_tensors
        gu = gy * ACTIVATIONS[ctx.act](g) if ctx.needs_input_grad[1] else None
        gg = None
        if ctx.needs_input_grad[0]:
            if ctx.act == "silu":
                gg = torch.ops.aten.silu_backward(gy * u, g)
            else:
                gg = torch.ops.aten.gelu_backward(gy * u, g, approximate="tanh")
        return gg, gu, None


class Block(nn.Module):
    Norm, Attention = RMSNorm, Attention  # Gemma2Block swaps in its own

    def __init__(self, cfg: Config, i=0):
        super().__init__()
        self.sliding = cfg.window(i) is not None
        self.input_layernorm = self.Norm(cfg.dim, cfg.norm_eps)
        self.self_attn = self.Attention(cfg)
        self.post_attention_layernorm = self.Norm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, slot=None, window_mask=None):
        mask = window_mask if self.sliding else mask
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(q_valid, k_valid, q_slot0, window=None):
    """Boolean SDPA mask (B, 1, Tq, Tk): True where query i may attend to key j.

    Slots are indices along the (padded) time axis; the queries' are q_slot0.. (or the tensor
    q_slot0 itself). A query sees earlier-or-equal slots that hold real tokens. Every query also
    sees itself, so rows of padding never become all-False (SDPA would return NaN there); real
    tokens never look at padding, so this changes nothing that is used.
    """
    Tq, Tk = q_valid.shape[1], k_valid.shape[1]
    qs = (q_slot0 if torch.is_tensor(q_slot0) else torch.arange(q_slot0, q_slot0 + Tq, device=k_valid.device))[:, None]
    ks = torch.arange(Tk, device=k_valid.device)[None, :]
    allowed = ks <= qs
    if window is not None:
        allowed = allowed & (qs - ks < window)
    m = allowed[None] & k_valid[:, None, :]
    m = m | (ks == qs)[None]
    return m[:, None]


class Transformer(nn.Module):
    Embedding, Block, Norm = nn.Embedding, Block, RMSNorm  # Gemma2 swaps in its own

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = self.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(self.Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = self.Norm(cfg.dim, cfg.norm_eps)
        self.lm_head = kernels.Linear(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.cache_valid = None  # (B, max_len) bool: which cache slots hold real tokens
        self.grad_ckpt = False  # True: recompute each block's activations in backward (memory for time)

    def setup_cache(self, batch, max_len, dtype=None, device=None):
        dtype = dtype or self.embed_tokens.weight.dtype
        for layer in self.layers:  # each layer's cache lives on its layer's device (pipeline split)
            a = layer.self_attn
            a.cache = KVCache(batch, max_len, a.n_kv_heads, a.head_dim, dtype, device or layer_device(layer))
        self.cache_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device or self.embed_tokens.weight.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None
        self.cache_valid = None

    def forward(self, idx, attn_mask=None, pos=None, slot=None, last_only=False, head=True):
        """Logits (B, T, vocab) for tokens idx (B, T).

        attn_mask: (B, T) bool, True for real tokens (left padding is False). pos: (B, T) RoPE
        positions; by default each row counts its real tokens from 0, so a left-padded row gets
        the same positions as the row alone. slot: None for a full forward (training, scoring);
        an int to write this chunk into the KV cache at that slot and attend over the cache; a
        tensor of slots to write there and attend over the whole cache, shapes fixed (CapturedDecode).
        head=False returns the final normalised hidden states instead of logits, so a caller that
        needs only some positions' logits (training scores responses, not prompts) saves the rest.
        embed and finish are methods of their own so a pipeline (pipeline.py) can run the
        layers between them in its own order.
        """
        x, ctx = self.embed(idx, attn_mask, pos, slot)
        for layer in self.layers:
            x, ctx = to_layer(layer, x, ctx)
            x = checkpoint(layer, x, *ctx, use_reentrant=False) if self.grad_ckpt else layer(x, *ctx)
        return self.finish(x, last_only, head)

    def embed(self, idx, attn_mask=None, pos=None, slot=None):
        """Token embeddings and what every layer needs: ctx = (cos, sin, mask, slot, window_mask);
        full-attention layers use mask, sliding-window layers window_mask."""
        B, T = idx.shape
        full = None
        if attn_mask is not None and attn_mask.dim() == 4:  # a whole (B, 1, T, T) mask (sequence_logps' pair rows)
            full, attn_mask = attn_mask, None
        if attn_mask is not None:
            attn_mask = attn_mask.bool()
        if pos is None:
            if attn_mask is None:
                pos = torch.arange(T, device=idx.device).expand(B, T)
            else:
                pos = (attn_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = self.embed_tokens(idx)
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)
        valid = attn_mask if attn_mask is not None else torch.ones_like(idx, dtype=torch.bool)
        static = torch.is_tensor(slot)  # slot a tensor: CapturedDecode's step, over the whole cache
        if static:
            self.cache_valid.index_copy_(1, slot, valid)
        elif slot is not None:
            self.cache_valid[:, slot:slot + T] = valid

        def mask_for(window):
            if slot is not None:
                return attention_mask(valid, self.cache_valid if static else self.cache_valid[:, :slot + T], slot, window)
            if full is not None:  # a window counts positions, which a pair row's second response restarts
                return full if window is None or T <= window else full & (pos[:, None, :, None] - pos[:, None, None, :] < window)
            if attn_mask is None and (window is None or T <= window):
                return None
            return attention_mask(valid, valid, 0, window)
        windows = [self.cfg.window(i) for i in range(len(self.layers))]
        mask = mask_for(None) if None in windows else None
        window_mask = mask_for(self.cfg.sliding_window) if any(w is not None for w in windows) else None
        return x, (cos, sin, mask, slot, window_mask)

    def finish(self, x, last_only=False, head=True):
        x = x.to(self.norm.weight.device)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return self.logits(x) if head else x

    def logits(self, h):
        """The LM head on final hidden states."""
        return self.lm_head(h)


def layer_device(layer):
    return layer.input_layernorm.weight.device


def to_layer(layer, x, ctx):
    """Split over devices, the activations (and the rope tables and masks) hop to the layer's
    device: the only cross-device traffic. On one device this does nothing."""
    dev = layer_device(layer)
    if x.device != dev:
        x, ctx = x.to(dev), tuple(c.to(dev) if torch.is_tensor(c) else c for c in ctx)
    return x, ctx


# ----------------------------------------------------------------------------- Gemma-2
# What Gemma-2 adds to the Llama block, each as a subclass (HF's Gemma2 modules): norms that
# scale by (1 + w), "sandwich" norms after attention and after the MLP, embeddings scaled by
# sqrt(dim), a query scale of its own, and tanh soft-capping of attention and output logits.

class GemmaRMSNorm(RMSNorm):
    def __init__(self, dim, eps):
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.zeros(dim))  # Gemma stores w - 1

    def forward(self, x):
        # scaled in float32 before casting back (HF Gemma2RMSNorm)
        return (self.normed(x) * (1.0 + self.weight.float())).to(x.dtype)


class Gemma2Attention(Attention):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        # queries scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.softcap = cfg.attn_logit_softcapping

    def attend(self, q, k, v, mask):
        if self.softcap is None:
            return super().attend(q, k, v, mask)
        return softcapped_attention(q, k, v, mask, self.scale or self.head_dim ** -0.5, self.softcap)


def softcapped_attention(q, k, v, mask, scale, cap):
    """Attention with Gemma-2's cap * tanh(logits / cap), written out because SDPA cannot cap
    its logits. Same conventions as the SDPA call: boolean mask, None = causal, GQA."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # kv head j serves q heads j*rep..
    s = (q @ k.transpose(-2, -1)) * scale
    s = cap * torch.tanh(s / cap)
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class Gemma2Block(Block):
    Norm, Attention = GemmaRMSNorm, Gemma2Attention

    def __init__(self, cfg: Config, i=0):
        super().__init__(cfg, i)
        # Same name, other place: Gemma-2's post_attention_layernorm normalises the attention
        # output; the norm before the MLP (Llama's post_attention_layernorm) is pre_feedforward.
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, slot=None, window_mask=None):
        mask = window_mask if self.sliding else mask
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, slot))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class ScaledEmbedding(nn.Embedding):
    def forward(self, idx):
        # the normaliser sqrt(dim) in the activations' dtype, as HF rounds it
        x = super().forward(idx)
        return x * torch.tensor(self.embedding_dim ** 0.5, dtype=x.dtype)


class Gemma2(Transformer):
    Embedding, Block, Norm = ScaledEmbedding, Gemma2Block, GemmaRMSNorm

    def logits(self, h):
        cap = self.cfg.final_logit_softcapping
        y = self.lm_head(h)
        return y if cap is None else cap * torch.tanh(y / cap)


def create(cfg: Config):
    """The model for cfg's architecture, with its parameters wherever torch.device says (meta to load)."""
    return (Gemma2 if cfg.arch == "Gemma2ForCausalLM" else Transformer)(cfg)

# ----------------------------------------------------------------------------- loading

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
    cfg = Config.from_hf(path)
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


def load_model(path, dtype=torch.float32, device="cpu"):
    """Build our Transformer from a local HF folder (config.json + safetensors), frozen, eval."""
    cfg = Config.from_hf(path)
    with torch.device("meta"):
        model = create(cfg)
    load_state(model, path, dtype, device)
    return model.eval()


# ----------------------------------------------------------------------------- sampling and scoring

def sample_next(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """Next token ids (B,) from last-position logits (B, V). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # The nucleus of an LM's distribution is nearly always within its top 64 tokens: sorting only
    # those is exact whenever they reach top_p. Flat distributions (high temperature, random or
    # early models) get the top 1024 (8x cheaper than a full sort of a 49k vocabulary), then the sort.
    for k in (64, 1024):
        sorted_p, order = probs.topk(min(k, probs.shape[-1]), dim=-1)
        if bool((sorted_p.sum(-1) >= top_p).all()):
            break
    else:
        sorted_p, order = probs.sort(-1, descending=True)
    # Drop a token when the tokens strictly above it already reach top_p (keeps >= 1).
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
             stop_ids=(), seed=None, pad_id=0, static_cache=None):
    """Sample continuations for a batch of token-id lists with a KV cache.

    Prompts are left-padded so every row's last prompt token sits in the same slot; each row
    stops at its first stop id (which is kept in its output) or after max_new_tokens. The
    same seed gives the same samples. Returns a list of new-token lists.

    static_cache: decode with CapturedDecode's fixed-shape step, CUDA graphs on CUDA. None (the
    default) does so when the whole model is on CUDA cards; elsewhere each step attends over
    the cache filled so far and rows that are done leave the batch.
    """
    return generate_seeds(model, prompts, max_new_tokens, temperature, top_p, top_k, stop_ids, [seed], pad_id,
                          static_cache)[0]


@torch.no_grad()
def generate_seeds(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                   stop_ids=(), seeds=(None,), pad_id=0, static_cache=None):
    """generate() once per seed, the same prompts: a list with one result per seed, each equal
    to generate(..., seed=that seed).

    On CPU in float32 (oneDNN, where its probe shows a row's result independent of the other rows) the seeds
    run as one batch of len(seeds) x len(prompts) rows: the prompts are prefilled once, their
    KV cache copied to every seed's rows, and each decode step is one forward for all rows, each
    seed's rows sampled with that seed's own generator, so every seed draws the random numbers
    it would draw alone. Elsewhere, and for a single prompt (oneDNN's one-row product is
    another kernel), the seeds run one after another.
    """
    device = model.embed_tokens.weight.device
    w = model.embed_tokens.weight
    if len(seeds) > 1 and (len(prompts) == 1 or not kernels.onednn_ok(w, w, path="rows")):
        return [generate_seeds(model, prompts, max_new_tokens, temperature, top_p, top_k, stop_ids, [s], pad_id,
                               static_cache)[0] for s in seeds]
    if static_cache is None:
        static_cache = {p.device.type for p in model.parameters()} == {"cuda"}
    # Longest prompts first, so rows of similar length are neighbours and prefill() can run
    # them as blocks cut to their own longest prompt; results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    prompts = [prompts[i] for i in order]
    B, T, G = len(prompts), max(len(p) for p in prompts), len(seeds)
    idx = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = True
    gens = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]
    model.setup_cache(G * B, T + max_new_tokens)
    try:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = prefill(model, idx, mask, pos, [len(p) for p in prompts])  # into rows 0..B-1
        for layer in model.layers:  # every seed starts from the same prompt cache
            c = layer.self_attn.cache
            for g in range(1, G):
                c.k[g * B:(g + 1) * B, :, :T].copy_(c.k[:B, :, :T])
                c.v[g * B:(g + 1) * B, :, :T].copy_(c.v[:B, :, :T])
        model.cache_valid[B:, :T] = model.cache_valid[:B, :T].repeat(G - 1, 1)
        out = decode_n_tokens(model, logits.repeat(G, 1), (pos[:, -1:] + 1).repeat(G, 1), T, B, max_new_tokens,
                              temperature, top_p, top_k, stop_ids, gens, pad_id,
                              CapturedDecode(model, G * B) if static_cache else None)
    finally:
        model.clear_cache()
    results = []
    for g in range(G):
        result = [None] * B
        for i in range(B):
            row = out[g * B + i].tolist()
            hit = [j for j, t in enumerate(row) if t in set(stop_ids)]
            result[order[i]] = row[:hit[0] + 1] if hit else row
        results.append(result)
    return results


def decode_n_tokens(model, logits, next_pos, slot, B, n, temperature, top_p, top_k, stop_ids, gens, pad_id,
                    step_fn=None):
    """The decode loop: sample a token for every row not done yet (rows g*B..(g+1)*B-1 with
    generator gens[g], in row order), write it, run the one-token forward over the cache from
    `slot`, until every row has met a stop id or n tokens. Returns the (rows, steps) new tokens,
    pad_id after a row's stop.

    Rows that are done leave the forward: once a quarter of the rows it runs are done, the KV
    cache is cut to the others (one copy each time, a few times per call). A row's logits do not
    depend on the other rows (generate_seeds), so this changes no row's tokens; at least two rows
    stay, as oneDNN's one-row product is another kernel. With a fixed-shape step_fn
    (CapturedDecode) every row runs to the end: on a GPU a step costs the same for 1 row or 16."""
    device = logits.device
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    rows = logits.shape[0]
    out = torch.full((rows, n), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    run = torch.arange(rows, device=device)  # the rows the model runs, in cache order: logits[i] is row run[i]'s
    for step in range(n):
        tok = torch.full((len(run),), pad_id, dtype=torch.long, device=device)
        todo = ~done[run]
        for g, gen in enumerate(gens):
            mine = (todo & (run // B == g)).nonzero().squeeze(1)
            if len(mine):
                tok[mine] = sample_next(logits[mine], temperature, top_p, top_k, gen)
        out[run, step] = tok
        done[run] |= todo & torch.isin(tok, stop)
        if bool(done.all()) or step == n - 1:
            return out[:, :step + 1]
        todo = ~done[run]
        if step_fn is None and len(run) > 2 and 4 * int(todo.sum()) <= 3 * len(run):
            keep = todo.nonzero().squeeze(1)
            if len(keep) < 2:  # fill with rows that are done
                keep = torch.cat([keep, (~todo).nonzero().squeeze(1)[:2 - len(keep)]]).sort().values
            for layer in model.layers:
                layer.self_attn.cache.keep(keep)
            model.cache_valid = model.cache_valid[keep.to(model.cache_valid.device)]
            run, tok, next_pos = run[keep], tok[keep], next_pos[keep]
        logits = step_fn(tok, next_pos, slot + step) if step_fn else decode_one_token(model, tok, next_pos, slot + step)
        next_pos = next_pos + 1


def decode_one_token(model, tok, pos, slot):
    """Last-position logits (rows, vocab) of one new token per row, written to the cache at slot."""
    return model(tok[:, None], None, pos, slot=slot)[:, -1].to(pos.device)


class CapturedDecode:
    """decode_one_token with fixed shapes, captured once as CUDA graphs and replayed each step:
    what gpt-fast gets from torch.compile(mode="reduce-overhead"), by hand. An 8B model's step
    is ~1,300 kernel launches, each a few microseconds of Python and driver for much less GPU
    work at small batches; a replay launches them all at once.

    Fixed shapes: the token, positions and slot live in tensors of their own that each call
    refills, and the step attends over the whole preallocated cache (slots not yet written are
    masked out; their zeros cost a read, no more). A model split over cards (pipeline.py) gets
    one graph per stage, and between two replays its activations hop to the next card, as in
    forward. Off CUDA the same step runs eagerly (the tests)."""

    def __init__(self, model, rows):
        dev = model.embed_tokens.weight.device
        self.model, self.graphs, self.logits = model, None, None
        self.tok = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        bounds = getattr(model, "stage_bounds", None) or [0, len(model.layers)]
        self.stages = [model.layers[a:b] for a, b in zip(bounds, bounds[1:])]

    def __call__(self, tok, pos, slot):
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.slot.fill_(slot)
        if self.tok.device.type != "cuda":
            return self.eager()
        if self.graphs is None:
            self.capture()
        for graph, hops in self.graphs:
            for dst, src in hops:
                dst.copy_(src)
            graph.replay()
        return self.logits.to(self.tok.device)  # the last graph's own output: read it before the next call

    def stage(self, i, x=None, ctx=None):
        """Stage i of the one-token forward: after the embedding for stage 0, the head after the last."""
        if i == 0:
            x, ctx = self.model.embed(self.tok[:, None], None, self.pos, self.slot)
        for layer in self.stages[i]:
            x = layer(x, *ctx)
        return self.model.finish(x)[:, -1] if i == len(self.stages) - 1 else (x, ctx)

    def eager(self):
        """The stages one after another, hopping between cards as forward does."""
        out = self.stage(0)
        for i in range(1, len(self.stages)):
            out = self.stage(i, *to_layer(self.stages[i][0], *out))
        return out.to(self.tok.device)

    def capture(self):
        # A first eager step on a side stream loads the kernels and cuBLAS' workspace, which a
        # capture must not do; it writes this step's K/V, which the replay writes again.
        side = torch.cuda.Stream(self.tok.device)
        side.wait_stream(torch.cuda.current_stream(self.tok.device))
        with torch.cuda.stream(side):
            self.eager()
        torch.cuda.current_stream(self.tok.device).wait_stream(side)
        self.graphs, out = [], None
        for i, layers in enumerate(self.stages):
            dev, hops, args = layer_device(layers[0]), [], ()
            if i > 0:  # the previous stage's outputs, copied to this card if it is another (fixed buffers)
                args = [t.to(dev) if torch.is_tensor(t) else t for t in (out[0], *out[1])]
                hops = [(a, t) for a, t in zip(args, (out[0], *out[1])) if torch.is_tensor(t) and a is not t]
                args = (args[0], tuple(args[1:]))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(dev), torch.cuda.graph(graph, stream=torch.cuda.Stream(dev)):
                out = self.stage(i, *args)
            self.graphs.append((graph, hops))
        self.logits = out


def length_groups(lengths, waste=0.15):
    """Row indices grouped, longest first, so that padding each group to its longest row adds at
    most `waste` of its real tokens: a padded position costs the model as much as a real one.
    Used by prefill and by sequence_logps (pair batches vary threefold in length)."""
    groups = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        g = groups[-1] if groups else []
        if g and (len(g) + 1) * lengths[g[0]] <= (1 + waste) * (sum(lengths[j] for j in g) + lengths[i]):
            g.append(i)
        else:
            groups.append([i])
    return groups


def prefill(model, idx, mask, pos, lengths, waste=0.15):
    """Last-position logits of left-padded prompts (sorted longest first), their K/V written to
    the cache. A block of rows runs cut to its own longest prompt, starting at that slot: the
    padding that the batch's longest prompt forces on short rows is mostly never computed."""
    T, out = idx.shape[1], []
    caches, valid = [layer.self_attn.cache for layer in model.layers], model.cache_valid
    try:
        for g in length_groups(lengths, waste):  # sorted input: each group is a run of rows a..b-1
            a, b = g[0], g[-1] + 1
            for layer, c in zip(model.layers, caches):
                layer.self_attn.cache = c.rows(a, b)
            model.cache_valid = valid[a:b]
            s = T - lengths[a]
            out.append(model(idx[a:b, s:], mask[a:b, s:], pos[a:b, s:], slot=s, last_only=True)[:, -1])
    finally:
        for layer, c in zip(model.layers, caches):
            layer.self_attn.cache = c
        model.cache_valid = valid
    return torch.cat([o.to(idx.device) for o in out])


def sequence_logps(model, ids, resp):
    """sum_t log pi(y_t | x, y_<t) over the response tokens of right-padded rows ids (B, T).

    resp (B, T) says which tokens are scored. Bool: True on the one response of each row
    (prompt x then response y) -> (B,). Or integer segment ids for a pair row, x y_w y_l with
    its prompt computed once (data.pair_tensors): 0 on prompt and padding, 1 on y_w, 2 on y_l
    -> (B, 2). y_l attends to x and itself, not to y_w, and its positions restart where y_w's
    began, so each response is scored exactly as in a row of its own (pair_row_layout).
    Rows of one response need no attention mask: causal, no real token sees the right padding.

    Rows run in groups of similar length, each cut to its longest row, so little time goes to
    padding (length_groups). The LM head runs only where a response token is predicted: with a
    49k-128k vocabulary the logits of prompt and padding positions would cost as much as the
    rest of the model. model: a Transformer, or anything with the same forward(ids, head=False,
    attn_mask, pos) and logits(h), e.g. pipeline.GPipe, the micro-batched schedule over split devices."""
    n = 1 if resp.dtype == torch.bool else 2
    seg = resp.long()
    ends = row_ends(seg).clamp(min=1).tolist()
    parts, order = [], []
    for g in length_groups(ends):
        T = ends[g[0]]
        g_ids, g_seg = (ids, seg) if len(g) == len(ends) else (ids[g], seg[g])
        g_ids, g_seg = g_ids[:, :T], g_seg[:, :T]
        prev, kw = pair_row_layout(g_seg) if n == 2 else (torch.arange(-1, T - 1, device=ids.device).expand(len(g), T), {})
        h = model(g_ids, head=False, **kw)
        scored = g_seg > 0
        scored[:, 0] = False  # nothing predicts a row's first token
        b, t = scored.nonzero(as_tuple=True)  # row by row
        b, t, g_ids, g_seg, prev = b.to(h.device), t.to(h.device), g_ids.to(h.device), g_seg.to(h.device), prev.to(h.device)
        logits = model.logits(h[b, prev[b, t]]).float()  # the position that predicts each scored token
        logp = -F.cross_entropy(logits, g_ids[b, t], reduction="none")
        parts.append(torch.zeros(len(g) * n, device=h.device, dtype=logp.dtype).index_add(0, b * n + g_seg[b, t] - 1, logp).view(len(g), n))
        order += g
    out = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.tensor(order, device=parts[0].device).argsort()]
    return out[:, 0] if n == 1 else out


def row_ends(seg):
    """(B,) how far each row of right-padded rows runs: one past its last scored token (0 for none)."""
    return ((seg > 0).long() * torch.arange(1, seg.shape[1] + 1, device=seg.device)).amax(1)


def pair_row_layout(seg):
    """For pair rows x y_w y_l (segment ids 0, 1, 2): which position predicts each token (the one
    before it; y_l's first token: x's last), and the model's positions and (B, 1, T, T) mask:
    causal, except that y_l never sees y_w, and y_l's positions follow x's as in a row of its own."""
    T = seg.shape[1]
    i = torch.arange(T, device=seg.device)
    n_w = (seg == 1).sum(1, keepdim=True)
    x_len = (seg == 1).long().argmax(1, keepdim=True)  # y_w's first token
    pos = i - (seg == 2) * n_w
    prev = torch.where(i == x_len + n_w, x_len - 1, i - 1)
    mask = (i[:, None] >= i[None, :]) & ((seg[:, :, None] != 2) | (seg[:, None, :] != 1))
    return prev, {"attn_mask": mask[:, None], "pos": pos}
