"""compare.py: the paper's comparison, offline: SPPO against iterative DPO and IPO in the same loop.

    python scripts/compare.py [--seeds 0,1,2] [--arms sppo,dpo] [any sppo.py flag ...]     (make compare SEEDS=0,1,2)

From one pi_0, one prompt split and one set of sampling seeds, sppo.py's loop runs once per loss
(the paper's Table: SPPO, its single-response variant, iterative DPO and IPO), each an ordinary
resumable run folder runs/compare/seed<S>/<loss>; running the command again resumes every arm.
Then runs/compare/seed<S>/summary.md and compare.png: per arm and iteration, the held-out
constraint-satisfaction gain over pi_0 and its length-controlled counterpart, the win rate
against pi_0 (both with 95% CIs, paired by prompt), the mean answer length and an estimate of
KL(pi_{t+1} || pi_t). Every arm is evaluated on all held-out prompts (--eval-prompts 0; make
iterate uses the first 100), so each run's interval is about half as wide.

Seeds are the unit: with --seeds S1,S2,... the arms of each seed run one after another (each
resumable), then runs/compare/summary.md gives each seed's figures and, per arm, the mean over
seeds of the paired gains with an interval from both the seed and the prompt level
(results.py, stats.pooled_gain); `make results` writes the same into docs/RESULTS.md.

What the arms share: pi_0's held-out answers and iteration 0's samples, judgments and pairs
(with their reference log-probs) depend on pi_0, the seeds and the judge only; the loss first
acts in training. They are computed by the first arm and copied into the others.
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: its modules

import sppo  # noqa: E402
from machinery import files, report  # noqa: E402
from scripts import results as pooled_results  # noqa: E402

ARMS = ["sppo", "sppo_single", "dpo", "ipo"]
SHARED = ["eval_base.jsonl", "alpaca_eval/model_outputs.json",
          "iter0/responses.jsonl", "iter0/judgments.jsonl", "iter0/pairs.jsonl"]
KL_SAMPLES = 32  # held-out prompts per KL estimate: one sample each, scored under two models


def share(src, dst):
    """Copy what every arm computes alike from one arm's folder to another's, if not there yet."""
    for rel in SHARED:
        a, b = src / rel, dst / rel
        if a.exists() and not b.exists():
            b.parent.mkdir(parents=True, exist_ok=True)
            with files.atomic(b) as tmp:
                shutil.copyfile(a, tmp)


def results(tables):
    """{arm: [eval.json of each iteration]} -> summary.md's text."""
    out = ["| arm | iter | satisfaction gain | at equal length | win rate vs pi_0 | at equal length | words | KL(pi_t+1 ‖ pi_t) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    def cell(r, key, signed=False):  # satisfaction needs prompts with checks, KL --kl-samples
        return report.ci(r[key], signed) if key in r else ""

    for arm, table in tables.items():
        for r in table:
            out.append(f"| {arm} | {r['iter'] + 1} | {cell(r, 'sat_gain', True)} | {cell(r, 'sat_gain_lc', True)} | "
                       f"{cell(r, 'win_rate')} | {cell(r, 'win_rate_lc')} | "
                       f"{r['words_base'][0]:.1f} -> {r['words_new'][0]:.1f} | {cell(r, 'kl')} |")
    last = {arm: t[-1] for arm, t in tables.items() if t}
    first = next(iter(last.values()))
    if "per_kind" not in first:
        return "\n".join(out) + "\n"
    out += ["", "Satisfaction per check kind after the last iteration (pi_0 in the first column):", "",
            "| check kind | prompts | pi_0 | " + " | ".join(last) + " |", "|---|---:|---:" + "|---:" * len(last) + "|"]
    for kind, k in first["per_kind"].items():
        out.append(f"| {kind} | {k['n']} | {k['base']:.2f} | "
                   + " | ".join(f"{r['per_kind'][kind]['new']:.2f} ({r['per_kind'][kind]['gain'][0]:+.2f} ± "
                                f"{r['per_kind'][kind]['gain'][1]:.2f})" for r in last.values()) + " |")
    return "\n".join(out) + "\n\n95% CIs, paired by held-out prompt. At equal length: fitted with a length term (stats.py).\n"


def plot(tables, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("sat_gain", "satisfaction gain over pi_0"), ("sat_gain_lc", "gain at equal length"),
              ("win_rate", "win rate vs pi_0"), ("win_rate_lc", "win rate at equal length"),
              ("words_new", "mean answer length (words)"), ("kl", "KL(pi_t+1 || pi_t)")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (arm, table) in enumerate(tables.items()):
            got = [r for r in table if key in r]
            x = [r["iter"] + 1 + (i - 1.5) * 0.05 for r in got]  # arms side by side: bars stay readable
            ax.errorbar(x, [r[key][0] for r in got], yerr=[r[key][1] for r in got], fmt="o-", capsize=3, label=arm)
        ax.set(title=title, xlabel="iteration")
        ax.axhline(0.5 if key.startswith("win") else 0.0, color="gray", ls="--", lw=1)
    axes.flat[0].legend()
    fig.tight_layout()
    with files.atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the seed of every arm (prompt split, sampling, LoRA init)")
    p.add_argument("--seeds", default="", help="comma-separated seeds, run one after another, then pooled (default: --seed)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated losses to compare")
    p.add_argument("--runs-dir", default=str(sppo.HERE / "runs" / "compare"))
    # The strengths: SPPO's tuned eta is sppo.py's default. For DPO and IPO beta = 0.1, the DPO paper's
    # and TRL's default (the SPPO paper does not state its baselines' beta in the text we read).
    p.add_argument("--eta", type=float, default=sppo.Settings.eta, help="eta of the SPPO arms")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the DPO and IPO arms")
    args, rest = p.parse_known_args(argv)
    arms = args.arms.split(",")
    if not arms or not set(arms) <= set(ARMS):
        print(f"error: --arms must be a comma-separated subset of {','.join(ARMS)}, got {args.arms!r}", file=sys.stderr)
        return 2
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        print(f"error: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    for seed in seeds:
        if run_seed(args, arms, seed, rest):
            return 2
    try:  # the pooled summary: every seed just run, pooled per arm
        got, unfinished = pooled_results.collect(args.runs_dir, set(seeds))
        files.write_text(Path(args.runs_dir) / "summary.md", text := pooled_results.section(got, unfinished, sppo.HERE))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


def run_seed(args, arms, seed, rest):
    """Every arm of one seed, then runs/compare/seed<S>/summary.md and compare.png; -> 2 when an arm
    stopped (it said why), else 0."""
    out = Path(args.runs_dir) / f"seed{seed}"
    tables = {}
    for arm in arms:
        if arm != arms[0]:
            share(out / arms[0], out / arm)
        print(f"=== compare: {arm} (seed {seed}) ===")
        strength = ["--eta", str(args.eta)] if arm.startswith("sppo") else ["--beta", str(args.beta)]
        # each arm in its own process, exactly the command a user would type: one process running
        # four loops keeps their freed memory (measured: 8 GB resident after two and a half arms)
        # all held-out prompts (a --eval-prompts in rest comes later and wins)
        r = subprocess.run([sys.executable, str(sppo.HERE / "sppo.py"), "--kl-samples", str(KL_SAMPLES), "--eval-prompts", "0",
                            *rest, "--loss", arm, *strength, "--seed", str(seed), "--runs-dir", str(out), "--name", arm])
        if r.returncode == 2:  # a bad input: the arm said why, in one line
            return 2
        if r.returncode:
            print(f"error: compare: the {arm} arm stopped (exit {r.returncode}); run the same command again to resume",
                  file=sys.stderr)
            return 2
        tables[arm] = files.read_jsonl(out / arm / "metrics.jsonl")
    files.write_text(out / "summary.md", text := results(tables))
    plot(tables, out / "compare.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
