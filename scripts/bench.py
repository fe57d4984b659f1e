"""bench.py: our stack side by side with what users would run instead, in one run.

"Theirs" is what TRL runs underneath: transformers' AutoModelForCausalLM loaded in 4 bits
through BitsAndBytesConfig (NF4, double quant), peft LoRA r=16 on all seven linears, and
transformers' generate. Same model, same data, same dtype, same threads. Rows:

  training step   SPPO loss on a batch of pairs (sequence <= 256): forward of chosen + rejected,
                  backward, AdamW step; tokens/s and peak memory
  scoring         reference log-probs (no grad, sum over response tokens); tokens/s
  (both count the tokens of prompt + chosen and prompt + rejected; ours runs each prompt once)
  sampling        tokens/s at batch 1 and 16, temperature/top-p sampling, no early stop
  PairRM          prompts/s judged at K=5 by a PairRM of its real size with random weights
                  (judge.build_pairrm "large"): our judge against llm-blender's rank(batch_size=1),
                  as the SPPO authors' rank.py calls it; both give the same P

Every measurement runs in a child process (a training step's peak memory must not include the
other stack's), ours and theirs alternate, and the table shows medians over the repeats, so
the ratio stays fair on a busy machine.

    python scripts/bench.py --quick       # small shapes, on the embedded SmolLM2-135M
    python scripts/bench.py               # the full run; with CUDA also a Llama-3-8B-shaped model
    python scripts/bench.py --quick --pairrm-only   # the PairRM row alone, 2 prompts
"""
import argparse
import dataclasses
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: its modules
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch  # noqa: E402

import data  # noqa: E402
import generate  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402
import pipeline  # noqa: E402
import quant  # noqa: E402
import sppo  # noqa: E402
from machinery import convert, kernels  # noqa: E402

HERE = Path(__file__).resolve().parents[1]  # the repository root
LLAMA3_8B = "llama3-8b-random"  # --model value: Llama-3-8B shapes, random weights (GPU only)


@dataclass
class Bench:
    model: str = ""            # HF folder, or LLAMA3_8B; "" = the embedded SmolLM2-135M-Instruct
    device: str = ""           # cpu or cuda; "" = cuda when available
    rows: int = 8              # pairs per training/scoring batch (2 x rows sequences)
    seq_len: int = 256         # longest prompt + response
    gen_tokens: int = 64       # new tokens per sampled row
    gen_batches: tuple = (1, 16)
    steps: int = 3             # timed training steps per child process (after one warm-up step)
    repeats: int = 3           # scoring/sampling rounds, ours and theirs alternating; the table has medians
    train_rounds: int = 3      # training rounds: a fresh child process per stack per round
    threads: int = 0           # torch threads in every child; 0 = this machine's default
    temperature: float = 0.7
    top_p: float = 0.9
    lora_r: int = 16
    seed: int = 0
    grad_ckpt: bool = False    # gradient checkpointing per block, in both stacks
    split: bool = False        # each stack's inference in its own process (two 8B models do not fit one card)
    pairrm_prompts: int = 8    # prompts of K=5 answers in the PairRM row (0: no PairRM row)
    pairrm_shape: str = "large"  # judge.PAIRRM_SHAPES: PairRM's real size ("tiny" in the tests)


def for_24gb(b: Bench) -> Bench:
    """The Llama-3-8B rows sized for one 24 GB card, as a home user would run them: 4 pairs of
    <= 256 tokens with gradient checkpointing (16 x 256 tokens without it need ~40 GiB of
    activations), and one stack per process: a bf16 8B model is 16 GB, two do not fit."""
    return dataclasses.replace(b, rows=4, grad_ckpt=True, split=True)


def quick(b: Bench) -> Bench:
    """A minute or two on a quiet 2-core CPU: the shapes shrink, so the ratios are indicative only."""
    return dataclasses.replace(b, rows=1, seq_len=128, gen_tokens=16, steps=1, repeats=2, train_rounds=1, pairrm_prompts=2)


