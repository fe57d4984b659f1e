"""
Tests for stats.py against hand-computed cases and closed-form maths: the plain mean and its
normal interval, OLS's closed form, the logistic MLE's fixed point, the intervals' coverage
on simulated data, and two judges whose truth is known by construction: one that rewards only
brevity (a raw gain, none at equal length) and one that rewards content (a gain either way).
"""

import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from machinery import stats  # noqa: E402


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def text(n, word="leaf"):
    return " ".join([word] * n) + "." if n else ""


# -----------------------------------------------------------------------------
# plain figures, hand-computed


def test_mean_ci_is_the_mean_and_normal_95_half_width():
    m, h = stats.mean_ci([1, 2, 3, 4])
    assert m == 2.5
    assert h == pytest.approx(1.96 * math.sqrt(5 / 3) / 2, abs=1e-12)  # sd (n-1) = sqrt(5/3)
    assert math.isnan(stats.mean_ci([7])[1])


def test_n_words_counts_what_max_words_counts():
    # "don't" and "stop-me" are one word each, a bullet dash is none, an empty answer is 0
    assert stats.n_words(["one two", "- don't stop-me now", ""]).tolist() == [2, 3, 0]


def test_per_kind_rates_and_paired_gain_by_hand():
    rows = [{"checks": [{"type": "max_words", "n": 3}, {"type": "include_word", "word": "sun"}]},
            {"checks": [{"type": "max_words", "n": 3}]},
            {"checks": [{"type": "include_word", "word": "sun"}, {"type": "include_word", "word": "moon"}]}]
    base = ["the sun is hot", "short one", "the sun"]      # max_words: F, T; include: T; 1 of 2
    new = ["sun is hot", "a much longer answer", "sun and moon"]  # max_words: T, F; include: T; 2 of 2
    k = stats.per_kind(rows, base, new)
    assert list(k) == ["include_word", "max_words"]  # ties in n: by name
    mw = k["max_words"]
    assert (mw["n"], mw["base"], mw["new"]) == (2, 0.5, 0.5)
    assert mw["gain"][0] == 0.0
    assert mw["gain"][1] == pytest.approx(1.96 * math.sqrt(2) / math.sqrt(2))  # gains +1, -1: sd sqrt 2
    iw = k["include_word"]  # the third prompt counts once, at the fraction of its two checks met
    assert (iw["n"], iw["base"], iw["new"]) == (2, 0.75, 1.0)
    assert iw["gain"][0] == 0.25


def test_length_effect_longest_minus_shortest_and_correlation_by_hand():
    lengths = [[10, 20, 30], [5, 5, 5], [30, 10, 20], [1, 2, 3]]
    scores = [[1, 0.5, 0], [1, 0, 1], [0, 1, 0.5], [1, 1, 1]]
    e = stats.length_effect(lengths, scores)
    # prompt 2 has no longest sample; prompt 4's scores are all equal: longest - shortest = 0
    assert e["n"] == 3
    assert e["longest_minus_shortest"][0] == pytest.approx(-2 / 3)
    # correlations -1, 0 (lengths constant), -1, 0 (scores constant)
    assert e["corr"][0] == pytest.approx(-0.5)


# -----------------------------------------------------------------------------
# the length-controlled fits: closed forms and degenerate cases

LEN_BASE = np.array([20, 30, 40, 50, 25, 35, 45, 55, 30, 40])
LEN_NEW = LEN_BASE + np.array([-10, -20, 5, 0, -5, 15, -30, 10, -15, 0])


def feature():
    d = LEN_NEW - LEN_BASE
    return np.tanh(d / d.std(ddof=1))


def test_gain_at_equal_length_is_the_ols_intercept_in_closed_form():
    f = feature()
    g = np.array([0.5, 1, 0, 0, 0.5, -1, 1, 0, 0.5, -0.5])
    b = np.cov(f, g, ddof=1)[0, 1] / np.var(f, ddof=1)
    a, half = stats.length_controlled_gain(g, LEN_BASE, LEN_NEW)
    assert a == pytest.approx(g.mean() - b * f.mean(), abs=1e-12)
    assert 0 < half < 1
    # exactly linear in the feature: the intercept, with no residual left to be unsure about
    a, half = stats.length_controlled_gain(0.1 + 0.3 * f, LEN_BASE, LEN_NEW)
    assert a == pytest.approx(0.1, abs=1e-12) and half == pytest.approx(0, abs=1e-9)


def test_win_rate_at_equal_length_recovers_a_well_specified_logistic_model():
    # the soft judgments lie exactly on sigmoid(a + b f): the likelihood's gradient is zero there
    p, half = stats.length_controlled_win_rate(sig(0.8 - 2.0 * feature()), LEN_BASE, LEN_NEW)
    assert p == pytest.approx(sig(0.8), abs=1e-9) and half == pytest.approx(0, abs=1e-6)


def test_equal_lengths_give_the_plain_mean_and_its_interval():
    y = np.array([0.9, 0.2, 0.5, 0.7, 0.99, 0.5])
    same = np.full(6, 30)
    assert stats.length_controlled_gain(y, same, same) == stats.mean_ci(y)
    assert stats.length_controlled_win_rate(y, same, same) == stats.mean_ci(y)


