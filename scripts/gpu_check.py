"""gpu_check.py: `make gpu-check`, a preflight for real hardware that takes minutes, not hours.

Before a run of many hours, prove that this machine's cards do every part of it, and measure
what it will cost. Each step runs in its own process, so one failure cannot hide the others and
every step starts with empty cards; it reports one `GPUCHECK {json}` line, and the summary at
the end is built from those lines:

  env       torch and CUDA versions, each card and its free memory, bitsandbytes' 4-bit kernels
            on each card (a matmul and its input gradient against the dequantized weight), and
            whether vLLM imports
  tests     tests/test_pipeline.py's split / gradient / generation checks on each card and on a
            split over two cards (cuda:0,cuda:0 with one card), and its CUDA-graph decode check
  train     a random Llama-3-8B-shaped NF4 + LoRA model, split as the plan says, trained a few
            steps at the walkthrough's settings (pipeline.check): peak memory per card against
            the plan, training and reference-scoring tokens/s
  sample    the same shapes in bf16, as the sampler holds them: tokens/s at batch 1 and 16 (decode
            steps replayed as CUDA graphs; batch 1 also without), peak memory per card against the
            plan; on one card the same in NF4
  judge     a PairRM of its real size with random weights (judge.build_pairrm "large") judging
            K=5 answers on the first card: our judge's prompts/s against llm-blender's
            rank(batch_size=1), as the SPPO authors' rank.py calls it, and its peak memory
  e2e       one tiny SPPO iteration through sppo.py on the cards, every stage; the disk's read
            and write rates (what merging a checkpoint costs)
  e2e-vllm  the same with --backend vllm (skipped when vLLM does not import)

A card whose measured peak is more than 10% above the plan fails its step: the plan is what
`--plan` promises before a long run. From the measured rates it estimates the hours of one
iteration at the paper's scale (20k prompts, K=5, up to 512 new tokens, 3 epochs), every stage:
generate, judge, reference scoring, train, merge and the held-out evaluation; beside it the same
for 2 x RTX 4090, scaled from published bandwidth and bf16 throughput (not measured).

--mem-cap GiB caps every card at that much for each step (torch's per-process memory fraction),
and plans under it: an H200 plays a 24 GB card.

    python scripts/gpu_check.py                          # what `make gpu-check` runs; exit 1 if a step failed
    python scripts/gpu_check.py --out gpu_check.jsonl    # also keep the step results (for docs/BENCHMARKS.md)
    python scripts/gpu_check.py --device cpu             # the same steps on CPU with tiny shapes (the tests)
    python scripts/gpu_check.py --mem-cap 24             # every step inside 24 GiB per card

Without CUDA there is nothing to check: one line, exit status 0 (CI stays green).

What it calls in the rest of the project: sppo.parse_args, main; pipeline.workload, plan,
print_plan, check, random_model, pair_rows, micro_batched, compute_dtype, autocast, CONTEXT;
model.Config, LLAMA3_8B, sequence_logps, generate, Attention; quant.NF4Linear; judge.build_pairrm,
PairRMJudge, prob_matrix, sigmoid; bench.pairrm_inputs; tests/tiny.py's
make_tiny_chat_model and the device tests of tests/test_pipeline.py and tests/test_devices.py
(DEVICE_TESTS).

What it shows that only a GPU can: bitsandbytes' CUDA kernels; masked attention
running on SDPA's memory-efficient kernel (env); LoRA's initial adapter equal for any split over
two cards (tests); the two cards overlapping in GPipe's forward (train: scoring with 2
micro-batches against 1); a training run killed after its first checkpoint resuming on the
split (e2e), and its step-0 mean |log-ratio|; vLLM starting after the parent used the cards
(e2e-vllm: it samples again after training).
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # the repository root
sys.path.insert(0, str(HERE))  # its modules, imported by the steps
GiB = 2 ** 30
TAG = "GPUCHECK "      # a step's result line starts with this
SLACK = 0.10           # a measured peak may exceed the plan by this fraction

# README's walkthrough (Llama-3-8B-Instruct on two RTX 4090s), as sppo.py flags; --device cpu
# and --tiny use the small version.
WALKTHROUGH = ("--grad-ckpt --batch-size 4 --grad-accum 2 --micro-batches 2 --max-new-tokens 512 --max-len 1024 "
               "--max-prompt-len 512 --gen-batch 16 --eval-batch 16").split()
TINY_FLAGS = ("--grad-ckpt --batch-size 2 --micro-batches 2 --max-new-tokens 12 --max-len 48 --max-prompt-len 24 "
              "--gen-batch 4 --eval-batch 4 --lora-r 4").split()
TINY_SHAPES = dict(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)


@dataclass
class Check:
    """What the steps run on; the parent sends it to each step's process as JSON."""
    cards: list            # every card to test, e.g. ["cuda:0", "cuda:1"]; ["cpu"] with --device cpu
    split: str             # the pipeline of the shape steps and the e2e run, e.g. "cuda:0,cuda:1"
    tiny: bool = False     # small shapes instead of Llama-3-8B's (the CPU run of the tests)
    tests_filter: str = ""    # pytest -k for the tests step (the CPU run of the tests picks one test)
    batch1_tokens: int = 128  # new tokens timed at batch 1 (batch 16 runs the walkthrough's 512)
    mem_cap: float = 0.0      # GiB per card for every step (0: the card's own memory)

    @property
    def cuda(self):
        return self.cards[0].startswith("cuda")

    def caps(self, devices):
        """The plan's bytes per device: the cap when there is one, else each card's own (None)."""
        return [self.mem_cap * GiB] * len(devices) if self.mem_cap else None


