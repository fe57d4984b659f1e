"""checks.py: the command line (parse_args: one flag per Settings field; fail: the one-line
`error:` and exit 2), and every bad start refused before anything is loaded or written. A flag
out of its range, a device that is not there, a judge without its files, a flag the chosen loss
would silently ignore, a prompt file that leaves an iteration with nothing to do: each is one
line naming the flag (or the file and line), so that a typo costs a second, not a run folder
that then refuses the corrected command.

The loaders check their own files (data.load_prompts, data.Tokenizer.from_dir,
model.Config.from_hf, loader.check_headers); this file checks what only the settings know, and
sppo.run calls its checks in order before it makes the run folder."""
import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import judge as judges
import lora
import model as M
import pipeline
import quant
from machinery import files, kernels, loader, report, runs


class FlagError(ValueError):
    """A bad flag or combination of flags. The message is one line and names the flag."""


SPPO_LOSSES = ("sppo", "sppo_single")

# flag: (test, what it must be). Flags not listed take any value their type parses.
RANGES = {
    "iters": (lambda v: v >= 1, ">= 1"), "k": (lambda v: v >= 2, ">= 2 (a pair needs two responses)"),
    "prompts_per_iter": (lambda v: v >= 0, ">= 0 (0 = all)"), "eval_prompts": (lambda v: v >= 0, ">= 0 (0 = all)"),
    "kl_samples": (lambda v: v >= 0, ">= 0 (0 = none)"),
    "temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 = off)"), "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "gen_batch": (lambda v: v >= 1, ">= 1"), "eval_batch": (lambda v: v >= 0, ">= 0 (0 = --gen-batch)"),
    "vllm_memory": (lambda v: 0 < v <= 1, "in (0, 1]"), "vllm_tp": (lambda v: v >= 1, ">= 1"),
    "judge_batch": (lambda v: v >= 1, ">= 1"), "tau": (lambda v: v > 0, "> 0"),
    "eta": (lambda v: v > 0, "> 0"), "beta": (lambda v: v > 0, "> 0"), "lr": (lambda v: v > 0, "> 0"),
    "epochs": (lambda v: v >= 1, ">= 1"), "batch_size": (lambda v: v >= 1, ">= 1"),
    "grad_accum": (lambda v: v >= 1, ">= 1"), "warmup": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "clip": (lambda v: v > 0, "> 0"), "max_len": (lambda v: v >= 2, ">= 2"),
    "max_prompt_len": (lambda v: v >= 1, ">= 1"), "lora_r": (lambda v: v >= 1, ">= 1"),
    "lora_alpha": (lambda v: v > 0, "> 0"), "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ckpt_every": (lambda v: v >= 1, ">= 1"), "micro_batches": (lambda v: v >= 1, ">= 1"),
    "device_mem": (lambda v: v >= 0, ">= 0 (0 = the card's own)"),
}


