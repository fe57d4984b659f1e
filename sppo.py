"""sppo.py: Self-Play Preference Optimization (arXiv 2405.00675), the whole loop.

For each iteration t, starting from pi_0 = the base model:
  generate  K responses per prompt from pi_t                      -> iter<t>/responses.jsonl
  judge     a K x K preference matrix P per prompt                -> iter<t>/judgments.jsonl
  pairs     chosen/rejected + win probabilities, and the
            reference log-probs log pi_t(y|x) (frozen weights)    -> iter<t>/pairs.jsonl
  train     LoRA on an NF4 copy of pi_t with the SPPO loss         -> iter<t>/adapter/
  merge     pi_{t+1} = pi_t + (alpha/r) B A, a full HF checkpoint  -> iter<t>/model/
  evaluate  win rate of pi_{t+1} against pi_0 on held-out prompts  -> iter<t>/eval.json, metrics.jsonl

Read top to bottom: the settings, the SPPO maths (win rates, pairs, the loss, one training
step), the six stages, the loop. Every stage reads and writes named files under runs/<name>/;
a stage whose output exists is skipped, so running the same command again resumes where it
stopped (the machinery for that is in runs.py, the start-up checks in checks.py, the devices in
pipeline.py and parallel.py).
"""
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import generate
import judge as judges
import lora
import pipeline
from machinery import checks, convert, files, kernels, loader, parallel, report, runs, stats

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- settings

