"""quant.py: 4-bit (NF4) frozen base weights through bitsandbytes.

Applied to a built model.py Transformer as module swaps (gpt-fast style): model.py knows
nothing of quantization. The 4-bit format and kernels are bitsandbytes' (NF4, blocks of 64,
double quant); the weights are quantized as the checkpoint streams in. LoRA on top: lora.py.
"""
import logging
import math

# On AVX512-BF16 CPUs bitsandbytes tries to fetch an optional kernel from the Hugging Face hub
# at import and warns when it can't; we never want a download, and the fallback is fine.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import model as M  # noqa: E402
from machinery import kernels, loader  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- 4-bit linear

class NF4Linear(nn.Module):
    """A frozen linear layer stored in 4 bits (bitsandbytes NF4, blocks of 64, double quant).

    We multiply by the packed weight ourselves instead of using bnb.nn.Linear4bit: on CPUs with
    AVX512-BF16, Linear4bit in eval mode repacks its weight into another layout, and a backward
    after that silently yields no input gradient (LoRA would stop learning). On CPU (float32 or
    bf16) the product is NF4Matmul (bitsandbytes' dequantization, oneDNN's matmul), elsewhere
    bnb.matmul_4bit. compute_dtype is the product's dtype (bitsandbytes' bnb_4bit_compute_dtype,
    see product_dtype); the output comes back in the input's dtype.
    """

    def __init__(self, weight, compute_dtype=torch.float32, quant_type="nf4", double_quant=True, blocksize=64):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        q, self.quant_state = bnbf.quantize_4bit(weight.contiguous(), blocksize=blocksize,
                                                 compress_statistics=double_quant, quant_type=quant_type)
        self.register_buffer("qweight", q)  # a buffer: frozen, never seen by the optimizer

    def forward(self, x):
        dtype, x = x.dtype, x.to(self.compute_dtype)
        if kernels.onednn_ok(x, x, bf16=True):  # CPU (the weight is dequantized to x's dtype): see NF4Matmul
            y = NF4Matmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else kernels.mm_nt(x, self.dequantize(x.dtype))
        else:
            y = bnb.matmul_4bit(x, self.qweight.t(), quant_state=self.quant_state)
        return y.to(dtype)

    def block_scales(self):
        """The per-block absmax in float32. With double quant bitsandbytes stores them in 8 bits
        and decodes them on every call; they never change, so ours are decoded once and kept
        (4 bytes per 64 weights: 6 MiB for SmolLM2-135M)."""
        qs = self.quant_state
        if not qs.nested:
            return qs.absmax
        if "_absmax" not in self.__dict__:
            self.__dict__["_absmax"] = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        return self.__dict__["_absmax"]

    def dequantize(self, dtype=None):
        """The float weight (out, in), exactly as bitsandbytes dequantizes it (in the dtype it was
        quantized from, or dtype)."""
        qs = self.quant_state
        return torch.ops.bitsandbytes.dequantize_4bit(self.qweight, self.block_scales(), qs.blocksize, qs.quant_type,
                                                      qs.shape, dtype or qs.dtype)


class NF4Matmul(torch.autograd.Function):
    """x W^T for a frozen NF4 weight on CPU in x's dtype: the weight is dequantized (bitsandbytes'
    kernel, block scales decoded once per layer) and multiplied through oneDNN (kernels.mm_nt), in
    forward and again in backward. Nothing of the weight is kept between the two: a float copy
    of every linear would cost more memory (4 bytes per weight) than dequantizing twice costs
    time (the second dequantization is a small part of a training step: docs/BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return kernels.mm_nt(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        return kernels.mm_nt(gy.contiguous(), ctx.layer.dequantize(gy.dtype).t()), None


# ----------------------------------------------------------------------------- quantized loading

def product_dtype(device, choice="auto"):
    """The dtype NF4 products compute in (--nf4-compute). auto: bf16, QLoRA's, on CUDA; float32 on
    CPU, where the tests compare with float32 references. bfloat16 on a CPU that multiplies bf16
    natively (AVX512-BF16, AMX) runs a training-shaped product faster (docs/BENCHMARKS.md)."""
    if choice != "auto":
        return getattr(torch, choice)
    return torch.bfloat16 if torch.device(device).type != "cpu" else torch.float32


def quantize_model(path, compute_dtype=torch.float32, device="cpu", quant_type="nf4", double_quant=True,
                   targets=LINEARS, cfg=None, tensors=None, product_dtype=None):
    """Our Transformer with its target linears in 4 bits, quantized as the checkpoint streams in:
    each weight is quantized the moment it arrives, so full precision never sits in memory.
    compute_dtype: the rest of the model's; product_dtype: the 4-bit products' (default the same).
    cfg and tensors: build from these instead of path's files (see loader.load_state)."""
    cfg = cfg or M.Config.from_hf(path)
    with torch.device("meta"):
        model = M.create(cfg)

    def convert(key, t, dev):
        mod_name, _, leaf = key.rpartition(".")
        parent, _, child = mod_name.rpartition(".")
        if leaf != "weight" or child not in targets:
            return False
        w = t.to(device=dev, dtype=compute_dtype if compute_dtype != torch.float32 else t.dtype)
        setattr(model.get_submodule(parent), child, NF4Linear(w, product_dtype or compute_dtype, quant_type, double_quant))
        return True

    loader.load_state(model, path, compute_dtype, device, convert, tensors)
    return kernels.use_onednn(model).eval()  # the rest of its products (lm_head, ...) on CPU


# ----------------------------------------------------------------------------- sizes

def shape_bytes(cfg: M.Config, r=16, targets=LINEARS):
    """(bf16 bytes, NF4 + LoRA bytes) of a model's weights from its shapes alone (meta device)."""
    with torch.device("meta"):
        m = M.create(cfg)
    bf16 = nf4 = 0
    for name, p in m.named_parameters():
        n = p.numel()
        bf16 += 2 * n
        if name.rsplit(".", 2)[-2] in targets:
            out_f, in_f = p.shape
            # 4 bits per weight + one 8-bit absmax per 64 + one fp32 scale per 256 absmaxes + LoRA in fp32
            nf4 += n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 * r * (in_f + out_f)
        else:
            nf4 += 2 * n
    return bf16, nf4
