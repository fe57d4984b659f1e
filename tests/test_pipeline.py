"""Split over devices and GPipe micro-batches: same numbers as one device, one batch."""
import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import generate
import lora
import model as M
import pipeline
import quant
import sppo
from tiny import make_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]
# The split checks run on `cpu,cpu,...` here, and on `cuda:0,cuda:0,...` too where a GPU exists.
# SPPO_TEST_DEVICES replaces that list (entries split by `;`, each a --devices value whose
# devices the stages take in turn): `make gpu-check` asks for "cuda:0;cuda:1;cuda:0,cuda:1".
DEVICES = (os.environ["SPPO_TEST_DEVICES"].split(";") if os.environ.get("SPPO_TEST_DEVICES")
           else ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else []))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "m", layers=5, hidden=64)


def first(dev):
    return dev.split(",")[0]


def split_model(path, bounds, quantized=False, dev="cpu"):
    cards = dev.split(",")
    devices = [cards[s % len(cards)] for s in range(len(bounds) - 1)]
    where = pipeline.device_map(bounds, devices)
    m = quant.quantize_model(path, device=where) if quantized else M.load_model(path, device=where)
    m.stage_bounds = bounds
    return m


def batch(vocab, B=6, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):  # responses of different lengths after a 7-token prompt, right padding
        mask[i, 7:T - i] = True
    return ids, mask


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("bounds,chunks", [([0, 2, 5], 1), ([0, 2, 5], 3), ([0, 1, 3, 5], 4)])
def test_split_hidden_states_and_logits_match_one_device(tiny, bounds, chunks, dev):
    whole = M.load_model(tiny, device=first(dev))
    split = split_model(tiny, bounds, dev=dev)
    ids, _ = batch(whole.cfg.vocab_size)
    ids = ids.to(first(dev))
    with torch.no_grad():
        ref = whole(ids)
        h = pipeline.GPipe(split, chunks)(ids)
        assert (split.lm_head(h).to(ref.device) - ref).abs().max() <= 1e-5
        assert (split(ids).to(ref.device) - ref).abs().max() <= 1e-5


def test_gpipe_clock_order(tiny, monkeypatch):
    """At tick k stage s runs micro-batch k - s: stage 1 starts micro-batch 0 before stage 0
    starts micro-batch 2, never after all of stage 0 is done (that would be no pipeline). Within
    a tick the last stage is issued first: on CUDA, stage 1's copy of micro-batch k - 1 off the
    first card is then queued there before stage 0's work on micro-batch k, not behind it."""
    m = split_model(tiny, [0, 2, 5])
    log, which = [], {}
    embed, run_stage = m.embed, pipeline.run_stage

    def tagged_embed(idx, *a, **k):
        x, ctx = embed(idx, *a, **k)
        which[id(ctx[0])] = len(which)
        return x, ctx

    def logged_run(model, x, ctx, lo, hi):
        log.append(([0, 2].index(lo), which[id(ctx[0])]))
        return run_stage(model, x, ctx, lo, hi)

    m.embed = tagged_embed
    monkeypatch.setattr(pipeline, "run_stage", logged_run)
    ids, _ = batch(m.cfg.vocab_size, B=6)
    with torch.no_grad():
        pipeline.GPipe(m, 3)(ids)
    assert log == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]


def grads_and_loss(model, pairs, s, dev="cpu"):
    for p in lora.lora_params(model).values():
        p.grad = None
    score = functools.partial(data.sequence_logps, pipeline.micro_batched(model, s.micro_batches))
    loss, _ = sppo.train_step(score, pairs, s, 0, torch.device(first(dev)), amp=False)
    loss.backward()
    return loss.item(), {k: v.grad.clone() for k, v in lora.lora_params(model).items()}


def lora_model(path, bounds, dev="cpu"):
    m = split_model(path, bounds, quantized=True, dev=dev)
    lora.add_lora(m, lora.LoRAConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.lora_params(m).values():  # B != 0 so that A gets gradients too
            p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)
    return m.train()


