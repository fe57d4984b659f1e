"""results.py: `make results`, docs/RESULTS.md's tables and figure regenerated from the run folders.

    python scripts/results.py [--runs runs/compare] [--out docs/RESULTS.md]        (make results)

Reads every finished arm of `make compare SEEDS=...`, runs/compare/seed<S>/<arm>/: settings.json
(the held-out file, the iterations), provenance.json (the commit and machine it was made at),
eval_base.jsonl and the last iteration's eval_answers.jsonl (rescored per prompt with the
verifiable judge: the pooled figures need each prompt's gain, not only a run's mean) and its
eval.json (win rate, KL). Writes, between the markers below, so the prose around them is kept:

  per seed   each arm's paired gain over pi_0 after its last iteration, at equal length too, win
             rate, words, KL, and the commit and machine of that run
  pooled     per arm, the mean over seeds of the paired gains with an interval from both the
             seed-level and the prompt-level variation (stats.pooled_gain), at equal length too
  per kind   the pooled gain per check kind with 10+ prompts
  figure     docs/results.png: each seed's gain and the pooled one, per arm

Read from the runs, not from this machine: the commit and machine each table names are those
recorded at run time. If the code has changed since in a file that makes a seeded run (any
.py or prompts/ file or requirements.txt outside docs/, tests/ and scripts/, HEAD and uncommitted
changes alike), the section starts with a STALE banner naming the files.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: its modules

import data  # noqa: E402
from machinery import checks, files, runs, stats  # noqa: E402

HERE = Path(__file__).resolve().parents[1]  # the repository root
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
MIN_KIND = 10  # prompts a check kind needs for its own row
# what does not make a seeded run: changing it leaves the runs' numbers as they are
NOT_RUN = ("docs/", "tests/", "tests_vllm/", "scripts/")
INTRO = """# Results

What `make compare SEEDS=0,1,2` measured on the embedded default: each arm's held-out
constraint-satisfaction gain over pi_0, per seed and pooled over seeds, at equal length too.
The section between the markers is written by `make results` from the run folders; edit the
prose around it, not the tables.

"""


def read_json(path):
    try:
        return json.loads(files.decode(path, Path(path).read_bytes()))
    except json.JSONDecodeError as e:
        raise files.DataError(f"{path}: bad JSON ({e.msg} at line {e.lineno})") from None


class Arm:
    """One finished arm of one seed, with what the tables need per held-out prompt."""

    def __init__(self, folder):
        self.folder = folder
        self.settings = read_json(folder / "settings.json")
        self.provenance = read_json(folder / "provenance.json") if (folder / "provenance.json").exists() else {}
        last = self.settings["iters"] - 1
        self.iters = last + 1
        self.eval = read_json(folder / f"iter{last}" / "eval.json")
        base = {r["id"]: r["responses"][0] for r in files.read_jsonl(folder / "eval_base.jsonl")}
        new = {r["id"]: r["responses"][0] for r in files.read_jsonl(folder / f"iter{last}" / "eval_answers.jsonl")}
        if set(new) != set(base):
            raise files.DataError(f"{folder}/iter{last}/eval_answers.jsonl: answers other prompts than eval_base.jsonl")
        held, _ = data.load_prompts(self.settings["heldout"])
        by_id = {r["id"]: r for r in held}
        missing = [i for i in base if i not in by_id]
        if missing:
            raise files.DataError(f"{folder}/eval_base.jsonl: prompt {missing[0]!r} is not in {self.settings['heldout']} "
                                  "(the held-out file changed since the run)")
        if not all(by_id[i].get("checks") for i in base):
            raise files.DataError(f"{self.settings['heldout']}: every held-out row needs 'checks' for the satisfaction gain")
        self.ids = list(base)
        self.rows = [by_id[i] for i in self.ids]
        b, n = [base[i] for i in self.ids], [new[i] for i in self.ids]
        _, r_base, r_new = stats.win_probs(self.rows, b, n)
        self.gain = r_new - r_base
        self.words_base, self.words_new = stats.n_words(b), stats.n_words(n)
        self.lc = stats.lc_contributions(self.gain, self.words_base, self.words_new)
        self.kinds = stats.kind_scores(self.rows, b, n)


def finished(folder):
    iters = read_json(folder / "settings.json").get("iters")
    return isinstance(iters, int) and (folder / f"iter{iters - 1}" / "eval.json").exists()


def collect(runs_dir, seeds=None):
    """{seed: {arm: Arm}} of the finished arms under runs_dir/seed<S>/ (all seeds, or those given),
    and the unfinished ones' folders."""
    got, unfinished = {}, []
    for d in sorted(Path(runs_dir).glob("seed*"), key=lambda p: (len(p.name), p.name)):
        if not re.fullmatch(r"seed\d+", d.name) or (seeds is not None and int(d.name[4:]) not in seeds):
            continue
        for arm in sorted((x for x in d.iterdir() if (x / "settings.json").exists()), key=lambda x: arm_order(x.name)):
            if not finished(arm):
                unfinished.append(arm)
                continue
            try:
                got.setdefault(int(d.name[4:]), {})[arm.name] = Arm(arm)
            except (KeyError, IndexError, TypeError) as e:
                raise files.DataError(f"{arm}: not a run folder sppo.py wrote (missing or odd field {e})") from None
    return got, unfinished