@dataclass
class Iteration:
    """One SPPO iteration at the paper's scale, for the hours estimate."""
    prompts: int = 20_000
    k: int = 5
    new_tokens: int = 512   # --max-new-tokens
    seq_len: int = 1024     # --max-len: prompt + response in scoring and training
    epochs: int = 3
    eval_prompts: int = 100  # held-out prompts answered (greedily, to new_tokens) and judged both ways
    model_bytes: int = 16_060_522_496  # Llama-3-8B's bf16 checkpoint: merging reads and writes it once


# ----------------------------------------------------------------------------- the project
# The calls into sppo.py and the tests that need glue; the steps call the rest directly.

def settings(flags, devices):
    import sppo
    return sppo.parse_args(flags + ["--devices", devices])


def workload(s):
    import pipeline
    import torch
    return pipeline.workload(s, torch.finfo(pipeline.compute_dtype(pipeline.device_of(s))).bits // 8)


def llama3_8b_or_tiny(tiny):
    import model as M
    return M.Config(**TINY_SHAPES) if tiny else M.LLAMA3_8B


def run_sppo(argv):
    """sppo.py's command line in this process; returns its table of iterations."""
    import sppo
    return sppo.main(argv)


def make_tiny_model(path, hidden):
    sys.path.insert(0, str(HERE / "tests"))
    from tiny import make_tiny_chat_model
    return make_tiny_chat_model(path, layers=2, hidden=hidden)


DEVICE_TESTS = ["tests/test_pipeline.py::test_split_hidden_states_and_logits_match_one_device",
                "tests/test_pipeline.py::test_split_and_micro_batched_loss_and_lora_grads_match_full_batch",
                "tests/test_pipeline.py::test_split_greedy_generation_matches_one_device",
                "tests/test_devices.py::test_lora_a_is_drawn_on_the_cpu_so_the_adapter_does_not_depend_on_the_split",
                "tests/test_pipeline.py::test_static_cache_step_samples_the_growing_cache_steps_tokens"]


# ----------------------------------------------------------------------------- memory per card

def within_plan(planned, measured, slack=SLACK):
    """The rule: a measured peak may exceed the plan by at most `slack` (None: not measured)."""
    return measured is None or measured <= planned * (1 + slack)


def planned_by_card(rows, phase):
    """The plan's rows (one per stage) as {card: (layers, planned bytes)}: `cuda:0,cuda:0` puts
    two stages on one card, which holds both stages' bytes but pays the CUDA context once."""
    import pipeline
    out = {}
    for r in rows:
        if r["device"] in out:
            layers, planned = out[r["device"]]
            context = pipeline.CONTEXT if r["device"].startswith("cuda") else 0
            out[r["device"]] = (f"{layers}+{r['layers']}", planned + r[phase] - context)
        else:
            out[r["device"]] = (r["layers"], r[phase])
    return out


class CardMemory:
    """Each card's peak as the plan counts it: what is on the card outside PyTorch's allocator
    (the CUDA context, cuBLAS, any other process: the plan assumes the card is ours alone) plus
    the allocator's peak reservation (reserved, not allocated: fragmentation is real memory)."""

    def __init__(self, cards):
        import torch
        self.cards = [c for c in dict.fromkeys(cards) if c.startswith("cuda")]
        self.outside = {}
        for c in self.cards:
            torch.zeros(1, device=c)  # creates the context
            self.note_outside(c)

    def note_outside(self, c):
        import torch
        free, total = torch.cuda.mem_get_info(c)
        self.outside[c] = max(self.outside.get(c, 0), total - free - torch.cuda.memory_reserved(c))

    def reset(self):
        import torch
        for c in self.cards:
            torch.cuda.synchronize(c)
            torch.cuda.empty_cache()  # blocks cached by what came before are not this phase's peak
            torch.cuda.reset_peak_memory_stats(c)

    def rows(self, plan_rows, phase):
        """One row per card: layers, planned and measured bytes (measured None on CPU)."""
        import torch
        out = []
        for card, (layers, planned) in planned_by_card(plan_rows, phase).items():
            measured = allocated = None
            if card in self.cards:
                torch.cuda.synchronize(card)
                self.note_outside(card)  # lazily loaded kernels and handles grow it
                measured = self.outside[card] + torch.cuda.max_memory_reserved(card)
                allocated = torch.cuda.max_memory_allocated(card)
            out.append({"device": card, "phase": phase, "layers": layers, "planned": planned, "measured": measured,
                        "allocated": allocated})
        return out


# ----------------------------------------------------------------------------- the steps (each in its own process)

def step_env(c: Check):
    """Versions, cards, bitsandbytes' kernels on each card, vLLM."""
    import torch
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cards": [], "ok": True}
    import bitsandbytes
    out["bitsandbytes"] = bitsandbytes.__version__
    for d in c.cards:
        card = {"device": d}
        if d.startswith("cuda"):
            free, total = torch.cuda.mem_get_info(d)
            p = torch.cuda.get_device_properties(d)
            card.update(name=p.name, free=free, total=total, capability=f"{p.major}.{p.minor}")
        card["nf4_error"] = nf4_matmul_error(d)
        card["nf4_ok"] = all(e <= 2e-2 for e in card["nf4_error"].values())
        card["sdpa"] = masked_attention_kernel(d)
        out["ok"] &= card["nf4_ok"] and card["sdpa"] in ("memory-efficient", "n/a on CPU")
        out["cards"].append(card)
    out["vllm"] = vllm_version()
    names = ", ".join(f"{x['device']} {x.get('name', '')} {x['free'] / GiB:.1f}/{x['total'] / GiB:.1f} GiB free"
                      if "free" in x else x["device"] for x in out["cards"])
    worst = max(e for x in out["cards"] for e in x["nf4_error"].values())
    out["summary"] = (f"torch {out['torch']}, CUDA {out['cuda']}; {names}; bitsandbytes {out['bitsandbytes']} 4-bit "
                      f"matmul {'ok' if all(x['nf4_ok'] for x in out['cards']) else 'WRONG'} (max rel. error {worst:.1e}); "
                      f"masked attention kernel: {out['cards'][0]['sdpa']}; vLLM {out['vllm'] or 'not importable'}")
    return out


def masked_attention_kernel(dev):
    """Which fast SDPA kernel our attention gets in generation (a mask, GQA): with only the
    memory-efficient kernel allowed it must still run (SDPA's own GQA with a mask
    would leave it only the slow math kernel, in float32)."""
    import torch
    import model as M
    if not dev.startswith("cuda"):
        return "n/a on CPU"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = M.Config(dim=1024, n_heads=8, n_kv_heads=2, head_dim=128)
    attn = M.Attention(cfg)
    q = torch.randn(4, 8, 1, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(4, 2, 300, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(4, 1, 1, 300, dtype=torch.bool, device=dev)
    mask[1:, ..., :7] = False  # left padding
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            attn.attend(q, k, v, mask)
        return "memory-efficient"
    except RuntimeError as e:
        return f"NOT the memory-efficient one ({str(e).splitlines()[0][:120]})"


def nf4_matmul_error(dev):
    """Relative errors of the project's NF4 linear (bitsandbytes' quantize_4bit and matmul_4bit)
    against a plain matmul with the dequantized weight: a batch with the input gradient (training's
    path) and one row without (bitsandbytes' separate single-token kernel)."""
    import torch
    import pipeline
    import quant
    torch.manual_seed(0)
    dtype = pipeline.compute_dtype(torch.device(dev))
    lin = quant.NF4Linear(torch.randn(512, 1024, device=dev, dtype=dtype) * 0.02, dtype)
    w = lin.dequantize().to(dtype)
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    x = torch.randn(16, 1024, device=dev, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(16, 512, device=dev, dtype=dtype)
    y, y2 = lin(x), x2 @ w.t()
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    with torch.no_grad():
        one = rel(lin(x[:1].detach()), x2[:1].detach() @ w.t())
    return {"batch": rel(y, y2), "input_grad": rel(x.grad, x2.grad), "one_row": one}


def vllm_python():
    return os.environ.get("SPPO_VLLM_PYTHON", sys.executable)


def vllm_version():
    """vLLM's version in the Python the sampler would use (vllm_backend.py), or None."""
    try:
        r = subprocess.run([vllm_python(), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def step_tests(c: Check):
    """The device-parametrized tests on every card and on a split over two (test_pipeline.DEVICES):
    cuda:0,cuda:1, or cuda:0,cuda:0 with one card, so activations and gradients cross a stage
    boundary on the GPU either way."""
    two = ",".join(c.cards[:2] if len(c.cards) > 1 else c.cards * 2)
    entries = list(dict.fromkeys(c.cards + [two]))
    env = dict(os.environ, SPPO_TEST_DEVICES=";".join(entries))
    pick = ["-k", c.tests_filter] if c.tests_filter else []
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pick, *DEVICE_TESTS],
                       cwd=HERE, env=env, capture_output=True, text=True)
    print(r.stdout[-6000:] + r.stderr[-2000:])
    last = (r.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    return {"ok": r.returncode == 0, "devices": entries, "summary": f"{last} on {'; '.join(entries)}"}


def shape_setup(c: Check):
    """The walkthrough's settings on the split, and the model's shapes."""
    s = settings(TINY_FLAGS if c.tiny else WALKTHROUGH, c.split)
    return s, llama3_8b_or_tiny(c.tiny), c.split.split(",")


def step_train(c: Check):
    """pipeline.check at the walkthrough's settings, then reference scoring on the same model."""
    import torch
    import data
    import model as M
    import pipeline
    s, cfg, devices = shape_setup(c)
    mem = CardMemory(devices)
    w = workload(s)
    if not pipeline.print_plan(pipeline.plan(cfg, devices, w, c.caps(devices))[1]):
        return {"ok": False, "summary": "the plan says training does not fit these cards"}
    # pipeline.check plans, builds the random NF4 + LoRA model on the split, resets the peaks
    # (weights included: they are allocated) and trains; it prints its own table too.
    rows, train_tok_s, m = pipeline.check(cfg, devices, w, s.micro_batches, steps=2 if c.tiny else 3, caps=c.caps(devices))
    memory = mem.rows(rows, "train")
    # Reference scoring (make_pairs' stage): the same forward without gradients.
    ids, seg = pipeline.pair_rows(cfg, w, devices[0])
    def score_rate(chunks):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            with torch.no_grad(), pipeline.autocast(torch.device(devices[0])):
                data.sequence_logps(pipeline.micro_batched(m, chunks), ids, seg)
            sync(devices)
            times.append(time.perf_counter() - t)
        return w.train_seqs * w.seq_len / min(times[1:])  # as pipeline.check counts

    score_tok_s = score_rate(s.micro_batches)
    # GPipe's overlap: split over two cards, micro-batches let both work at once
    overlap = score_tok_s / score_rate(1) if len(set(devices)) > 1 and s.micro_batches > 1 else None
    return {"ok": True, "memory": memory, "rates": {"train_tok_s": train_tok_s, "score_tok_s": score_tok_s},
            "bounds": m.stage_bounds, "gpipe_overlap": overlap,
            "shape": f"{ids.shape[0]} pair rows x {ids.shape[1]}, {s.micro_batches} micro-batches"
            f"{', grad-ckpt' if w.grad_ckpt else ''}",
            "summary": f"training {train_tok_s:,.0f} tokens/s, reference scoring {score_tok_s:,.0f} tokens/s "
                       f"({ids.shape[0]} pair rows x {ids.shape[1]}, layers {m.stage_bounds})"
                       + (f"; {s.micro_batches} micro-batches score {overlap:.2f}x as fast as 1 (GPipe overlap)"
                          if overlap else "")}


def step_sample(c: Check):
    """Sampling as sppo.sample does it (temperature 0.7, top-p 0.9, no early stop), at batch 1
    and at the walkthrough's --gen-batch with its full prompt and answer lengths."""
    import torch
    import generate
    import model as M
    import pipeline
    s, cfg, devices = shape_setup(c)
    mem = CardMemory(devices)
    w = workload(s)
    bounds, rows = pipeline.plan(cfg, devices, w, c.caps(devices))
    if not pipeline.print_plan(rows):
        return {"ok": False, "summary": "the plan says sampling does not fit these cards"}
    dtype = pipeline.compute_dtype(torch.device(devices[0]))
    m = pipeline.random_model(cfg, devices, bounds, dtype, lora_r=0, quantized=False)  # as sampling loads pi_t
    g = torch.Generator().manual_seed(0)
    prompts = lambda n: torch.randint(3, cfg.vocab_size, (n, s.max_prompt_len), generator=g).tolist()

    def rate(n, new, static_cache=None):
        t = time.perf_counter()
        out = generate.generate(m, prompts(n), new, s.temperature, s.top_p, s.top_k, stop_ids=(), seed=0,
                         static_cache=static_cache)
        sync(devices)
        if sum(map(len, out)) != n * new:
            raise RuntimeError(f"the sampler stopped early: {sum(map(len, out))} of {n} x {new} tokens")
        return n * new / (time.perf_counter() - t)

    rate(2, 4)  # warm-up: kernels load, the allocator grows
    mem.reset()
    batch = max(s.gen_batch, s.eval_batch)
    big = rate(batch, s.max_new_tokens)
    memory = mem.rows(rows, "sample")
    n1 = min(c.batch1_tokens, s.max_new_tokens)
    one = rate(1, n1)
    rates = {"sample_tok_s_1": one, "sample_tok_s_batch": big}
    # batch 1 again with each step's kernels launched one by one (no CUDA graph), then all in NF4
    rates["sample_tok_s_1_eager"] = rate(1, n1 // 4, static_cache=False)
    summary = (f"{one:,.1f} tokens/s at batch 1 ({rates['sample_tok_s_1_eager']:,.1f} without CUDA graphs), "
               f"{big:,.0f} at batch {batch}")
    if c.cuda and len(set(devices)) == 1:  # the 4-bit model is built on one card
        del m
        mem.reset()
        m = pipeline.random_model(cfg, devices, bounds, dtype, lora_r=0)
        rate(2, 4)
        rates["nf4_tok_s_1"], rates["nf4_tok_s_batch"] = rate(1, n1), rate(batch, n1)
        summary += f"; in NF4 {rates['nf4_tok_s_1']:,.1f} at batch 1, {rates['nf4_tok_s_batch']:,.0f} at batch {batch}"
    return {"ok": True, "memory": memory, "rates": rates, "gen_batch": batch,
            "summary": summary + f" (prompts of {s.max_prompt_len} tokens, {s.max_new_tokens} new, layers {bounds})"}


def sync(devices):
    import torch
    for d in dict.fromkeys(devices):
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def e2e(c: Check, vllm=False):
    """One tiny iteration through sppo.py: sample, judge, pairs, train, merge, evaluate."""
    if vllm and not vllm_version():
        return {"ok": None, "summary": f"skipped: vLLM does not import in {vllm_python()}"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # vLLM's attention kernels take no heads smaller than 64 (hidden 256, 4 heads)
        make_tiny_model(tmp / "model", hidden=256 if vllm else 64)
        # A check a random model's answers meet about half the time: its 12 new tokens decode to
        # 10-21 characters. With 12 prompts the K answers of every prompt tie (no pair to train on)
        # with odds of about 1e-7; a bound of 30 characters, met by every answer, tied every prompt
        # on one seed in six (measured on CPU; it did on the first H200 run).
        checks = [{"type": "max_chars", "n": 15}, {"type": "no_commas"}]
        for name, n in (("train", 12), ("heldout", 4)):
            rows = [{"id": f"{name}{i}", "prompt": f"say something short number {i} please", "checks": checks}
                    for i in range(n)]
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv = ["--model", str(tmp / "model"), "--prompts", str(tmp / "train.jsonl"), "--heldout",
                str(tmp / "heldout.jsonl"), "--runs-dir", str(tmp / "runs"), "--name", "e2e", "--iters", "1",
                "--prompts-per-iter", "12", "--eval-prompts", "4", "--k", "3", "--max-new-tokens", "12",
                "--gen-batch", "6", "--eval-batch", "4", "--batch-size", "2", "--epochs", "1", "--lora-r", "4",
                "--lr", "1e-3", "--eta", "2", "--judge-batch", "4", "--merged-dtype", "bfloat16", "--ckpt-every", "1"]
        if vllm:
            argv += ["--backend", "vllm", "--device", c.cards[0], "--vllm-memory", "0.3"]
        else:
            argv += ["--devices", c.split, "--micro-batches", "2"]
        if c.mem_cap:  # sppo.py plans under the cap too
            argv += ["--device-mem", str(c.mem_cap)]
        t = time.time()
        if not vllm:  # killed right after training's first checkpoint, then resumed below, on the same split
            killed = subprocess.run([sys.executable, str(HERE / "sppo.py"), *argv], cwd=HERE,
                                    env=dict(os.environ, SPPO_KILL_AT="train:1"), capture_output=True, text=True)
            if killed.returncode != -signal.SIGKILL:
                return {"ok": False, "summary": f"the run to be killed in training ended with {killed.returncode}: "
                                                f"{(killed.stderr.strip().splitlines() or [''])[-1][:200]}"}
        try:
            table = run_sppo(argv)
        except SystemExit as e:  # sppo's one-line errors end in exit status 2
            return {"ok": False, "summary": f"sppo.py stopped with exit status {e.code}"}
        run = tmp / "runs" / "e2e"
        missing = [f for f in ("eval_base.jsonl", "metrics.jsonl", "iter0/pairs.jsonl", "iter0/adapter",
                               "iter0/model/config.json", "iter0/eval.json") if not (run / f).exists()]
        if missing or len(table) != 1:
            return {"ok": False, "summary": f"the run left no {', '.join(missing) or 'metrics row'}"}
        if not math.isfinite(table[0]["train_loss"]):
            return {"ok": False, "summary": "no training step ran: the judge tied every prompt's answers"}
        wr, ci = table[0]["win_rate"]
        first = json.loads((run / "iter0" / "train" / "losses.jsonl").read_text().splitlines()[0])
        read_s, write_s = disk_rates(tmp / "disk", (1 if c.tiny else 256) * 2 ** 20)
        return {"ok": True, "rates": {"disk_read_bytes_s": read_s, "disk_write_bytes_s": write_s},
                "summary": f"1 iteration, every stage, in {time.time() - t:.0f} s; disk {write_s / 1e6:,.0f} MB/s "
                           f"written, {read_s / 1e6:,.0f} MB/s read "
                                       f"({'vLLM sampler' if vllm else 'devices ' + c.split + ', killed in training and resumed'}); "
                                       f"win rate {wr:.2f}, loss {table[0]['train_loss']:.3g}, step-0 mean |log-ratio| "
                                       f"{first.get('abs_logr', float('nan')):.1e}"}


def disk_rates(path, nbytes):
    """(read, write) bytes/s of a file of nbytes where the run folder would be: written and synced,
    dropped from the page cache, read back (merging a checkpoint reads the last one, writes the next)."""
    data = os.urandom(nbytes)
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    write_s = nbytes / (time.perf_counter() - t)
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        while f.read(2 ** 24):
            pass
    read_s = nbytes / (time.perf_counter() - t)
    os.remove(path)
    return read_s, write_s


def step_judge(c: Check):
    """PairRM at K=5 on the first card: a random ranker of PairRM's size (tiny with c.tiny), our
    judge's prompts/s on 64 prompts, llm-blender's rank(batch_size=1) on 8 (the authors' call),
    and the peak memory of ours."""
    import numpy as np
    import torch
    from scripts import bench
    import judge
    import llm_blender
    from llm_blender.blender.config import BlenderConfig
    dev = c.cards[0]
    mem = CardMemory([dev])
    with tempfile.TemporaryDirectory() as tmp:
        ranker, backbone = judge.build_pairrm(tmp, "tiny" if c.tiny else "large")
        ours = judge.PairRMJudge(ranker, backbone_dir=backbone, batch_size=16, device=dev)
        theirs = llm_blender.Blender(BlenderConfig(device=torch.device(dev).type, use_tqdm=False))
        with ours.on_card():
            theirs.loadranker(str(ranker), device=torch.device(dev).type, model_name=str(backbone))
    n_ours, n_theirs = (2, 2) if c.tiny else (64, 8)
    prompts, cands = bench.pairrm_inputs(n_ours)
    k = len(cands[0])
    ours(prompts[:2], cands[:2])  # warm-up
    mem.reset()
    t = time.perf_counter()
    P = ours(prompts, cands)
    sync([dev])
    ours_s = n_ours / (time.perf_counter() - t)
    memory = [{"device": r, "peak": (mem.outside[r] + torch.cuda.max_memory_reserved(r)) if r in mem.cards else None}
              for r in [dev]]
    with ours.on_card():
        t = time.perf_counter()
        s = theirs.rank(prompts[:n_theirs], cands[:n_theirs], return_scores=True, batch_size=1, disable_tqdm=True)
        sync([dev])
        theirs_s = n_theirs / (time.perf_counter() - t)
    Q = [judge.prob_matrix(lambda i, j, sn=sn: judge.sigmoid(sn[i] - sn[j]), k) for sn in np.asarray(s, dtype=np.float64)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(P, Q))
    tol = 1e-6 if not c.cuda else 2e-2  # half precision on the card, in both
    peak = memory[0]["peak"]
    return {"ok": diff <= tol, "rates": {"judge_prompts_s": ours_s, "judge_prompts_s_theirs": theirs_s},
            "judge_memory": memory, "p_max_abs_diff": diff,
            "summary": f"PairRM{' (tiny)' if c.tiny else ''} K={k}: {ours_s:,.2f} prompts/s, llm-blender's "
                       f"rank(batch_size=1) {theirs_s:,.2f} ({ours_s / theirs_s:.1f}x); P max |diff| {diff:.1e}"
                       + (f"; peak {peak / GiB:.2f} GiB" if peak else "")}


STEPS = {"env": step_env, "tests": step_tests, "train": step_train, "sample": step_sample, "judge": step_judge,
         "e2e": e2e, "e2e-vllm": lambda c: e2e(c, vllm=True)}
# Generous ceilings per step (seconds); the budget of the whole check is 10 min on one card.
TIMEOUTS = {"env": 300, "tests": 420, "train": 420, "sample": 420, "judge": 420, "e2e": 420, "e2e-vllm": 600}


def apply_mem_cap(c: Check):
    """What a smaller card allows: torch's allocator on each card refuses to go past mem_cap GiB
    (the CUDA context, outside the allocator, is not capped: the plan counts it on its own)."""
    import torch
    for d in dict.fromkeys(c.cards):
        if d.startswith("cuda"):
            total = torch.cuda.get_device_properties(d).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, c.mem_cap * GiB / total), d)


def child(name, c: Check):
    """Run one step in this process and print its result line; errors become a failed result."""
    t = time.time()
    try:
        if c.mem_cap and c.cuda:
            apply_mem_cap(c)
        res = STEPS[name](c)
    except Exception as e:  # noqa: BLE001 - every failure must reach the summary, as one line
        import traceback
        traceback.print_exc()
        res = {"ok": False, "summary": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    res.update(step=name, seconds=round(time.time() - t, 1))
    print(TAG + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- the parent

def run_step(name, c: Check, log=print):
    """One step in a fresh process, its output shown as it comes, its result line parsed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--check", json.dumps(dataclasses.asdict(c))]
    log(f"== {name}")
    t = time.time()
    # Its own process group, so a timeout also ends what it started (pytest, vLLM's workers),
    # which would otherwise keep the output pipe open.
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    timer = threading.Timer(TIMEOUTS[name], lambda: os.killpg(p.pid, signal.SIGKILL))
    timer.start()
    lines = []
    for line in p.stdout:
        lines.append(line)
        if not line.startswith(TAG):
            log("   " + line.rstrip())
    rc = p.wait()
    timed_out = not timer.is_alive()
    timer.cancel()
    res = parse_result(name, rc, "".join(lines))
    if timed_out:
        res.update(ok=False, summary=f"timed out after {TIMEOUTS[name]} s")
    res.setdefault("seconds", round(time.time() - t, 1))
    return res


def parse_result(name, rc, output):
    """A step's result from its process's output: its last result line, or a failure that says
    how the process ended (a crash, a kill by the OOM killer, a segfault in a kernel)."""
    found = [ln[len(TAG):] for ln in output.splitlines() if ln.startswith(TAG)]
    if found:
        res = json.loads(found[-1])
        if rc != 0 and res.get("ok"):
            res.update(ok=False, summary=f"exit status {rc} after: {res.get('summary', '')}")
        return res
    tail = [ln for ln in output.splitlines() if ln.strip()][-1:] or ["no output"]
    return {"step": name, "ok": False, "summary": f"exit status {rc} without a result: {tail[0].strip()[:200]}"}


def verdict(res):
    """pass, FAIL or skipped: a step passes when it ran and no card went over its plan."""
    if res.get("ok") is None:
        return "skipped"
    over = [r for r in res.get("memory", []) if not within_plan(r["planned"], r["measured"])]
    return "pass" if res["ok"] and not over else "FAIL"


def gib(n):
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


def summary_table(results):
    lines = ["| step | result | time | key numbers |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['step']} | {verdict(r)} | {r.get('seconds', 0):.0f} s | {r.get('summary', '')} |")
    return "\n".join(lines)


def memory_table(results):
    rows = [m for r in results for m in r.get("memory", [])]
    if not rows:
        return ""
    lines = ["| card | phase | layers | planned peak | measured peak | measured / planned | within plan + 10% |",
             "|---|---|---|---|---|---|---|"]
    for m in rows:
        ratio = "n/a" if m["measured"] is None else f"{m['measured'] / m['planned']:.2f}"
        ok = "n/a (CPU)" if m["measured"] is None else ("yes" if within_plan(m["planned"], m["measured"]) else "NO")
        lines.append(f"| {m['device']} | {m['phase']} | {m['layers']} | {gib(m['planned'])} | {gib(m['measured'])} "
                     f"| {ratio} | {ok} |")
    return "\n".join(lines)


def over_plan_messages(results):
    return [f"FAIL: {m['device']} {m['phase']} peak {gib(m['measured'])} is {m['measured'] / m['planned'] - 1:.0%} "
            f"above the plan's {gib(m['planned'])}: `--plan` underestimates this card, and a long run at these "
            f"settings may run out of memory (please report this table)"
            for r in results for m in r.get("memory", []) if not within_plan(m["planned"], m["measured"])]


def estimate_hours(it: Iteration, sample_tok_s, score_tok_s, train_tok_s, judge_prompts_s=None,
                   disk_read_bytes_s=None, disk_write_bytes_s=None):
    """Hours per stage of one iteration from the measured rates. Upper bounds: every response
    runs to it.new_tokens (a batch samples until its last row stops) and every scored or trained
    sequence is it.seq_len long. With the judge's rate: judging K answers per prompt, and the
    held-out evaluation (greedy answers, then each pair judged in both orders: 2 x 2 comparisons
    against a K-answer prompt's K (K - 1)); with the disk's: merging (read one checkpoint, write
    the next). A stage whose rate is missing is left out."""
    gen_tokens = it.prompts * it.k * it.new_tokens
    seq_tokens = it.prompts * 2 * it.seq_len  # chosen and rejected of one pair per prompt
    stages = {"generate": (gen_tokens, sample_tok_s), "pairs": (seq_tokens, score_tok_s),
              "train": (it.epochs * seq_tokens, train_tok_s)}
    out = {k: {"tokens": n, "tok_s": r, "hours": n / r / 3600} for k, (n, r) in stages.items()}
    if judge_prompts_s:
        out["judge"] = {"prompts": it.prompts, "prompts_s": judge_prompts_s, "hours": it.prompts / judge_prompts_s / 3600}
        answers = it.eval_prompts * it.new_tokens / sample_tok_s / 3600
        judged = it.eval_prompts * 4 / (it.k * (it.k - 1)) / judge_prompts_s / 3600
        out["evaluate"] = {"parts": {"decode": answers, "judge": judged}, "hours": answers + judged}
    if disk_read_bytes_s and disk_write_bytes_s:
        out["merge"] = {"bytes": it.model_bytes, "hours": (it.model_bytes / disk_read_bytes_s
                                                           + it.model_bytes / disk_write_bytes_s) / 3600}
    out["total"] = {"hours": sum(v["hours"] for v in out.values())}
    return out


# Published figures per card (dense bf16 tensor throughput, fp32 accumulate on the 4090):
# decoding reads every weight per token, so it scales with memory bandwidth; prefill, scoring,
# training and the judge are matrix products and scale with throughput. Keyed by a part of the
# name torch gives the card.
CARD_SPECS = {"H200": {"bandwidth": 4.8e12, "bf16_flops": 990e12},
              "RTX 4090": {"bandwidth": 1.008e12, "bf16_flops": 165e12}}
SCALED_TO = "RTX 4090"
BOUND_BY = {"generate": "bandwidth", "pairs": "bf16_flops", "train": "bf16_flops", "judge": "bf16_flops"}


def card_spec(name):
    return next((v for k, v in CARD_SPECS.items() if k in (name or "")), None)


def scaled_hours(est, measured_on, to=SCALED_TO):
    """The estimate moved from the card it was measured on to another by the ratios of their
    published figures (a pipeline over two of them: each token still passes every layer once, so
    one card's figures; the overlap of their micro-batches is left out). Merging is disk-bound:
    unchanged. None when the measured card has no published figures here."""
    a, b = card_spec(measured_on), CARD_SPECS[to]
    if a is None:
        return None
    ratio = {k: a[k] / b[k] for k in ("bandwidth", "bf16_flops")}
    out = {}
    for stage, v in est.items():
        if stage == "evaluate":
            out[stage] = v["parts"]["decode"] * ratio["bandwidth"] + v["parts"]["judge"] * ratio["bf16_flops"]
        elif stage in BOUND_BY:
            out[stage] = v["hours"] * ratio[BOUND_BY[stage]]
        elif stage == "merge":
            out[stage] = v["hours"]
    out["total"] = sum(out.values())
    return out


def rates_of(results):
    rates = {}
    for r in results:
        rates.update(r.get("rates", {}))
    return rates


def measured_card(results):
    """The first card's name as the env step saw it (None on CPU or without that step)."""
    for r in results:
        for card in r.get("cards", []):
            return card.get("name")
    return None


def estimate_of(results, it: Iteration):
    """estimate_hours from the rates the steps measured; None without sampling, scoring and training's."""
    rates = rates_of(results)
    need = ("sample_tok_s_batch", "score_tok_s", "train_tok_s")
    if not all(rates.get(k) for k in need):
        return None
    return estimate_hours(it, *(rates[k] for k in need), rates.get("judge_prompts_s"), rates.get("disk_read_bytes_s"),
                          rates.get("disk_write_bytes_s"))


def estimate_table(results, it: Iteration, tiny=False):
    est = estimate_of(results, it)
    if est is None:
        return ""
    card = measured_card(results)
    scaled = scaled_hours(est, card)
    work = {"generate": f"{it.prompts:,} prompts x K={it.k} x {it.new_tokens} new tokens",
            "judge": f"PairRM on {it.prompts:,} prompts x K={it.k} ({it.k * (it.k - 1)} comparisons each)",
            "pairs": f"reference log-probs of {2 * it.prompts:,} sequences x {it.seq_len}",
            "train": f"{it.epochs} epochs x {2 * it.prompts:,} sequences x {it.seq_len}",
            "merge": f"read and write {it.model_bytes / 1e9:.1f} GB",
            "evaluate": f"{it.eval_prompts} held-out prompts: greedy answers, judged both ways"}
    rate = lambda k: (f"{est[k]['tok_s']:,.0f} tokens/s" if "tok_s" in est[k] else  # noqa: E731
                      f"{est[k]['prompts_s']:,.2f} prompts/s" if "prompts_s" in est[k] else
                      "the disk's" if k == "merge" else "sampling's and the judge's")
    column = f"2 x {SCALED_TO} (scaled)"
    lines = [f"Estimated hours of one iteration ({it.prompts:,} prompts, K={it.k}, up to {it.new_tokens} new tokens, "
             f"{it.epochs} epochs; upper bounds: every response at {it.new_tokens} tokens, every sequence at "
             f"{it.seq_len}), measured on {card or 'this machine'}"
             + (f"; the last column is scaled from published bandwidth and bf16 throughput ({card} against "
                f"{SCALED_TO}: decoding by bandwidth, the rest by throughput), not measured:" if scaled else
                f"; no {column} column: no published figures for {card or 'a CPU'} here:"), "",
             f"| stage | work | measured rate | hours |{f' {column} |' if scaled else ''}",
             f"|---|---|---|---|{'---|' if scaled else ''}"]
    if tiny:
        lines[0] = "(tiny shapes: these rates are not the real model's) " + lines[0]
    for k in ("generate", "judge", "pairs", "train", "merge", "evaluate"):
        if k in est:
            lines.append(f"| {k} | {work[k]} | {rate(k)} | {est[k]['hours']:.1f} |"
                         + (f" {scaled[k]:.1f} |" if scaled else ""))
    lines.append(f"| total | | | {est['total']['hours']:.1f} |" + (f" {scaled['total']:.1f} |" if scaled else ""))
    return "\n".join(lines)


def report(results, it: Iteration, header="", tiny=False):
    parts = [header, summary_table(results), memory_table(results), estimate_table(results, it, tiny),
             "\n".join(over_plan_messages(results))]
    return "\n\n".join(p for p in parts if p)


def find_check(device, devices, tiny):
    """The cards to check, or None when there are none (no CUDA and no --device cpu)."""
    import torch
    if device == "cpu":
        return Check(cards=["cpu"], split=devices or "cpu,cpu", tiny=True)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return None
    cards = [f"cuda:{i}" for i in range(n)]
    # Two cards are the walkthrough's split; one card runs the shape steps on itself alone, as
    # the plan would place a run there (the split tests still use cuda:0,cuda:0).
    split = devices or (",".join(cards[:2]) if n > 1 else "cuda:0")
    return Check(cards=cards, split=split, tiny=tiny)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the same steps on CPU with tiny shapes (a test of this script)")
    ap.add_argument("--devices", default="", help="the split of the shape steps and the e2e run (default: the "
                    "first two cards, or cuda:0 alone)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes instead of Llama-3-8B's (a quick smoke run)")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of the steps")
    ap.add_argument("--iter-prompts", type=int, default=Iteration.prompts, help="prompts per iteration in the estimate")
    ap.add_argument("--out", default="", help="also write the step results here as JSON lines")
    ap.add_argument("--mem-cap", type=float, default=0.0, help="GiB per card for every step, e.g. 24: an RTX 4090's "
                    "memory on a larger card (torch.cuda.set_per_process_memory_fraction); CUDA only")
    ap.add_argument("--step", help=argparse.SUPPRESS)   # internal: run one step in this process
    ap.add_argument("--check", help=argparse.SUPPRESS)  # internal: the Check as JSON
    a = ap.parse_args(argv)
    if a.step:
        return child(a.step, Check(**json.loads(a.check)))
    try:
        import torch
    except ImportError as e:
        print(f"gpu-check: torch does not import in {sys.executable} ({e}); install your CUDA build of PyTorch "
              f"(README, 'On a GPU box') or run make gpu-check PYTHON=/path/to/python")
        return 1
    if a.mem_cap < 0 or (a.mem_cap and (a.device == "cpu" or not torch.cuda.is_available())):
        print(f"error: --mem-cap {a.mem_cap:g}: " + ("must be > 0" if a.mem_cap < 0 else "caps a CUDA card's memory "
              "(torch.cuda.set_per_process_memory_fraction); this run has no CUDA card to cap"), file=sys.stderr)
        return 2
    c = find_check(a.device, a.devices, a.tiny)
    if c is None:
        print(f"gpu-check: torch {torch.__version__} sees no CUDA device, nothing to check")
        return 0
    c.mem_cap = a.mem_cap
    steps = a.steps.split(",")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step {unknown[0]}; the steps: {', '.join(STEPS)}")
    t0 = time.time()
    results = [run_step(name, c) for name in steps]
    it = Iteration(prompts=a.iter_prompts)
    from machinery import kernels
    header = (f"## gpu-check: {', '.join(c.cards)} (split {c.split}{', tiny shapes' if c.tiny else ''}"
              f"{f', each card capped at {c.mem_cap:g} GiB' if c.mem_cap else ''}), "
              f"{time.time() - t0:.0f} s\n\nhost CPU: {kernels.cpu_description()}")
    print("\n" + report(results, it, header, c.tiny))
    budget = 10 if len(c.cards) == 1 else 15  # minutes: the promise to a user about to start a run
    if c.cuda and time.time() - t0 > budget * 60:
        print(f"note: gpu-check took {(time.time() - t0) / 60:.1f} min, over its {budget}-minute budget")
    if a.out:  # the step results, then the estimate (when the rates were measured)
        est = estimate_of(results, it)
        extra = [{"step": "estimate", "iteration": dataclasses.asdict(it), "hours": est, "tiny": c.tiny}] if est else []
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in results + extra))
    return 0 if all(verdict(r) != "FAIL" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
