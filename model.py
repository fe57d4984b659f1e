"""Our own Llama-family causal LM (Llama, Mistral, Gemma-2): its config, its modules, and
load_model.

One file, read top to bottom: Config -> RMSNorm/RoPE -> Attention/MLP/Block -> Transformer
-> Gemma-2, a small extension beside the Llama block -> load_model.
Module names follow Hugging Face's (q_proj, gate_proj, input_layernorm, ...) so a checkpoint
maps onto the model by stripping the "model." prefix, and LoRA adapter keys match PEFT's.
The modules are plain torch. What changes how a built model computes is applied to it from
outside, as gpt-fast does: 4-bit weights (quant.py), LoRA (lora.py), the CPU's kernels
(machinery/kernels.py), the checks on a model folder (machinery/loader.py). The sampler is
generate.py; the scorer of given responses, data.sequence_logps.
It knows two things about device splits: a layer may live on another device than the one
before it, so the forward pass carries the activations over (`to_layer`), and a split model's
`stage_bounds` give the sampler's CapturedDecode one graph per card. Which layers go where,
and the micro-batch schedule, are pipeline.py's.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
        a bad field or fields that contradict each other, is a ModelError naming the file and
        field: machinery/loader.py checks each one."""
        from machinery import loader  # it builds on this file: imported when used
        return loader.read_config(path)


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
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.scale = None  # SDPA's 1/sqrt(head_dim)
        self.cache = None

    def forward(self, x, cos, sin, mask, slot=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slot is not None:
            k, v = self.cache.update(slot, k, v)
        y = self.attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def qkv(self, x):
        # one method of its own, so that a CPU kernel can run the three as one product from
        # outside (machinery/kernels.py: use_onednn)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q, k, v, mask):
        # mask None means plain causal over an unpadded batch: SDPA's fast path, GQA inside the
        # kernel. With a mask (padded batches, always in generation) SDPA's GQA would rule out the
        # flash and memory-efficient kernels on CUDA (its math kernel runs in float32 and expands
        # K/V itself): there expand K/V here, in the compute dtype, as transformers does. The CPU
        # flash kernel takes GQA with a mask, with the same results: expanding there would copy
        # the whole KV cache in every layer at every decode step, most of a step's time.
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
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.hidden_act = cfg.hidden_act  # SwiGLU, or Gemma's GeGLU
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        g, u = self.gate_up(x)
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return self.down_proj(GatedAct.apply(g, u, self.hidden_act))
        # contiguous: g may be a column slice of fused_linears' output, and on a strided input
        # silu/gelu take another kernel whose results differ in the last bit
        return self.down_proj(self.act(g.contiguous()) * u)

    def gate_up(self, x):  # as Attention.qkv: a method, so a kernel can fuse the two from outside
        return self.gate_proj(x), self.up_proj(x)


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
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
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

    def qkv(self, x):
        # one method of its own, so that a CPU kernel can run the three as one product from
        # outside (machinery/kernels.py: use_onednn)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

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


def load_model(path, dtype=torch.float32, device="cpu"):
    """Build our Transformer from a local HF folder (config.json + safetensors), frozen, eval.
    The folder's checks and the streaming of its tensors are machinery/loader.py's."""
    from machinery import loader  # it builds on this file: imported when used
    cfg = Config.from_hf(path)
    with torch.device("meta"):
        model = create(cfg)
    loader.load_state(model, path, dtype, device)
    return model.eval()
