"""report.py: what a run shows its user: a summary line per stage, the results table, metrics.png,
and the held-out answers in AlpacaEval's format."""
import files


def kilo(n):
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


def size(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def answers_summary(rows, what):
    n = sum(len(r["response_ids"]) for r in rows)
    tokens = sum(len(x) for r in rows for x in r["response_ids"])
    return f"{n} {what}, {kilo(tokens)} tokens"


def print_table(table, seconds):
    print("\n| iter | win rate vs pi_0 (95% CI) | train loss | held-out satisfaction: base -> new (gain, 95% CI) |")
    print("|---|---|---|---|")
    for r in table:
        wr, ci = r["win_rate"]
        sat = ""
        if "sat_new" in r:
            sat = f"{r['sat_base'][0]:.3f} -> {r['sat_new'][0]:.3f} ({r['sat_gain'][0]:+.3f} +/- {r['sat_gain'][1]:.3f})"
        print(f"| {r['iter'] + 1} | {wr:.3f} +/- {ci:.3f} | {r['train_loss']:.4f} | {sat} |")
    print(f"wall time {seconds / 60:.1f} min")


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