def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Settings:
    # what to train, on what
    model: str = opt("", "base model: a local Hugging Face folder (Llama/Mistral). Default: the embedded SmolLM2-135M-Instruct")
    prompts: str = opt(str(HERE / "prompts/train.jsonl"), "training prompt pool (JSONL/JSON/Parquet with `prompt` or `messages`)")
    heldout: str = opt(str(HERE / "prompts/heldout.jsonl"), "held-out prompts for the win-rate evaluation")
    name: str = opt("default", "run name: everything goes under runs/<name>/")
    runs_dir: str = opt(str(HERE / "runs"), "folder holding the runs")
    iters: int = opt(3, "SPPO iterations; the pool is split into this many disjoint parts, one per iteration")
    prompts_per_iter: int = opt(96, "prompts used per iteration (from its part of the pool); 0 = the whole part")
    eval_prompts: int = opt(100, "the first N held-out prompts used for evaluation (make iterate: 100 of the embedded 330, "
                             "for speed; make compare: all); 0 = all")
    seed: int = opt(0, "seed for the prompt split, LoRA init and data order")
    # 1. generation (the paper: K=5, temperature 0.7, top-p 0.9)
    k: int = opt(5, "responses sampled per prompt (K)")
    temperature: float = opt(0.7, "sampling temperature")
    top_p: float = opt(0.9, "nucleus sampling top-p")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    max_new_tokens: int = opt(64, "max new tokens per response (the paper used 2048)")
    gen_batch: int = opt(24, "prompts per generation batch (also the resume chunk)")
    eval_batch: int = opt(50, "held-out prompts answered together (greedy) in the evaluation; 0 = --gen-batch")
    kl_samples: int = opt(0, "held-out prompts on which to estimate KL(pi_(t+1) || pi_t) each iteration (one sample "
                          "each at temperature 1, scored under both models); 0 = none")
    backend: str = opt("builtin", "sampler: builtin (our KV-cache sampler) or vllm (GPU extra)", choices=["builtin", "vllm"])
    vllm_memory: float = opt(0.85, "fraction of GPU memory the vLLM sampler may take")
    vllm_tp: int = opt(1, "GPUs vLLM splits the sampler over (its tensor parallel; under torchrun rank 0 runs it)")
    # 2. judging
    judge: str = opt("verifiable", "judge: verifiable (machine-checkable constraints), pairrm (llm-blender), llm (a local LM)",
                     choices=["verifiable", "pairrm", "llm"])
    pairrm_dir: str = opt("", "local folder of llm-blender/PairRM (for --judge pairrm)")
    pairrm_backbone: str = opt("", "local folder of microsoft/deberta-v3-large, PairRM's backbone (for --judge pairrm)")
    pairrm_mode: str = opt("scores", "PairRM mode: scores (the paper's) or pairwise", choices=["scores", "pairwise"])
    judge_model: str = opt("", "local HF folder of the judging LM (for --judge llm)")
    judge_batch: int = opt(16, "prompts per judge call (the resume chunk); PairRM runs this many comparisons per forward")
    tau: float = opt(0.1, "verifiable judge temperature: P = sigmoid((r_i - r_j) / tau)")
    # 3-4. the update
    loss: str = opt("sppo", "loss: sppo (the paper's), sppo_single, dpo, ipo", choices=["sppo", "sppo_single", "dpo", "ipo"])
    eta: float = opt(50.0, "SPPO eta = 1/beta (--loss sppo, sppo_single; dpo and ipo do not use it): log-ratio target is eta * (P_win - 1/2). The paper: 1000 for full fine-tuning")
    beta: float = opt(0.1, "DPO/IPO beta; --loss sppo and sppo_single do not use it (their strength is --eta)")
    lr: float = opt(5e-4, "learning rate (LoRA params; the paper's 5e-7 was for full fine-tuning)")
    epochs: int = opt(3, "epochs over each iteration's pairs")
    batch_size: int = opt(8, "pairs per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    warmup: float = opt(0.1, "fraction of steps with linear warm-up (then linear decay)")
    clip: float = opt(1.0, "gradient-norm clipping")
    max_len: int = opt(256, "max tokens of prompt + response in training")
    max_prompt_len: int = opt(160, "max prompt tokens in training (the prompt's end is kept)")
    long_prompts: str = opt("error", "a prompt longer than --max-prompt-len tokens: error (stop and name it), "
                            "truncate (cut its text's start, keep the request's end) or skip; counted", choices=["error", "truncate", "skip"])
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha (scale alpha/r)")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "comma-separated linear layers to adapt")
    quant_type: str = opt("nf4", "4-bit type of the frozen base during training", choices=["nf4", "fp4"])
    nf4_compute: str = opt("auto", "dtype of the 4-bit products in scoring and training; auto = bfloat16 (QLoRA's) on CUDA, float32 "
                           "on CPU (bfloat16 is faster on CPUs with AVX512-BF16 or AMX, see docs/BENCHMARKS.md)", choices=["auto", "bfloat16", "float32"])
    grad_ckpt: bool = opt(False, "gradient checkpointing per block (saves activation memory)")
    ckpt_every: int = opt(10, "optimizer steps between training checkpoints (resume points)")
    # hardware
    device: str = opt("", "cpu or cuda[:i]; default cuda when available")
    devices: str = opt("", "split the layers over these devices, e.g. cuda:0,cuda:1 (a pipeline; see pipeline.py)")
    micro_batches: int = opt(1, "GPipe micro-batches per training/scoring batch, so split devices work at once")
    plan: bool = opt(False, "print the memory each device needs for these settings and stop, before loading anything")
    device_mem: float = opt(0.0, "GiB per device for the plan (0 = each CUDA device's total; 24 otherwise)")
    card: str = opt("", "for --plan on a machine without the cards: the card each device of --devices is, its memory "
                    "from a table (3090, 4090: 24 GiB; a100-40; a100-80, h100: 80; h200: 141); reads config.json only")
    report_to: str = opt("none", "also send the training metrics to: tensorboard (event files under runs/<name>/tensorboard) "
                         "or wandb (needs `pip install wandb`; offline with WANDB_MODE=offline)",
                         choices=["none", "tensorboard", "wandb"])
    merged_dtype: str = opt("auto", "dtype of the merged checkpoints; auto = the base checkpoint's own (bf16 for Llama-3: "
                            "16 GB per iteration, not float32's 32)", choices=["auto", "float32", "bfloat16", "float16"])

    # Settings that change no artifact: a run may be resumed with other values.
    HARMLESS = ("name", "runs_dir", "device", "devices", "micro_batches", "plan", "device_mem", "card", "judge_batch",
                "vllm_memory", "vllm_tp", "report_to")


def parse_args(argv=None):
    return checks.parse_args(Settings, argv, __doc__.split("\n\n")[0])


# ----------------------------------------------------------------------------- the SPPO maths
# From a judge's K x K matrix P (P[i][j] = P(y_i beats y_j)) to one training step.

def build_pair(P):
    """Each response's estimated win rate against pi_t is the mean of its row of P (the self
    term 1/2 included, as the authors' code): p_hat_i = (1/K) sum_j P[i][j]. Chosen = argmax,
    rejected = argmin, first index on ties; None when best and worst tie (nothing to prefer)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 2:
        raise ValueError(f"P must be a K x K matrix with K >= 2, got shape {P.shape}")
    if not np.isfinite(P).all():
        raise ValueError("P has NaN or inf")
    p_hat = P.mean(axis=1)
    w, l = int(np.argmax(p_hat)), int(np.argmin(p_hat))
    if p_hat[w] - p_hat[l] <= 1e-9:  # up to float rounding
        return None
    return {
        "chosen_idx": w,
        "rejected_idx": l,
        "chosen_probs": float(P[w, l]),
        "chosen_probs_win": float(p_hat[w]),
        "chosen_probs_lose": float(p_hat[l]),
    }


def preference_loss(kind, logp_w, logp_l, ref_w, ref_l, p_win, p_lose, p_wl, eta, beta):
    """Per-pair losses. logr = log pi_theta(y|x) - log pi_t(y|x).

    sppo:        the paper's eq. (4.2) on both responses, with p_hat = estimated win rates
                 ((logr_w - eta (p_win - 1/2))^2 + (logr_l - eta (p_lose - 1/2))^2) / 2
    sppo_single: the same with the pair's own P(y_w > y_l) for both (the authors' code's variant)
    dpo, ipo:    the baselines the paper compares with.

    The square loss pulls each response's log-ratio towards eta times how much better than
    average it is: a multiplicative-weights step pi_{t+1}(y) ~ pi_t(y) exp(eta P(y > pi_t)).
    """
    logr_w, logr_l = logp_w - ref_w, logp_l - ref_l
    if kind in ("sppo", "sppo_single"):
        target_w, target_l = sppo_targets(kind, p_win, p_lose, p_wl, eta)
        return ((logr_w - target_w) ** 2 + (logr_l - target_l) ** 2) / 2
    if kind == "dpo":
        return -F.logsigmoid(beta * (logr_w - logr_l))
    if kind == "ipo":
        return (logr_w - logr_l - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss {kind!r}")


def sppo_targets(kind, p_win, p_lose, p_wl, eta):
    """The log-ratios the SPPO square loss pulls chosen and rejected towards."""
    if kind == "sppo":
        return eta * (p_win - 0.5), eta * (p_lose - 0.5)
    return eta * (p_wl - 0.5), -eta * (p_wl - 0.5)  # sppo_single


def train_step(score, batch, s, pad_id, dev, amp=None):
    """One micro-batch: policy log-probs of chosen and rejected in one forward, then the loss.
    score(ids, seg) -> log-probs: data.sequence_logps on the policy (or on pipeline.GPipe over
    it), or under torchrun its DDP wrapper. -> (mean loss, what the log shows: each pair's
    log-ratios of chosen and rejected, their SPPO targets (None for dpo/ipo), the tokens run)."""
    ids, seg = data.pair_tensors(batch, s, pad_id, dev)
    with pipeline.autocast(dev, amp):
        logps = score(ids, seg)
    f = lambda key: torch.tensor([p[key] for p in batch], device=logps.device, dtype=torch.float32)
    ref_w, ref_l = f("ref_chosen_logp"), f("ref_rejected_logp")
    probs = f("chosen_probs_win"), f("chosen_probs_lose"), f("chosen_probs")
    losses = preference_loss(s.loss, logps[:, 0], logps[:, 1], ref_w, ref_l, *probs, s.eta, s.beta)
    targets = sppo_targets(s.loss, *probs, s.eta) if s.loss in ("sppo", "sppo_single") else (None, None)
    seen = {"logr_w": logps[:, 0] - ref_w, "logr_l": logps[:, 1] - ref_l, "target_w": targets[0], "target_l": targets[1]}
    seen = {k: v.detach().tolist() for k, v in seen.items() if v is not None}
    seen["tokens"] = int(data.row_ends(seg).sum())  # what the forward ran: each row up to its last scored token
    return losses.mean(), seen


def batch_order(s, n):
    """The micro-batches of pair indices, epoch after epoch: a pure function of (seed, epoch),
    so a resumed run replays it, and reference scoring uses the first epoch's batches."""
    order = []
    for e in range(s.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed * 1000 + e)).tolist()
        order += [perm[i:i + s.batch_size] for i in range(0, n, s.batch_size)]
    return order


