"""kernels.py: the model's products on CPU in float32 (and NF4's in bf16), through oneDNN instead of MKL.

Nothing here changes what is computed, only which library multiplies: `use_onednn` turns a
built model's linears into `Linear` and fuses q/k/v and gate/up with `fused_linears` where
nothing trains; quant.py and lora.py multiply through `linear` / `mm_nt`. On a GPU, in another dtype, or on a
CPU where the one-time probe (`paths`) finds a oneDNN path missing or wrong, every function
falls back to F.linear. Also here: what this CPU is (`cpu_description`), for the lines that
print a time.
"""
import functools
import os
import platform
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

# On CPU in float32, torch's F.linear calls MKL's sgemm, which on AMD CPUs takes a slow generic
# path: oneDNN, which ships inside torch as well, runs the same products faster (docs/BENCHMARKS.md
# has the ratios per CPU). Its rows are also batch-invariant on the CPUs measured (a row's result
# does not depend on the other rows), MKL's are not. Results differ from MKL's in the last bits
# (another summation order), as any two BLAS do. None of this is assumed: `paths` checks it.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def paths(dtype):
    """The oneDNN paths that hold on this CPU in dtype, tried once at first use on small random
    products (their own generator: no random numbers of a run are consumed) -> a set of
      "product"  mm_nt runs (oneDNN has no bf16 inner product on a CPU without AVX512-BF16/AMX,
                 or under ONEDNN_MAX_CPU_ISA=AVX2) and equals F.linear's result to rounding;
      "packed"   a weight in oneDNN's blocked layout gives the same product, bit for bit;
      "fused"    one product over stacked weights equals the separate products, bit for bit;
      "rows"     a row's result does not depend on the other rows of the batch (generate.generate_seeds).
    Empty where oneDNN is absent. An unexpected failure counts as a missing path, never an error:
    the plain F.linear path is always there."""
    if not ONEDNN:
        return frozenset()
    g = torch.Generator().manual_seed(0)
    x, w, w2 = (torch.randn(n, 96, generator=g).to(dtype) for n in (12, 40, 24))
    want = F.linear(x.double(), w.double())  # the exact product of the (rounded) inputs
    tol = (1e-5 if dtype == torch.float32 else 1e-2) * want.abs().max().item()
    got = set()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        try:
            y = mm_nt(x, w)
            if y.dtype != dtype or (y.double() - want).abs().max().item() > tol:
                return frozenset()
            got.add("product")
            if torch.equal(mm_nt(x, torch.ops.mkldnn._reorder_linear_weight(w, None)), y):
                got.add("packed")
                ws = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w, w2]), None)
                if torch.equal(mm_nt(x, ws), torch.cat([y, mm_nt(x, w2)], -1)):
                    got.add("fused")
            x3 = torch.cat([x[5:], x, x[:7]])
            if all(torch.equal(mm_nt(x3, w)[7:19], y) and torch.equal(mm_nt(x[i:i + 5], w), y[i:i + 5])
                   for i in (0, 7)):
                got.add("rows")
        except RuntimeError:
            pass
    return frozenset(got)


