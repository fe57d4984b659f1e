"""bench.py on a tiny random model: both stacks run, compute the same thing, and the table is whole."""
import dataclasses
import os

import pytest
import torch

from scripts import bench
from tiny import make_tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_chat_model(tmp_path_factory.mktemp("bench") / "m")
    return bench.Bench(model=str(path), rows=2, seq_len=48, gen_tokens=4, gen_batches=(1, 3), steps=1, repeats=1,
                       train_rounds=1, threads=1)


def test_both_stacks_score_the_same_log_probs(tiny):
    """Ours (sppo.sequence_logps on quant.NF4Linear) and transformers + bitsandbytes 4-bit agree,
    so the scoring row times the same computation; both differ from the full-precision model."""
    dev = torch.device("cpu")
    vocab, pad = bench.vocab_and_pad(tiny)
    ids, resp, attn = bench.batch_tensors(tiny, bench.make_pairs(tiny, vocab, pad), pad, dev)
    assert not attn.all() and resp.any(1).all()  # lengths vary: padding is part of the workload
    theirs = bench.load_theirs(tiny, dev, quantized=True).train()
    ours = bench.score_ours(bench.load_ours(tiny, dev, quantized=True), ids, resp)
    ref = bench.score_theirs(theirs, ids, resp, attn)
    assert (ours - ref).abs().max().item() <= 1e-3
    full = bench.score_theirs(bench.load_theirs(tiny, dev, quantized=False), ids, resp, attn)
    assert (ours - full).abs().max().item() > 1e-2  # the 4-bit rows really are 4-bit


def test_table_has_every_row_and_judges_targets(tiny):
    """Every measurement of both stacks (in this process, not children, to stay fast)."""
    dev = torch.device("cpu")
    rows, inf = bench.measure(tiny, dev, log=lambda *a: None, run=lambda b, what, d: bench.WORKERS[what](b, d))
    names = list(rows)
    for want in ("training step, tokens/s", "training step, peak memory MiB", "reference scoring, tokens/s",
                 "sampling batch 1, tokens/s", "sampling batch 3, tokens/s"):
        assert want in names
    assert inf["logp_max_abs_diff"] <= 1e-3
    said = bench.machine(bench.Bench(threads=2), dev)  # the header names the CPU and its instruction set
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert f"{os.cpu_count()} cores, " in said and (" avx512f " not in flags or "AVX-512" in said)
    assert all(a > 0 and t > 0 for a, t in rows.values())
    text = bench.table(rows)
    assert text.count("\n") == len(rows) + 1
    # targets compare the ratio: 2x the speed meets ">= 2.0x", 1.9x misses it, 2x the memory misses "<= 0.6x"
    t = bench.table({"sampling batch 16, tokens/s": (200.0, 100.0), "sampling batch 1, tokens/s": (190.0, 100.0),
                     "training step, peak memory MiB": (200.0, 100.0)})
    assert "| 2.00x | >= 2.0x | yes |" in t and "| 1.90x | >= 1.5x | yes |" in t and "| 2.00x | <= 0.6x | NO |" in t
    assert "| 1.90x | >= 2.0x | NO |" in bench.table({"sampling batch 16, tokens/s": (190.0, 100.0)})


def test_random_llama_path_builds_the_same_model_in_both_stacks(monkeypatch):
    """The GPU-only Llama-3-8B rows build random weights layer by layer in each stack; on a tiny
    config here (CPU, float32), both stacks must hold the same model: equal scoring log-probs."""
    import model as M
    monkeypatch.setattr(bench, "llama3_8b", lambda: M.Config(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                                             head_dim=32, ffn_dim=256, rope_theta=500000.0))
    b = bench.Bench(model=bench.LLAMA3_8B, rows=2, seq_len=48)
    dev = torch.device("cpu")
    vocab, pad = bench.vocab_and_pad(b)
    ids, resp, attn = bench.batch_tensors(b, bench.make_pairs(b, vocab, pad), pad, dev)
    ours = bench.score_ours(bench.load_ours(b, dev, quantized=True), ids, resp)
    theirs = bench.score_theirs(bench.load_theirs(b, dev, quantized=True).train(), ids, resp, attn)
    assert (ours - theirs).abs().max().item() <= 1e-3
    full = bench.score_theirs(bench.load_theirs(b, dev, quantized=False), ids, resp, attn)
    assert (bench.score_ours(bench.load_ours(b, dev, quantized=False), ids, resp) - full).abs().max().item() <= 1e-3


def test_split_rows_load_one_stack_per_process_and_give_the_same_rows(tiny, monkeypatch):
    """The Llama-3-8B rows (for_24gb) run each stack's scoring and sampling in its own process:
    two bf16 8B models do not fit one 24 GB card. Here the workers run in this process, and each
    may load only its own stack; every row is there, and the two stacks' log-probs agree."""
    dev = torch.device("cpu")
    b = dataclasses.replace(bench.for_24gb(tiny), rows=tiny.rows)
    assert b.split and b.grad_ckpt
    loaded, now = [], {}
    for who in ("ours", "theirs"):
        real = getattr(bench, f"load_{who}")
        monkeypatch.setattr(bench, f"load_{who}", lambda *a, real=real, who=who, **kw: loaded.append((now["what"], who)) or real(*a, **kw))

    def run(b, what, d):
        now["what"] = what
        return bench.WORKERS[what](b, d)
    rows, inf = bench.measure(b, dev, log=lambda *a: None, run=run)
    inference = {(w, who) for w, who in loaded if w.startswith("inference")}
    assert inference == {("inference-ours", "ours"), ("inference-theirs", "theirs")}
    for want in ("training step, tokens/s", "training step, peak memory MiB", "reference scoring, tokens/s",
                 "sampling batch 1, tokens/s", "sampling batch 3, tokens/s"):
        assert want in rows
    assert all(a > 0 and t > 0 for a, t in rows.values())
    assert inf["logp_max_abs_diff"] <= 1e-3
    said = bench.machine(bench.Bench(threads=2), dev)  # the header names the CPU and its instruction set
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert f"{os.cpu_count()} cores, " in said and (" avx512f " not in flags or "AVX-512" in said)


def test_pairrm_row_times_our_judge_and_llm_blenders_rank_on_the_same_p(tmp_path, monkeypatch):
    """The PairRM row on a tiny random PairRM, in this process: both judges give the same P, both
    rates are measured, and the GPU target (>= 10x llm-blender's batch-1 rank) is only reported on a CPU."""
    monkeypatch.setenv("SPPO_CACHE", str(tmp_path))
    b = bench.Bench(pairrm_prompts=3, pairrm_shape="tiny", repeats=2, threads=1)
    seen = []
    text, rows = bench.pairrm_table(b, torch.device("cpu"), run=lambda b, what, d: seen.append(bench.WORKERS[what](b, d))
                                    or seen[-1])
    x = seen[0]
    assert x["prompts"] == 3 and x["k"] == 5 and x["p_max_abs_diff"] <= 1e-6
    assert all(len(v) == 1 and v[0] > 0 for v in x["rates"].values())
    assert list(rows) == ["PairRM judge (K=5), prompts/s"] and "| GPU: >= 10.0x | — (CPU) |" in text
    assert "| 10.00x | >= 10.0x | yes |" in bench.table({"PairRM judge (K=5), prompts/s": (10.0, 1.0)})
    assert "| 9.00x | >= 10.0x | NO |" in bench.table({"PairRM judge (K=5), prompts/s": (9.0, 1.0)})