# ----------------------------------------------------------------------------- 1. generate

def sample(s, policy_dir, tok, rows, out_path, seeds, greedy=False, desc="generate", batch=0):
    """K samples per prompt, in chunks of gen_batch prompts (`runs.in_chunks`). vLLM samples the
    k-th with seed seeds[k] in one pass over all prompts, as the authors' code's K vLLM passes;
    the built-in sampler draws the k-th of chunk c with seed 1000 seeds[k] + c. Either way the
    same chunk always gets the same seeds, so a resumed run samples what an uninterrupted one would."""
    temperature = 0.0 if greedy else s.temperature

    def setup(todo):
        if s.backend != "vllm":
            return pipeline.load(s, policy_dir)
        if parallel.is_main():  # one vLLM run for the whole stage
            from machinery import vllm_backend
            return vllm_backend.sampler(s, policy_dir, todo, [tok.encode_chat(data.messages_of(r)) for r in todo], temperature,
                                        tok.stop_ids, seeds)

    def work(c, chunk, ctx):
        ids = [tok.encode_chat(data.messages_of(r)) for r in chunk]
        outs = ctx(chunk) if s.backend == "vllm" else generate.generate_seeds(
            ctx, ids, s.max_new_tokens, temperature, s.top_p, s.top_k, tok.stop_ids, seeds=[seed * 1000 + c for seed in seeds],
            pad_id=tok.pad_id)
        lines = []
        for i, r in enumerate(chunk):
            # response_ids are exactly the sampled ids, the stop token that ended a response included
            # (Gemma-2 stops on <end_of_turn>, not its eos; Llama-3 on <|eot_id|>): they are what is
            # scored and trained. A response cut at --max-new-tokens has no end token.
            resp = [o[i] for o in outs]
            finished = [bool(x) and x[-1] in tok.stop_ids for x in resp]
            lines.append({"id": r["id"], "prompt_ids": ids[i], "finished": finished, "response_ids": resp,
                          "responses": [tok.decode(x[:-1] if f else x) for x, f in zip(resp, finished)]})
        return lines

    # vLLM parallelises itself, so with torchrun rank 0 runs it alone: one chunk per round, its own.
    return runs.in_chunks(rows, batch or s.gen_batch, out_path, work, "generate", desc, "prompt", setup,
                     per=1 if s.backend == "vllm" else None)