def test_robust_interval_with_length_term_is_mean_ci_when_length_says_nothing():
    # length varies but the data are balanced over it (f symmetric, y the same at +f and -f):
    # the slope is 0, and HC1's n/(n-2) makes the intercept's interval match OLS's
    # residual-based one: 1.96 sqrt(sum r^2 / (n (n-2))) (f has mean 0 here)
    y = np.array([0.2, 0.8, 0.2, 0.8, 0.6, 0.6])
    lb = np.full(6, 30)
    ln = lb + np.array([-10, -10, 10, 10, 0, 0])
    a, half = stats.length_controlled_gain(y, lb, ln)
    r = y - y.mean()
    assert a == pytest.approx(y.mean(), abs=1e-12)
    assert half == pytest.approx(1.96 * math.sqrt(np.sum(r ** 2) / (6 * 4)), abs=1e-12)


@pytest.mark.parametrize("fn", [stats.length_controlled_gain, stats.length_controlled_win_rate])
def test_length_cannot_be_separated_from_the_intercept_gives_nan(fn):
    # every new answer 5 words shorter: all of the gain could be length, or none of it
    a, half = fn([0.7, 0.8, 0.9, 0.6], [20, 30, 40, 50], [15, 25, 35, 45])
    assert math.isnan(a) and math.isnan(half)
    # two pairs: a line through two points leaves no error to estimate
    a, half = fn([0.7, 0.8], [20, 30], [15, 40])
    assert math.isnan(a) and math.isnan(half)


def test_intervals_cover_the_true_value_95_percent_of_the_time():
    # heteroskedastic data from a known model; the 95% intervals should hold the truth ~95%
    rng = np.random.default_rng(0)
    n, sims, hit_gain, hit_win = 120, 600, 0, 0
    for _ in range(sims):
        lb = rng.integers(10, 60, n)
        ln = np.maximum(lb + rng.normal(-8, 12, n).round().astype(int), 0)
        d = ln - lb
        f = np.tanh(d / d.std(ddof=1))
        g = 0.1 - 0.3 * f + rng.normal(0, 0.2 + 0.2 * np.abs(f), n)
        a, h = stats.length_controlled_gain(g, lb, ln)
        hit_gain += abs(a - 0.1) <= h
        w = (rng.random(n) < sig(0.4 - 1.5 * f)).astype(float)  # hard 0/1 verdicts
        p, h = stats.length_controlled_win_rate(w, lb, ln)
        hit_win += abs(p - sig(0.4)) <= h
    # binomial sd of a coverage of 0.95 over 600 runs: 0.009
    assert 0.92 <= hit_gain / sims <= 0.98
    assert 0.92 <= hit_win / sims <= 0.98


# -----------------------------------------------------------------------------
# judges with a known truth, through the verifiable judge and report()

# base lengths 30..80, symmetric about the limit 55; new answers 7.5 words shorter on average.
# The length changes repeat every 8 prompts, content every 3: independent of each other.
N = 8 * 3 * 17
BASE_LEN = 30 + (np.arange(N) * 7) % 51
NEW_LEN = BASE_LEN + np.array([-25, -15, -10, -5, 0, 5, 10, -20])[np.arange(N) % 8]


def test_a_judge_that_only_rewards_brevity_shows_no_gain_at_equal_length():
    rows = [{"checks": [{"type": "max_words", "n": 55}]}] * N
    base = [text(n) for n in BASE_LEN]
    new = [text(n) for n in NEW_LEN]
    r = stats.report(rows, base, new)
    assert r["words_new"][0] < r["words_base"][0] - 5
    # shorter answers meet the limit more often: a clear raw gain and win rate ...
    assert r["sat_gain"][0] > 0.1 and r["sat_gain"][0] - r["sat_gain"][1] > 0
    assert r["win_rate"][0] > 0.55 and r["win_rate"][0] - r["win_rate"][1] > 0.5
    # ... and none between answers of equal length
    a, half = r["sat_gain_lc"]
    assert abs(a) < 0.03 and abs(a) < half
    p, half = r["win_rate_lc"]
    assert abs(p - 0.5) < 0.03 and abs(p - 0.5) < half


def test_a_judge_that_rewards_content_shows_the_gain_at_equal_length_too():
    rows = [{"checks": [{"type": "include_word", "word": "river"}]}] * N
    content = np.arange(N) % 3 != 0  # two thirds of new answers name the river
    base = [text(n) for n in BASE_LEN]
    new = [text(n - 1) + " river" if c else text(n) for n, c in zip(NEW_LEN, content)]  # same length
    r = stats.report(rows, base, new)
    assert r["words_new"][0] < r["words_base"][0] - 5
    assert r["sat_gain"][0] == pytest.approx(2 / 3)
    # content is independent of length by construction: the slope is 0, the intercept the mean
    assert r["sat_gain_lc"][0] == pytest.approx(2 / 3, abs=1e-9)
    assert r["sat_gain_lc"][0] - r["sat_gain_lc"][1] > 0.5
    assert r["win_rate_lc"][0] == pytest.approx(r["win_rate"][0], abs=1e-6)
    assert r["win_rate_lc"][0] - r["win_rate_lc"][1] > 0.6
    assert r["per_kind"]["include_word"]["new"] == pytest.approx(2 / 3)