def make_pairs(vocab, n=6):
    g = torch.Generator().manual_seed(2)
    r = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()
    return [{"prompt_ids": r(5 + i), "chosen_ids": r(3 + i), "rejected_ids": r(8 - i), "ref_chosen_logp": -20.0 - i,
             "ref_rejected_logp": -25.0 + i, "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3, "chosen_probs": 0.8}
            for i in range(n)]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("bounds,chunks", [([0, 2, 5], 1), ([0, 2, 5], 2), ([0, 1, 3, 5], 4), ([0, 5], 3)])
def test_split_and_micro_batched_loss_and_lora_grads_match_full_batch(tiny, bounds, chunks, dev):
    s = sppo.Settings(eta=5.0, max_len=64, max_prompt_len=32)
    ref_loss, ref_grads = grads_and_loss(lora_model(tiny, [0, 5], first(dev)), make_pairs(300), s, dev)
    s.micro_batches = chunks
    loss, grads = grads_and_loss(lora_model(tiny, bounds, dev), make_pairs(300), s, dev)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert grads.keys() == ref_grads.keys() and len(grads) == 5 * 7 * 2
    for k in grads:
        assert grads[k].abs().max() > 0, k
        assert (grads[k].to(ref_grads[k].device) - ref_grads[k]).abs().max() <= \
            1e-5 * max(1.0, ref_grads[k].abs().max().item()), k


@pytest.mark.parametrize("dev", DEVICES)
def test_split_greedy_generation_matches_one_device(tiny, dev):
    whole, split = M.load_model(tiny, device=first(dev)), split_model(tiny, [0, 3, 5], dev=dev)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        want = generate.generate(whole, prompts, 12, static_cache=False, **kw)
        assert generate.generate(split, prompts, 12, static_cache=False, **kw) == want
        # the fixed-shape step, stage by stage (on CUDA one graph per stage, activations hopping between)
        assert generate.generate(split, prompts, 12, static_cache=True, **kw) == want


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("quantized", [False, True])
def test_static_cache_step_samples_the_growing_cache_steps_tokens(tiny, dev, quantized, monkeypatch):
    """The sampler's fixed-shape decode step (generate.CapturedDecode: on CUDA one captured CUDA
    graph, replayed) gives the tokens of the eager step over the growing cache, greedy and
    sampled, in full precision and in NF4 (bitsandbytes' kernels inside the graph)."""
    graphs = []

    class Counted(torch.cuda.CUDAGraph):
        def replay(self):
            graphs.append(self)
            return super().replay()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Counted)
    m = split_model(tiny, [0, 5], quantized=quantized, dev=first(dev))
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.7, top_p=0.9, seed=4)):
        want = generate.generate(m, prompts, 12, static_cache=False, **kw)
        assert generate.generate(m, prompts, 12, static_cache=True, **kw) == want, kw
    assert len(set(sum(want, []))) > 5, "the samples are one repeated token: the check is weak"
    assert bool(graphs) == first(dev).startswith("cuda"), "CUDA decodes by replaying a graph, nothing else does"
    if graphs:  # and on one card that is the default
        assert generate.generate(m, prompts, 12, **kw) == want and len(set(map(id, graphs))) == 4


# ----------------------------------------------------------------------------- the memory plan

def test_balance_is_the_best_contiguous_split():
    """Against exhaustive search over every split (the independent reference)."""
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        L, S = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 4, (1,), generator=g))
        costs = [(float(a), float(b)) for a, b in torch.randint(1, 20, (L, 2), generator=g).tolist()]
        first, last = (5.0, 30.0), (40.0, 8.0)
        caps = [float(c) for c in torch.randint(50, 100, (S,), generator=g).tolist()]

        def worst(bounds):
            out = 0.0
            for s in range(S):
                t = sum(c[0] for c in costs[bounds[s]:bounds[s + 1]])
                u = sum(c[1] for c in costs[bounds[s]:bounds[s + 1]])
                if s == 0:
                    t, u = t + first[0], u + first[1]
                if s == S - 1:
                    t, u = t + last[0], u + last[1]
                out = max(out, max(t, u) / caps[s])
            return out

        best = min(worst([0, *cut, L]) for cut in itertools.combinations(range(1, L), S - 1))
        got = pipeline.balance(costs, first, last, caps)
        assert got[0] == 0 and got[-1] == L and len(got) == S + 1 and all(a < b for a, b in zip(got, got[1:]))
        assert worst(got) == pytest.approx(best)