# ----------------------------------------------------------------------------- 2. judge

def make_judge(s, tok):
    """The judge, loaded in the stage that uses it and freed with it: a model judge (an 8B LLM)
    must not hold GPU memory through sampling and training. checks.check_judge saw its files."""
    if s.judge == "llm":
        return judges.make_judge("llm", model=pipeline.load(s, s.judge_model), tokenizer=data.Tokenizer.from_dir(s.judge_model),
                                 batch_size=s.judge_batch)
    if s.judge == "pairrm":
        return judges.make_judge("pairrm", ranker_dir=s.pairrm_dir, backbone_dir=s.pairrm_backbone or None,
                                 mode=s.pairrm_mode, batch_size=s.judge_batch, device=str(pipeline.device_of(s)))
    return judges.make_judge("verifiable", tau=s.tau)


def judge_responses(s, tok, rows, responses, out_path):
    """P matrices, one per prompt, in chunks of judge_batch prompts (`runs.in_chunks`). The prompt
    shown to PairRM is chat-rendered, as in the authors' code."""
    by_id = {g["id"]: g for g in responses}

    def work(c, chunk, judge):
        Ps = judge([tok.render_chat(data.messages_of(r)) for r in chunk], [by_id[r["id"]]["responses"] for r in chunk], chunk)
        return [{"id": r["id"], "P": np.asarray(P).tolist()} for r, P in zip(chunk, Ps)]

    return runs.in_chunks(rows, s.judge_batch, out_path, work, "judge", "judge", "prompt", setup=lambda todo: make_judge(s, tok))


# ----------------------------------------------------------------------------- 3. pairs + reference log-probs

def build_pairs(rows):
    """rows of {"id", "prompt", "responses": [K str], "P": K x K} -> (pairs, stats)."""
    pairs = []
    stats = {"prompts": 0, "pairs": 0, "identical": 0, "tied": 0, "same_text": 0}
    for row in rows:
        stats["prompts"] += 1
        responses = row["responses"]
        if len(responses) != len(row["P"]):
            raise ValueError(f"prompt {row['id']}: {len(responses)} responses but P is {len(row['P'])} x ...")
        # all K samples identical (e.g. greedy-like sampling): any P is judge noise, skip before looking
        if len(set(responses)) == 1:
            stats["identical"] += 1
            continue
        pair = build_pair(row["P"])
        if pair is None:
            stats["tied"] += 1
            continue
        chosen, rejected = responses[pair["chosen_idx"]], responses[pair["rejected_idx"]]
        if chosen == rejected:  # duplicates among the K scored apart: pushing one text both up and down
            stats["same_text"] += 1
            continue
        out = {"id": row["id"], "prompt": row["prompt"], "chosen": chosen, "rejected": rejected, **pair}
        if "messages" in row:  # keep the chat form so the trainer renders the same prompt the sampler saw
            out["messages"] = row["messages"]
        pairs.append(out)
    stats["pairs"] = len(pairs)
    return pairs, stats