def parse_args(settings, argv, description):
    """The command line: one flag per field of the settings dataclass, its help and choices from
    the field's metadata, its default shown."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(settings):
        kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        if f.type == "bool" or f.type is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            p.add_argument(flag(f.name), type=typ, default=f.default, help=f.metadata["help"], **kw)
    return settings(**vars(p.parse_args(argv)))


ERRORS = (files.DataError, M.ModelError, FlagError, runs.RunError)  # what a bad input or a stopped run raises


def fail(e):
    """One line on stderr, `error: ...`, and exit status 2."""
    for bar in list(getattr(tqdm, "_instances", [])):  # end the stopped stage's bar: the error gets its own line
        bar.close()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def flag(name):
    return "--" + name.replace("_", "-")


def check_flags(s):
    """Raise FlagError for the first bad flag: out of range, a device that is not there, a judge
    without its files, or the strength of the other loss (the SPPO losses' strength is --eta,
    eta = 1/beta in the paper; DPO's and IPO's is --beta: a non-default value of the other one
    would change nothing, and whoever set it believes otherwise)."""
    for name, (ok, want) in RANGES.items():
        v = getattr(s, name)
        if not ok(v):
            raise FlagError(f"{flag(name)} must be {want}, got {v}")
    if s.max_prompt_len >= s.max_len:
        raise FlagError(f"--max-prompt-len ({s.max_prompt_len}) must be below --max-len ({s.max_len}): "
                        "a training sequence is the prompt and the response")
    if not s.name or s.name != os.path.basename(s.name) or s.name in (".", ".."):
        raise FlagError(f"--name must be a plain folder name, got {s.name!r}")
    targets = s.lora_targets.split(",")
    if not targets or not set(targets) <= set(quant.LINEARS):
        raise FlagError(f"--lora-targets must be a comma-separated subset of {','.join(quant.LINEARS)}, got {s.lora_targets!r}")
    default = {f.name: f.default for f in dataclasses.fields(s)}
    if s.loss in SPPO_LOSSES and s.beta != default["beta"]:
        raise FlagError(f"--beta is not used by --loss {s.loss} (its strength is --eta)")
    if s.loss not in SPPO_LOSSES and s.eta != default["eta"]:
        raise FlagError(f"--eta is not used by --loss {s.loss} (its strength is --beta)")
    if s.card and s.card not in pipeline.CARDS:
        raise FlagError(f"--card: unknown card {s.card!r} (known: {', '.join(pipeline.CARDS)}; "
                        "or give the memory itself, --device-mem GiB)")
    if s.card and s.device_mem:
        raise FlagError(f"--card {s.card} and --device-mem {s.device_mem:g} both give each device's memory; give one")
    if s.card and not s.plan:
        raise FlagError("--card is for --plan (a run plans with each card's own memory)")
    check_devices(s)
    check_nf4_compute(s)
    check_judge(s)
    if s.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise FlagError("--report-to wandb: wandb is not installed (pip install wandb; it also runs offline: "
                            "WANDB_MODE=offline)") from None


def check_devices(s):
    """--device and every entry of --devices name a device this machine has (cpu, or cuda[:i]
    with i below the number of visible cards). `--plan` with the cards' memory given (--card or
    --device-mem) plans for cards this machine need not have: it loads nothing onto them."""
    elsewhere = s.plan and bool(s.card or s.device_mem)
    for name, value in (("device", s.device), *(("devices", d) for d in s.devices.split(",") if s.devices)):
        if name == "device" and not value:
            continue
        try:
            d = torch.device(value)
        except (RuntimeError, ValueError):
            raise FlagError(f"{flag(name)}: {value!r} is not a device (cpu, cuda or cuda:<index>)") from None
        if d.type not in ("cpu", "cuda"):
            raise FlagError(f"{flag(name)}: {value!r} is not supported (cpu, cuda or cuda:<index>)")
        if d.type == "cuda" and elsewhere:
            continue
        if d.type == "cuda" and not torch.cuda.is_available():
            raise FlagError(f"{flag(name)}: {value} asked for, but this torch sees no CUDA device "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})"
                            + ("; to plan for cards this machine lacks, add --card NAME or --device-mem GiB" if s.plan else ""))
        if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
            raise FlagError(f"{flag(name)}: {value} asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                            f"are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def check_nf4_compute(s):
    """--nf4-compute bfloat16 on a CPU needs oneDNN's bf16 products (AVX512-BF16 or AMX): without
    them only a generic path would run, many times slower than float32 for no gain."""
    devices = s.devices.split(",") if s.devices else [str(pipeline.device_of(s))]
    if (s.nf4_compute == "bfloat16" and any(torch.device(d).type == "cpu" for d in devices)
            and "product" not in kernels.paths(torch.bfloat16)):
        raise FlagError(f"--nf4-compute bfloat16: this CPU has no native bf16 products (oneDNN needs AVX512-BF16 "
                        f"or AMX; here: {kernels.cpu_description()}); use --nf4-compute float32 (auto's choice on CPU)")


def check_judge(s):
    """The judge's files are there (nothing is downloaded at run time)."""
    if s.judge == "pairrm":
        if not s.pairrm_dir:
            raise FlagError("--judge pairrm needs --pairrm-dir (a local copy of llm-blender/PairRM; see README)")
        problem = judges.pairrm_paths_problem(s.pairrm_dir, s.pairrm_backbone or None)
        if problem:
            raise FlagError(problem)
    if s.judge == "llm":
        if not s.judge_model:
            raise FlagError("--judge llm needs --judge-model (a local Hugging Face folder)")
        if not os.path.isfile(os.path.join(os.path.expanduser(s.judge_model), "config.json")):
            raise FlagError(f"--judge-model {s.judge_model}: no config.json there (need a local Hugging Face folder)")


def check_prompts(s, pool, heldout, parts, path):
    """What the prompt files mean for this run: the verifiable judge knows every check a row
    asks for (with its parameters), and every iteration has prompts to play on."""
    if s.judge == "verifiable":
        for r in pool + heldout:
            for c in r.get("checks", []):
                problem = judges.check_problem(c)
                if problem:
                    raise FlagError(f"{r['where']}: {problem}")
    for t, part in enumerate(parts):
        if not part:
            raise FlagError(f"{path}: {sum(map(len, parts))} prompts for --iters {s.iters}: iteration {t} has none "
                            "(each iteration plays on its own part of the pool); add prompts or lower --iters")


def check_plan(s, base_dir):
    """The memory plan, printed, for --plan, --devices and any CUDA device (always checked there:
    a run that cannot fit is refused before it loads anything). --plan ends the command here:
    exit 0 when it fits, else the table and one error line naming what to lower."""
    devices = s.devices.split(",") if s.devices else [str(pipeline.device_of(s))]
    cuda = any(torch.device(d).type == "cuda" for d in devices)
    if not (s.plan or s.devices or cuda):
        return
    _, rows = pipeline.run_plan(s, base_dir)
    fits = pipeline.print_plan(rows, errors=False)
    each = lora.merged_bytes(base_dir, None if s.merged_dtype == "auto" else getattr(torch, s.merged_dtype))
    print(f"disk: each merged pi_(t+1) {report.size(each)} (--merged-dtype {s.merged_dtype}), {s.iters} iterations "
          f"{report.size(s.iters * each)} under {Path(s.runs_dir) / s.name} (adapters and JSONL files: a few MB more)")
    if s.plan and not fits:  # the table above, then one line naming what to lower
        raise FlagError("; ".join(pipeline.plan_problems(rows)))
    if s.plan:
        sys.exit(0)
    if not fits and cuda:
        raise runs.RunError(pipeline.plan_problems(rows)[0] + " (the plan above; --plan prints it alone)")


def check_model(base_dir):
    """config.json's fields and every shard's header, before a run loads anything (ModelError)."""
    M.Config.from_hf(base_dir)
    loader.check_headers(base_dir)
