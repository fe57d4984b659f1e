"""
Held-out statistics that keep length in view: a gain is a gain only at equal length.

    mean_ci(x)                              mean and 95% half-width
    n_words(answers)                        each answer's length in words
    per_kind(rows, base, new)               per check kind: n, base and new rates, paired gain (95% CI)
    length_controlled_gain(gains, lb, ln)   the satisfaction gain at equal length (linear model)
    length_controlled_win_rate(w, lb, ln)   the win rate at equal length (logistic model)
    length_effect(lengths, scores)          within a prompt's K samples: do longer ones score more?
    lc_contributions(gains, lb, ln)         per-prompt terms of the gain at equal length (for pooling)
    pooled_gain(per_seed)                   the mean over seeds of paired gains, its interval from both levels
    report(rows, base, new)                 all of the above for one pair of answer lists

Every function is pure (numpy and judge's check functions only). `python -m machinery.stats RUN_DIR`
prints them for each iteration of a run (eval_base.jsonl against iter<t>/eval_answers.jsonl).

Why length control: a model that learns to say less meets every "at most N words" check and
wins against its base without following instructions any better. The length-controlled
figures ask what the gain would be between answers of equal length, as AlpacaEval 2's
length-controlled win rate does (Dubois et al. 2024, arXiv 2404.04475).
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

import judge

Z95 = 1.96


def mean_ci(x):
    """Mean and the half-width of its normal-approximation 95% interval (every CI of eval.json: stats.report, sppo.kl_estimate)."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(Z95 * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def n_words(answers):
    """Each answer's length in words (judge.words: what max_words/min_words count)."""
    return np.array([len(judge.words(a)) for a in answers], dtype=float)


def kind_scores(rows, base, new):
    """{kind: (indices of the rows whose checks include it, n x 2 array of base and new scores)},
    most frequent kind first. A prompt's score for a kind is the fraction of its checks of that
    kind met (usually one), so each prompt counts once."""
    got = {}
    for i, (row, a, b) in enumerate(zip(rows, base, new)):
        ra, rb = judge.check_results(a, row["checks"]), judge.check_results(b, row["checks"])
        kinds = {}
        for c, x, y in zip(row["checks"], ra, rb):
            kinds.setdefault(c["type"], []).append((x, y))
        for kind, xy in kinds.items():
            got.setdefault(kind, []).append((i, *np.mean(xy, axis=0)))
    return {kind: (np.array(v)[:, 0].astype(int), np.array(v)[:, 1:])
            for kind, v in sorted(got.items(), key=lambda kv: (-len(kv[1]), kv[0]))}


def per_kind(rows, base, new):
    """{kind: {"n", "base", "new", "gain": (mean, half-width)}} over the prompts whose checks
    include that kind (kind_scores), the gain paired by prompt."""
    out = {}
    for kind, (_, xy) in kind_scores(rows, base, new).items():
        out[kind] = {"n": len(xy), "base": float(xy[:, 0].mean()), "new": float(xy[:, 1].mean()),
                     "gain": mean_ci(xy[:, 1] - xy[:, 0])}
    return out


# ----------------------------------------------------------------------------- length control

def length_feature(len_base, len_new):
    """f_i = tanh(d_i / sd(d)), d_i = len_new_i - len_base_i in words: AlpacaEval 2's feature.
    f = 0 at equal length, odd in d (a shorter new answer mirrors a longer one), and bounded,
    so a few very long answers cannot dominate the fit. None when sd(d) = 0: then length
    cannot be told apart from the intercept."""
    d = np.asarray(len_new, dtype=float) - np.asarray(len_base, dtype=float)
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    return np.tanh(d / sd) if sd > 0 else None


def _degenerate(y, len_base, len_new):
    """The answer when the length term cannot be fitted, else None: equal lengths everywhere
    need no control (the plain mean is the answer); fewer than 3 pairs, or one and the same
    nonzero length difference everywhere, cannot separate length from the intercept (nan)."""
    if np.array_equal(np.asarray(len_base, float), np.asarray(len_new, float)):
        return mean_ci(y)
    if len(y) < 3 or length_feature(len_base, len_new) is None:
        return float("nan"), float("nan")
    return None