def make_pairs(s, tok, policy_dir, responses, judgments, out_path, keep=None):
    """Pairs as the authors' code builds them, each stored with log pi_t of chosen and rejected.

    The reference model is the frozen NF4 pi_t that training starts from (adapter off), so
    the log-ratio is exactly 0 at step 0. It is computed once, here, before any training.
    keep: a list, to which the NF4 pi_t loaded here is appended, for training to adapt that very
    model instead of quantizing pi_t again (quantizing consumes no random numbers: a handed-on
    and a fresh model give the same run)."""
    if out_path.exists():
        return files.read_jsonl(out_path)
    by_id = {g["id"]: g for g in responses}
    rows = [dict(by_id[j["id"]], P=j["P"], prompt=by_id[j["id"]]["prompt_ids"]) for j in judgments]
    pairs, stats = build_pairs(rows)
    for p in pairs:
        g = by_id[p["id"]]
        w, l = p["chosen_idx"], p["rejected_idx"]
        p["prompt_ids"] = g["prompt_ids"]
        # the sampled ids, stop token included: training also teaches to stop, on the token the model stops on
        p["chosen_ids"], p["rejected_ids"] = g["response_ids"][w], g["response_ids"][l]
        p.pop("prompt")
    dev = pipeline.device_of(s)

    def work(c, batch, base):
        ids, seg = data.pair_tensors(batch, s, tok.pad_id, dev)
        with torch.no_grad(), pipeline.autocast(dev):
            lp = data.sequence_logps(base, ids, seg).tolist()
        return [dict(p, ref_chosen_logp=w, ref_rejected_logp=l) for p, (w, l) in zip(batch, lp)]

    # scored in training's first-epoch batches, as training will score them (see pipeline.autocast)
    batches = [[pairs[i] for i in b] for b in batch_order(s, len(pairs))[:math.ceil(len(pairs) / s.batch_size)]]
    pairs = runs.in_chunks(pairs, batches, out_path, work, "pairs", "reference log-probs", "pair",
                           setup=lambda todo: pipeline.micro_batched(load_reference(s, policy_dir, keep), s.micro_batches))
    print(f"  pairs: {len(pairs)} from {len(rows)} prompts; no pair: {stats}")
    return pairs


def load_reference(s, policy_dir, keep=None):
    model = pipeline.load(s, policy_dir, quantized=True)
    if keep is not None:
        keep.append(model)
    return model


# ----------------------------------------------------------------------------- 4. train

def lora_config(s):
    return lora.LoRAConfig(r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                           targets=tuple(s.lora_targets.split(",")))


