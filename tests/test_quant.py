"""quant.py against bitsandbytes, transformers and peft as independent references."""
import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import generate
import lora as L
import model as M
import quant as Q
from machinery import kernels

TINY = dict(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False)).save_pretrained(
        tmp_path / "m", safe_serialization=True, max_shard_size="200KB")
    return tmp_path / "m"


def test_nf4_linear_equals_bitsandbytes_linear4bit_and_stays_within_nf4_bound():
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 192, bias=False)
    ref = bnb.nn.Linear4bit(256, 192, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                            quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    ref = ref.to("cpu")  # quantizes on the move
    ref.train()  # train mode: no CPU repacking (see the trap test below)
    ours = Q.NF4Linear(dense.weight.data, torch.float32)
    x = torch.randn(5, 256)
    assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
    # NF4 rounds each weight to the nearest of 16 levels times its block's absmax. The widest gap
    # between adjacent NF4 levels is -0.6962 - (-1) = 0.3038, so the rounding error is at most
    # 0.1519 * absmax; double quant stores absmax in 8 bits (about 1% more). Bound: 0.16 * absmax.
    w = dense.weight.data
    err = (ours.dequantize() - w).abs().reshape(-1, 64)
    absmax = w.abs().reshape(-1, 64).max(-1, keepdim=True).values
    assert (err <= 0.16 * absmax).all()
    assert bnbf.get_4bit_type("nf4", device="cpu").diff().max().item() == pytest.approx(0.3038, abs=1e-3)
    assert err.max() > 0  # it is really quantized


def test_gradients_reach_the_input_after_an_eval_pass():
    """The AVX512-BF16 trap: bnb.nn.Linear4bit in eval mode repacks its weight on such CPUs and
    a later backward gives no input gradient. Ours must give the same gradient as dequant + matmul."""
    torch.manual_seed(0)
    layer = L.LoRALinear(Q.NF4Linear(torch.randn(64, 128), torch.float32), r=4, alpha=8)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 128))
    layer.train()
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    W = layer.base.dequantize() + layer.delta()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ W.t()).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_lora_with_zero_b_equals_base_and_training_moves_only_a_and_b(tiny_dir):
    base = Q.quantize_model(tiny_dir)
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want = base(idx)
    q_before = {n: b.clone() for n, b in base.named_buffers() if n.endswith("qweight")}
    other_before = {n: p.clone() for n, p in base.named_parameters()}
    L.add_lora(base, L.LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        assert torch.equal(base(idx), want)
    params = L.lora_params(base)
    assert {n for n, p in base.named_parameters() if p.requires_grad} == set(params)
    a_before = {n: p.clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    base.train()
    for _ in range(3):
        torch.nn.functional.cross_entropy(base(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, a_before[n]) for n, p in params.items())
    for n, b in base.named_buffers():
        if n.endswith("qweight"):
            assert torch.equal(b, q_before[n.replace(".base.", ".")])
    for n, p in base.named_parameters():
        if n not in params:
            assert torch.equal(p, other_before[n.replace(".base.", ".")])


def random_lora(m, cfg, seed=1):
    L.add_lora(m, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in L.lora_params(m).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def test_merged_checkpoint_and_peft_adapter_give_our_logits(tiny_dir, tmp_path):
    from peft import PeftModel
    cfg = L.LoRAConfig(r=4, alpha=16)
    ours = random_lora(M.load_model(tiny_dir), cfg)  # full-precision base + LoRA
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want = ours(idx)
    L.merge_lora(tiny_dir, ours, tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(idx).logits - want).abs().max().item() <= 1e-4
    L.save_adapter(ours, cfg, tmp_path / "adapter", base_path=tiny_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (peft_model(input_ids=idx).logits - want).abs().max().item() <= 1e-4
    # and our loader reads the file back to the same logits
    again = L.add_lora(M.load_model(tiny_dir), cfg)
    L.load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(again(idx), want, atol=1e-6)


def held_bytes(model):
    """Bytes of every tensor the model holds, each once: parameters, buffers (the 4-bit data) and
    the NF4 layers' quant states (block scales, double quant's own scales, the code tables)."""
    held = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    for mod in model.modules():
        if isinstance(mod, Q.NF4Linear):
            qs = mod.quant_state
            held.update((t.data_ptr(), t) for t in [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else []))
    return sum(t.numel() * t.element_size() for t in held.values())


def test_embedded_smollm2_in_nf4_still_answers_paris(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    m = Q.quantize_model(smollm2_dir)
    assert held_bytes(m) < 0.5 * sum(p.numel() * 4 for p in M.load_model(smollm2_dir).parameters())
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)
    out = generate.generate(m, [ids], 24, temperature=0, stop_ids=[tok.eos_token_id])
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_dir):
    grads = []
    for ckpt in (False, True):
        m = random_lora(Q.quantize_model(tiny_dir), L.LoRAConfig(r=4, alpha=8))
        if ckpt:
            m.grad_ckpt = True
        m.train()
        idx = torch.arange(24).reshape(2, 12) % 97
        torch.nn.functional.cross_entropy(m(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in L.lora_params(m).items()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_merge_writes_a_bf16_checkpoint_in_bf16_that_transformers_loads_as_bf16(tiny_dir, tmp_path):
    """A home SSD holds one 8B checkpoint per iteration: the merge keeps the base's dtype (bf16
    for Llama-3: half of float32's bytes) unless asked otherwise, and its config.json says so in
    both generations' keys, so from_pretrained(dtype="auto") gives bf16. Asked for float32, it is
    float32 throughout. The merged weights are W + (alpha/r) B A summed in float32, then rounded."""
    from safetensors.torch import load_file
    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_dir / f).exists():
            (base / f).write_bytes((tiny_dir / f).read_bytes())
    cfg = L.LoRAConfig(r=4, alpha=16)
    ours = random_lora(M.load_model(base), cfg)
    L.merge_lora(base, ours, tmp_path / "merged")
    merged = {k: v for f in (tmp_path / "merged").glob("*.safetensors") for k, v in load_file(f).items()}
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    w = load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    lin = ours.layers[0].self_attn.q_proj
    want = (w.float() + lin.delta()).to(torch.bfloat16)
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], want)
    L.merge_lora(base, ours, tmp_path / "merged32", dtype=torch.float32)
    assert {v.dtype for f in (tmp_path / "merged32").glob("*.safetensors") for v in load_file(f).values()} == {torch.float32}
    assert json.loads((tmp_path / "merged32" / "config.json").read_text())["dtype"] == "float32"


def test_nf4_matmul_forward_and_backward_equal_bitsandbytes():
    """Our CPU path (bitsandbytes' dequantize with block scales decoded once, product through
    oneDNN, dequantized again in backward) against bnb.matmul_4bit: outputs and the input
    gradient within float32 rounding, on a double-quant weight and on a plain one."""
    torch.manual_seed(0)
    for double_quant in (True, False):
        layer = Q.NF4Linear(torch.randn(320, 192), torch.float32, double_quant=double_quant)
        assert torch.equal(layer.dequantize(), bnbf.dequantize_4bit(layer.qweight, layer.quant_state))
        x = torch.randn(3, 50, 192, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y = layer(x)
        ref = bnb.matmul_4bit(x2, layer.qweight.t(), quant_state=layer.quant_state)
        assert y.grad_fn is not None and (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
        g = torch.randn_like(y)
        y.backward(g)
        ref.backward(g)
        assert (x.grad - x2.grad).abs().max().item() <= 1e-5 * x2.grad.abs().max().item()
        with torch.no_grad():  # the no-grad path (scoring, sampling) gives the forward's values
            assert torch.equal(layer(x), y)


NO_BF16 = pytest.mark.skipif("product" not in kernels.paths(torch.bfloat16),
                             reason="this CPU has no oneDNN bf16 products (no AVX512-BF16/AMX, or ONEDNN_MAX_CPU_ISA "
                             "below it): --nf4-compute bfloat16 is refused here (test_failures.py checks the refusal)")


@NO_BF16
def test_nf4_bf16_products_equal_bitsandbytes_in_bf16_and_return_the_input_dtype():
    """--nf4-compute bfloat16 (the default on CUDA, a choice on CPU): a float32
    input is multiplied in bf16, as bnb.matmul_4bit does with bf16 inputs, and comes back in
    float32; the input gradient too. bf16 really is used: the float32 product is further away
    than bf16's rounding allows between the two bf16 products."""
    torch.manual_seed(0)
    w = torch.randn(320, 192)
    layer, layer32 = Q.NF4Linear(w, torch.bfloat16), Q.NF4Linear(w, torch.float32)
    x = torch.randn(3, 50, 192, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = layer(x)
    ref = bnb.matmul_4bit(x2.bfloat16(), layer.qweight.t(), quant_state=layer.quant_state).float()
    assert y.dtype == torch.float32 and y.grad_fn is not None
    scale = ref.abs().max().item()
    assert (y - ref).abs().max().item() <= 4e-3 * scale
    assert (layer32(x) - y).abs().max().item() > (y - ref).abs().max().item()
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert x.grad.dtype == torch.float32
    assert (x.grad - x2.grad).abs().max().item() <= 4e-3 * x2.grad.abs().max().item()
    with torch.no_grad():
        assert torch.equal(layer(x), y)
    assert Q.product_dtype("cuda") == Q.product_dtype("cpu", "bfloat16") == torch.bfloat16
    assert Q.product_dtype("cpu") == Q.product_dtype("cuda", "float32") == torch.float32


def test_lora_gradients_through_nf4_equal_bitsandbytes_path(monkeypatch):
    """A LoRA layer on an NF4 base trains the same through our product as through bnb.matmul_4bit."""
    torch.manual_seed(0)
    layer = L.LoRALinear(Q.NF4Linear(torch.randn(96, 128), torch.float32), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 9, 128)
    grads = []
    for onednn in (True, False):  # False: the bitsandbytes and F.linear path of before
        monkeypatch.setattr(kernels, "ONEDNN", onednn)
        h = layer(x.requires_grad_(True))
        (h.square().sum()).backward()
        grads.append([layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), x.grad.clone()])
        layer.zero_grad()
        x = x.detach()
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
