"""What the CUDA paths need, shown on the CPU with stand-ins: models freed when their
stage ends, a resumed optimizer's state where its parameters are, the LoRA adapter independent of
the split, attention that leaves SDPA its fast kernels, the step-0 log-ratio exactly zero.
What only a GPU can show is in `make gpu-check`."""
import functools
import gc
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import lora
import model as M
import pipeline
import quant
import sppo
from test_pipeline import DEVICES, split_model
from test_quant import NO_BF16
from test_sppo import run_args
from tiny import make_tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dev")
    make_tiny_chat_model(d / "model", layers=4)
    return d


def settings(tiny, tmp_path, *extra):
    return sppo.parse_args(run_args(tiny, tmp_path) + list(extra))


def stages_up_to_pairs(s, tok, it, keep=None):
    rows = data.load_prompts(s.prompts)[0][:6]
    responses = sppo.sample(s, Path(s.model), tok, rows, it / "responses.jsonl", [0, 50, 100])
    judgments = sppo.judge_responses(s, tok, rows, responses, it / "judgments.jsonl")
    return sppo.make_pairs(s, tok, Path(s.model), responses, judgments, it / "pairs.jsonl", keep=keep)


def test_no_model_outlives_its_stage_even_without_the_garbage_collector(tiny, tmp_path, monkeypatch):
    """Every model a stage loads (the sampler's, the trained NF4 copy) is gone by reference
    counting alone when the stage function returns: no cycle keeps it (the old
    gradient-checkpointing lambda did), so its GPU memory is free for the next stage or vLLM.
    The one model handed on is the reference's NF4 pi_t, held only by the list run() hands to
    make_pairs (keep) for the next stage, training, which takes it and frees it like its own."""
    s = settings(tiny, tmp_path, "--grad-ckpt")
    tok = data.Tokenizer.from_dir(s.model)
    loaded, real_load = [], pipeline.load

    def recording_load(*a, **k):
        m = real_load(*a, **k)
        loaded.append(weakref.ref(m))
        return m

    monkeypatch.setattr(pipeline, "load", recording_load)
    it = tmp_path / "it"
    (it / "train").mkdir(parents=True)
    gc.collect()
    gc.disable()
    try:
        nf4 = []
        pairs = stages_up_to_pairs(s, tok, it, nf4)
        assert len(loaded) == 2 and loaded[0]() is None, "the sampler survived its stage"
        assert len(nf4) == 1 and nf4[0] is loaded[1](), "the reference model is not handed to training"
        sppo.train(s, tok, Path(s.model), pairs, it / "train", it / "adapter", model=nf4.pop())
        assert len(loaded) == 2, "training loaded pi_t again instead of taking the reference's"
        assert loaded[1]() is None, "the reference model survived train()"
    finally:
        gc.enable()


def test_training_resumes_from_a_checkpoint_loaded_to_the_cpu(tiny, tmp_path, monkeypatch):
    """A checkpoint loaded onto the first device leaves AdamW's `step` counters there, and the
    first step after a resume fails for LoRA parameters on a second card: the checkpoint is
    loaded to the CPU (load_state_dict then moves each moment to its parameter's device)."""
    s = settings(tiny, tmp_path, "--epochs", "1")
    tok = data.Tokenizer.from_dir(s.model)
    it = tmp_path / "it"
    (it / "train").mkdir(parents=True)
    pairs = stages_up_to_pairs(s, tok, it)
    sppo.train(s, tok, Path(s.model), pairs, it / "train", it / "adapter")
    assert (it / "train" / "ckpt.pt").exists()
    seen, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (seen.append(k.get("map_location")), real(*a, **k))[1])
    import shutil
    shutil.rmtree(it / "adapter")  # as if killed before the adapter was written
    sppo.train(s, tok, Path(s.model), pairs, it / "train", it / "adapter")
    assert seen == ["cpu"]


@pytest.mark.parametrize("dev", DEVICES)
def test_lora_a_is_drawn_on_the_cpu_so_the_adapter_does_not_depend_on_the_split(tiny, dev):
    """Every CUDA generator is seeded alike by torch.manual_seed: drawn on each layer's device,
    the second card's layers would repeat the first card's A. A is drawn on the CPU generator
    (recorded here), so the same seed gives the same initial adapter for any split. Here the
    splits are over `cpu` stages; `make gpu-check` runs this on cuda:0,cuda:1 (DEVICES)."""
    drawn_on, real = [], torch.nn.init.kaiming_uniform_

    def recording(t, *a, **k):
        drawn_on.append(t.device.type)
        return real(t, *a, **k)

    adapters = []
    for bounds in ([0, 4], [0, 1, 4], [0, 2, 3, 4]):
        m = split_model(tiny / "model", bounds, quantized=True, dev=dev)
        torch.manual_seed(7)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.init, "kaiming_uniform_", recording)
            lora.add_lora(m, lora.LoRAConfig(r=4))
        adapters.append({k: v.detach().cpu().clone() for k, v in lora.lora_params(m).items()})
    assert drawn_on and set(drawn_on) == {"cpu"}
    assert all(a.keys() == adapters[0].keys() for a in adapters)
    assert all(torch.equal(a[k], adapters[0][k]) for a in adapters for k in a)
    a_mats = [v for k, v in adapters[0].items() if k.endswith("lora_A")]
    assert not torch.equal(a_mats[0], a_mats[7])  # layers 0 and 1 differ (no repeats)