def train(s, tok, policy_dir, pairs, work_dir, adapter_dir, track=None, step_offset=0, model=None):
    """LoRA on an NF4 copy of pi_t (model: the reference's, handed on by make_pairs; else loaded
    here). Resumes from work_dir/ckpt.pt (written atomically).
    -> the log, one entry per optimizer step (step_log); each is also given to track(scalars,
    step_offset + step) (--report-to)."""
    if (adapter_dir / "adapter_config.json").exists():
        return files.read_jsonl(work_dir / "losses.jsonl") if (work_dir / "losses.jsonl").exists() else []
    if not pairs:
        raise runs.RunError(f"{work_dir.parent}/pairs.jsonl has no pairs: nothing to train on")
    dev = pipeline.device_of(s)
    torch.manual_seed(s.seed)
    model = model if model is not None else pipeline.load(s, policy_dir, quantized=True)
    lora.add_lora(model, lora_config(s))
    model.grad_ckpt = s.grad_ckpt
    params = list(lora.lora_params(model).values())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(pairs) / s.batch_size)
    total = math.ceil(per_epoch * s.epochs / s.grad_accum)
    warm = max(1, int(s.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, max(0.0, (total - i) / max(1, total - warm))))
    step, log = 0, []
    ckpt = work_dir / "ckpt.pt"
    if ckpt.exists():
        step, log = runs.load_train_state(ckpt, params, opt, sched)
    W, net = parallel.world(), pipeline.micro_batched(model, s.micro_batches)
    # with torchrun: LoRA gradients all-reduced by DDP (parallel.ddp)
    score = parallel.ddp(net) if W > 1 else functools.partial(data.sequence_logps, net)
    order = batch_order(s, len(pairs))
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step")
    while step < total:
        micro = order[step * s.grad_accum:(step + 1) * s.grad_accum]
        loss_sum, seen, t0 = 0.0, {}, time.perf_counter()
        for mb in micro:
            mine, weight = parallel.share_of(mb)  # with torchrun the ranks split each micro-batch
            loss, got = train_step(score, [pairs[i] for i in mine], s, tok.pad_id, dev)
            whole, got = parallel.whole_batch(loss, got, weight)
            parallel.merge_log(seen, got)  # the optimizer step's micro-batches, for the log
            if not math.isfinite(whole):
                runs.not_finite(f"loss is {whole}", step, ckpt)
            (loss * weight / len(micro)).backward()
            loss_sum += whole / len(micro)
        # a finite loss can still give inf gradients; stepping on them would put NaN in the weights
        norm = torch.nn.utils.clip_grad_norm_(params, s.clip)
        if not torch.isfinite(norm):
            runs.not_finite(f"gradient norm is {norm.item()}", step, ckpt)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log.append(report.step_log(step, loss_sum, lr, norm.item(), seen, time.perf_counter() - t0))
        if step == 1:  # the policy starts as the reference: exactly 0 where training scores as the reference was scored
            print(f"  step 0: mean |log-ratio| {log[-1]['abs_logr']:.2e}")
        if track:
            track({f"train/{k}": v for k, v in log[-1].items() if k != "step"}, step_offset + step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4g}", margin=f"{log[-1]['margin']:.2f}", acc=f"{log[-1]['accuracy']:.2f}")
        if (step % s.ckpt_every == 0 or step == total) and parallel.is_main():
            runs.save_train_state(ckpt, params, opt, sched, step, log)
            runs.resume_point("train")
    bar.close()
    if parallel.is_main():
        files.write_jsonl(work_dir / "losses.jsonl", log)
        lora.save_adapter(model, lora_config(s), adapter_dir, base_path=str(policy_dir))
    return log


# ----------------------------------------------------------------------------- 5. merge

def merge(s, policy_dir, adapter_dir, out_dir):
    """pi_{t+1}: the adapter folded into pi_t's full-precision weights read from disk."""
    if not (out_dir / "config.json").exists() and parallel.is_main():
        bar = tqdm(total=len(loader.checkpoint_files(policy_dir)), desc="merge", unit="shard")
        dtype = None if s.merged_dtype == "auto" else getattr(torch, s.merged_dtype)
        lora.merge_adapter(policy_dir, adapter_dir, out_dir, lora_config(s), dtype,
                           on_shard=lambda file: (bar.update(1), runs.resume_point("merge")))
        bar.close()
    parallel.barrier()  # with torchrun: the others wait for rank 0's merge before loading pi_{t+1}
    return out_dir


# ----------------------------------------------------------------------------- 6. evaluate

def evaluate(s, t, tok, heldout, base_answers, new_answers, it, loss, kl=None):
    """Win rate of pi_{t+1} over pi_0 on held-out prompts (each pair judged in both orders), and,
    as preference training loves to change length, both models' answer lengths and each figure at
    equal length too; where prompts carry checks, satisfaction rates, the paired gain and a table
    per check kind (stats.report); kl: kl_estimate's. -> it/eval.json, it/alpaca_eval/."""
    out_path = it / "eval.json"
    report.export_alpaca_eval(it / "alpaca_eval" / "model_outputs.json", heldout, new_answers, f"{s.name}_sppo_iter{t + 1}")
    if out_path.exists():
        return json.loads(out_path.read_text())
    prompts, judge = [tok.render_chat(data.messages_of(r)) for r in heldout], make_judge(s, tok)
    new = [a["responses"][0] for a in new_answers]
    old = [a["responses"][0] for a in base_answers]
    bar = tqdm(total=math.ceil(len(heldout) / s.judge_batch), desc="evaluate", unit="batch")
    wins = judges.win_rates(judge, prompts, new, old, heldout, s.judge_batch, lambda: (bar.update(1), runs.resume_point("evaluate")))
    bar.close()
    res = {"iter": t, "n_eval": len(wins), "train_loss": loss, **stats.report(heldout, old, new, wins, s.tau)}
    if kl is not None:
        res["kl"] = kl
    files.write_json(out_path, res)
    runs.resume_point("evaluate")
    return res