def arm_order(name):
    from scripts import compare
    return (compare.ARMS.index(name), name) if name in compare.ARMS else (len(compare.ARMS), name)


def by_arm(got):
    """{arm: {seed: Arm}}, the arms in compare's order."""
    out = {}
    for seed, arms in got.items():
        for name, a in arms.items():
            out.setdefault(name, {})[seed] = a
    return dict(sorted(out.items(), key=lambda kv: arm_order(kv[0])))


def pooled(arms):
    """One arm's seeds -> its pooled figures (stats.pooled_gain over the shared prompts)."""
    seeds = list(arms.values())
    first = seeds[0]
    for a in seeds[1:]:
        if a.ids != first.ids:
            raise files.DataError(f"{a.folder}: answers other held-out prompts than {first.folder}; pool runs of one "
                                  "held-out set (--heldout, --eval-prompts)")
    out = {"seeds": sorted(arms), "n": len(first.ids),
           "gain": stats.pooled_gain([a.gain for a in seeds]), "lc": stats.pooled_gain([a.lc for a in seeds]),
           "words": stats.pooled_gain([a.words_new - a.words_base for a in seeds]),
           "words_base": float(np.mean([a.words_base.mean() for a in seeds])),
           "words_new": float(np.mean([a.words_new.mean() for a in seeds])), "kinds": {}}
    kl = [a.eval["kl"][0] for a in seeds if "kl" in a.eval]
    out["kl"] = float(np.mean(kl)) if len(kl) == len(seeds) else None
    for kind, (idx, _) in first.kinds.items():
        if len(idx) >= MIN_KIND:
            xy = [a.kinds[kind][1] for a in seeds]
            out["kinds"][kind] = {"n": len(idx), "base": float(np.mean([x[:, 0].mean() for x in xy])),
                                  "gain": stats.pooled_gain([x[:, 1] - x[:, 0] for x in xy])}
    return out


# ----------------------------------------------------------------------------- where and when

def short(p):
    c = p.get("commit", "unknown")
    return (c[:7] if c != "unknown" else "unknown commit") + (" (uncommitted changes)" if p.get("dirty") else "")


def machine(p):
    return p.get("machine", "unknown machine") + (f", {', '.join(p['gpus'])}" if p.get("gpus") else "")


