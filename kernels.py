"""kernels.py: the model's products on CPU in float32 (and NF4's in bf16), through oneDNN instead of MKL.

Nothing here changes what is computed, only which library multiplies: model.py builds its
linears as `Linear` and fuses q/k/v and gate/up with `fused_linears` where nothing trains;
quant.py and lora.py multiply through `linear` / `mm_nt`. On a GPU, or in another dtype, every
function falls back to F.linear.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# On CPU in float32, torch's F.linear calls MKL's sgemm, which on AMD CPUs (this project's
# EPYC machines) takes a slow generic path: oneDNN, which ships inside torch as well, runs the
# same products 1.4x (one row, sampling) to 2.3x (batch 16 and training shapes) faster. Its
# rows are also batch-invariant (a row's result does not depend on the other rows), MKL's are
# not. Results differ from MKL's in the last bits (another summation order), as any two BLAS do.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_ok(x, w, bf16=False):
    # not under CPU autocast: there F.linear computes in bf16, and so must we. bf16=True also
    # takes bf16 inputs (quant.NF4Linear's products under --nf4-compute bfloat16).
    dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
    return (ONEDNN and x.device.type == "cpu" and x.dtype in dtypes and w.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu"))


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
    if not onednn_ok(x, ws[0]):
        return None
    return mm_nt(x, packed_weight(owner, name, ws)).split([w.shape[0] for w in ws], -1)


class OneDNNLinear(torch.autograd.Function):
    """y = x w^T through oneDNN; dx = dy w through oneDNN (with a packed w^T when the weight is
    frozen); dw = dy^T x, when the weight trains, by whichever of oneDNN and MKL is the faster
    for its shape."""

    @staticmethod
    def forward(ctx, x, w, owner):
        ctx.owner = owner
        ctx.save_for_backward(x if w.requires_grad else None, w)
        frozen = owner is not None and not w.requires_grad
        return mm_nt(x, packed_weight(owner, "_packed", w) if frozen else w)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        frozen = ctx.owner is not None and not w.requires_grad
        gx = gw = None
        if ctx.needs_input_grad[0]:
            wt = packed_weight(ctx.owner, "_packed_t", w.t()) if frozen else w.t()
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
    return mm_nt(x, packed_weight(owner, "_packed", w) if owner is not None and not w.requires_grad else w)


class Linear(nn.Linear):
    """nn.Linear without bias, its product through `linear` (oneDNN on CPU)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return linear(x, self.weight, self)
