"""Where a run's model lives: its device, or its layers split over devices (pipelined in
micro-batches), and the memory plan that chooses the split before anything is loaded.

The mission's hardware is two 24 GB cards without NVLink. Llama-3-8B in NF4 fits on one card,
but its bf16 copy for sampling, the LoRA optimizer state, activations at sequence 1024 and a
128k-vocabulary head do not all fit together; split over two cards they do.

- `--devices cuda:0,cuda:1` puts the embedding and the first blocks on the first device and
  the rest, the final norm and the head on the last. `plan()` chooses the split so that the
  device with the most to hold holds as little as possible (`balance`), from the shapes alone.
- Activations hop between devices in `model.to_layer` (one (B, T, dim) copy per boundary);
  each layer's KV cache lives on its own device.
- `GPipe` runs micro-batches in GPipe's order (Huang et al., 2019): at clock tick k,
  stage s works on micro-batch k - s. CUDA launches are asynchronous, so while the second
  card runs micro-batch m the first is already on m + 1; backward, one call over the summed
  loss, is pipelined the same way by autograd's per-device threads.
"""
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

import data
import lora
import model as M
import quant
from machinery import kernels, loader

GiB = 2 ** 30
# What a card holds beyond the tensors a step needs: the CUDA context and the libraries' handles,
# outside PyTorch's allocator, and the caching allocator's freed blocks kept for reuse, a share
# of the bytes that come and go (activations, logits, recomputed blocks, the KV cache). Both
# from `make gpu-check` on the first card it ran on (docs/BENCHMARKS.md has the run).
CONTEXT = 0.75 * GiB  # each CUDA device, before any tensor
CACHE_SLACK = 0.3     # on the bytes that come and go
# GiB per card for `--plan --card NAME`, so a plan can be made for cards this machine does not
# have: the memory each is sold with. The card itself reports a little less to torch (the plan on
# the card reads that), so a plan that fits with only a few percent to spare is worth --device-mem.
CARDS = {"3090": 24, "4090": 24, "a100-40": 40, "a100-80": 80, "h100": 80, "h200": 141}


# ----------------------------------------------------------------------------- placement