def measured_at(arms):
    """'Measured at <commit> on <machine>' for a set of Arms, each distinct pair with its seeds."""
    where = {}
    for seed, a in arms:
        for p in [a.provenance, *a.provenance.get("resumed", [])]:
            where.setdefault((short(p), machine(p)), set()).add(seed)
    return "Measured at " + "; ".join(f"`{c}` on {m} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, sorted(s)))})"
                                      for (c, m), s in where.items()) + "."


def stale(got, repo):
    """The banner lines for runs made at code other than repo's: every recorded commit compared
    with the working tree (HEAD plus uncommitted changes) over the files that make a seeded run."""
    commits = sorted({p.get("commit", "unknown") for arms in got.values() for a in arms.values()
                      for p in [a.provenance, *a.provenance.get("resumed", [])]})
    out = []
    for c in commits:
        if c == "unknown":
            out.append("**STALE?** some runs recorded no commit: which code made them cannot be told.")
            continue
        changed = runs.git(repo, "diff", "--name-only", c, "--", "*.py", "prompts/", "requirements.txt")
        if changed is None:
            out.append(f"**STALE?** measured at {c[:7]}, which this repository does not have: what changed cannot be told.")
            continue
        changed = [f for f in changed.splitlines() if f and not f.startswith(NOT_RUN)]
        if changed:
            out.append(f"**STALE: measured at {c[:7]}, code has changed since in {', '.join(changed)}.** "
                       "Rerun `make compare SEEDS=...` and `make results`.")
    return out


# ----------------------------------------------------------------------------- the section

def ci(m, signed=True):
    return f"{m[0]:{'+' if signed else ''}.3f} ± {m[1]:.3f}"