def test_activation_estimate_matches_what_autograd_saves(tiny):
    """The plan's activation bytes per token per block against the bytes autograd actually
    keeps for one LoRA block's backward (counted by a saved-tensors hook, each storage once)."""
    m = quant.quantize_model(tiny)
    lora.add_lora(m, lora.LoRAConfig(r=4, alpha=8))
    m.train()
    B, T = 4, 32
    x = torch.randn(B, T, m.cfg.dim, requires_grad=True)
    # a training row's mask and positions (prompt, chosen, rejected: data.pair_tensors)
    _, kw = data.pair_row_layout(torch.tensor([0] * 12 + [1] * 10 + [2] * 10).expand(B, T))
    mask = kw["attn_mask"]
    cos, sin = M.rope_cos_sin(m.inv_freq, kw["pos"], x.dtype)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    lora_and_weights = {p.untyped_storage().data_ptr() for p in m.parameters()} | \
                       {b.untyped_storage().data_ptr() for b in m.buffers()} | \
                       {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr(), mask.untyped_storage().data_ptr()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.layers[0](x, cos, sin, mask).sum().backward()
    measured = sum(n for ptr, n in seen.items() if ptr not in lora_and_weights) / (B * T)
    estimate = pipeline.activation_bytes(m.cfg, 4)
    print(f"activation bytes per token per block: measured {measured:.0f}, estimated {estimate:.0f}")
    assert measured <= estimate <= 1.3 * measured, (measured, estimate)


def test_measuring_command_trains_a_random_nf4_model_split_over_devices():
    """`python pipeline.py --check` (the GPU measurement of the plan) on a small shape: the
    LoRA weights on every stage move, so gradients crossed the device boundary."""
    cfg = M.Config(vocab_size=300, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)
    w = pipeline.Workload(lora_r=4, train_seqs=4, seq_len=24, resp_len=12, grad_ckpt=True)
    rows, tok_s, m = pipeline.check(cfg, ["cpu", "cpu"], w, micro_batches=2, steps=2)
    assert [r["layers"] for r in rows] == [f"0-{m.stage_bounds[1] - 1}", f"{m.stage_bounds[1]}-3"] and tok_s > 0
    for i, layer in enumerate(m.layers):
        assert layer.self_attn.q_proj.lora_B.abs().max() > 0, i  # B starts at zero: a step moved it


def test_plan_command_prints_split_and_refuses_what_does_not_fit(tiny):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "sppo.py"), "--model", str(tiny), "--plan", *a],
                                    capture_output=True, text=True, cwd=ROOT, timeout=120)
    ok = run("--devices", "cpu,cpu", "--device-mem", "4")
    assert ok.returncode == 0, ok.stderr
    assert "| cpu | 0-" in ok.stdout and "| cpu | " in ok.stdout.split("| cpu | 0-")[1]
    # the disk each merged checkpoint takes: its tensors' bytes, in the checkpoint's own dtype by default
    from safetensors.torch import load_file
    each = sum(t.numel() * t.element_size() for t in load_file(tiny / "model.safetensors").values())
    assert f"disk: each merged pi_(t+1) {each / 2**20:.1f} MiB (--merged-dtype auto), 3 iterations " \
           f"{3 * each / 2**20:.1f} MiB" in ok.stdout, ok.stdout
    half = run("--device", "cpu", "--merged-dtype", "bfloat16")
    assert f"disk: each merged pi_(t+1) {each / 2 / 2**20:.1f} MiB (--merged-dtype bfloat16)" in half.stdout, half.stdout
    bad = run("--devices", "cpu,cpu", "--device-mem", "0.001")
    assert bad.returncode == 2 and "| cpu | 0-" in bad.stdout  # the table, then one error line
    assert bad.stderr.startswith("error: cpu needs") and "--batch-size" in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]


# Meta-Llama-3-8B-Instruct's config.json as the Hub has it: the walkthrough's model, no weights
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128009, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256}
WALKTHROUGH_PLAN = ("--plan --devices cuda:0,cuda:1 --max-new-tokens 512 --max-len 1024 --max-prompt-len 512 "
                    "--gen-batch 16 --eval-batch 16 --grad-ckpt --batch-size 4 --grad-accum 2 --micro-batches 2").split()


@pytest.fixture
def laptop(tmp_path, monkeypatch, capsys):
    """A machine without CUDA and a model folder holding config.json alone; -> plan(*flags):
    (exit status, stdout, stderr) of sppo.py's command line, run in this process."""
    import json
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    folder = tmp_path / "Meta-Llama-3-8B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))

    def plan(*flags):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sppo.main(["--model", str(folder), "--runs-dir", str(tmp_path / "runs"), *flags])
        out = capsys.readouterr()
        assert "Traceback" not in out.err and not (tmp_path / "runs").exists(), out.err  # nothing written
        return e.value.code, out.out, out.err
    return plan


def plan_rows(stdout):
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in stdout.splitlines() if ln.startswith("| cuda")]


