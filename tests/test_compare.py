"""make compare: the arms share what does not depend on the loss, and only that."""
import json
import subprocess
import sys

from test_sppo import ROOT, run_args, tiny_setup  # noqa: F401 (tiny_setup is a fixture)


def test_arms_share_only_what_every_loss_computes_alike_and_summarise_every_iteration(tiny_setup, tmp_path):  # noqa: F811
    args = run_args(tiny_setup, tmp_path / "unused") + ["--iters", "1"]
    for flag in ("--eta", "--runs-dir", "--name"):  # compare sets these itself (--eta: of its SPPO arms)
        i = args.index(flag)
        args = args[:i] + args[i + 2:]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), "--arms", "sppo,dpo", "--runs-dir", str(tmp_path / "cmp"),
                        "--seed", "3", "--eta", "2", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "cmp" / "seed3"
    # the reference for sharing: the dpo arm run on its own computes the same files byte for byte
    alone = subprocess.run([sys.executable, str(ROOT / "sppo.py"), *args, "--loss", "dpo", "--beta", "0.1", "--seed", "3",
                            "--runs-dir", str(tmp_path / "alone"), "--name", "dpo"],
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    for rel in ("eval_base.jsonl", "iter0/responses.jsonl", "iter0/judgments.jsonl", "iter0/pairs.jsonl",
                "iter0/eval_answers.jsonl", "iter0/eval.json"):
        assert (out / "dpo" / rel).read_bytes() == (tmp_path / "alone" / "dpo" / rel).read_bytes(), rel
    # ... while the arms' losses did differ: their trained adapters are not the same
    a, b = (out / arm / "iter0" / "adapter" / "adapter_model.safetensors" for arm in ("sppo", "dpo"))
    assert a.read_bytes() != b.read_bytes()
    settings = {arm: json.loads((out / arm / "settings.json").read_text()) for arm in ("sppo", "dpo")}
    assert settings["sppo"]["loss"] == "sppo" and settings["dpo"]["loss"] == "dpo" and settings["dpo"]["seed"] == 3
    summary = (out / "summary.md").read_text()
    evals = {arm: json.loads((out / arm / "iter0" / "eval.json").read_text()) for arm in ("sppo", "dpo")}
    for arm, ev in evals.items():  # a row per arm and iteration, its figures from that arm's eval.json
        assert f"| {arm} | 1 | {ev['sat_gain'][0]:+.3f} +/- {ev['sat_gain'][1]:.3f} |" in summary
        assert len(ev["kl"]) == 2
    assert "| no_digits |" in summary and (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # run again: every arm resumes (nothing left to do) and the summary is the same
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), "--arms", "sppo,dpo", "--runs-dir", str(tmp_path / "cmp"),
                            "--seed", "3", "--eta", "2", *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (out / "summary.md").read_text() == summary