def section(got, unfinished, repo, figure=None):
    """The Markdown between the markers."""
    out = stale(got, repo)
    if unfinished:
        out.append("Unfinished, left out: " + ", ".join(f"`{u.parent.name}/{u.name}`" for u in unfinished) + ".")
    if not got:
        return "\n\n".join(out + ["No finished runs yet: `make compare SEEDS=0,1,2`, then `make results`."]) + "\n"
    arms = by_arm(got)
    flat = [(seed, a) for seed, x in got.items() for a in x.values()]
    n = {len(a.ids) for _, a in flat}
    iters = {a.iters for _, a in flat}
    out += [f"All figures after {'/'.join(map(str, sorted(iters)))} iteration{'s' if max(iters) > 1 else ''} against pi_0 on "
            f"{'/'.join(map(str, sorted(n)))} held-out prompts, 95% intervals, paired by prompt."]
    rows = ["### Per seed", "", measured_at(flat), "",
            "| seed | arm | satisfaction gain | at equal length | win rate vs pi_0 | words, pi_0 -> pi_T | KL(pi_T ‖ pi_T-1) | measured at |",
            "|---:|---|---:|---:|---:|---:|---:|---|"]
    for seed, a in flat:
        kl = ci(a.eval["kl"], False) if "kl" in a.eval else ""
        rows.append(f"| {seed} | {a.folder.name} | {ci(stats.mean_ci(a.gain))} | "
                    f"{ci(stats.length_controlled_gain(a.gain, a.words_base, a.words_new))} | {ci(a.eval['win_rate'], False)} | "
                    f"{a.words_base.mean():.1f} -> {a.words_new.mean():.1f} | {kl} | `{short(a.provenance)}` |")
    pools = {name: pooled(x) for name, x in arms.items()}
    rows += ["", "### Pooled over seeds", "", measured_at(flat), "",
             "| arm | seeds | prompts | satisfaction gain | (seed, prompt terms) | at equal length | words, pi_0 -> pi_T | change in words | KL, mean of seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in pools.items():
        g = p["gain"]
        kl = f"{p['kl']:.2f}" if p["kl"] is not None else ""
        rows.append(f"| {name} | {','.join(map(str, p['seeds']))} | {p['n']} | **{ci(g)}** | ± {g[2]['seed']:.3f}, ± {g[2]['prompt']:.3f} | "
                    f"**{ci(p['lc'])}** | {p['words_base']:.1f} -> {p['words_new']:.1f} | "
                    f"{p['words'][0]:+.1f} ± {p['words'][1]:.1f} | {kl} |")
    rows += ["", "The pooled figure is the mean over seeds of each seed's paired gain; its interval adds the spread of "
             "the seeds' gains (seed term) to that of the prompts' gains averaged over seeds (prompt term), "
             "`stats.pooled_gain`. At equal length: each seed's length-controlled gain, pooled the same way "
             "(`stats.lc_contributions`)."]
    kinds = {k: None for p in pools.values() for k in p["kinds"]}
    if kinds:
        rows += ["", f"### Per check kind ({MIN_KIND}+ prompts), pooled over seeds", "", measured_at(flat), "",
                 "| check kind | prompts | pi_0 | " + " | ".join(pools) + " |", "|---|---:|---:" + "|---:" * len(pools) + "|"]
        for k in kinds:
            first = next(p["kinds"][k] for p in pools.values() if k in p["kinds"])
            rows.append(f"| {k} | {first['n']} | {first['base']:.2f} | "
                        + " | ".join(ci(p["kinds"][k]["gain"]) if k in p["kinds"] else "" for p in pools.values()) + " |")
    if figure:
        rows += ["", f"![each seed's gain and the pooled one, per arm]({figure})"]
    return "\n\n".join(out) + "\n\n" + "\n".join(rows) + "\n"


def plot(got, path):
    """Each seed's gain (and at equal length) per arm, beside the pooled one, 95% bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = by_arm(got)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, title) in zip(axes, [("gain", "satisfaction gain over pi_0"), ("lc", "gain at equal length")]):
        for x, (name, seeds) in enumerate(arms.items()):
            for j, (seed, a) in enumerate(seeds.items()):
                m = stats.mean_ci(a.gain) if key == "gain" else stats.length_controlled_gain(a.gain, a.words_base, a.words_new)
                ax.errorbar(x - 0.3 + 0.4 * j / max(1, len(seeds) - 1), m[0], yerr=m[1], fmt="o", color="gray", capsize=2)
            p = pooled(seeds)[key]
            ax.errorbar(x + 0.25, p[0], yerr=p[1], fmt="s", color="C0", capsize=4, ms=7)
        ax.axhline(0, color="gray", ls="--", lw=1)
        ax.set(title=title + " (gray: seeds, blue: pooled)", xticks=range(len(arms)), xticklabels=list(arms))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)


def write_section(path, text):
    """Replace what lies between the markers in path (made with a title, an intro and the markers
    if it does not exist); everything outside them is kept byte for byte."""
    old = path.read_text() if path.exists() else INTRO + BEGIN + "\n" + END + "\n"
    if old.count(BEGIN) != 1 or old.count(END) != 1 or old.index(BEGIN) > old.index(END):
        raise files.DataError(f"{path}: needs one '{BEGIN}' and, after it, one '{END}'")
    head, rest = old.split(BEGIN)
    files.write_text(path, head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=str(HERE / "runs" / "compare"), help="the folder holding seed<S>/<arm>/")
    p.add_argument("--out", default=str(HERE / "docs" / "RESULTS.md"), help="the Markdown file to write into")
    p.add_argument("--repo", default=str(HERE), help="the code the runs are compared with (stale marking)")
    a = p.parse_args(argv)
    try:
        if not Path(a.runs).is_dir():
            raise files.DataError(f"--runs {a.runs}: no such folder (make compare SEEDS=0,1,2 first)")
        got, unfinished = collect(a.runs)
        out = Path(a.out)
        figure = None
        if got:
            plot(got, out.parent / "results.png")
            figure = "results.png"
        write_section(out, text := section(got, unfinished, a.repo, figure))
    except (OSError, ValueError, KeyError) as e:  # json.JSONDecodeError and files.DataError are ValueErrors
        checks.fail(e)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