def kl_estimate(s, tok, old_dir, new_dir, rows, out_path):
    """KL(pi_{t+1} || pi_t) on held-out prompts by its definition, E_{y ~ pi_{t+1}}[log pi_{t+1}(y|x)
    - log pi_t(y|x)]: one sample per prompt from pi_{t+1} at temperature 1 with no top-p or top-k
    (the models' own distributions, not the sampler's), scored under both models in full
    precision. -> (mean, 95% half-width) over prompts; responses cut at --max-new-tokens make it
    the KL of the first max-new-tokens tokens."""
    got = sample(dataclasses.replace(s, temperature=1.0, top_p=1.0, top_k=0), new_dir, tok, rows, out_path, [s.seed],
                 desc="KL samples")
    if not parallel.is_main():
        return None
    chunks = [got[i:i + s.batch_size] for i in range(0, len(got), s.batch_size)]
    batches = [data.seq_tensors([g["prompt_ids"] for g in c], [g["response_ids"][0] for g in c], s, tok.pad_id, pipeline.device_of(s))
               for c in chunks]

    @torch.no_grad()
    def logps(model_dir):
        m = pipeline.load(s, model_dir)
        return [x for ids, mask in batches for x in data.sequence_logps(m, ids, mask).tolist()]

    return stats.mean_ci(np.subtract(logps(new_dir), logps(old_dir)))


# ----------------------------------------------------------------------------- the loop