def test_masked_attention_expands_kv_off_cpu_and_keeps_sdpa_gqa_on_cpu(tiny, monkeypatch):
    """SDPA with enable_gqa and an explicit mask has only its slow math kernel on CUDA: there,
    with a mask (padded batches, every generation step), K/V are expanded in the compute dtype
    before the call. On CPU the flash kernel takes GQA with a mask, so K/V are not copied (the
    copy of the whole KV cache at every decode step was most of a step's time), and the logits
    are exactly those of the expanded call. Without a mask SDPA does GQA itself everywhere.
    Recorded calls; the off-CPU branch on meta tensors (shapes only)."""
    m = M.load_model(tiny / "model")
    H, KV = m.cfg.n_heads, m.cfg.n_kv_heads
    assert KV < H
    calls, real = [], F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        calls.append((q.device.type, q.shape[1], k.shape[1], kw["attn_mask"] is not None, kw["enable_gqa"]))
        return real(q, k, v, **kw)

    ids = torch.randint(3, 200, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        with monkeypatch.context() as mp:  # the other way: K/V expanded as transformers does
            mp.setattr(M.Attention, "attend", lambda self, q, k, v, mask: real(
                q, k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1), attn_mask=mask,
                is_causal=mask is None, scale=self.scale))
            ref = m(ids, mask)
        monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
        got = m(ids, mask)
        m(ids)
        att, d = m.layers[0].self_attn, m.cfg.head_dim
        att.attend(torch.empty(2, H, 9, d, device="meta"), torch.empty(2, KV, 9, d, device="meta"),
                   torch.empty(2, KV, 9, d, device="meta"), torch.ones(2, 1, 9, 9, dtype=torch.bool, device="meta"))
    L = len(m.layers)
    assert calls[:L] == [("cpu", H, KV, True, True)] * L  # CPU, masked: SDPA's GQA, no copy
    assert calls[L:2 * L] == [("cpu", H, KV, False, True)] * L  # unmasked: SDPA's GQA
    assert calls[2 * L:] == [("meta", H, H, True, False)]  # elsewhere, masked: K/V expanded first
    assert torch.equal(got, ref)


@pytest.mark.parametrize("nf4_compute", ["float32", pytest.param("bfloat16", marks=NO_BF16)])
def test_step_zero_log_ratio_is_exactly_zero(tmp_path, nf4_compute):
    """Reference log-probs are scored in training's first-epoch batches (and under the same
    autocast, pipeline.autocast), so every first-epoch micro-batch of a fresh adapter sees log pi_theta - log pi_t
    = 0 exactly, not up to the rounding of differently padded batches (which, even on the CPU,
    moves a row's log-prob by an ulp now and then: rows of very different lengths here)."""
    make_tiny_chat_model(tmp_path / "model", layers=2, hidden=128)
    s = sppo.Settings(model=str(tmp_path / "model"), batch_size=3, max_len=256, max_prompt_len=64, device="cpu", k=2,
                      lora_r=4, nf4_compute=nf4_compute)  # bfloat16: as on CUDA
    tok = data.Tokenizer.from_dir(s.model)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()
    responses = [{"id": str(i), "prompt_ids": ids(4 + i), "responses": ["a", "b"], "finished": [False, False],
                  "response_ids": [ids(3 + 11 * i % 97), ids(5 + 29 * i % 83)]} for i in range(12)]
    judgments = [{"id": r["id"], "P": [[0.5, 0.9], [0.1, 0.5]]} for r in responses]
    pairs = sppo.make_pairs(s, tok, tmp_path / "model", responses, judgments, tmp_path / "pairs.jsonl")
    assert len(pairs) == 12 and [p["id"] for p in pairs] == [r["id"] for r in responses]  # the file's own order
    policy = quant.quantize_model(s.model, torch.float32, "cpu", product_dtype=getattr(torch, nf4_compute))
    lora.add_lora(policy, sppo.lora_config(s))  # B = 0: the policy equals the reference
    score = functools.partial(data.sequence_logps, policy)
    for batch in sppo.batch_order(s, len(pairs))[:4]:
        _, seen = sppo.train_step(score, [pairs[i] for i in batch], s, tok.pad_id, torch.device("cpu"))
        assert max(map(abs, seen["logr_w"] + seen["logr_l"])) == 0.0
