"""model.py against transformers, the independent reference."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import generate
import model as M
from machinery import convert, kernels

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def save_hf(tmp_path, hf_cls, cfg, shard=None, seed=0):
    torch.manual_seed(seed)
    hf = hf_cls(cfg).eval()
    for p in hf.parameters():  # RMSNorm weights start at 1: randomise them so they are tested too
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, safe_serialization=True, **kw)
    return hf


VARIANTS = {
    "llama_gqa_untied": (LlamaForCausalLM, lambda: LlamaConfig(**TINY, rope_theta=500000.0, tie_word_embeddings=False)),
    "llama3_rope_tied": (LlamaForCausalLM, lambda: LlamaConfig(**TINY, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**TINY, sliding_window=None)),
    "mistral_window": (MistralForCausalLM, lambda: MistralConfig(**TINY, sliding_window=5)),
}


def padded_batch(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    idx = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        idx[i, T - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, T - n:] = True
    return idx, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shard", [None, "60KB"])
def test_logits_match_transformers_on_left_padded_batch(tmp_path, variant, shard):
    hf_cls, make_cfg = VARIANTS[variant]
    cfg = make_cfg()
    if variant == "mistral_window":
        cfg._attn_implementation = "eager"  # transformers' sdpa path ignores the window with padding
    hf = save_hf(tmp_path, hf_cls, cfg, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = M.load_model(tmp_path)
    idx, mask = padded_batch(cfg.vocab_size, [11, 7, 1, 11])
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=idx, attention_mask=mask.long(), position_ids=pos).logits
        got = ours(idx, mask)
    diff = (want - got)[mask].abs().max().item()
    assert diff <= 1e-4, diff


def test_tied_model_shares_head_and_embedding(tmp_path):
    save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama3_rope_tied"][1]())
    m = M.load_model(tmp_path)
    assert m.lm_head.weight is m.embed_tokens.weight


def test_unpadded_fast_path_equals_masked_path(tmp_path):
    save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama_gqa_untied"][1]())
    m = M.load_model(tmp_path)
    idx, mask = padded_batch(97, [9, 9])
    with torch.no_grad():
        assert torch.allclose(m(idx), m(idx, mask), atol=1e-5)


def greedy_no_cache(m, prompt, n):
    """The plainest greedy decoder: a full forward over everything each step."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "llama3_rope_tied", "mistral"])
def test_greedy_kv_cache_equals_recompute_and_transformers(tmp_path, variant):
    hf_cls, make_cfg = VARIANTS[variant]
    hf = save_hf(tmp_path, hf_cls, make_cfg())
    m = M.load_model(tmp_path)
    prompts = [[5, 17, 33, 2, 9], [44, 3], [7, 7, 8, 90, 12, 61, 4, 5, 6]]
    n = 20
    batch = generate.generate(m, prompts, n, temperature=0)
    static = generate.generate(m, prompts, n, temperature=0, static_cache=True)  # CUDA's fixed-shape step, run eagerly
    for p, got, fixed in zip(prompts, batch, static):
        alone = generate.generate(m, [p], n, temperature=0)[0]
        assert got == alone, "a batch row differs from the same prompt run alone"
        assert got == greedy_no_cache(m, p, n)
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert got == ref[0, len(p):].tolist()
        assert fixed == ref[0, len(p):].tolist(), "the static-cache step differs from transformers"


def test_stop_ids_end_each_row_on_its_own(tmp_path):
    save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama_gqa_untied"][1]())
    m = M.load_model(tmp_path)
    prompts = [[5, 17, 33], [44, 3, 9, 10]]
    free = generate.generate(m, prompts, 12, temperature=0)
    # Make a token that row 0 emits (and row 1 never does) a stop token: row 0 must end at
    # its first occurrence (keeping it), row 1 must run on unchanged.
    j = next(j for j, t in enumerate(free[0]) if j > 0 and t not in free[1] and t not in free[0][:j])
    out = generate.generate(m, prompts, 12, temperature=0, stop_ids=[free[0][j]])
    assert out[0] == free[0][:j + 1]
    assert out[1] == free[1]


