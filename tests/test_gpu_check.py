"""gpu_check.py (`make gpu-check`) on a machine without a GPU: what it says there, how step
results become the summary, the memory rule, the hours estimate, and its steps on CPU with
tiny shapes (the same code paths the GPU run takes, minus the per-card memory numbers)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from scripts import gpu_check as G

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def no_cuda_env():
    return dict(os.environ, CUDA_VISIBLE_DEVICES="")


def test_without_cuda_make_gpu_check_says_nothing_to_check_in_one_line_and_exits_0():
    r = subprocess.run(["make", "-s", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}"], cwd=ROOT, env=no_cuda_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [r.stdout.strip()] and "nothing to check" in r.stdout
    # it uses the installed torch: the target installs nothing (no venv stamp, no pip); run under
    # another make (as CI does) make would otherwise print "Entering directory" around it
    dry = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.stdout.strip().endswith("gpu_check.py") and "pip" not in dry.stdout


def result_line(**res):
    return G.TAG + json.dumps(res)


def table_rows(markdown):
    """| a | b | ... | lines -> lists of cells (header and separator dropped)."""
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in markdown.splitlines() if ln.startswith("|")]
    return rows[2:]


def test_step_outputs_become_summary_rows_pass_fail_and_skipped():
    over = {"device": "cuda:1", "phase": "train", "layers": "21-31", "planned": 10 * GIB, "measured": 12 * GIB,
            "allocated": 11 * GIB}
    within = {"device": "cuda:0", "phase": "train", "layers": "0-20", "planned": 10 * GIB, "measured": 9 * GIB,
              "allocated": 8 * GIB}
    outputs = {
        "env": (0, "some log\n" + result_line(step="env", ok=True, seconds=12.3, summary="torch 2.5.1, 2 cards")),
        "train": (0, result_line(step="train", ok=True, seconds=80, summary="training 2,000 tokens/s",
                                 memory=[within, over])),
        "sample": (-9, "building the model\nKilled"),  # the OOM killer: no result line
        "e2e": (1, result_line(step="e2e", ok=True, seconds=5, summary="1 iteration")),  # result, then a crash
        "e2e-vllm": (0, result_line(step="e2e-vllm", ok=None, seconds=1, summary="skipped: no vLLM")),
    }
    results = [G.parse_result(name, rc, out) for name, (rc, out) in outputs.items()]
    rows = table_rows(G.summary_table(results))
    assert [r[:3] for r in rows] == [["env", "pass", "12 s"], ["train", "FAIL", "80 s"], ["sample", "FAIL", "0 s"],
                                     ["e2e", "FAIL", "5 s"], ["e2e-vllm", "skipped", "1 s"]]
    assert rows[0][3] == "torch 2.5.1, 2 cards"
    assert rows[2][3] == "exit status -9 without a result: Killed"
    assert rows[3][3] == "exit status 1 after: 1 iteration"
    mem = table_rows(G.memory_table(results))
    assert mem == [["cuda:0", "train", "0-20", "10.00 GiB", "9.00 GiB", "0.90", "yes"],
                   ["cuda:1", "train", "21-31", "10.00 GiB", "12.00 GiB", "1.20", "NO"]]
    report = G.report(results, G.Iteration())
    assert "FAIL: cuda:1 train peak 12.00 GiB is 20% above the plan's 10.00 GiB" in report


def memory_result(planned, measured):
    return {"step": "train", "ok": True, "memory": [{"device": "cuda:0", "phase": "train", "layers": "0-31",
                                                      "planned": planned, "measured": measured, "allocated": 0}]}


def test_a_peak_more_than_10_percent_over_the_plan_fails_and_within_10_percent_passes():
    plan = 10 * GIB
    assert G.verdict(memory_result(plan, 1.11 * plan)) == "FAIL"
    assert G.verdict(memory_result(plan, 1.09 * plan)) == "pass"
    assert G.verdict(memory_result(plan, 0.5 * plan)) == "pass"
    assert G.verdict(memory_result(plan, None)) == "pass"  # CPU: nothing measured per card
    assert not G.within_plan(100, 111) and G.within_plan(100, 109)


def test_two_stages_on_one_card_are_planned_as_one_card_with_one_context():
    ctx = pipeline.CONTEXT  # each card pays it once
    rows = [{"device": "cuda:0", "layers": "0-15", "train": 4 * GIB + ctx, "sample": 9 * GIB + ctx},
            {"device": "cuda:0", "layers": "16-31", "train": 7 * GIB + ctx, "sample": 9 * GIB + ctx}]
    assert G.planned_by_card(rows, "train") == {"cuda:0": ("0-15+16-31", 11 * GIB + ctx)}
    two = [dict(rows[0]), dict(rows[1], device="cuda:1")]
    assert G.planned_by_card(two, "sample") == {"cuda:0": ("0-15", 9 * GIB + ctx), "cuda:1": ("16-31", 9 * GIB + ctx)}


def test_hours_estimate_is_tokens_of_each_stage_over_its_measured_rate():
    it = G.Iteration(prompts=20_000, k=5, new_tokens=512, seq_len=1024, epochs=3)
    est = G.estimate_hours(it, sample_tok_s=400.0, score_tok_s=6000.0, train_tok_s=2000.0)
    # by hand: 20,000 x 5 x 512 = 51,200,000 tokens at 400/s = 128,000 s = 35.56 h;
    # 20,000 pairs x 2 sequences x 1024 = 40,960,000 tokens at 6000/s = 6826.7 s = 1.896 h;
    # 3 epochs of those at 2000/s = 61,440 s = 17.07 h; total 54.52 h
    assert est["generate"]["hours"] == pytest.approx(35.556, abs=1e-3)
    assert est["pairs"]["hours"] == pytest.approx(1.8963, abs=1e-3)
    assert est["train"]["hours"] == pytest.approx(17.067, abs=1e-3)
    assert est["total"]["hours"] == pytest.approx(54.519, abs=1e-3)
    results = [{"step": "train", "ok": True, "rates": {"train_tok_s": 2000.0, "score_tok_s": 6000.0}},
               {"step": "sample", "ok": True, "rates": {"sample_tok_s_1": 30.0, "sample_tok_s_batch": 400.0}}]
    rows = table_rows(G.estimate_table(results, it))
    assert rows[0][0] == "generate" and rows[0][2:] == ["400 tokens/s", "35.6"]
    assert rows[-1] == ["total", "", "", "54.5"]


def test_every_stage_is_in_the_estimate_with_a_2x4090_column_scaled_from_published_figures():
    """By hand from the rates: the judge's 20,000 prompts at 2 prompts/s; merging 16.06 GB read at
    1 GB/s and written at 0.5 GB/s; the evaluation's 100 greedy answers of 512 tokens at 400
    tokens/s plus 100 x 2 x 2 comparisons at 2 x 20 comparisons/s. The 4090 column: decoding
    times 4.8 / 1.008 (bandwidth), products times 990 / 165 (bf16 throughput), merging unchanged."""
    it = G.Iteration(prompts=20_000, k=5, new_tokens=512, seq_len=1024, epochs=3, eval_prompts=100,
                     model_bytes=16_060_000_000)
    results = [{"step": "env", "ok": True, "cards": [{"device": "cuda:0", "name": "NVIDIA H200"}]},
               {"step": "train", "ok": True, "rates": {"train_tok_s": 2000.0, "score_tok_s": 6000.0}},
               {"step": "sample", "ok": True, "rates": {"sample_tok_s_1": 30.0, "sample_tok_s_batch": 400.0}},
               {"step": "judge", "ok": True, "rates": {"judge_prompts_s": 2.0, "judge_prompts_s_theirs": 0.1}},
               {"step": "e2e", "ok": True, "rates": {"disk_read_bytes_s": 1e9, "disk_write_bytes_s": 0.5e9}}]
    est = G.estimate_of(results, it)
    h = {"generate": 128_000 / 3600, "pairs": 6826.67 / 3600, "train": 61_440 / 3600, "judge": 10_000 / 3600,
         "merge": (16.06 + 32.12) / 3600, "evaluate": (128.0 + 10.0) / 3600}
    for stage, want in h.items():
        assert est[stage]["hours"] == pytest.approx(want, rel=1e-4), stage
    assert est["total"]["hours"] == pytest.approx(sum(h.values()), rel=1e-4)
    bw, fl = 4.8 / 1.008, 990 / 165
    scaled = {"generate": h["generate"] * bw, "pairs": h["pairs"] * fl, "train": h["train"] * fl,
              "judge": h["judge"] * fl, "merge": h["merge"], "evaluate": 128.0 / 3600 * bw + 10.0 / 3600 * fl}
    text = G.estimate_table(results, it)
    assert "2 x RTX 4090 (scaled)" in text and "scaled from published bandwidth and bf16 throughput" in text
    rows = {r[0]: r for r in table_rows(text)}
    assert list(rows) == ["generate", "judge", "pairs", "train", "merge", "evaluate", "total"]
    for stage, want in scaled.items():
        assert rows[stage][3] == f"{h[stage]:.1f}" and rows[stage][4] == f"{want:.1f}", stage
    assert rows["total"][4] == f"{sum(scaled.values()):.1f}"
    cpu = G.estimate_table([dict(r, cards=[{"device": "cpu"}]) if r["step"] == "env" else r for r in results], it)
    assert "(scaled)" not in cpu.splitlines()[2] and "no published figures" in cpu  # no card to scale from


def test_mem_cap_caps_each_card_at_that_fraction_and_is_refused_without_cuda(monkeypatch):
    """On CUDA: set_per_process_memory_fraction(cap / total) on each card, once (a stand-in torch.cuda
    records it). Without CUDA the flag cannot be honoured: one error line, exit status 2."""
    import torch
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 140 * GIB}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((d, f)))
    G.apply_mem_cap(G.Check(cards=["cuda:0", "cuda:1"], split="cuda:0,cuda:1", mem_cap=24))
    assert calls == [("cuda:0", 24 / 140), ("cuda:1", 24 / 140)]
    assert G.Check(cards=["cuda:0"], split="cuda:0", mem_cap=24).caps(["cuda:0", "cuda:0"]) == [24 * GIB] * 2
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--mem-cap", "24"], cwd=ROOT,
                       env=no_cuda_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: --mem-cap 24: "), r.stderr


@pytest.fixture(scope="module")
def cpu_check():
    return G.Check(cards=["cpu"], split="cpu,cpu", tiny=True, tests_filter="greedy")


@pytest.mark.parametrize("step", ["env", "train", "sample", "judge", "e2e", "tests"])
def test_every_step_runs_its_code_path_on_cpu_with_tiny_shapes(cpu_check, step):
    """The steps' own code, in this process, on `cpu` and `cpu,cpu` (a split)."""
    res = G.STEPS[step](cpu_check)
    assert res["ok"] is True, res["summary"]
    if step in ("judge", "e2e"):  # the rates the estimate's judge, evaluation and merge rows come from
        assert set(res["rates"]) == ({"judge_prompts_s", "judge_prompts_s_theirs"} if step == "judge"
                                     else {"disk_read_bytes_s", "disk_write_bytes_s"})
        assert all(v > 0 for v in res["rates"].values())
    if step == "judge":  # our judge and llm-blender's rank(batch_size=1) gave the same P
        assert res["p_max_abs_diff"] <= 1e-6
    if step in ("train", "sample"):
        assert [m["device"] for m in res["memory"]] == ["cpu"] and res["memory"][0]["measured"] is None
        assert all(v > 0 for v in res["rates"].values())
    if step == "tests":  # the split test ran on the one card and on the split over two
        assert res["devices"] == ["cpu", "cpu,cpu"] and "2 passed" in res["summary"]


def test_each_step_runs_in_its_own_process_and_the_results_reach_the_table_and_the_json(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--steps", "env,e2e-vllm",
                        "--out", str(out)], cwd=ROOT, env=no_cuda_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = table_rows(r.stdout.split("## gpu-check")[1])
    assert [row[:2] for row in rows] == [["env", "pass"], ["e2e-vllm", "skipped"]]
    cpu = re.search(r"^host CPU: (.+), (\d+) cores, (AVX-512|AVX2|SSE/AVX|\w+)", r.stdout, re.M)  # the machine is named
    assert cpu and int(cpu[2]) == os.cpu_count(), r.stdout[:2000]
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["step"] for x in saved] == ["env", "e2e-vllm"] and saved[0]["cards"][0]["nf4_ok"] is True