def _sandwich(X, r, H_inv):
    """Heteroskedasticity-robust covariance H^-1 (sum r_i^2 x_i x_i^T) H^-1 with HC1's n/(n-p).
    Robust because judgments are soft and gains are bounded: neither has the variance a
    Bernoulli or Gaussian model assumes. With only an intercept it reduces to var(y)/n, so an
    equal-length fit gives exactly mean_ci's interval."""
    n, p = X.shape
    meat = (X * r[:, None] ** 2).T @ X
    return H_inv @ meat @ H_inv * n / (n - p)


def length_controlled_gain(gains, len_base, len_new):
    """The paired gain at equal length: least squares  gain_i = a + b f_i  (f: length_feature);
    returns (a, 95% half-width of a). a is the expected gain where f = 0, i.e. where the new
    answer is as long as the base one; b carries what length alone buys. Closed form:
    b = cov(f, g) / var(f), a = mean(g) - b mean(f)."""
    g = np.asarray(gains, dtype=float)
    bad = _degenerate(g, len_base, len_new)
    if bad is not None:
        return bad
    X = np.column_stack([np.ones_like(g), length_feature(len_base, len_new)])
    H_inv = np.linalg.inv(X.T @ X)
    theta = H_inv @ X.T @ g
    cov = _sandwich(X, g - X @ theta, H_inv)
    return float(theta[0]), float(Z95 * math.sqrt(cov[0, 0]))


def lc_contributions(gains, len_base, len_new):
    """Per-prompt terms u_i of the gain at equal length: mean(u) is length_controlled_gain's a and
    mean_ci(u) its interval, exactly, so it pools over seeds as a plain gain does (pooled_gain).
    u_i = a + c psi_i with psi_i = n ((X^T X)^-1 x_i r_i)[0], prompt i's influence on the fitted
    intercept (sum psi_i = 0 at the least-squares fit; sum psi_i^2 / n^2 is the sandwich's HC0
    variance), and c = sqrt((n - 1) / (n - 2)) turning mean_ci's 1/(n - 1) into HC1's n/(n - 2).
    With equal lengths u is the gains themselves; where a cannot be fitted, nan."""
    g = np.asarray(gains, dtype=float)
    bad = _degenerate(g, len_base, len_new)
    if bad is not None:
        return g.copy() if np.isfinite(bad[0]) else np.full_like(g, np.nan)
    X = np.column_stack([np.ones_like(g), length_feature(len_base, len_new)])
    H_inv = np.linalg.inv(X.T @ X)
    theta = H_inv @ X.T @ g
    n = len(g)
    psi = n * (X @ H_inv[0]) * (g - X @ theta)
    return theta[0] + math.sqrt((n - 1) / (n - 2)) * psi


def pooled_gain(per_seed):
    """The mean over seeds of the per-seed paired gains, with a 95% interval that counts both
    levels of chance: which seeds were run (prompt split, sampling, LoRA init, data order) and
    which prompts the held-out set happens to hold.

    per_seed: S x n, row s the paired differences of seed s on the same n held-out prompts in
    the same order (every seed answers the same set). The design is crossed, not nested: a prompt
    that is hard for one seed is hard for all, so the prompt term is taken from the per-prompt
    means over seeds, D_i, and does not shrink with more seeds. The closed form, not a bootstrap:

        Var = var_s(g_s) / S + var_i(D_i) / n        (g_s: seed s's mean; both with ddof = 1)

    the variance a two-level bootstrap targets (resample seeds, then prompts, one draw of prompts
    for every seed as they share the set). Under d_si = mu + a_s + b_i + e_si its expectation is
    s_a^2 / S + s_b^2 / n + 2 s_e^2 / (n S): the true variance of the mean plus s_e^2 / (n S),
    slightly conservative (each level's spread also carries the other's noise e). With one seed
    it is mean_ci's interval; with identical seeds the seed term is 0 and the interval is one
    seed's. With 3 seeds the seed term rests on 2 degrees of freedom, read it as rough.
    -> (mean, 95% half-width, {"seed": half-width of the seed term alone, "prompt": of the prompt term})."""
    d = np.asarray(per_seed, dtype=float)
    S, n = d.shape
    seed_var = d.mean(axis=1).var(ddof=1) / S if S > 1 else 0.0
    prompt_var = d.mean(axis=0).var(ddof=1) / n if n > 1 else float("nan")
    return (float(d.mean()), float(Z95 * math.sqrt(seed_var + prompt_var)),
            {"seed": float(Z95 * math.sqrt(seed_var)), "prompt": float(Z95 * math.sqrt(prompt_var))})