def device_of(b):
    return torch.device(b.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------- data (same for both)

def make_pairs(b, vocab, pad_id):
    """rows random pairs: prompts of 48-128 tokens, responses filling up to seq_len, lengths varied
    (so padding costs what it costs in a real batch), and the longest sequence exactly seq_len."""
    g = torch.Generator().manual_seed(b.seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    ids = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()
    pairs = []
    for i in range(b.rows):
        p = ri(min(48, b.seq_len // 4), min(128, b.seq_len // 2))
        chosen = b.seq_len - p if i == 0 else ri((b.seq_len - p) // 3, b.seq_len - p)
        pairs.append({"prompt_ids": ids(p), "chosen_ids": ids(chosen), "rejected_ids": ids(ri((b.seq_len - p) // 3, b.seq_len - p)),
                      "ref_chosen_logp": -300.0, "ref_rejected_logp": -310.0,
                      "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3, "chosen_probs": 0.6})
    return pairs


def train_settings(b):
    """sppo's own Settings for these pairs: nothing is truncated, the loss is SPPO's."""
    return sppo.Settings(max_len=b.seq_len, max_prompt_len=b.seq_len, batch_size=b.rows, lora_r=b.lora_r)


def batch_tensors(b, pairs, pad_id, dev):
    """Theirs: chosen and rejected as rows of their own (TRL's concatenated batch), as ids,
    response mask and the attention mask transformers is given. Ours computes each prompt once
    (data.pair_tensors); both rates count these rows' tokens, the same work."""
    s = train_settings(b)
    ids, resp = data.seq_tensors([p["prompt_ids"] for p in pairs] * 2,
                                 [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs], s, pad_id, dev)
    attn = torch.arange(ids.shape[1], device=dev)[None] < data.row_ends(resp)[:, None]
    return ids, resp, attn


def prompts_for_sampling(b, vocab, batch):
    """The first prompts of prompts/train.jsonl in the model's chat template (what sppo.sample
    feeds it: real prompts give the peaked next-token distributions top-p sampling meets in
    practice); random ids for a model without a tokenizer."""
    if b.model != LLAMA3_8B and (model_dir(b) / "tokenizer.json").exists():
        tok = data.Tokenizer.from_dir(model_dir(b))
        rows, _ = data.load_prompts(HERE / "prompts/train.jsonl")
        return [tok.encode_chat(data.messages_of(r)) for r in rows[:batch]]
    g = torch.Generator().manual_seed(b.seed + batch)
    return [torch.randint(0, vocab, (int(torch.randint(16, 65, (), generator=g)),), generator=g).tolist()
            for _ in range(batch)]


# ----------------------------------------------------------------------------- loading

def model_dir(b):
    return Path(b.model) if b.model and b.model != LLAMA3_8B else convert.embedded_model_dir()


def load_ours(b, dev, quantized):
    if b.model == LLAMA3_8B:
        return random_ours(dev, quantized)
    if quantized:
        return quant.quantize_model(model_dir(b), pipeline.compute_dtype(dev), dev)
    return kernels.use_onednn(M.load_model(model_dir(b), pipeline.compute_dtype(dev), dev))


def bnb_config(dev):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=pipeline.compute_dtype(dev))


def load_theirs(b, dev, quantized):
    """transformers' model as a user loads it: 4-bit through BitsAndBytesConfig, or plain."""
    from transformers import AutoModelForCausalLM
    if b.model == LLAMA3_8B:
        return random_theirs(dev, quantized)
    kw = {"quantization_config": bnb_config(dev), "device_map": str(dev)} if quantized else {}
    m = AutoModelForCausalLM.from_pretrained(model_dir(b), dtype=pipeline.compute_dtype(dev), attn_implementation="sdpa", **kw)
    return m.to(dev) if not quantized else m


def vocab_and_pad(b):
    if b.model == LLAMA3_8B:
        return llama3_8b().vocab_size, 0
    cfg = json.loads((model_dir(b) / "config.json").read_text())
    return cfg["vocab_size"], cfg.get("eos_token_id") or 0


# ----------------------------------------------------------------------------- 1. training step

def their_logps(model, ids, resp, attn):
    """TRL's concatenated forward: logits at every position, then selective_log_softmax
    (trl.trainer.utils: gather minus logsumexp, one row at a time to bound memory)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    labels = ids[:, 1:]
    per_token = torch.stack([lg.float().gather(-1, lb[:, None]).squeeze(-1) - torch.logsumexp(lg.float(), -1)
                             for lg, lb in zip(logits, labels)])
    return (per_token * resp[:, 1:]).sum(-1)


def train_ours(b, dev):
    torch.manual_seed(b.seed)
    m = load_ours(b, dev, quantized=True)
    lora.add_lora(m, lora.LoRAConfig(r=b.lora_r))
    m.grad_ckpt = b.grad_ckpt
    m.train()
    params = list(lora.lora_params(m).values())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    vocab, pad = vocab_and_pad(b)
    pairs, s = make_pairs(b, vocab, pad), train_settings(b)

    def step():  # sppo.train's inner loop, micro-batch = the whole batch
        sppo.train_step(functools.partial(data.sequence_logps, m), pairs, s, pad, dev)[0].backward()
        torch.nn.utils.clip_grad_norm_(params, s.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_steps(b, dev, step, real_tokens(b, pairs, pad, dev))


def train_theirs(b, dev):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(b.seed)
    m = load_theirs(b, dev, quantized=True)
    if b.grad_ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(m, LoraConfig(r=b.lora_r, lora_alpha=2 * b.lora_r, lora_dropout=0.0, target_modules=list(quant.LINEARS),
                                     task_type="CAUSAL_LM"))
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    vocab, pad = vocab_and_pad(b)
    pairs, s = make_pairs(b, vocab, pad), train_settings(b)
    ids, resp, attn = batch_tensors(b, pairs, pad, dev)
    n = len(pairs)
    f = lambda key: torch.tensor([p[key] for p in pairs], device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):  # Trainer's bf16=True
            logps = their_logps(m, ids, resp, attn)
        loss = sppo.preference_loss("sppo", logps[:n], logps[n:], f("ref_chosen_logp"), f("ref_rejected_logp"),
                                    f("chosen_probs_win"), f("chosen_probs_lose"), f("chosen_probs"), s.eta, s.beta)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, s.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_steps(b, dev, step, real_tokens(b, pairs, pad, dev))


def real_tokens(b, pairs, pad, dev):
    return int(batch_tensors(b, pairs, pad, dev)[2].sum())


def timed_steps(b, dev, step, tokens):
    """One warm-up step (it also allocates the optimizer state), then b.steps timed ones.
    Peak memory counts from just after loading: weights, optimizer state, activations."""
    release_freed(dev)
    reset_peak(dev)
    base = current_mib(dev) if dev.type == "cpu" else 0.0
    times = []
    for i in range(1 + b.steps):
        sync(dev)
        t = time.perf_counter()
        step()
        sync(dev)
        if i:
            times.append(time.perf_counter() - t)
    return {"tokens_per_s": tokens / statistics.median(times), "peak_mib": peak_mib(dev), "rss_after_load_mib": base}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def release_freed(dev):
    """Give loading's freed heap back to the OS (glibc keeps it otherwise), so the peak counts
    what training holds, not what the loader once held; the same for both stacks."""
    import ctypes
    import gc
    gc.collect()
    if dev.type == "cpu" and sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: "5" resets the process's peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def proc_status_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024


def current_mib(dev):
    return torch.cuda.memory_allocated() / 2**20 if dev.type == "cuda" else proc_status_mib("VmRSS")


def peak_mib(dev):
    """CUDA: the allocator's peak. CPU: the process's peak resident memory (whole process:
    interpreter, libraries, weights, optimizer, activations), each stack in its own process."""
    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else proc_status_mib("VmHWM")


# ----------------------------------------------------------------------------- 2-3. scoring and sampling

def score_ours(m, ids, seg):
    """As sppo.make_pairs scores: pair rows. -> chosen then rejected, as theirs."""
    with torch.no_grad():
        return data.sequence_logps(m, ids, seg).T.reshape(-1)


def score_theirs(m, ids, resp, attn):
    with torch.no_grad():
        return their_logps(m, ids, resp, attn)


def sample_ours(b, m, prompts, pad):
    out = generate.generate(m, prompts, b.gen_tokens, b.temperature, b.top_p, stop_ids=(), seed=b.seed, pad_id=pad)
    return sum(map(len, out))


def sample_theirs(b, m, prompts, pad, dev):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], device=dev)
    attn = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=dev)
    torch.manual_seed(b.seed)
    # eos_token_id=None: no early stop, as ours with no stop ids; top_k=0: transformers' default is 50
    out = m.generate(ids, attention_mask=attn, do_sample=True, temperature=b.temperature, top_p=b.top_p, top_k=0,
                     max_new_tokens=b.gen_tokens, eos_token_id=None, pad_token_id=pad)
    return (out.shape[1] - T) * out.shape[0]


def inference(b, dev, stacks=("ours", "theirs")):
    """Scoring and sampling in one process, alternating ours/theirs each round; with one stack
    (b.split) that stack alone, the other's side of each job left out."""
    vocab, pad = vocab_and_pad(b)
    pairs = make_pairs(b, vocab, pad)
    ids, resp, attn = batch_tensors(b, pairs, pad, dev)
    pair_ids, seg = data.pair_tensors(pairs, train_settings(b), pad, dev)
    tokens = int(attn.sum())
    ours_q = load_ours(b, dev, True) if "ours" in stacks else None
    theirs_q = load_theirs(b, dev, True) if "theirs" in stacks else None
    # Kept in train mode (no dropout in Llama, and no grad here): in eval mode on AVX512-BF16 CPUs
    # bitsandbytes repacks the 4-bit weights for a kernel that computes in bf16, not the compute
    # dtype asked for. The "same computation" rows use fp32 on both sides; the extra row below
    # shows what that bf16 kernel gives.
    if theirs_q is not None:
        theirs_q.train()
    on = lambda m, fn: None if m is None else fn  # noqa: E731 (a stack not in this process has no side)
    jobs = {"scoring": (on(ours_q, lambda: score_ours(ours_q, pair_ids, seg)), on(theirs_q, lambda: score_theirs(theirs_q, ids, resp, attn)))}
    logps = {w: fn and fn().tolist() for w, fn in zip(("ours", "theirs"), jobs["scoring"])}  # also the warm-ups
    results = {}
    measure_rounds(b, dev, jobs, results, lambda out: tokens)
    if dev.type == "cpu" and bf16_cpu_kernel() and theirs_q is not None:
        theirs_q.eval()
        score_theirs(theirs_q, ids, resp, attn)  # repacks
        jobs = {"scoring, theirs in eval mode (bnb bf16 CPU kernel)": jobs["scoring"]}
        measure_rounds(b, dev, jobs, results, lambda out: tokens)
    jobs = ours_q = theirs_q = None  # the 4-bit models go before the full-precision ones load
    release_freed(dev)
    ours_f = load_ours(b, dev, False) if "ours" in stacks else None
    theirs_f = load_theirs(b, dev, False).eval() if "theirs" in stacks else None
    jobs = {}
    for n in b.gen_batches:
        prompts = prompts_for_sampling(b, vocab, n)
        jobs[f"sampling batch {n}"] = (on(ours_f, lambda p=prompts: sample_ours(b, ours_f, p, pad)),
                                       on(theirs_f, lambda p=prompts: sample_theirs(b, theirs_f, p, pad, dev)))
    rows = {n * b.gen_tokens for n in b.gen_batches}
    short = dataclasses.replace(b, gen_tokens=2)
    for n in b.gen_batches:  # warm-up: a 2-token run of each
        p = prompts_for_sampling(b, vocab, n)
        if ours_f is not None:
            sample_ours(short, ours_f, p, pad)
        if theirs_f is not None:
            sample_theirs(short, theirs_f, p, pad, dev)

    def count(n_new):  # both stacks must sample every token asked for: no early stop
        if n_new not in rows:
            raise RuntimeError(f"sampling: {n_new} new tokens, not batch x {b.gen_tokens}: a stack stopped early")
        return n_new
    measure_rounds(b, dev, jobs, results, count)
    return {"rates": results, "logps": logps}


def bf16_cpu_kernel():
    from bitsandbytes.functional import has_avx512bf16
    return has_avx512bf16()


def measure_rounds(b, dev, jobs, results, count):
    """tokens/s of each job's two sides, ours and theirs alternating which goes first."""
    for r in range(b.repeats):
        for name, (a, t) in jobs.items():
            print(f"{time.strftime('%X')} {name}, round {r + 1}", file=sys.stderr, flush=True)
            order = [("ours", a), ("theirs", t)] if r % 2 == 0 else [("theirs", t), ("ours", a)]
            for who, fn in order:
                if fn is None:  # that stack runs in its own process (b.split)
                    continue
                sync(dev)
                t0 = time.perf_counter()
                n = count(fn())
                sync(dev)
                results.setdefault(name, {"ours": [], "theirs": []})[who].append(n / (time.perf_counter() - t0))


# ----------------------------------------------------------------------------- Llama-3-8B shapes, random weights
# UNTESTED on the CPU-only machine this was written on: it runs only when CUDA is available.

def llama3_8b():
    return M.LLAMA3_8B


def random_tensors(cfg, dtype, dev):
    """HF-named tensors of a random Llama, one at a time, identical for both stacks (seeded per name)."""
    return ((name, t) for name, t, _ in pipeline.random_tensors(cfg, dtype, lambda key: dev))


def random_ours(dev, quantized):
    cfg = llama3_8b()
    return pipeline.random_model(cfg, [dev], [0, cfg.n_layers], pipeline.compute_dtype(dev), lora_r=0, quantized=quantized)


def random_theirs(dev, quantized):
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import replace_with_bnb_linear
    c = llama3_8b()
    hf = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
                     num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, rope_theta=c.rope_theta,
                     rms_norm_eps=c.norm_eps, head_dim=c.head_dim,
                     max_position_embeddings=c.max_seq_len, tie_word_embeddings=False, torch_dtype=pipeline.compute_dtype(dev),
                     attn_implementation="sdpa")
    with init_empty_weights():
        m = LlamaForCausalLM(hf)
    if quantized:  # what from_pretrained does with a BitsAndBytesConfig, one layer at a time
        m = replace_with_bnb_linear(m, modules_to_not_convert=["lm_head"], quantization_config=bnb_config(dev))
        m.is_loaded_in_4bit = True
    for name, t in random_tensors(c, pipeline.compute_dtype(dev), dev):
        mod_name, _, leaf = name.rpartition(".")
        if quantized and mod_name.rpartition(".")[2] in quant.LINEARS:
            mod = m.get_submodule(mod_name)
            mod.weight = bnb.nn.Params4bit(t.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                           blocksize=64).to(dev)
        else:
            set_module_tensor_to_device(m, name, dev, value=t)
    m.model.rotary_emb = type(m.model.rotary_emb)(hf, device=dev)
    return m.eval()


# ----------------------------------------------------------------------------- PairRM at its real size

PAIRRM_K = 5


def pairrm_dir(shape):
    """A random PairRM of that shape (judge.build_pairrm), built once under the cache (large: 3.4 GB)."""
    import judge
    root = convert.cache_dir() / f"pairrm-{shape}-random"
    if not (root / "ranker" / "config.json").exists():  # written last: a killed build is built again
        judge.build_pairrm(root, shape)
    return root / "ranker", root / "backbone"


def pairrm_inputs(n, k=PAIRRM_K, seed=0):
    """n chat-rendered prompts of 8-30 words and k answers each of 10-50 words (seeded, from the
    judge's own text): varied lengths, as sampled answers are."""
    import random

    import judge
    words = judge.PAIRRM_TEXT.split()
    g = random.Random(seed)
    text = lambda lo, hi: " ".join(g.choice(words) for _ in range(g.randint(lo, hi)))  # noqa: E731
    prompts = [f"<|im_start|>user\n{text(8, 30)}<|im_end|>\n<|im_start|>assistant\n" for _ in range(n)]
    return prompts, [[text(10, 50) for _ in range(k)] for _ in range(n)]


def pairrm(b, dev):
    """prompts/s of our PairRM judge and of llm-blender's rank(batch_size=1), rounds alternating,
    and the largest difference between their P matrices."""
    import numpy as np

    import judge
    import llm_blender
    from llm_blender.blender.config import BlenderConfig
    ranker, backbone = pairrm_dir(b.pairrm_shape)
    ours = judge.PairRMJudge(ranker, backbone_dir=backbone, mode="scores", batch_size=16, device=str(dev))
    theirs = llm_blender.Blender(BlenderConfig(device=dev.type, use_tqdm=False))
    theirs.loadranker(str(ranker), device=dev.type, model_name=str(backbone))
    prompts, cands = pairrm_inputs(b.pairrm_prompts)
    k = len(cands[0])
    got = {}
    jobs = {"ours": lambda p, c: ours(p, c),
            "theirs": lambda p, c: [judge.prob_matrix(lambda i, j, sn=sn: judge.sigmoid(sn[i] - sn[j]), len(sn)) for sn in
                                    np.asarray(theirs.rank(p, c, return_scores=True, batch_size=1, disable_tqdm=True),
                                               dtype=np.float64)]}
    for fn in jobs.values():  # warm-up: one prompt, two answers
        fn(prompts[:1], [cands[0][:2]])
    rates = {"ours": [], "theirs": []}
    for r in range(max(1, b.repeats - 1)):
        for who in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            print(f"{time.strftime('%X')} PairRM {who}, round {r + 1}", file=sys.stderr, flush=True)
            sync(dev)
            t0 = time.perf_counter()
            got[who] = jobs[who](prompts, cands)  # the P matrices compared below
            sync(dev)
            rates[who].append(len(prompts) / (time.perf_counter() - t0))
    diff = max(float(np.abs(a - t).max()) for a, t in zip(got["ours"], got["theirs"]))
    return {"rates": rates, "p_max_abs_diff": diff, "prompts": len(prompts), "k": k}


# ----------------------------------------------------------------------------- driver

def child(b, what, dev):
    """Run one measurement in a fresh process and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", what, "--config", json.dumps(dataclasses.asdict(b)),
           "--device", str(dev)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.exit(f"error: bench worker {what} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def worker(b, what, dev):
    """One measurement in this (child) process. Both stacks import the same libraries first, and
    memory is counted above what they take, so the memory row compares models and training only."""
    import bitsandbytes, peft, transformers  # noqa: F401
    torch.set_num_threads(b.threads)
    libs = current_mib(dev) if dev.type == "cpu" else 0.0
    print("RESULT " + json.dumps({**WORKERS[what](b, dev), "libs_mib": libs}), flush=True)


WORKERS = {"train-ours": train_ours, "train-theirs": train_theirs, "inference": inference, "pairrm": pairrm,
           "inference-ours": functools.partial(inference, stacks=("ours",)),
           "inference-theirs": functools.partial(inference, stacks=("theirs",))}


def measure(b, dev, log=print, run=child):
    """All rows for one model: {row: (ours, theirs)} plus the log-prob agreement.
    run(b, what, dev) runs one measurement (default: in a child process)."""
    train = {"ours": [], "theirs": []}
    for r in range(b.train_rounds):
        for who in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            train[who].append(run(b, f"train-{who}", dev))
            x = train[who][-1]
            x["peak_above_libs_mib"] = x["peak_mib"] - x.get("libs_mib", 0.0)
            log(f"  train {who}, round {r + 1}: {x['tokens_per_s']:,.1f} tokens/s, peak {x['peak_mib']:,.0f} MiB "
                f"({x['peak_above_libs_mib']:,.0f} MiB above the libraries)")
    if b.split:  # one stack per process; the rates and log-probs of the two put together
        a, t = run(b, "inference-ours", dev), run(b, "inference-theirs", dev)
        # (a row only theirs measures, bitsandbytes' eval-mode CPU kernel, is set against our scoring)
        inf = {"rates": {k: {"ours": a["rates"].get(k, a["rates"]["scoring"])["ours"], "theirs": v["theirs"]}
                         for k, v in t["rates"].items()},
               "logps": {"ours": a["logps"]["ours"], "theirs": t["logps"]["theirs"]}}
    else:
        inf = run(b, "inference", dev)
    lp_ours, lp_theirs = (torch.tensor(inf["logps"][w]) for w in ("ours", "theirs"))
    inf["logp_max_abs_diff"], inf["logp_scale"] = (lp_ours - lp_theirs).abs().max().item(), lp_ours.abs().max().item()
    med = lambda xs: statistics.median(xs)
    rows = {"training step, tokens/s": tuple(med([x["tokens_per_s"] for x in train[w]]) for w in ("ours", "theirs")),
            "training step, peak memory MiB": tuple(med([x["peak_above_libs_mib"] for x in train[w]]) for w in ("ours", "theirs"))}
    for name, by in inf["rates"].items():
        label = "reference scoring, tokens/s" if name == "scoring" else f"{name}, tokens/s"
        rows[label] = (med(by["ours"]), med(by["theirs"]))
    return rows, inf


TARGETS = {"training step, tokens/s": (">=", 1.5), "training step, peak memory MiB": ("<=", 0.6),  # the project's
           "reference scoring, tokens/s": (">=", 1.5), "sampling batch 1, tokens/s": (">=", 1.5),
           "sampling batch 16, tokens/s": (">=", 2.0)}
PAIRRM_ROW = f"PairRM judge (K={PAIRRM_K}), prompts/s"
GPU_TARGETS = {PAIRRM_ROW: (">=", 10.0)}  # on a GPU; on a CPU the row is reported only


def table(rows, gpu=True):
    out = ["| row | ours | theirs | ours/theirs | target | met? |", "|---|---|---|---|---|---|"]
    for name, (a, t) in rows.items():
        ratio = a / t
        if name in GPU_TARGETS and not gpu:
            op, want = GPU_TARGETS[name]
            out.append(f"| {name} | {num(a)} | {num(t)} | {ratio:.2f}x | GPU: {op} {want}x | — (CPU) |")
            continue
        op, want = TARGETS.get(name, GPU_TARGETS.get(name, ("", None)))
        met = "—" if want is None else ("yes" if (ratio >= want if op == ">=" else ratio <= want) else "NO")
        out.append(f"| {name} | {num(a)} | {num(t)} | {ratio:.2f}x | {f'{op} {want}x' if want else '—'} | {met} |")
    return "\n".join(out)


def num(x):
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def machine(b, dev):
    import bitsandbytes, peft, transformers
    gpu = f", GPU {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""
    return (f"machine: {kernels.cpu_description()}, {b.threads} torch threads{gpu}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")


def pairrm_table(b, dev, run=child):
    """The PairRM row: medians of the rounds, and how far apart the two judges' P are."""
    x = run(b, "pairrm", dev)
    rows = {PAIRRM_ROW: tuple(statistics.median(x["rates"][w]) for w in ("ours", "theirs"))}
    return (table(rows, gpu=dev.type == "cuda") + f"\n\n{x['prompts']} prompts x K={x['k']}, {'DeBERTa-v3-large-shaped' if b.pairrm_shape == 'large' else b.pairrm_shape} "
            f"PairRM with random weights; theirs: llm-blender's rank(batch_size=1); P, ours vs theirs: max |diff| "
            f"{x['p_max_abs_diff']:.1e}"), rows


def run(b, dev, pairrm_only=False):
    b = dataclasses.replace(b, threads=b.threads or torch.get_num_threads())
    models = [] if pairrm_only else [b.model or "embedded SmolLM2-135M-Instruct"]
    if dev.type == "cuda" and not b.model and not pairrm_only:
        models.append(LLAMA3_8B)
    print(machine(b, dev))
    print(f"settings: {b.rows} pairs x seq <= {b.seq_len}, LoRA r={b.lora_r}, {b.steps} timed steps x {b.train_rounds} "
          f"training rounds, {b.gen_tokens} new tokens, {b.repeats} scoring/sampling rounds, {pipeline.compute_dtype(dev)} on {dev}")
    tables = []
    for name in models:
        bm = dataclasses.replace(b, model="" if name.startswith("embedded") else name)
        bm = for_24gb(bm) if name == LLAMA3_8B else bm
        print(f"\n### {name}")
        rows, inf = measure(bm, dev)
        text = table(rows) + (f"\n\nscoring log-probs, ours vs theirs: max |diff| {inf['logp_max_abs_diff']:.2e} "
                              f"(values up to {inf['logp_scale']:,.0f} nats)")
        print(text)
        tables.append(f"### {name}\n\n{text}")
    if b.pairrm_prompts:
        print("\n### PairRM")
        text, _ = pairrm_table(b, dev)
        print(text)
        tables.append(f"### PairRM\n\n{text}")
    return tables


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help=f"HF folder (default: the embedded SmolLM2-135M); {LLAMA3_8B}: random 8B shapes (GPU)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--rows", type=int, default=Bench.rows, help="pairs per training/scoring batch")
    p.add_argument("--gen-tokens", type=int, default=Bench.gen_tokens, help="new tokens per sampled row")
    p.add_argument("--repeats", type=int, default=Bench.repeats, help="alternating rounds (medians are reported)")
    p.add_argument("--train-rounds", type=int, default=Bench.train_rounds, help="training rounds (fresh processes)")
    p.add_argument("--steps", type=int, default=Bench.steps, help="timed training steps per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="1 pair of <= 128 tokens, 16 new tokens, 1 training round, "
                   "2 PairRM prompts")
    p.add_argument("--pairrm-prompts", type=int, default=None, help=f"prompts in the PairRM row (default {Bench.pairrm_prompts}, "
                   "--quick 2; 0: no PairRM row)")
    p.add_argument("--pairrm-only", action="store_true", help="the PairRM row alone")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.config:
        c = json.loads(a.config)
        return dataclasses.replace(Bench(), **{**c, "gen_batches": tuple(c["gen_batches"])}), a
    b = Bench(model=a.model, device=a.device, rows=a.rows, gen_tokens=a.gen_tokens, repeats=a.repeats, train_rounds=a.train_rounds, steps=a.steps,
              threads=a.threads)
    b = quick(b) if a.quick else b
    return (b if a.pairrm_prompts is None else dataclasses.replace(b, pairrm_prompts=a.pairrm_prompts)), a


if __name__ == "__main__":
    b, a = parse_args()
    dev = device_of(b)
    if a.worker:
        worker(b, a.worker, dev)
    else:
        run(b, dev, pairrm_only=a.pairrm_only)
