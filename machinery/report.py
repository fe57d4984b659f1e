"""report.py: what a run shows its user: a summary line per stage, each training step's measures,
the results table, metrics.png, and the held-out answers in AlpacaEval's format."""
from machinery import files


def ci(m, signed=False):
    return f"{m[0]:{'+' if signed else ''}.3f} +/- {m[1]:.3f}"


def kilo(n):
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


def size(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def step_log(step, loss, lr, grad_norm, seen, seconds):
    """One optimizer step as TRL users read it: the loss; the mean log-ratios of chosen and rejected
    (log pi_theta - log pi_t), their margin and the fraction of pairs where chosen's is the larger
    ("accuracy"); the mean SPPO targets they are pulled towards; the mean |log-ratio| (0 at the
    first step: the policy starts as the reference); the gradient norm before clipping, the
    learning rate used, and tokens per second."""
    mean = lambda xs: sum(xs) / len(xs)
    w, l = seen["logr_w"], seen["logr_l"]
    out = {"step": step, "loss": loss, "logr_chosen": mean(w), "logr_rejected": mean(l),
           "margin": mean([a - b for a, b in zip(w, l)]), "accuracy": mean([float(a > b) for a, b in zip(w, l)]),
           "abs_logr": mean([abs(x) for x in w + l]), "grad_norm": grad_norm, "lr": lr, "tokens_per_s": seen["tokens"] / seconds}
    if "target_w" in seen:
        out.update(target_chosen=mean(seen["target_w"]), target_rejected=mean(seen["target_l"]))
    return out


# How an iteration's time splits on CPU, relative to the held-out answers' (the evaluation): pi_0's
# answers are a run's first stage, so they calibrate the others. The ratios are the mean stage
# times of `make iterate` at the defaults on the CPUs measured in docs/BENCHMARKS.md (the ratios
# agree closely between an AVX2 and an AVX-512 CPU, though the times do not); each stage
# is scaled by its work against the defaults' (prompts x K sampled, pairs x epochs trained).
STAGE_RATIOS = {"generate": 2.5, "pairs": 0.7, "train": 4.9, "evaluate": 1.0}
AT_DEFAULTS = dict(prompts=96, k=5, epochs=3, eval_prompts=100)


def iteration_estimate(prompts, k, epochs, eval_prompts, eval_seconds):
    """Seconds one iteration will take on this CPU, from the seconds pi_0's held-out answers took."""
    d = AT_DEFAULTS
    per_eval = eval_seconds * d["eval_prompts"] / max(1, eval_prompts)
    work = {"generate": prompts * k / (d["prompts"] * d["k"]), "pairs": prompts / d["prompts"],
            "train": prompts * epochs / (d["prompts"] * d["epochs"]), "evaluate": eval_prompts / d["eval_prompts"]}
    return sum(STAGE_RATIOS[st] * work[st] * per_eval for st in STAGE_RATIOS)


def minutes(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def answers_summary(rows, what):
    n = sum(len(r["response_ids"]) for r in rows)
    tokens = sum(len(x) for r in rows for x in r["response_ids"])
    return f"{n} {what}, {kilo(tokens)} tokens"


def eval_summary(res):
    return (f"win rate vs pi_0 {ci(res['win_rate'])} on {res['n_eval']} prompts (at equal length "
            f"{res['win_rate_lc'][0]:.3f}), words {res['words_base'][0]:.1f} -> {res['words_new'][0]:.1f}")


def results(table):
    """The held-out results as Markdown, length beside every figure (a gain is a gain only at
    equal length), then, where the prompts carry checks, satisfaction per check kind."""
    cols = ["iter", "win rate vs pi_0", "at equal length", "words: base -> new"]
    sat, kl = bool(table) and "sat_new" in table[0], bool(table) and "kl" in table[0]
    cols += ["satisfaction: base -> new", "gain", "gain at equal length"] if sat else []
    cols += ["KL(pi_t+1 || pi_t)"] if kl else []
    out = ["| " + " | ".join(cols + ["train loss"]) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in table:
        row = [str(r["iter"] + 1), ci(r["win_rate"]), ci(r["win_rate_lc"]), f"{r['words_base'][0]:.1f} -> {r['words_new'][0]:.1f}"]
        if sat:
            row += [f"{r['sat_base'][0]:.3f} -> {r['sat_new'][0]:.3f}", ci(r["sat_gain"], True), ci(r["sat_gain_lc"], True)]
        row += [ci(r["kl"])] if kl else []
        out.append("| " + " | ".join(row + [f"{r['train_loss']:.4f}"]) + " |")
    out.append("\n95% CIs. words: mean held-out answer length. At equal length: fitted with a length term (stats.py).")
    if sat:
        last = table[-1]
        out += ["", "| check kind | prompts | pi_0 | " + " | ".join(f"pi_{r['iter'] + 1}" for r in table)
                + f" | gain of pi_{last['iter'] + 1} |", "|---|---:" + "|---:" * (len(table) + 2) + "|"]
        for kind, k in last["per_kind"].items():
            out.append(f"| {kind} | {k['n']} | {k['base']:.2f} | " + " | ".join(f"{r['per_kind'][kind]['new']:.2f}" for r in table)
                       + f" | {ci(k['gain'], True)} |")
    return "\n".join(out) + "\n"


def export_alpaca_eval(path, rows, answers, generator):
    """Held-out answers as AlpacaEval's model_outputs.json: a JSON list of
    {"instruction", "output", "generator"}, for `alpaca_eval --model_outputs` (see README). A truncated
    prompt is exported with its full text: AlpacaEval matches outputs to its instructions by text."""
    files.write_json(path, [{"instruction": r.get("full_prompt", r["prompt"]), "output": a["responses"][0], "generator": generator}
                            for r, a in zip(rows, answers)])


def plot_metrics(run_dir, table):
    """runs/<name>/metrics.png: win rate vs pi_0 (95% CI bars) and the training loss, per iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    it = [r["iter"] + 1 for r in table]
    a.errorbar(it, [r["win_rate"][0] for r in table], yerr=[r["win_rate"][1] for r in table], fmt="o-", capsize=4)
    a.axhline(0.5, color="gray", ls="--", lw=1)
    a.set(xlabel="iteration", ylabel="win rate vs pi_0", title="held-out win rate (95% CI)", xticks=it)
    for r in table:
        f = run_dir / f"iter{r['iter']}" / "train" / "losses.jsonl"
        log = files.read_jsonl(f) if f.exists() else []
        b.plot([x["step"] for x in log], [x["loss"] for x in log], label=f"iteration {r['iter'] + 1}")
    b.set(xlabel="optimizer step", ylabel="loss", title="training loss", yscale="symlog")
    b.legend()
    fig.tight_layout()
    with files.atomic(run_dir / "metrics.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


class Tracker:
    """--report-to: the per-step training metrics and the per-iteration held-out measures, also
    sent to TensorBoard or W&B (nothing by default). TensorBoard's event files go under
    runs/<name>/tensorboard, so `tensorboard --logdir runs` shows every run side by side, each
    named by its folder. Steps count optimizer steps across iterations; a resumed run logs the
    steps after its last checkpoint again."""

    def __init__(self, kind, run_dir, name, config):
        self.tb = self.wb = None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        elif kind == "wandb":
            import wandb  # checks.check_flags made sure it imports
            self.wb = wandb.init(project="sppo", name=name, dir=str(run_dir), config=config, resume="allow", id=name)

    def __call__(self, scalars, step):
        scalars = {k: v for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wb:
            self.wb.log(scalars, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wb:
            self.wb.finish()


def iteration_scalars(res):
    """An iteration's eval.json as scalars: each measure's value (its CI half-width as _ci)."""
    out = {}
    for k, v in res.items():
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
            out[f"heldout/{k}"], out[f"heldout/{k}_ci"] = v
        elif isinstance(v, (int, float)) and k != "iter":
            out[f"heldout/{k}"] = v
    return out