def onednn_ok(x, w, bf16=False, path="product"):
    # not under CPU autocast: there F.linear computes in bf16, and so must we. bf16=True also
    # takes bf16 inputs (quant.NF4Linear's products under --nf4-compute bfloat16).
    dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
    return (ONEDNN and x.device.type == "cpu" and x.dtype in dtypes and w.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu") and path in paths(x.dtype))


def cpu_flags():
    """The instruction-set extensions this CPU reports that decide our kernels (Linux's
    /proc/cpuinfo; empty elsewhere)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


@functools.cache
def cpu_description():
    """This CPU in one line: its model, cores, the widest instruction set torch's kernels use and
    whether bf16 products are native, e.g. "AMD EPYC, 2 cores, AVX-512 + AVX512-BF16". An
    ONEDNN_MAX_CPU_ISA or ATEN_CPU_CAPABILITY cap (one CPU playing another) is said, as emulated."""
    name = platform.processor() or platform.machine()
    try:
        text = open("/proc/cpuinfo").read()
        name = next((ln.partition(":")[2].strip() for ln in text.splitlines()
                     if ln.startswith(("model name", "Model", "CPU part"))), name)
    except OSError:
        pass
    flags = cpu_flags()
    if platform.machine() in ("x86_64", "AMD64"):
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/AVX"
        native = [n for n, f in (("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_tile")) if f in flags]
    else:
        isa = platform.machine()
        native = ["BF16"] if "bf16" in flags else []
    caps = [f"{v}={os.environ[v]}" for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(v)]
    bf16 = "bf16 products native" if "product" in paths(torch.bfloat16) else "no bf16 products"
    said = f"{name}, {os.cpu_count()} cores, {' + '.join([isa] + native)}"
    if caps:
        said += f", emulating a smaller CPU ({', '.join(caps)}: torch's kernels {torch.backends.cpu.get_cpu_capability()}, {bf16})"
    return said


def mm_nt(x, w):
    """x @ w.T without autograd; w may be a oneDNN-packed weight (packed_weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def packed_weight(owner, name, w):
    """w in oneDNN's blocked layout, made once and kept on `owner` (not a parameter or buffer,
    so state dicts are unchanged) until the tensor is replaced or modified in place. w may be a
    list of weights with the same input size: their rows stacked, one product for all."""
    ws = w if isinstance(w, (list, tuple)) else [w]
    key = tuple((t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride())) for t in ws)
    got = owner.__dict__.get(name)
    if got is None or got[0] != key:
        dense = torch.cat([t.detach() for t in ws]) if len(ws) > 1 else ws[0].detach().contiguous()
        got = (key, torch.ops.mkldnn._reorder_linear_weight(dense, None))
        owner.__dict__[name] = got
    return got[1]


def fused_linears(owner, name, x, *linears):
    """The outputs of several plain frozen Linear layers on the same input as one oneDNN product
    over their stacked weights (split back), or None where that does not apply (training, LoRA,
    NF4, not CPU float32). Bit for bit the separate products: each output column is the same
    dot product (tests/test_model.py), only the number of calls per token shrinks."""
    if (x.requires_grad and torch.is_grad_enabled()) or not all(type(m) is Linear and not m.weight.requires_grad
                                                                 for m in linears):
        return None
    ws = [m.weight for m in linears]
    if not onednn_ok(x, ws[0], path="fused"):
        return None
    return mm_nt(x, packed_weight(owner, name, ws)).split([w.shape[0] for w in ws], -1)


def frozen(owner, w):
    """Whether w's packed copy may be made and kept: a frozen weight of a module, on a CPU where
    the packed product is the plain one's."""
    return owner is not None and not w.requires_grad and "packed" in paths(w.dtype)


class OneDNNLinear(torch.autograd.Function):
    """y = x w^T through oneDNN; dx = dy w through oneDNN (with a packed w^T when the weight is
    frozen); dw = dy^T x, when the weight trains, by whichever of oneDNN and MKL is the faster
    for its shape."""

    @staticmethod
    def forward(ctx, x, w, owner):
        ctx.owner = owner
        ctx.save_for_backward(x if w.requires_grad else None, w)
        return mm_nt(x, packed_weight(owner, "_packed", w) if frozen(owner, w) else w)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            wt = packed_weight(ctx.owner, "_packed_t", w.t()) if frozen(ctx.owner, w) else w.t()
            gx = mm_nt(gy.contiguous(), wt)
        if ctx.needs_input_grad[1]:  # (out, rows) @ (rows, in)
            gy2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
            # oneDNN is the faster for a short output (LoRA's A: r x in), MKL for a short input (B: out x r)
            gw = mm_nt(gy2.t(), x2.t()) if w.shape[0] <= w.shape[1] else gy2.t() @ x2
        return gx, gw, None


def linear(x, w, owner=None):
    """F.linear(x, w) (no bias), through oneDNN on CPU in float32. owner (a module) keeps the
    weight's packed copies when the weight is frozen; without it the weight is used as it is."""
    if not onednn_ok(x, w):
        return F.linear(x, w)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return OneDNNLinear.apply(x, w, owner)
    return mm_nt(x, packed_weight(owner, "_packed", w) if frozen(owner, w) else w)


class Linear(nn.Linear):
    """nn.Linear without bias, its product through `linear` (oneDNN on CPU)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return linear(x, self.weight, self)


def _fused(key, *names):
    """A module's method computing its linears `names` on one input: one product where
    fused_linears applies, else each its own (as the model's own method does)."""
    def project(self, x):
        linears = [getattr(self, n) for n in names]
        return fused_linears(self, key, x, *linears) or tuple(m(x) for m in linears)
    return project


FUSED = {"qkv": _fused("_packed_qkv", "q_proj", "k_proj", "v_proj"),
         "gate_up": _fused("_packed_gate_up", "gate_proj", "up_proj")}


def use_onednn(model):
    """Apply this file to a built model, from outside, as quant.quantize_model applies 4 bits:
    every plain bias-free nn.Linear becomes a `Linear` (the same module and parameters, its
    class swapped), and the modules' qkv / gate_up methods (model.Attention, model.MLP) become
    one fused product where it applies. Where oneDNN's paths do not hold, `Linear` is F.linear
    and nothing is fused: applying it is always safe. Returns the model."""
    for m in model.modules():
        if type(m) is nn.Linear and m.bias is None:
            m.__class__ = Linear
        for name, project in FUSED.items():
            if callable(getattr(type(m), name, None)):
                setattr(m, name, types.MethodType(project, m))
    return model


def rows_independent(model):
    """Whether a row's outputs do not depend on the other rows of the batch: every product of
    the model through oneDNN on this CPU where its probe found "rows" (the sampler then runs
    several seeds as one batch, generate.generate_seeds). A plain nn.Linear left anywhere
    (MKL's F.linear) rules it out."""
    w = model.embed_tokens.weight
    return onednn_ok(w, w, path="rows") and not any(type(m) is nn.Linear for m in model.modules())
