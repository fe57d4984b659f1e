"""make results and make compare SEEDS=...: the tables hold the numbers of the run folders, computed
here again from the answers with numpy alone (satisfaction known by construction), the commit and
machine recorded at run time are named, and a change of code since is marked stale."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from test_sppo import ROOT

sys.path.insert(0, str(ROOT))
from machinery import runs  # noqa: E402
from scripts import compare, results  # noqa: E402

N = 40  # held-out prompts
COMMIT = "0" * 40


def heldout(path):
    """Every prompt: the word 'river' and at most 20 words; the first 5 also no commas (too few
    prompts for a per-kind row)."""
    rows = [{"id": f"h{i}", "prompt": f"say something {i}",
             "checks": [{"type": "include_word", "word": "river"}, {"type": "max_words", "n": 20}]
             + ([{"type": "no_commas"}] if i < 5 else [])} for i in range(N)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer(words, river):
    """An answer of `words` words, with 'river' or without, and no comma: what each check sees is known."""
    return " ".join((["river"] if river else []) + ["leaf"] * (words - river)) + "."


def write_arm(folder, held, base, new, commit=COMMIT, machine="Test CPU, 2 cores, AVX2", kl=(1.5, 0.5), iters=1):
    """The files results.py reads, as sppo.py writes them; base/new: (words, river) per prompt."""
    last = folder / f"iter{iters - 1}"
    last.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({"heldout": str(held), "iters": iters, "seed": 0}))
    (folder / "provenance.json").write_text(json.dumps({"commit": commit, "dirty": False, "machine": machine}))
    for path, answers in ((folder / "eval_base.jsonl", base), (last / "eval_answers.jsonl", new)):
        path.write_text("".join(json.dumps({"id": f"h{i}", "responses": [answer(*a)]}) + "\n" for i, a in enumerate(answers)))
    (last / "eval.json").write_text(json.dumps({"iter": iters - 1, "win_rate": [0.55, 0.05], "kl": list(kl)}))


def draw(rng):
    """(words, river) per prompt, and its satisfaction by construction: (river + (words <= 20)) / 2,
    and (river + (words <= 20) + 1) / 3 on the first 5 prompts (no answer has a comma)."""
    words, river = rng.integers(5, 40, N), (rng.random(N) < 0.5).astype(int)
    sat = np.where(np.arange(N) < 5, (river + (words <= 20) + 1) / 3, (river + (words <= 20)) / 2)
    return list(zip(words.tolist(), river.tolist())), sat, words, river


@pytest.fixture
def compared(tmp_path):
    """Three seeds of two arms, pi_0 shared within a seed, drawn at random."""
    held = heldout(tmp_path / "heldout.jsonl")
    rng = np.random.default_rng(0)
    truth = {}
    for seed in (0, 1, 2):
        base = draw(rng)
        for arm in ("sppo", "dpo"):
            new = draw(rng)
            write_arm(tmp_path / "cmp" / f"seed{seed}" / arm, held, base[0], new[0], kl=(1.0 + seed, 0.2))
            truth[seed, arm] = base, new
    return tmp_path / "cmp", truth


def ci(mean, hw):
    return f"{mean:+.3f} ± {hw:.3f}"


def lc_gain(g, lb, ln):
    """The gain at equal length by its textbook formula: OLS g = a + b tanh(d / sd(d)), HC1 on a."""
    d = ln - lb
    X = np.column_stack([np.ones(len(g)), np.tanh(d / d.std(ddof=1))])
    theta = np.linalg.lstsq(X, g, rcond=None)[0]
    r = g - X @ theta
    B = np.linalg.inv(X.T @ X)
    return theta[0], 1.96 * math.sqrt(len(g) / (len(g) - 2) * (B @ X.T @ np.diag(r ** 2) @ X @ B)[0, 0])


def test_tables_hold_each_seeds_and_the_pooled_gain_computed_from_the_answers(compared, tmp_path):
    runs_dir, truth = compared
    out = tmp_path / "docs" / "RESULTS.md"
    assert results.main(["--runs", str(runs_dir), "--out", str(out), "--repo", str(tmp_path)]) == 0
    text = out.read_text()
    for arm in ("sppo", "dpo"):
        gains = []
        for seed in (0, 1, 2):
            (_, sb, wb, _), (_, sn, wn, _) = truth[seed, arm]
            g = sn - sb
            gains.append(g)
            row = f"| {seed} | {arm} | {ci(g.mean(), 1.96 * g.std(ddof=1) / math.sqrt(N))} | {ci(*lc_gain(g, wb + 0.0, wn + 0.0))} |"
            assert row in text, row
            assert f"{wb.mean():.1f} -> {wn.mean():.1f} | {1.0 + seed:.3f} ± 0.200 |" in text
        G = np.array(gains)  # seeds x prompts; pooled: seed means' spread / S + prompt means' spread / N
        var = G.mean(axis=1).var(ddof=1) / 3 + G.mean(axis=0).var(ddof=1) / N
        assert f"| {arm} | 0,1,2 | {N} | **{ci(G.mean(), 1.96 * math.sqrt(var))}** |" in text
        # per kind: include_word's score is river alone; no_commas (5 prompts) gets no row
        K = np.array([truth[s, arm][1][3] - truth[s, arm][0][3] for s in (0, 1, 2)], dtype=float)
        kvar = K.mean(axis=1).var(ddof=1) / 3 + K.mean(axis=0).var(ddof=1) / N
        assert ci(K.mean(), 1.96 * math.sqrt(kvar)) in text.split("| include_word |")[1].split("\n")[0]
    assert "| no_commas |" not in text
    assert "Measured at `0000000` on Test CPU, 2 cores, AVX2 (seeds 0, 1, 2)." in text
    assert "STALE" in text  # tmp_path is no repository: nothing can vouch for the commit
    assert (out.parent / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prose_outside_the_markers_is_kept_and_a_missing_file_is_made_with_them(compared, tmp_path):
    runs_dir, _ = compared
    out = tmp_path / "RESULTS.md"
    results.main(["--runs", str(runs_dir), "--out", str(out), "--repo", str(tmp_path)])
    made = out.read_text()
    assert made.startswith("# Results\n") and made.count(results.BEGIN) == 1 and made.count(results.END) == 1
    out.write_text("# Mine\n\nbefore\n" + results.BEGIN + "\nold table\n" + results.END + "\nafter\n")
    results.main(["--runs", str(runs_dir), "--out", str(out), "--repo", str(tmp_path)])
    again = out.read_text()
    assert again.startswith("# Mine\n\nbefore\n" + results.BEGIN + "\n") and again.endswith(results.END + "\nafter\n")
    assert "old table" not in again and "| sppo | 0,1,2 |" in again


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_stale_banner_appears_when_code_that_makes_a_run_changed_since_its_commit_and_not_otherwise(tmp_path):
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "tests").mkdir()
    for f in ("sppo.py", "docs/notes.md", "tests/test_x.py", "README.md"):
        (repo / f).write_text("1\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    commit = git(repo, "rev-parse", "HEAD")
    held = heldout(tmp_path / "heldout.jsonl")
    rng = np.random.default_rng(1)
    write_arm(tmp_path / "cmp" / "seed0" / "sppo", held, draw(rng)[0], draw(rng)[0], commit=commit)

    def banner():
        out = tmp_path / "R.md"
        results.main(["--runs", str(tmp_path / "cmp"), "--out", str(out), "--repo", str(repo)])
        section = out.read_text().split(results.BEGIN)[1]
        return [ln for ln in section.splitlines() if "STALE" in ln]

    assert banner() == []
    for f in ("docs/notes.md", "tests/test_x.py", "README.md"):  # nothing that makes a run
        (repo / f).write_text("2\n")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "b")
    assert banner() == []
    (repo / "sppo.py").write_text("2\n")  # uncommitted, then committed: stale either way
    assert banner() == [f"**STALE: measured at {commit[:7]}, code has changed since in sppo.py.** "
                        "Rerun `make compare SEEDS=...` and `make results`."]
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "c")
    assert len(banner()) == 1 and "sppo.py" in banner()[0]


def test_a_run_records_its_commit_and_machine_once_and_a_resume_elsewhere_adds_itself(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("1\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    run = tmp_path / "run"
    run.mkdir()
    runs.record_provenance(run, repo)
    first = (run / "provenance.json").read_bytes()
    got = json.loads(first)
    assert got["commit"] == git(repo, "log", "-1", "--format=%H") and got["dirty"] is False
    assert got["machine"] == runs.kernels.cpu_description()
    runs.record_provenance(run, repo)  # a resume at the same commit on the same machine: nothing changes
    assert (run / "provenance.json").read_bytes() == first
    (repo / "a.py").write_text("2\n")  # a tracked file edited: the commit no longer pins the code
    runs.record_provenance(run, repo)
    assert json.loads((run / "provenance.json").read_text())["resumed"] == [dict(got, dirty=True)]


def test_bad_run_folder_is_one_error_line_naming_it(tmp_path, capsys):
    held = heldout(tmp_path / "heldout.jsonl")
    rng = np.random.default_rng(2)
    arm = tmp_path / "cmp" / "seed0" / "sppo"
    write_arm(arm, held, draw(rng)[0], draw(rng)[0])
    (arm / "iter0" / "eval.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        results.main(["--runs", str(tmp_path / "cmp"), "--out", str(tmp_path / "R.md")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "eval.json" in err
    assert not (tmp_path / "R.md").exists()


def test_compare_runs_every_arm_of_every_seed_on_all_heldout_prompts_then_pools(tmp_path, monkeypatch, capsys):
    """make compare SEEDS=3,4: each seed's arms one after another, each as sppo.py with --eval-prompts 0
    (all held-out prompts; a flag given after it still wins), then the pooled summary. The arms'
    processes are stood in for by writing the files a finished arm leaves."""
    held = heldout(tmp_path / "heldout.jsonl")
    rng = np.random.default_rng(3)
    calls, real_run = [], subprocess.run

    def fake_run(cmd, **kw):
        if cmd[:2] != [sys.executable, str(ROOT / "sppo.py")]:  # git, for the stale marking
            return real_run(cmd, **kw)
        a = dict(zip(cmd[2:], cmd[3:]))
        calls.append(cmd)
        folder = tmp_path / "cmp" / f"seed{a['--seed']}" / a["--name"]
        if not (folder / "settings.json").exists():
            write_arm(folder, held, draw(rng)[0], draw(rng)[0])
        (folder / "metrics.jsonl").write_text(json.dumps({"iter": 0, "sat_gain": [0.1, 0.1], "sat_gain_lc": [0.1, 0.1],
                                                          "win_rate": [0.5, 0.1], "win_rate_lc": [0.5, 0.1],
                                                          "words_base": [20, 1], "words_new": [21, 1]}) + "\n")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    monkeypatch.setattr(compare, "plot", lambda tables, path: None)
    assert compare.main(["--seeds", "3,4", "--arms", "sppo,dpo", "--runs-dir", str(tmp_path / "cmp"), "--eval-prompts", "7"]) == 0
    assert [(c[c.index("--seed") + 1], c[c.index("--name") + 1]) for c in calls] == [("3", "sppo"), ("3", "dpo"), ("4", "sppo"), ("4", "dpo")]
    for c in calls:  # all held-out prompts unless told otherwise: the user's later flag wins in argparse
        assert c.index("--eval-prompts") < len(c) and c[c.index("--eval-prompts") + 1] == "0"
        assert c[len(c) - 1 - c[::-1].index("--eval-prompts") + 1] == "7"
    pooled = (tmp_path / "cmp" / "summary.md").read_text()
    assert "| sppo | 3,4 | 40 |" in pooled and "| dpo | 3,4 | 40 |" in pooled
    assert (tmp_path / "cmp" / "seed3" / "summary.md").exists() and (tmp_path / "cmp" / "seed4" / "summary.md").exists()


def test_bad_seeds_are_one_error_line_and_nothing_is_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("an arm was started"))
    assert compare.main(["--seeds", "0,one", "--runs-dir", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --seeds must be comma-separated integers, got '0,one'\n" and not (tmp_path / "cmp").exists()