def device_of(s):
    """The (first) device: inputs go there. With --devices, the last one holds the head."""
    if s.devices:
        return torch.device(s.devices.split(",")[0])
    return torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def compute_dtype(dev):
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def autocast(dev, on=None):
    """bf16 autocast, by default on CUDA only (tests turn it off to compare in float32). Training
    and reference scoring both run under it, in the same batches, so that the log-ratio at
    step 0 is exactly 0 (bitsandbytes picks its kernels by the number of rows)."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" if on is None else on)


def run_plan(s, path):
    """(split bounds, per-device rows) for a run's flags: --devices, or its one device as one stage."""
    devices = s.devices.split(",") if s.devices else [str(device_of(s))]
    gib = s.device_mem or CARDS.get(s.card, 0)
    caps = [gib * GiB] * len(devices) if gib else None
    return plan(M.Config.from_hf(path), devices, workload(s, torch.finfo(compute_dtype(device_of(s))).bits // 8), caps)


def load(s, path, quantized=False):
    """pi_t on the device(s): bf16/fp32 for sampling, NF4 for scoring and training, its CPU
    products through oneDNN where they hold (kernels.use_onednn)."""
    dev, where, bounds = device_of(s), device_of(s), None
    if s.devices:
        bounds, _ = run_plan(s, path)
        where = device_map(bounds, s.devices.split(","))
    if quantized:
        m = quant.quantize_model(path, compute_dtype(dev), where, quant_type=s.quant_type,
                                 product_dtype=quant.product_dtype(dev, s.nf4_compute))
    else:
        m = M.load_model(path, compute_dtype(dev), where)
    kernels.use_onednn(m)
    m.stage_bounds = bounds
    if torch.cuda.is_available():  # the loader's transient full-precision tensors: back to the card
        torch.cuda.empty_cache()
    return m


def device_map(bounds, devices):
    """name -> device for a split whose stage s holds layers bounds[s]:bounds[s + 1]."""
    def where(key):
        if key.startswith("embed_tokens."):
            return torch.device(devices[0])
        if key.startswith("layers."):
            i = int(key.split(".")[1])
            return torch.device(next(d for s, d in enumerate(devices) if bounds[s] <= i < bounds[s + 1]))
        return torch.device(devices[-1])  # final norm and head
    return where


class GPipe(torch.nn.Module):
    """A model split over devices, run in micro-batches in GPipe's order: wraps the built model
    from outside and offers what data.sequence_logps needs, forward(ids, head=False) and
    logits(h). Used for training and scoring (right-padded rows, pair rows' masks; no KV cache).

    The batch is cut into `chunks` micro-batches; at tick k stage s runs micro-batch k - s,
    the last stage's work issued first.
    The result equals model(ids, head=False, attn_mask, pos): rows never interact, so only the
    order of the work changes.
    """

    def __init__(self, model, chunks):
        super().__init__()
        self.model, self.chunks = model, chunks

    def logits(self, h):
        return self.model.logits(h)

    def forward(self, ids, head=False, attn_mask=None, pos=None):
        assert not head, "GPipe returns hidden states; the caller runs the head where it needs it"
        model = self.model
        bounds = getattr(model, "stage_bounds", None) or [0, len(model.layers)]
        n = max(1, min(self.chunks, ids.shape[0]))
        parts = list(ids.chunk(n))
        masks, poss = [list(x.chunk(n)) if x is not None else [None] * len(parts) for x in (attn_mask, pos)]
        xs, ctxs = [None] * len(parts), [None] * len(parts)
        n_stages = len(bounds) - 1
        for tick in range(len(parts) + n_stages - 1):
            # Last stage first: stage s + 1's copy of micro-batch k - s - 1 from stage s's device is
            # queued on that device before stage s's work on micro-batch k - s, so the copy does not
            # wait behind it and both devices compute at once.
            for s in reversed(range(n_stages)):
                m = tick - s
                if not 0 <= m < len(parts):
                    continue
                if s == 0:
                    xs[m], ctxs[m] = model.embed(parts[m], masks[m], poss[m])
                xs[m], ctxs[m] = run_stage(model, xs[m], ctxs[m], bounds[s], bounds[s + 1])
        return torch.cat([model.finish(x, head=False) for x in xs])


def run_stage(model, x, ctx, lo, hi):
    """Layers lo..hi-1, as model.forward runs them."""
    for layer in model.layers[lo:hi]:
        x, ctx = M.to_layer(layer, x, ctx)
        x = checkpoint(layer, x, *ctx, use_reentrant=False) if model.grad_ckpt else layer(x, *ctx)
    return x, ctx


def micro_batched(model, chunks):
    """The model itself for one micro-batch; GPipe over it for more."""
    return GPipe(model, chunks) if chunks > 1 else model


# ----------------------------------------------------------------------------- the memory plan

@dataclass
class Workload:
    """What a run asks of the devices; sppo.py fills it from its flags."""
    lora_r: int = 16
    targets: tuple = quant.LINEARS  # the LoRA-adapted linears of each block
    train_seqs: int = 16          # 2 x the pairs in a training micro-batch (chosen and rejected)
    seq_len: int = 256            # the longest prompt + response; a pair's row (prompt, chosen, rejected) < 2 x seq_len
    resp_len: int = 96            # response tokens per sequence (where the LM head runs)
    grad_ckpt: bool = False
    gen_batch: int = 24           # prompts sampled together
    gen_len: int = 224            # prompt + new tokens in sampling
    compute_bytes: int = 2        # bf16 on GPU

    @property
    def expanded_kv(self):
        """Whether training's masked attention expands K/V (model.Attention.attend does off CPU,
        where the compute dtype is bf16; on CPU it is float32)."""
        return self.compute_bytes < 4


def workload(s, compute_bytes):
    """The Workload of a run's flags (sppo.Settings)."""
    return Workload(lora_r=s.lora_r, targets=tuple(s.lora_targets.split(",")), train_seqs=2 * s.batch_size,
                    seq_len=s.max_len, resp_len=s.max_len - min(s.max_prompt_len, s.max_len // 2),
                    grad_ckpt=s.grad_ckpt, gen_batch=max(s.gen_batch, s.eval_batch),
                    gen_len=s.max_prompt_len + s.max_new_tokens, compute_bytes=compute_bytes)


def activation_bytes(cfg: M.Config, c, expanded_kv=False):
    """Bytes one block keeps for backward per token, counted from the code (model.Block with
    LoRA on all seven linears): in the compute dtype, the normed inputs, q/k/v before and
    after RoPE, the attention output, o_proj's input, three (tokens x ffn) MLP tensors (gate,
    up and down_proj's input; act(gate) is recomputed in backward, model.GatedAct); in
    float32, both RMSNorms' upcast inputs. (LoRA's own inputs are the linears' inputs, already
    counted: under bf16 autocast LoRALinear leaves them in bf16.) tests/test_pipeline.py checks
    this against the bytes autograd actually saves (in float32; `make gpu-check` in bf16).
    expanded_kv: off CPU, attention with a mask (training's pair rows always have one) runs on
    K/V expanded to every query head (model.Attention.attend), and keeps them too."""
    d, kv, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    return c * (2 * cfg.dim + 4 * d + 4 * kv + 3 * f + (2 * d if expanded_kv else 0)) + 4 * 2 * cfg.dim


def stage_costs(cfg: M.Config, w: Workload):
    """Per layer: (training bytes, sampling bytes). Training holds NF4 weights, LoRA weights,
    grads and two AdamW moments in float32, and the activations; sampling holds bf16 weights
    and the KV cache."""
    c = w.compute_bytes
    _, nf4_block = quant.shape_bytes(_one_block(cfg), r=0)
    lora = sum(16 * w.lora_r * (i + o) for name, (o, i) in _linears(cfg).items() if name in w.targets)
    tokens = w.train_seqs * w.seq_len
    act = tokens * (c * cfg.dim if w.grad_ckpt else activation_bytes(cfg, c, w.expanded_kv))
    block_params = sum(o * i for o, i in _linears(cfg).values()) + 2 * cfg.dim
    kv = 2 * cfg.n_kv_heads * cfg.head_dim * c * w.gen_batch * w.gen_len
    return nf4_block + lora + act * (1 + CACHE_SLACK), c * block_params + kv * (1 + CACHE_SLACK)


def _linears(cfg):
    d, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q_proj": (d, cfg.dim), "k_proj": (kv, cfg.dim), "v_proj": (kv, cfg.dim), "o_proj": (cfg.dim, d),
            "gate_proj": (cfg.ffn_dim, cfg.dim), "up_proj": (cfg.ffn_dim, cfg.dim), "down_proj": (cfg.dim, cfg.ffn_dim)}


def _one_block(cfg):
    """The config of a model that is one block and nothing else (for shape_bytes)."""
    from dataclasses import replace
    return replace(cfg, n_layers=1, vocab_size=1, tie_embeddings=True)


def edge_costs(cfg: M.Config, w: Workload, split):
    """Extra bytes of the first device (embedding) and the last (norm, head, logits, and the
    one block's activations that checkpointing recomputes), each as (training, sampling)."""
    c, V = w.compute_bytes, cfg.vocab_size
    emb = c * V * cfg.dim
    head = 0 if cfg.tie_embeddings and not split else c * V * cfg.dim
    # The head runs on response positions only: logits in the compute dtype, their float32
    # copy and the float32 log-softmax cross-entropy keeps for backward.
    logits = w.train_seqs * w.resp_len * V * (c + 8)
    gen_logits = w.gen_batch * V * 4
    recompute = w.train_seqs * w.seq_len * activation_bytes(cfg, c, w.expanded_kv) if w.grad_ckpt else 0
    first = (emb, emb)
    last = (head + (logits + recompute) * (1 + CACHE_SLACK), head + gen_logits * (1 + CACHE_SLACK))
    return first, last


def balance(costs, first, last, caps):
    """Contiguous split of layers into len(caps) stages minimising the largest used fraction
    of a device. costs[i] = (train, sample) bytes of layer i; first/last are the extras of
    the first and last stage. A small dynamic programme: layers <= 128, stages <= 8."""
    L, S = len(costs), len(caps)
    pre = [(0, 0)]
    for t, g in costs:
        pre.append((pre[-1][0] + t, pre[-1][1] + g))

    def load(s, a, b):  # bytes of stage s holding layers a..b-1: the worse of its two phases
        t, g = pre[b][0] - pre[a][0], pre[b][1] - pre[a][1]
        for on, (et, eg) in ((s == 0, first), (s == S - 1, last)):
            if on:
                t, g = t + et, g + eg
        return max(t, g) / caps[s]

    best = {(0, 0): (0.0, [0])}
    for s in range(S):
        nxt = {}
        for (_, a), (worst, bounds) in best.items():
            ends = [L] if s == S - 1 else range(a + 1, L - (S - s - 1) + 1)
            for b in ends:
                cand = (max(worst, load(s, a, b)), bounds + [b])
                if (s + 1, b) not in nxt or cand[0] < nxt[(s + 1, b)][0]:
                    nxt[(s + 1, b)] = cand
        best = nxt
    return best[(S, L)][1]


def plan(cfg: M.Config, devices, w: Workload, caps=None):
    """The split and, per device, what it will hold. caps: bytes per device (default: each
    CUDA device's total memory; 24 GiB for anything else, the mission's card)."""
    if len(devices) > cfg.n_layers:
        raise ValueError(f"{len(devices)} devices for {cfg.n_layers} layers: at most one device per layer")
    caps = caps or [device_capacity(d) for d in devices]
    context = [CONTEXT if torch.device(d).type == "cuda" else 0 for d in devices]
    costs = [stage_costs(cfg, w)] * cfg.n_layers
    first, last = edge_costs(cfg, w, split=len(devices) > 1)
    bounds = balance(costs, first, last, [c - x for c, x in zip(caps, context)])
    rows = []
    for s, dev in enumerate(devices):
        n = bounds[s + 1] - bounds[s]
        t, g = n * costs[0][0], n * costs[0][1]
        if s == 0:
            t, g = t + first[0], g + first[1]
        if s == len(devices) - 1:
            t, g = t + last[0], g + last[1]
        rows.append({"device": dev, "layers": f"{bounds[s]}-{bounds[s + 1] - 1}", "train": t + context[s],
                     "sample": g + context[s], "capacity": caps[s]})
    return bounds, rows


def device_capacity(dev):
    d = torch.device(dev)
    if d.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(d.index or 0).total_memory
    return 24 * GiB


def print_plan(rows, errors=True):
    """The plan as a table; returns False (and, with errors, says which device) when something
    will not fit."""
    print("| device | layers | training peak | sampling peak | capacity |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['layers']} | {r['train'] / GiB:.2f} GiB | {r['sample'] / GiB:.2f} GiB "
              f"| {r['capacity'] / GiB:.1f} GiB |")
    print(f"(estimates from the shapes; a CUDA device also pays {CONTEXT / GiB:.2f} GiB of context, included)")
    for problem in plan_problems(rows) if errors else []:
        print(f"error: {problem}")
    return not plan_problems(rows)


# what to lower when a phase does not fit, named with the flags that set its size
PHASE_FLAGS = {"train": "lower --batch-size or --max-len, or add --grad-ckpt",
               "sample": "lower --gen-batch and --eval-batch, or --max-new-tokens or --max-prompt-len"}


def plan_problems(rows):
    """One message per device that does not fit, naming the phase and the flags that size it."""
    out = []
    for r in rows:
        over = [ph for ph in ("train", "sample") if r[ph] > r["capacity"]]
        if over:
            what = " and ".join(f"{'training' if ph == 'train' else 'sampling'} {r[ph] / GiB:.1f} GiB" for ph in over)
            out.append(f"{r['device']} needs {what} of its {r['capacity'] / GiB:.1f} GiB: "
                       + "; ".join(PHASE_FLAGS[ph] for ph in over) + ", or add a device to --devices")
    return out


# ----------------------------------------------------------------------------- measured vs planned

def random_tensors(cfg: M.Config, dtype, where, seed=0):
    """HF-named tensors of a random model of cfg's shapes, one at a time, each drawn on its own
    device from a generator seeded by its name's position (so two stacks built from them, ours
    and transformers' in bench.py, hold the same weights): norms 1, the rest N(0, 0.02^2)."""
    with torch.device("meta"):
        skeleton = M.create(cfg)
    for i, (name, p) in enumerate(skeleton.named_parameters()):
        dev = torch.device(where(name))
        g = torch.Generator(device=dev).manual_seed(seed * 10 ** 6 + i)
        t = torch.ones(p.shape, dtype=dtype, device=dev) if "norm" in name else \
            torch.randn(p.shape, dtype=dtype, device=dev, generator=g) * 0.02
        yield ("model." + name if name != "lm_head.weight" else name), t, "random weights"


def random_model(cfg: M.Config, devices, bounds, compute_dtype, lora_r=16, seed=0, quantized=True):
    """A model of cfg's shapes with random weights (random_tensors), built in place on its devices:
    nothing to download, nothing to load. quantized: each target linear is drawn in the compute
    dtype on its own device and quantized to NF4 at once, so an 8B model never exists in full
    precision; False: left in the compute dtype, as sampling loads pi_t. LoRA of rank lora_r on
    top (0: none)."""
    where = device_map(bounds, devices)
    tensors = random_tensors(cfg, compute_dtype, where, seed)
    if quantized:
        m = quant.quantize_model(None, compute_dtype, where, cfg=cfg, tensors=tensors)
    else:
        with torch.device("meta"):
            m = M.create(cfg)
        loader.load_state(m, None, compute_dtype, where, tensors=tensors)
    kernels.use_onednn(m)
    m.stage_bounds = bounds
    if lora_r:
        torch.manual_seed(seed)  # the LoRA A matrices
        lora.add_lora(m, lora.LoRAConfig(r=lora_r))
    return m.eval()


def check(cfg: M.Config, devices, w: Workload, micro_batches=2, steps=3, caps=None):
    """Train a random NF4 + LoRA model of cfg's shapes split over devices, as sppo.train does
    (pipelined forward, loss on response positions, backward, AdamW), and print each device's
    measured peak beside the plan's estimate, and the training tokens/s. caps: as plan's."""
    import time
    dev = torch.device(devices[0])
    cuda, dtype = dev.type == "cuda", compute_dtype(dev)
    w.compute_bytes = torch.finfo(dtype).bits // 8
    bounds, rows = plan(cfg, devices, w, caps)
    m = random_model(cfg, devices, bounds, dtype, w.lora_r)
    m.grad_ckpt = w.grad_ckpt
    params = list(lora.lora_params(m).values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, seg = pair_rows(cfg, w, devices[0])
    if cuda:
        # what building left in the allocator's cache is not training's: give it back, then count
        # (uncounted, it made the first measured peak several GiB above training's own)
        torch.cuda.empty_cache()
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with autocast(dev):
            logps = data.sequence_logps(micro_batched(m, micro_batches), ids, seg)  # as sppo.train_step
        (logps.float() / w.resp_len).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            for d in devices:
                torch.cuda.synchronize(d)
        times.append(time.perf_counter() - t)
    tok_s = w.train_seqs * w.seq_len / min(times[1:] or times)  # prompt + response, twice per pair: bench.py's count
    print("| device | layers | planned training peak | measured peak |\n|---|---|---|---|")
    for r in rows:
        got = (f"{(torch.cuda.max_memory_allocated(r['device']) + CONTEXT) / GiB:.2f} GiB allocated (incl. {CONTEXT / GiB:.2f} context)"
               if cuda else "n/a (not measurable per device on CPU)")
        print(f"| {r['device']} | {r['layers']} | {r['train'] / GiB:.2f} GiB | {got} |")
    print(f"training: {tok_s:.0f} tokens/s ({ids.shape[0]} pair rows x {ids.shape[1]}, {micro_batches} micro-batches, "
          f"grad_ckpt={w.grad_ckpt}, best of {steps} steps after the first)")
    return rows, tok_s, m


def pair_rows(cfg: M.Config, w: Workload, device, seed=0):
    """Random training rows as data.pair_tensors lays them out: train_seqs / 2 pairs, each a
    prompt of seq_len - resp_len tokens, then chosen and rejected of resp_len. -> ids, segment ids."""
    g = torch.Generator().manual_seed(seed)
    x = w.seq_len - w.resp_len
    ids = torch.randint(0, cfg.vocab_size, (w.train_seqs // 2, x + 2 * w.resp_len), generator=g).to(device)
    seg = torch.tensor([0] * x + [1] * w.resp_len + [2] * w.resp_len, device=device).expand_as(ids)
    return ids, seg


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="The memory plan for Llama-3-8B's shapes; --check measures it on real devices.")
    ap.add_argument("--devices", default="cuda:0,cuda:1")
    ap.add_argument("--check", action="store_true", help="build a random NF4 + LoRA r=16 model and train a few steps")
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model of small shapes instead of Llama-3-8B (a smoke run)")
    ap.add_argument("--seqs", type=int, default=4, help="sequences per training batch")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--no-grad-ckpt", action="store_true")
    a = ap.parse_args(argv)
    cfg = (M.Config(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)
           if a.tiny else M.LLAMA3_8B)
    w = Workload(train_seqs=a.seqs, seq_len=a.seq_len, resp_len=a.seq_len // 2, grad_ckpt=not a.no_grad_ckpt,
                 gen_batch=16, gen_len=a.seq_len + a.seq_len // 2)
    devices = a.devices.split(",")
    if a.check:
        return check(cfg, devices, w, a.micro_batches)
    bf16, nf4 = quant.shape_bytes(cfg, r=16)
    print(f"weights: bf16 {bf16 / GiB:.1f} GiB, NF4 + LoRA r=16 on all linears {nf4 / GiB:.1f} GiB")
    bounds, rows = plan(cfg, devices, w, caps=[24 * GiB] * len(devices))
    print_plan(rows)
    print("bounds", bounds)


if __name__ == "__main__":  # python pipeline.py: the plan of Llama-3-8B on two 24 GB cards
    main()
