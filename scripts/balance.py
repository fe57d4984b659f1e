"""
Does a prompt set reward length? Samples K answers per prompt from the embedded policy the way
`make iterate` does (SmolLM2-135M-Instruct, temperature 0.7, top-p 0.9, 64 new tokens) and
measures, within each prompt, whether the longer samples meet more or fewer of its checks.
SPPO learns only from differences between a prompt's own samples, so this is the incentive
it sees: if the longest sample beats the shortest on average, self-play teaches length.

    SPPO_CACHE=/work/main/.cache python scripts/balance.py [FILE.jsonl] [--limit N] [--k K]

Prints (each mean over prompts with its 95% half-width):
  longest - shortest   satisfaction of a prompt's longest sample minus that of its shortest
  corr                 within-prompt correlation of length (words) and satisfaction
  chosen - rejected    words of the pair SPPO would train on (sppo.build_pair on the judge's P)
  per check kind       the same longest - shortest difference on that kind alone, and how
                       often samples meet it (calibration: met sometimes, not always)
Samples are cached in runs/balance/ (one file per prompt file's content, appended per batch),
so a rerun, or a larger --limit, samples only what is missing.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import judge  # noqa: E402
import sppo  # noqa: E402
from machinery import files, stats  # noqa: E402

# as `make iterate` samples (sppo.Settings' defaults)
TEMPERATURE, TOP_P, MAX_NEW_TOKENS, BATCH = 0.7, 0.9, 64, 24


def sample(rows, k, cache):
    """K answers per row, batch by batch (a batch is BATCH prompts x K copies, seeded by its
    index, so a resumed or extended run samples what an uninterrupted one would)."""
    import torch

    import generate
    import model as M
    from machinery import convert, kernels
    done = {r["id"]: r["responses"] for r in files.read_jsonl_tolerant(cache)} if cache.exists() else {}
    batches = [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]
    todo = [c for c, b in enumerate(batches) if not all(r["id"] in done for r in b)]
    if todo:
        path = convert.embedded_model_dir()
        tok, policy = data.Tokenizer.from_dir(path), kernels.use_onednn(M.load_model(path, torch.float32, "cpu"))
    for n, c in enumerate(todo):
        ids = [tok.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in batches[c] for _ in range(k)]
        out = generate.generate(policy, ids, MAX_NEW_TOKENS, TEMPERATURE, TOP_P, 0, tok.stop_ids, seed=c, pad_id=tok.pad_id)
        text = [tok.decode([t for t in o if t not in tok.stop_ids]) for o in out]
        lines = [{"id": r["id"], "responses": text[i * k:(i + 1) * k]} for i, r in enumerate(batches[c])]
        files.append_jsonl(cache, lines)
        done.update({x["id"]: x["responses"] for x in lines})
        print(f"  batch {n + 1}/{len(todo)} sampled", file=sys.stderr, flush=True)
    return [done[r["id"]] for r in rows]


def measure(rows, answers):
    """The balance figures for rows and their K answers each (see the module docstring)."""
    lengths = [stats.n_words(a) for a in answers]
    scores = [[judge.satisfaction(x, r["checks"]) for x in a] for r, a in zip(rows, answers)]
    out = stats.length_effect(lengths, scores)
    gap = []
    for ln, a, r in zip(lengths, answers, rows):
        P = judge.VerifiableJudge()([r["prompt"]], [a], [r])[0]
        pair = sppo.build_pair(P)
        if pair:
            gap.append(ln[pair["chosen_idx"]] - ln[pair["rejected_idx"]])
    out["chosen_minus_rejected_words"] = stats.mean_ci(gap) if gap else (float("nan"),) * 2
    out["pairs"] = len(gap)
    out["words"] = stats.mean_ci(np.concatenate(lengths))
    out["satisfaction"] = stats.mean_ci(np.concatenate(scores))
    kinds = {}
    for r, a, ln in zip(rows, answers, lengths):
        met = np.array([judge.check_results(x, r["checks"]) for x in a], dtype=float)  # K x checks
        for j, c in enumerate(r["checks"]):
            kinds.setdefault(c["type"], {"len": [], "met": []})
            kinds[c["type"]]["len"].append(ln)
            kinds[c["type"]]["met"].append(met[:, j])
    out["kinds"] = {}
    for kind, v in sorted(kinds.items(), key=lambda kv: -len(kv[1]["met"])):
        eff = stats.length_effect(v["len"], v["met"])
        met = np.array(v["met"])
        out["kinds"][kind] = {"checks": len(met), "met": float(met.mean()),
                              "varies": float(np.mean(met.std(axis=1) > 0)),  # prompts whose K samples disagree
                              "longest_minus_shortest": eff["longest_minus_shortest"]}
    return out


def print_measure(name, m, n):
    ci = lambda x, d=3: f"{x[0]:+.{d}f} ± {x[1]:.{d}f}"  # noqa: E731
    print(f"{name}: {n} prompts, {m['words'][0]:.1f} words per answer, satisfaction {m['satisfaction'][0]:.3f}")
    print(f"  longest - shortest sample's satisfaction: {ci(m['longest_minus_shortest'])} ({m['n']} prompts)")
    print(f"  within-prompt corr(words, satisfaction):  {ci(m['corr'])}")
    print(f"  chosen - rejected words (SPPO's pairs):   {ci(m['chosen_minus_rejected_words'], 1)} ({m['pairs']} pairs)")
    print("\n| check kind | checks | met | prompts whose samples differ | longest - shortest |\n|---|---:|---:|---:|---:|")
    for kind, k in m["kinds"].items():
        print(f"| `{kind}` | {k['checks']} | {k['met']:.0%} | {k['varies']:.0%} | {ci(k['longest_minus_shortest'], 2)} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", default=str(ROOT / "prompts" / "train.jsonl"))
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    ap.add_argument("--k", type=int, default=5, help="samples per prompt (make iterate: 5)")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "balance"), help="folder for the samples")
    a = ap.parse_args(argv)
    try:
        raw = Path(a.file).read_bytes()
        rows, _ = data.load_prompts(a.file)
        if not all(r.get("checks") for r in rows):
            raise ValueError(f"{a.file}: every row needs 'checks'")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = rows[:a.limit] if a.limit else rows
    key = hashlib.sha1(raw + f"k={a.k}".encode()).hexdigest()[:12]
    os.makedirs(a.cache, exist_ok=True)
    answers = sample(rows, a.k, Path(a.cache) / f"{Path(a.file).stem}-{key}.jsonl")
    print_measure(a.file, measure(rows, answers), len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