def run(s):
    t0 = time.time()
    # Start-up: every input is checked before the run folder is touched, so a bad start costs
    # nothing and leaves the folder as it was.
    checks.check_flags(s)
    s.device, s.devices = parallel.setup(s.device, s.devices)  # torchrun: join the ranks, pick this one's devices
    base_dir = Path(s.model) if s.model else convert.embedded_model_dir()
    checks.check_plan(s, base_dir)  # each device's memory (always on CUDA); --plan ends here
    checks.check_model(base_dir)
    tok = data.Tokenizer.from_dir(base_dir)
    pool, stats = data.load_prompts(s.prompts)
    heldout, _ = data.load_prompts(s.heldout)
    heldout = heldout[:s.eval_prompts] if s.eval_prompts else heldout
    pool, stats["too_long"] = data.fit_prompts(pool, tok, s.max_prompt_len, s.long_prompts)
    heldout, long_heldout = data.fit_prompts(heldout, tok, s.max_prompt_len, s.long_prompts)
    parts = data.split_prompts(pool, s.iters, s.prompts_per_iter, s.seed)  # one disjoint part per iteration
    checks.check_prompts(s, pool, heldout, parts, s.prompts)
    devices = s.devices.split(",") if s.devices else [str(pipeline.device_of(s))]
    run_dir = runs.open_run_folder(Path(s.runs_dir) / s.name, s, Settings.HARMLESS, devices)
    print(f"sppo: model {base_dir}, {len(pool)} prompts ({stats}), {s.iters} iterations x {len(parts[0])} prompts, "
          f"K={s.k}, judge {s.judge}, loss {s.loss}; run folder {run_dir}")
    if stats["too_long"] or long_heldout:
        print(f"  prompts longer than --max-prompt-len {s.max_prompt_len}: {stats['too_long']} training, "
              f"{long_heldout} held-out ({'truncated' if s.long_prompts == 'truncate' else 'skipped'})")
    seeds = [50 * k for k in range(s.k)]  # 0, 50, ..., 200: the authors' code's vLLM seeds (see sample)
    fresh, t_base = not (run_dir / "eval_base.jsonl").exists(), time.time()
    with runs.stage("base", "generate") as st:
        base_answers = sample(s, base_dir, tok, heldout, run_dir / "eval_base.jsonl", [0], greedy=True, desc="eval pi_0",
                              batch=s.eval_batch)
        if parallel.is_main():
            report.export_alpaca_eval(run_dir / "alpaca_eval" / "model_outputs.json", heldout, base_answers, f"{s.name}_pi0")
        st["summary"] = report.answers_summary(base_answers, "held-out answers")
    cpu = pipeline.device_of(s).type == "cpu" and s.backend == "builtin" and not s.devices
    if fresh and cpu and s.iters:  # how long this will take here, before the long part starts
        each = report.iteration_estimate(len(parts[0]), s.k, s.epochs, len(heldout), time.time() - t_base)
        print(f"estimate: ~{report.minutes(each)} per iteration, ~{report.minutes(s.iters * each)} for {s.iters} at this "
              f"machine's speed (from pi_0's answers; {kernels.cpu_description()})", flush=True)
    policy, table, steps = base_dir, [], 0
    track = report.Tracker(s.report_to, run_dir, s.name, dataclasses.asdict(s)) if parallel.is_main() else None
    for t in range(s.iters):
        it = run_dir / f"iter{t}"
        it.mkdir(exist_ok=True)
        print(f"== iteration {t}: policy {policy}")
        t_it = time.time()
        where = f"iter {t}"
        with runs.stage(where, "generate") as st:
            responses = sample(s, policy, tok, parts[t], it / "responses.jsonl", seeds)
            st["summary"] = report.answers_summary(responses, "responses")
        with runs.stage(where, "judge") as st:
            judgments = judge_responses(s, tok, parts[t], responses, it / "judgments.jsonl")
            st["summary"] = f"{len(judgments)} prompts, {len(judgments) * s.k * (s.k - 1) // 2} pairs of responses"
        nf4 = []  # the reference's NF4 pi_t, when make_pairs loads it: training adapts that very model
        with runs.stage(where, "pairs") as st:
            pairs = make_pairs(s, tok, policy, responses, judgments, it / "pairs.jsonl", keep=nf4)
            st["summary"] = f"{len(pairs)} chosen/rejected pairs with reference log-probs"
        (it / "train").mkdir(exist_ok=True)
        with runs.stage(where, "train") as st:
            log = train(s, tok, policy, pairs, it / "train", it / "adapter", track, steps, model=nf4.pop() if nf4 else None)
            steps += len(log)
            st["summary"] = f"{len(log)} steps, loss {log[0]['loss']:.4g} -> {log[-1]['loss']:.4g}" if log else "0 steps"
        with runs.stage(where, "merge") as st:
            new = merge(s, policy, it / "adapter", it / "model")
            st["summary"] = f"pi_{t + 1} in {new}"
        with runs.stage(where, "evaluate") as st:
            answers = sample(s, new, tok, heldout, it / "eval_answers.jsonl", [0], greedy=True,
                             desc="eval pi_%d" % (t + 1), batch=s.eval_batch)
            kl = None
            if s.kl_samples and not (it / "eval.json").exists():
                kl = kl_estimate(s, tok, policy, new, heldout[:s.kl_samples], it / "kl_samples.jsonl")
            loss = float(np.mean([r["loss"] for r in log[-max(1, len(log) // 4):]])) if log else float("nan")
            if parallel.is_main():  # with torchrun the others go on and wait in the next collective
                res = evaluate(s, t, tok, heldout, base_answers, answers, it, loss, kl)
                st["summary"] = report.eval_summary(res)
                table.append(res)
                files.write_jsonl(run_dir / "metrics.jsonl", table)
                report.plot_metrics(run_dir, table)
                track(report.iteration_scalars(res), t + 1)
        policy = new
        if t + 1 < s.iters:
            took = time.time() - t_it
            print(f"iteration {t}: {report.minutes(took)}; ~{report.minutes(took * (s.iters - t - 1))} to go", flush=True)
    if track:
        track.close()
    if parallel.is_main() and table:
        summary = report.results(table)
        files.write_text(run_dir / "summary.md", summary)
        print("\n" + summary + f"wall time {(time.time() - t0) / 60:.1f} min")
    parallel.finish()
    return table


def main(argv=None):
    """The command line: a bad input or a run that cannot go on is one line on stderr and exit
    status 2, never a traceback (checks.fail)."""
    try:
        return run(parse_args(argv))
    except checks.ERRORS as e:
        checks.fail(e)
    except OSError as e:  # a full disk outside a stage (runs.stage names the stage otherwise)
        if not runs.disk_full(e):
            raise
        checks.fail(f"the disk is full ({runs.one_line(e)}): free some space and run the same command again")
    finally:
        runs.unlock_run_folder()  # taken in runs.open_run_folder; a process that dies loses it anyway


if __name__ == "__main__":
    main()