def test_rows_that_stop_leave_the_batch_and_the_rest_still_equal_transformers(tmp_path, monkeypatch):
    """Greedy with stop ids over 6 prompts: rows end at different steps, the sampler cuts its KV
    cache to the rows still running, and every row is what transformers' generate gives that
    prompt alone with the same stop ids (its first stop included)."""
    hf = save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama_gqa_untied"][1]())
    m = M.load_model(tmp_path)
    prompts = [[5, 17, 33, 2, 9], [44, 3], [7, 7, 8, 90, 12, 61, 4, 5, 6], [11, 12, 13], [60, 2], [9, 9, 1, 70]]
    free = generate.generate(m, prompts, 16, temperature=0)
    stop_ids = [free[0][1], free[3][2], free[5][4]]  # tokens that some rows emit early
    cuts = []
    monkeypatch.setattr(M.KVCache, "keep", lambda self, idx, _f=M.KVCache.keep: cuts.append(len(idx)) or _f(self, idx))
    got = generate.generate(m, prompts, 16, temperature=0, stop_ids=stop_ids)
    assert cuts and min(cuts) < len(prompts), "no row left the batch: the case does not exercise it"
    for p, row in zip(prompts, got):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=16,
                          do_sample=False, pad_token_id=0, eos_token_id=stop_ids)[0, len(p):].tolist()
        end = next((j + 1 for j, t in enumerate(ref) if t in stop_ids), len(ref))
        assert row == ref[:end]


def test_same_seed_same_samples_different_seed_differs(tmp_path):
    save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama_gqa_untied"][1]())
    m = M.load_model(tmp_path)
    prompts = [[5, 17, 33], [44, 3, 9, 10]] * 2
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
    a = generate.generate(m, prompts, seed=0, **kw)
    b = generate.generate(m, prompts, seed=0, **kw)
    c = generate.generate(m, prompts, seed=1, **kw)
    assert a == b
    assert a != c


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    k1 = {int(generate.sample_next(logits, 1.0, top_k=1, generator=g)) for _ in range(50)}
    assert k1 == {0}
    p = {int(generate.sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert p == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    assert int(generate.sample_next(logits, 0.0)) == 0


def test_top_p_on_flat_distributions_keeps_transformers_nucleus():
    """Nuclei wider than the top 64 and than the top 1024 (the two cheap tiers before a full
    sort): samples stay inside transformers' TopPLogitsWarper nucleus and reach past each tier."""
    from transformers.generation.logits_process import TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    for width, tier in ((100, 64), (1000, 1024)):  # p_i ~ exp(-i / width): nucleus ~ 2.3 width
        logits = (-torch.arange(8000.0) / width)[torch.randperm(8000, generator=g)][None].repeat(64, 1)
        kept = set(torch.isfinite(TopPLogitsWarper(0.9)(None, logits.clone()))[0].nonzero()[:, 0].tolist())
        rank = {int(t): r for r, t in enumerate(logits[0].argsort(descending=True))}
        got = set()
        for _ in range(10):
            got |= set(generate.sample_next(logits, 1.0, top_p=0.9, generator=g).tolist())
        assert got <= kept and max(rank[t] for t in got) >= tier


def test_config_refuses_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(M.ModelError, match="GPTNeoXForCausalLM"):
        M.Config.from_hf(tmp_path)


def test_loading_errors_name_tensor_and_file(tmp_path):
    from safetensors.torch import load_file, save_file
    save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama_gqa_untied"][1]())
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    good = dict(sd)
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, f)
    with pytest.raises(M.ModelError, match=r"missing tensor model.layers.1.mlp.up_proj.weight"):
        M.load_model(tmp_path)
    sd = dict(good, **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    save_file(sd, f)
    with pytest.raises(M.ModelError, match=r"model.safetensors: tensor model.layers.0.self_attn.q_proj.weight has shape"):
        M.load_model(tmp_path)
    sd = dict(good, **{"model.extra.weight": torch.zeros(3)})
    save_file(sd, f)
    with pytest.raises(M.ModelError, match=r"unexpected tensor model.extra.weight"):
        M.load_model(tmp_path)


def test_missing_shard_is_named(tmp_path):
    save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama_gqa_untied"][1](), shard="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(M.ModelError, match=shard.name):
        M.load_model(tmp_path)


# ----------------------------------------------------------------------------- the embedded model

def test_embedded_smollm2_answers_paris(smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    m = M.load_model(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)
    out = generate.generate(m, [ids], 24, temperature=0, stop_ids=[tok.eos_token_id])
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)


def test_embedded_smollm2_logits_match_transformers_gguf_loader(smollm2_dir):
    gguf = convert.embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).eval()
    ours = M.load_model(smollm2_dir)
    idx, mask = padded_batch(49152, [12, 5, 9], seed=3)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=idx, attention_mask=mask.long(), position_ids=pos).logits
        got = ours(idx, mask)
    diff = (want - got)[mask].abs().max().item()
    assert diff <= 1e-3, diff


