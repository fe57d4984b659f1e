"""Gemma-2 in model.py against transformers' Gemma2ForCausalLM (eager attention: the only HF
path that soft-caps attention logits), plus LoRA/merge/NF4 and Gemma's chat template."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

import data as D
import generate
import lora as L
import model as M
import pipeline
import quant as Q
import sppo
from machinery import loader
from test_model import padded_batch  # left-padded random ids, as in the Llama checks

# 4 layers: sliding, full, sliding, full. head_dim 24 != 64 / 4, query scale from 20 != head_dim.
# Big init and small caps so the soft-capping really bends the logits (checked below).
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=4,
            attn_logit_softcapping=3.0, final_logit_softcapping=5.0, max_position_embeddings=128,
            initializer_range=0.3, pad_token_id=0, bos_token_id=2, eos_token_id=1)


def make_gemma(path, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = Gemma2Config(**{**TINY, **kw}, attn_implementation="eager")
    hf = Gemma2ForCausalLM(cfg).eval()
    for name, p in hf.named_parameters():  # Gemma norms store w - 1 and start at 0: randomise them
        if p.dim() == 1:
            p.data.uniform_(-0.5, 0.5)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def hf_logits(hf, idx, mask):
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=idx, attention_mask=mask.long(), position_ids=pos).logits


def test_config_reads_gemma_fields(tmp_path):
    make_gemma(tmp_path)
    c = M.Config.from_hf(tmp_path)
    assert c.layer_types == ("sliding_attention", "full_attention") * 2  # HF's rule: even layers slide
    assert [c.window(i) for i in range(4)] == [4, None, 4, None]
    assert (c.head_dim, c.query_pre_attn_scalar, c.hidden_act) == (24, 20, "gelu_pytorch_tanh")
    assert c.tie_embeddings  # Gemma2Config's default, absent from config.json
    loader.check_headers(tmp_path)  # the start-up check knows Gemma-2's extra norms (transformers wrote them)
    m = M.load_model(tmp_path)
    assert m.lm_head.weight is m.embed_tokens.weight
    good = json.loads((tmp_path / "config.json").read_text())
    for bad, field in (({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
                       ({"hidden_activation": "relu"}, "hidden_activation")):
        (tmp_path / "config.json").write_text(json.dumps({**good, **bad}))
        with pytest.raises(M.ModelError, match=f"config.json: {field}"):
            M.Config.from_hf(tmp_path)


def test_logits_match_transformers_longer_than_window_left_padded(tmp_path):
    hf = make_gemma(tmp_path)
    ours = M.load_model(tmp_path)
    idx, mask = padded_batch(97, [13, 7, 1, 13, 4])  # window 4: most rows are longer
    want = hf_logits(hf, idx, mask)
    with torch.no_grad():
        got = ours(idx, mask)
        full = ours(idx)  # the unpadded path (no attention mask) on the full rows
    diff = (want - got)[mask].abs().max().item()
    assert diff <= 1e-4, diff
    assert (full[0] - want[0]).abs().max().item() <= 1e-4
    # The test can fail: without the final soft-cap, or without the window, the logits differ.
    ours.cfg.final_logit_softcapping = None
    with torch.no_grad():
        assert (ours(idx, mask) - want)[mask].abs().max() > 0.1
    ours.cfg.final_logit_softcapping = 5.0
    for layer in ours.layers:
        layer.sliding = False
    with torch.no_grad():
        assert (ours(idx, mask) - want)[mask].abs().max() > 1e-2


def test_logits_match_with_every_layer_full_and_untied(tmp_path):
    hf = make_gemma(tmp_path, layer_types=["full_attention"] * 4, tie_word_embeddings=False, seed=3)
    ours = M.load_model(tmp_path)
    assert ours.lm_head.weight is not ours.embed_tokens.weight
    idx, mask = padded_batch(97, [9, 3, 9])
    with torch.no_grad():
        diff = (hf_logits(hf, idx, mask) - ours(idx, mask))[mask].abs().max().item()
    assert diff <= 1e-4, diff


def test_greedy_kv_cache_matches_transformers_generate(tmp_path):
    hf = make_gemma(tmp_path, tie_word_embeddings=False)  # tied + big init just repeats the last token
    ours = M.load_model(tmp_path)
    prompts = [[5, 17, 33, 2, 9], [44, 3], [7, 7, 8, 90, 12, 61, 4, 5, 6]]
    n = 14  # every output runs well past the window of 4
    batch = generate.generate(ours, prompts, n, temperature=0)
    for p, got in zip(prompts, batch):
        assert got == generate.generate(ours, [p], n, temperature=0)[0], "a padded row differs from the prompt alone"
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert got == ref[0, len(p):].tolist()
    # transformers' own left-padded batch gives the same tokens too
    idx, mask = padded_batch(97, [len(p) for p in prompts])
    for i, p in enumerate(prompts):
        idx[i, idx.shape[1] - len(p):] = torch.tensor(p)
    ref = hf.generate(idx, attention_mask=mask.long(), max_new_tokens=n, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    assert batch == ref[:, idx.shape[1]:].tolist()
    # CUDA's fixed-shape decode step (run eagerly here: the whole cache, the window as a mask)
    assert generate.generate(ours, prompts, n, temperature=0, static_cache=True) == ref[:, idx.shape[1]:].tolist()
    # The test can fail: the window changes these outputs, and they are not one repeated token.
    assert all(len(set(x)) > 5 for x in batch)
    for layer in ours.layers:
        layer.sliding = False
    assert generate.generate(ours, prompts, n, temperature=0) != batch


def test_lora_merge_loads_in_transformers_with_our_logits(tmp_path):
    make_gemma(tmp_path / "base")
    ours = M.load_model(tmp_path / "base")
    L.add_lora(ours, L.LoRAConfig(r=4, alpha=8))
    torch.manual_seed(5)
    for m in L.lora_modules(ours).values():
        m.lora_B.data.normal_(0, 0.05)
    assert len(L.lora_modules(ours)) == 4 * 7
    idx, mask = padded_batch(97, [10, 6])
    with torch.no_grad():
        want = ours(idx, mask)
    L.merge_lora(tmp_path / "base", ours, tmp_path / "merged")
    merged, info = Gemma2ForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager",
                                                     torch_dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    got = hf_logits(merged.eval(), idx, mask)
    diff = (want - got)[mask].abs().max().item()
    assert diff <= 1e-4, diff
    base = hf_logits(Gemma2ForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval(), idx, mask)
    assert (base - got)[mask].abs().max() > 1e-2  # the adapter really changed the model


def test_nf4_lora_forward_backward_against_dequantized_transformers(tmp_path):
    hf = make_gemma(tmp_path)
    qm = Q.quantize_model(tmp_path)
    L.add_lora(qm, L.LoRAConfig(r=4, alpha=8))
    idx, mask = padded_batch(97, [10, 6])
    # Reference: transformers' model with every target weight replaced by its NF4 dequantization.
    with torch.no_grad():
        for name, mod in qm.named_modules():
            if isinstance(mod, L.LoRALinear):
                hf.get_submodule("model." + name).weight.copy_(mod.base.dequantize())
    want = hf_logits(hf, idx, mask)
    qm.train()
    with torch.no_grad():  # a fresh adapter (B = 0) adds nothing: the NF4 base alone
        diff = (qm(idx, mask) - want)[mask].abs().max().item()
    assert diff <= 1e-4, diff
    for m in L.lora_modules(qm).values():
        m.lora_B.data.normal_(0, 0.01)
    logits = qm(idx, mask)
    F.cross_entropy(logits[mask][:-1], idx[mask][1:]).backward()
    grads = L.lora_params(qm)
    assert len(grads) == 2 * 4 * 7
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in grads.values())


def test_sequence_logps_use_soft_capped_logits_through_a_pipeline_split(tmp_path):
    hf = make_gemma(tmp_path)
    ours = M.load_model(tmp_path)
    ours.stage_bounds = [0, 1, 4]  # two stages (same device here), micro-batches below
    ids, _ = padded_batch(97, [9, 9, 9])
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 5:] = True
    with torch.no_grad():
        got = D.sequence_logps(pipeline.micro_batched(ours, 2), ids, resp)
        logp = hf(input_ids=ids).logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    want = (logp * resp[:, 1:]).sum(-1)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    # pair rows (D.pair_tensors): the rejected response's window counts its own positions
    pairs = [{"prompt_ids": ids[i, :5].tolist(), "chosen_ids": ids[i, 5:].tolist(), "rejected_ids": ids[(i + 1) % 3, 6:].tolist()}
             for i in range(3)]
    row_ids, seg = D.pair_tensors(pairs, sppo.Settings(), 0, "cpu")
    with torch.no_grad():
        got = D.sequence_logps(pipeline.micro_batched(ours, 2), row_ids, seg)
        want = [[hf_logp(hf, p["prompt_ids"], p[k]) for k in ("chosen_ids", "rejected_ids")] for p in pairs]
    assert torch.allclose(got, torch.tensor(want), atol=1e-4), (got, want)


def hf_logp(hf, prompt, resp):
    row = torch.tensor([prompt + resp])
    logp = hf(input_ids=row).logits[0].log_softmax(-1)
    return sum(logp[t - 1, row[0, t]].item() for t in range(len(prompt), row.shape[1]))


# ----------------------------------------------------------------------------- chat template

# Gemma-2-it's chat template (tokenizer_config.json of google/gemma-2-9b-it), written out here.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def make_gemma_tokenizer(path):
    """A tiny BPE with Gemma's special tokens and, like Gemma's tokenizer.json, a post-processor
    that puts <bos> in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from tiny import CORPUS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "add_bos_token": True, "chat_template": GEMMA_TEMPLATE}))
    return path


def test_gemma_chat_template_renders_as_transformers_with_one_bos(tmp_path):
    path = make_gemma_tokenizer(tmp_path)
    ref, ours = AutoTokenizer.from_pretrained(path), D.Tokenizer.from_dir(path)
    chats = [
        [{"role": "user", "content": "  please explain why the sky looks blue \n"}],
        [{"role": "user", "content": "one two three"}, {"role": "assistant", "content": "four five six"},
         {"role": "user", "content": "write a short answer"}],
    ]
    for msgs in chats:
        for gen in (True, False):
            text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.render_chat(msgs, gen) == text
            ids = ours.encode_chat(msgs, gen)
            assert ids == ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
    assert ours.render_chat(chats[1]).endswith("<end_of_turn>\n<start_of_turn>model\n")
    assert "<start_of_turn>model\nfour five six<end_of_turn>" in ours.render_chat(chats[1])
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    for render in (lambda m: ref.apply_chat_template(m, tokenize=False), ours.render_chat):
        with pytest.raises(Exception, match="System role not supported"):
            render(system)