# -----------------------------------------------------------------------------
# the command line


def write_run(tmp_path, base, new):
    held = tmp_path / "heldout.jsonl"
    held.write_text("".join(json.dumps({"id": f"h{i}", "prompt": "p", "checks": [{"type": "max_words", "n": 3}]}) + "\n"
                            for i in range(len(base))))
    run = tmp_path / "run"
    (run / "iter0").mkdir(parents=True)
    for path, answers in [(run / "eval_base.jsonl", base), (run / "iter0" / "eval_answers.jsonl", new)]:
        path.write_text("".join(json.dumps({"id": f"h{i}", "responses": [a]}) + "\n" for i, a in enumerate(answers)))
    return run, held


def test_command_line_prints_each_iteration_and_bad_input_is_one_error_line(tmp_path, capsys):
    run, held = write_run(tmp_path, ["a b c d", "a b", "a b c d e", "a"], ["a b", "a b", "a b c", "a b c"])
    assert stats.main([str(run), str(held)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("iter0: 4 prompts, words 3.0 -> 2.5") and "| max_words | 4 | 0.50 | 1.00 |" in out
    assert stats.main([str(tmp_path / "nowhere"), str(held)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


# -----------------------------------------------------------------------------
# pooled over seeds: closed-form reductions and the expectation under a known random-effects model

def test_lc_contributions_average_to_the_equal_length_gain_with_its_interval():
    rng = np.random.default_rng(5)
    lb, ln = rng.integers(10, 60, 80), rng.integers(10, 60, 80)
    g = 0.1 + 0.2 * np.tanh((ln - lb) / 20) + rng.normal(0, 0.3, 80)
    u = stats.lc_contributions(g, lb, ln)
    # the reference: HC1 by its textbook formula, n/(n-p) (X'X)^-1 X' diag(r^2) X (X'X)^-1, p = 2
    f = stats.length_feature(lb, ln)
    X = np.column_stack([np.ones(80), f])
    theta = np.linalg.lstsq(X, g, rcond=None)[0]
    r = g - X @ theta
    B = np.linalg.inv(X.T @ X)
    hc1 = 80 / 78 * (B @ X.T @ np.diag(r ** 2) @ X @ B)[0, 0]
    assert stats.mean_ci(u)[0] == pytest.approx(theta[0], abs=1e-12)
    assert stats.mean_ci(u)[1] == pytest.approx(1.96 * math.sqrt(hc1), rel=1e-9)
    assert np.array_equal(stats.lc_contributions(g, lb, lb), g)  # equal lengths: the gains themselves


def test_pooled_interval_with_one_seed_is_that_seeds_interval():
    d = np.random.default_rng(0).normal(0.05, 0.4, 330)
    mean, hw, parts = stats.pooled_gain([d])
    assert mean == pytest.approx(d.mean()) and hw == pytest.approx(1.96 * d.std(ddof=1) / math.sqrt(330))
    assert parts["seed"] == 0.0


def test_identical_seeds_add_no_seed_term_and_no_precision():
    d = np.random.default_rng(1).normal(0.05, 0.4, 200)
    one, three = stats.pooled_gain([d]), stats.pooled_gain([d, d, d])
    assert three[2]["seed"] == 0.0 and three[1] == pytest.approx(one[1]) and three[0] == pytest.approx(one[0])


def test_pooled_variance_matches_its_expectation_under_a_crossed_random_effects_model():
    """d_si = mu + a_s + b_i + e_si (seed, prompt and residual effects, sd 0.06, 0.5, 0.3): the
    pooled variance's expectation is s_a^2/S + s_b^2/n + 2 s_e^2/(n S) in closed form, the true
    variance of the mean (s_a^2/S + s_b^2/n + s_e^2/(nS)) plus s_e^2/(nS). A prompt term taken
    within each seed as if prompts were nested (mean over s of var_i(d_s) / (n S)) would expect
    s_b^2/(n S): a third of the prompt level, missed."""
    rng = np.random.default_rng(2)
    S, n, sa, sb, se, reps = 3, 100, 0.06, 0.5, 0.3, 4000
    d = (rng.normal(0, sa, (reps, S, 1)) + rng.normal(0, sb, (reps, 1, n)) + rng.normal(0, se, (reps, S, n)))
    var = np.array([(stats.pooled_gain(x)[1] / 1.96) ** 2 for x in d])
    want = sa ** 2 / S + sb ** 2 / n + 2 * se ** 2 / (n * S)
    assert var.mean() == pytest.approx(want, rel=0.03)
    # and the true variance of the pooled mean, measured over the replicates, is below it by s_e^2/(nS)
    truth = d.mean(axis=(1, 2)).var()
    assert truth == pytest.approx(sa ** 2 / S + sb ** 2 / n + se ** 2 / (n * S), rel=0.08)
    assert var.mean() >= truth