def length_controlled_win_rate(wins, len_base, len_new, iters=50):
    """The win rate at equal length: a logistic model of the soft judgment w_i in [0, 1] that
    the new answer beats the base one,  w_i ~ sigmoid(a + b f_i)  (f: length_feature), fitted
    by maximum likelihood (cross-entropy with soft targets; Newton's method, halving a step
    that does not lower the loss). Returns (sigmoid(a), 95% half-width): the win rate where
    the two answers are equally long, with a's robust standard error carried through the
    sigmoid (delta method: d sigmoid/da = p (1 - p)). With equal lengths the fit is
    sigmoid(a) = mean(w) and the interval is mean_ci's."""
    w = np.asarray(wins, dtype=float)
    bad = _degenerate(w, len_base, len_new)
    if bad is not None:
        return bad
    # hard 0/1 judgments that length separates perfectly would send b to infinity
    w = np.clip(w, 1e-6, 1 - 1e-6)
    X = np.column_stack([np.ones_like(w), length_feature(len_base, len_new)])

    def loss(t):
        z = X @ t
        return float(np.sum(np.logaddexp(0, z) - w * z))

    theta = np.array([math.log(w.mean() / (1 - w.mean())), 0.0])  # the no-length fit
    for _ in range(iters):
        p = judge.sigmoid(X @ theta)
        H = (X * (p * (1 - p))[:, None]).T @ X
        step = np.linalg.solve(H, X.T @ (w - p))
        while loss(theta + step) > loss(theta) and np.abs(step).max() > 1e-12:
            step /= 2
        theta = theta + step
        if np.abs(step).max() < 1e-10:
            break
    p = judge.sigmoid(X @ theta)
    H_inv = np.linalg.inv((X * (p * (1 - p))[:, None]).T @ X)
    cov = _sandwich(X, w - p, H_inv)
    p0 = float(judge.sigmoid(theta[0]))
    return p0, float(Z95 * p0 * (1 - p0) * math.sqrt(cov[0, 0]))


def length_effect(lengths, scores):
    """Within-prompt: does a longer sample of the same prompt score more? lengths and scores
    are one list of K values per prompt. Returns, each as (mean over prompts, 95% half-width):
      "longest_minus_shortest": score of the longest sample minus that of the shortest
                                (ties broken towards the first sample; prompts whose
                                samples are all equally long are left out),
      "corr": the Pearson correlation of length and score within the prompt (0 when either
              is constant: then length makes no difference to the score),
    and "n", the prompts in "longest_minus_shortest". Both are 0 on average when neither
    shorter nor longer answers meet more checks."""
    diff, corr = [], []
    for ln, sc in zip(lengths, scores):
        ln, sc = np.asarray(ln, float), np.asarray(sc, float)
        if ln.std() > 0:
            diff.append(sc[np.argmax(ln)] - sc[np.argmin(ln)])
        corr.append(0.0 if ln.std() == 0 or sc.std() == 0 else float(np.corrcoef(ln, sc)[0, 1]))
    return {"longest_minus_shortest": mean_ci(diff) if diff else (float("nan"),) * 2,
            "corr": mean_ci(corr), "n": len(diff)}