def test_plan_for_named_cards_runs_without_cuda_from_config_json_alone_and_matches_transformers_count(laptop):
    """The walkthrough's step 2 on a laptop: the table, exit 0. Its numbers against an independent
    count: transformers' LlamaForCausalLM built on the meta device from the same config gives the
    parameters; sampling holds them in bf16 on the two cards together, plus the KV cache of 16
    rows x (512 + 512) positions, the last position's float32 logits (both with the allocator's 30%),
    and each card's CUDA context; the disk line is the parameters in the config's bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    for memory in (["--card", "4090"], ["--device-mem", "24"]):
        code, out, err = laptop(*WALKTHROUGH_PLAN, *memory)
        assert code == 0 and err == "", err
        rows = plan_rows(out)
        assert [r[0] for r in rows] == ["cuda:0", "cuda:1"] and all(r[4] == "24.0 GiB" for r in rows), out
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**LLAMA3_8B_CONFIG)).parameters())
    kv = 2 * 32 * 8 * 128 * 2 * 16 * (512 + 512)  # K and V, layers, kv heads, head dim, bf16, rows, positions
    logits = 16 * 128256 * 4
    want = 2 * n + 1.3 * (kv + logits) + 2 * 0.75 * 2 ** 30
    got = sum(float(r[3].split()[0]) for r in rows) * 2 ** 30
    assert got == pytest.approx(want, abs=0.011 * 2 ** 30), (got / 2 ** 30, want / 2 ** 30)
    assert f"disk: each merged pi_(t+1) {2 * n / 2 ** 30:.2f} GiB (--merged-dtype auto)" in out, out
    assert [r[1] for r in rows] == ["0-20", "21-31"]  # README's walkthrough table


def test_plan_for_an_unknown_card_or_without_the_cards_memory_is_one_error_line(laptop):
    code, out, err = laptop(*WALKTHROUGH_PLAN, "--card", "5090")
    assert code == 2 and err.startswith("error: --card: unknown card '5090' (known: 3090, 4090,") and out == ""
    assert err.strip().splitlines() == [err.strip()]
    code, _, err = laptop(*WALKTHROUGH_PLAN)  # cards this machine lacks, and no word of their memory
    assert code == 2 and "this torch sees no CUDA device" in err and "--card NAME or --device-mem GiB" in err
    code, _, err = laptop(*[f for f in WALKTHROUGH_PLAN if f != "--plan"], "--device-mem", "24")  # a run: refused
    assert code == 2 and err.startswith("error: --devices: cuda:0 asked for, but this torch sees no CUDA device"), err
    code, _, err = laptop(*[f for f in WALKTHROUGH_PLAN if f != "--plan"], "--card", "4090")
    assert code == 2 and err.startswith("error: --card is for --plan"), err


def test_a_plan_that_does_not_fit_the_named_cards_is_the_table_then_one_error_line_naming_the_flag(laptop):
    code, out, err = laptop(*WALKTHROUGH_PLAN, "--card", "4090", "--batch-size", "16")
    assert code == 2 and len(plan_rows(out)) == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: cuda:"), err
    assert "training" in err and "of its 24.0 GiB" in err and "lower --batch-size" in err and "sampling" not in err
    code, out, err = laptop(*WALKTHROUGH_PLAN, "--card", "4090", "--gen-batch", "256", "--eval-batch", "256")
    assert code == 2 and "sampling" in err and "lower --gen-batch and --eval-batch" in err and "training" not in err
    assert laptop(*WALKTHROUGH_PLAN, "--card", "a100-80", "--batch-size", "16")[0] == 0  # 80 GiB holds it


def test_loop_split_over_two_devices_with_micro_batches_matches_one_device(tmp_path):
    """One SPPO iteration of the real CLI, on one device and on `cpu,cpu` with micro-batches:
    the same samples, reference log-probs and adapter (up to float rounding of the chunks)."""
    import json
    from safetensors.torch import load_file
    from test_sppo import run_args, run_sppo
    make_tiny_chat_model(tmp_path / "model")
    runs = {}
    for name, extra in (("one", []), ("two", ["--devices", "cpu,cpu", "--micro-batches", "2"])):
        # float32 products: bf16's rounding would hide what this compares, the chunks' float rounding
        r = run_sppo(run_args(tmp_path, tmp_path / name) + ["--iters", "1", "--nf4-compute", "float32", *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = tmp_path / name / "r" / "iter0"
    assert "| cpu | 0-0 |" in r.stdout  # the plan's split was printed
    one, two = runs["one"], runs["two"]
    assert (one / "responses.jsonl").read_bytes() == (two / "responses.jsonl").read_bytes()
    pa = [json.loads(x) for x in (one / "pairs.jsonl").read_text().splitlines()]
    pb = [json.loads(x) for x in (two / "pairs.jsonl").read_text().splitlines()]
    assert len(pa) == len(pb) > 0
    for x, y in zip(pa, pb):
        assert abs(x["ref_chosen_logp"] - y["ref_chosen_logp"]) <= 1e-4
        assert abs(x["ref_rejected_logp"] - y["ref_rejected_logp"]) <= 1e-4
    wa, wb = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (one, two))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-4, k