def test_onednn_linear_equals_f_linear_forward_backward_and_follows_weight_updates():
    """kernels.linear (oneDNN on CPU float32, packed weights kept on the module) against F.linear:
    values, input and weight gradients; a weight changed in place is packed again."""
    torch.manual_seed(0)
    lin = kernels.Linear(64, 48).requires_grad_(False)  # frozen, as load_model leaves weights
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert (lin(x) - torch.nn.functional.linear(x, lin.weight)).abs().max().item() <= 1e-5
        assert "_packed" in lin.__dict__  # no grad, frozen weight: the packed copy was used
        lin.weight.mul_(2)  # in place: the packed copy must follow
        assert (lin(x) - torch.nn.functional.linear(x, lin.weight)).abs().max().item() <= 1e-5
    for trains in (False, True):  # frozen weight (LM head, sampler) and a trained one
        lin.weight.requires_grad_(trains)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        g = torch.randn(2, 5, 48)
        lin(xa).backward(g)
        gw = lin.weight.grad
        lin.weight.grad = None
        torch.nn.functional.linear(xb, lin.weight).backward(g)
        assert (xa.grad - xb.grad).abs().max().item() <= 1e-5
        if trains:
            assert (gw - lin.weight.grad).abs().max().item() <= 1e-4
        lin.weight.grad = None


def test_a_cpu_whose_probe_finds_no_onednn_path_multiplies_by_f_linear(tmp_path, monkeypatch):
    """Where the one-time probe finds a oneDNN path missing or wrong (kernels.paths), nothing
    takes it: with none found, every product is F.linear's bit for bit (no packed copy kept, no
    fused q/k/v), and generate_seeds runs the seeds one by one with the same samples as one batch."""
    save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama_gqa_untied"][1]())
    m = kernels.use_onednn(M.load_model(tmp_path))
    idx, mask = padded_batch(97, [11, 7, 1, 11])
    prompts, seeds = [[5, 17, 33, 2, 9], [44, 3]], [0, 50]
    with torch.no_grad():
        batched = generate.generate_seeds(m, prompts, 6, temperature=1.0, seeds=seeds)
        m = kernels.use_onednn(M.load_model(tmp_path))  # no packed copies from the fast paths
        monkeypatch.setattr(kernels, "paths", lambda dtype: frozenset())
        plain = m(idx, mask)
        assert not any(k.startswith("_packed") for mod in m.modules() for k in mod.__dict__)
        monkeypatch.setattr(kernels, "ONEDNN", False)  # F.linear everywhere, as before kernels.py existed
        assert torch.equal(plain, m(idx, mask))
        monkeypatch.undo()
        monkeypatch.setattr(kernels, "paths", lambda dtype: frozenset({"product", "packed", "fused"}))  # rows differ
        assert generate.generate_seeds(m, prompts, 6, temperature=1.0, seeds=seeds) == batched


def test_onednn_applied_from_outside_keeps_the_models_parameters_and_transformers_logits(tmp_path):
    """kernels.use_onednn on a built model: the same parameters (tied head included), the same
    state dict, logits within float rounding of transformers' (as the plain model's); a plain
    model, MKL's products anywhere, never runs seeds as one batch."""
    hf = save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama3_rope_tied"][1]())
    plain = M.load_model(tmp_path)
    assert not kernels.rows_independent(plain)
    before = plain.state_dict(keep_vars=True)
    fast = kernels.use_onednn(plain)
    assert fast is plain and fast.lm_head.weight is fast.embed_tokens.weight
    after = fast.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in after)
    assert all(type(mod) is not torch.nn.Linear for mod in fast.modules())
    idx, mask = padded_batch(97, [11, 7, 1, 11])
    with torch.no_grad():
        ref = hf(idx, attention_mask=mask.long()).logits
        assert ((fast(idx, mask) - ref)[mask].abs().max().item()) <= 1e-4