# ----------------------------------------------------------------------------- one comparison

def win_probs(rows, base, new, tau=0.1):
    """The verifiable judge's soft verdict that new beats base, as sppo.evaluate computes it
    (both orders, averaged; for this judge the two orders agree): sigmoid((r_new - r_base) / tau)."""
    r_new = np.array([judge.satisfaction(a, r["checks"]) for a, r in zip(new, rows)])
    r_base = np.array([judge.satisfaction(a, r["checks"]) for a, r in zip(base, rows)])
    return judge.sigmoid((r_new - r_base) / tau), r_base, r_new


def report(rows, base, new, wins=None, tau=0.1):
    """Everything for base vs new answers to the same held-out rows, length beside each figure.
    wins: the judge's soft verdicts that new beats base (default: the verifiable judge's, as
    win_probs); the satisfaction measures need every row to carry checks."""
    lb, ln = n_words(base), n_words(new)
    out = {"n": len(rows), "words_base": mean_ci(lb), "words_new": mean_ci(ln)}
    if all(r.get("checks") for r in rows):
        w, r_base, r_new = win_probs(rows, base, new, tau)
        out.update(sat_base=mean_ci(r_base), sat_new=mean_ci(r_new), sat_gain=mean_ci(r_new - r_base),
                   sat_gain_lc=length_controlled_gain(r_new - r_base, lb, ln), per_kind=per_kind(rows, base, new))
        wins = w if wins is None else wins
    out.update(win_rate=mean_ci(wins), win_rate_lc=length_controlled_win_rate(wins, lb, ln))
    return out


def _answers(path):
    """id -> the first response of each line of an answers file (sppo.sample's format)."""
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return {r["id"]: r["responses"][0] for r in lines}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or argv[0].startswith("-"):
        print("error: usage: python -m machinery.stats RUN_DIR [HELDOUT.jsonl]  (default prompts/heldout.jsonl)", file=sys.stderr)
        return 2
    run = Path(argv[0])
    held = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "prompts" / "heldout.jsonl"
    try:
        rows = {r["id"]: r for r in (json.loads(x) for x in held.read_text().splitlines() if x.strip())}
        base = _answers(run / "eval_base.jsonl")
        iters = sorted(run.glob("iter*/eval_answers.jsonl"), key=lambda p: int(p.parent.name[4:]))
        if not iters:
            raise ValueError(f"no {run}/iter*/eval_answers.jsonl")
        if not set(base) <= set(rows):
            raise ValueError(f"{run / 'eval_base.jsonl'} answers prompts that are not in {held}")
        ids = list(base)
        for path in iters:
            new = _answers(path)
            if set(new) != set(ids):
                raise ValueError(f"{path}: answers other prompts than eval_base.jsonl")
            print_report(path.parent.name, report([rows[i] for i in ids], [base[i] for i in ids], [new[i] for i in ids]))
    except (OSError, ValueError, KeyError, IndexError) as e:  # json.JSONDecodeError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def print_report(name, r):
    f = lambda m: f"{m[0]:.3f} ± {m[1]:.3f}"  # noqa: E731
    print(f"{name}: {r['n']} prompts, words {r['words_base'][0]:.1f} -> {r['words_new'][0]:.1f} "
          f"(± {r['words_new'][1]:.1f}); satisfaction {r['sat_base'][0]:.3f} -> {r['sat_new'][0]:.3f}, "
          f"gain {f(r['sat_gain'])}, at equal length {f(r['sat_gain_lc'])}; "
          f"win rate {f(r['win_rate'])}, at equal length {f(r['win_rate_lc'])}")
    print("| kind | n | base | new | gain (95% CI) |\n|---|---:|---:|---:|---:|")
    for kind, k in r["per_kind"].items():
        print(f"| {kind} | {k['n']} | {k['base']:.2f} | {k['new']:.2f} | {k['gain'][0]:+.2f} ± {k['gain'][1]:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