def test_the_probe_finds_every_onednn_path_it_reports_true_on_this_cpu():
    """What kernels.paths reports holds, checked here on other shapes than the probe's own: the
    product is within float rounding of float64's, a packed weight gives it bit for bit, stacked
    weights give the separate products, a row does not depend on its neighbours."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        found = kernels.paths(dtype)
        x, w, w2 = (torch.randn(n, 200, generator=g).to(dtype) for n in (9, 64, 32))
        if "product" not in found:
            continue
        y = kernels.mm_nt(x, w)
        want = torch.nn.functional.linear(x.double(), w.double())
        assert (y.double() - want).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2) * want.abs().max()
        packed = lambda t: torch.ops.mkldnn._reorder_linear_weight(t, None)
        if "packed" in found:
            assert torch.equal(kernels.mm_nt(x, packed(w)), y)
        if "fused" in found:
            assert torch.equal(kernels.mm_nt(x, packed(torch.cat([w, w2]))), torch.cat([y, kernels.mm_nt(x, w2)], -1))
        if "rows" in found:
            assert torch.equal(kernels.mm_nt(torch.cat([x, x, x[:4]]), w)[9:18], y)
    assert "product" in kernels.paths(torch.float32) or not kernels.ONEDNN  # oneDNN's float32 path is everywhere


def test_seeds_in_one_batch_equal_one_call_per_seed(tmp_path):
    """generate_seeds runs K seeds as one batch (prefill once, per-seed generators): each seed's
    samples are token for token those of generate(seed=...) alone, stops and early ends included."""
    save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama_gqa_untied"][1]())
    m = kernels.use_onednn(M.load_model(tmp_path))
    # the one-batch path is what is checked, wherever this CPU's probe allows it
    assert kernels.rows_independent(m) == ("rows" in kernels.paths(torch.float32))
    prompts = [[5, 17, 33, 2, 9], [44, 3], [7, 7, 8, 90, 12, 61, 4, 5, 6], [11, 12, 13]]
    seeds = [0, 50, 100]
    for stops, kw in ((False, dict(temperature=1.0, top_p=0.9)), (True, dict(temperature=0.7, top_k=20)),
                      (True, dict(temperature=0))):
        free = generate.generate(m, prompts, 12, seed=seeds[1], **kw)
        stop_ids = (free[0][3], free[2][6]) if stops else ()  # tokens some rows do emit
        alone = [generate.generate(m, prompts, 12, stop_ids=stop_ids, seed=s, **kw) for s in seeds]
        assert generate.generate_seeds(m, prompts, 12, stop_ids=stop_ids, seeds=seeds, **kw) == alone
        if stop_ids:  # rows ended early: the per-seed stopping is exercised
            assert any(len(r) < 12 for a in alone for r in a)
        one = [generate.generate(m, prompts[:1], 12, stop_ids=stop_ids, seed=s, **kw) for s in seeds]
        assert generate.generate_seeds(m, prompts[:1], 12, stop_ids=stop_ids, seeds=seeds, **kw) == one
        # CUDA's fixed-shape step (run eagerly here), where done rows stay in the batch: same samples
        assert generate.generate_seeds(m, prompts, 12, stop_ids=stop_ids, seeds=seeds, static_cache=True, **kw) == alone


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_activation_gradients_are_autograds_bit_for_bit(act):
    """model.GatedAct (keeps g and u, recomputes act(g) in backward) gives exactly autograd's
    value and gradients for act(g) * u."""
    torch.manual_seed(0)
    g, u, gy = torch.randn(3, 7, 40), torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    ga, ua = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    gb, ub = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    ya = M.GatedAct.apply(ga, ua, act)
    yb = M.ACTIVATIONS[act](gb) * ub
    ya.backward(gy)
    yb.backward(gy)
    assert torch.equal(ya, yb) and torch.equal(ga.grad, gb.grad) and torch.equal(ua.grad, ub.grad)


def test_fused_projections_equal_separate_ones_bit_for_bit(tmp_path, monkeypatch):
    """Sampling runs q/k/v and gate/up as one oneDNN product each over stacked packed weights:
    the logits are exactly those of the separate products, and follow a weight changed in place."""
    save_hf(tmp_path, LlamaForCausalLM, VARIANTS["llama_gqa_untied"][1]())
    m = kernels.use_onednn(M.load_model(tmp_path))
    idx, mask = padded_batch(97, [11, 7, 1, 11])
    real = kernels.fused_linears

    def separate():  # each linear on its own, packed afresh (no copy made before is reused)
        for mod in m.modules():
            for k in [k for k in mod.__dict__ if k.startswith("_packed")]:
                del mod.__dict__[k]
        monkeypatch.setattr(kernels, "fused_linears", lambda *a: None)
        try:
            return m(idx, mask)
        finally:
            monkeypatch.setattr(kernels, "fused_linears", real)

    with torch.no_grad():
        fused = m(idx, mask)
        assert "_packed_qkv" in m.layers[0].self_attn.__dict__ and "_packed_gate_up" in m.layers[0].mlp.__dict__
        assert torch.equal(fused, separate())
        m(idx, mask)  # the stacked weights packed again, before they change
        m.layers[1].mlp.up_proj.weight.mul_(1.5)
        m.layers[2].self_attn.k_proj.weight.mul_(1.5)
        fused = m(idx, mask)
        assert torch.equal(fused, separate())
