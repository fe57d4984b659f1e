"""
Tests for judge.py and the prompt sets. References are independent of the code
under test: hand-written examples for the checks, closed-form sigmoids, llm-blender's
own rank()/compare() for PairRM, and single unpadded forward passes for LLMJudge.
"""

import importlib.util
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import judge  # noqa: E402
from judge import CHECKS, VerifiableJudge, check_results, make_judge, register_check, satisfaction  # noqa: E402


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def assert_pref_matrix(P, k):
    assert P.shape == (k, k) and P.dtype == np.float64
    assert np.array_equal(np.diag(P), np.full(k, 0.5))
    np.testing.assert_allclose(P + P.T, np.ones((k, k)), rtol=0, atol=1e-12)
    assert np.all((P > 0) & (P < 1))


# -----------------------------------------------------------------------------
# checks: hand-written examples, one or more True and False per kind

CASES = [
    ("max_words", {"n": 5}, "One two three four five.", True),
    ("max_words", {"n": 5}, "One two three four five six", False),
    ("max_words", {"n": 3}, "Don't stop-me now", True),  # apostrophes/hyphens stay inside a word
    ("max_words", {"n": 2}, "- apples\n- pears\n* -- ", True),  # bullets and dashes are not words
    ("min_words", {"n": 3}, "a b c", True),
    ("min_words", {"n": 3}, "a b", False),
    ("max_sentences", {"n": 2}, "Hi there. How are you?", True),
    ("max_sentences", {"n": 2}, "One. Two! Three?", False),
    ("max_sentences", {"n": 2}, "Pi is about 3.14 today. Yes.", True),  # no split inside a number
    ("max_sentences", {"n": 2}, "First line\nsecond line\nthird line", False),
    ("min_sentences", {"n": 3}, "One. Two! Three?", True),
    ("min_sentences", {"n": 3}, "Pi is 3.14 today. Yes.", False),  # no split inside a number
    ("min_sentences", {"n": 3}, "- apples\n- pears\n- plums", True),  # list items count as sentences
    ("max_chars", {"n": 10}, "  short!  \n", True),
    ("max_chars", {"n": 10}, "this is too long", False),
    ("include_word", {"word": "river"}, "The River is wide.", True),
    ("include_word", {"word": "river"}, "We sat on the riverbank.", False),
    ("include_keywords", {"keywords": ["river", "stone"]}, "A Stone sat in the river.", True),
    ("include_keywords", {"keywords": ["river", "stone"]}, "A river, and stones.", False),  # "stones" is not "stone"
    ("include_keywords", {"keywords": ["river", "stone"]}, "The river.", False),
    ("exclude_word", {"word": "very"}, "It is very good.", False),
    ("exclude_word", {"word": "very"}, "Everything is fine.", True),
    ("word_frequency", {"word": "river", "n": 2}, "river, River!", True),
    ("word_frequency", {"word": "river", "n": 2}, "one river and a rivers", False),
    ("all_lowercase", {}, "all small words, even here.", True),
    ("all_lowercase", {}, "Not this one.", False),
    ("all_lowercase", {}, "123 456", False),  # no letters at all is not "lowercase"
    ("all_uppercase", {}, "LOUD AND CLEAR!", True),
    ("all_uppercase", {}, "LOUD and clear", False),
    ("bullet_count", {"n": 3}, "- a\n- b\n* c", True),
    ("bullet_count", {"n": 3}, "**Fruits**\n  - apple\n  - pear\n  - plum", True),
    ("bullet_count", {"n": 3}, "- a\n- b", False),
    ("bullet_count", {"n": 3}, "1. a\n2. b\n3. c", False),
    ("numbered_list", {"n": 2}, "1. first\n2) second", True),
    ("numbered_list", {"n": 2}, "1. only one", False),
    ("number_of_paragraphs", {"n": 2}, "One.\n\nTwo.", True),
    ("number_of_paragraphs", {"n": 2}, "A\n \n\n\nB\n\n", True),
    ("number_of_paragraphs", {"n": 2}, "One.\nStill one.", False),
    ("valid_json", {}, '{"a": 1}', True),
    ("valid_json", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("valid_json", {}, 'Here it is: {"a": 1}', False),
    ("json_keys", {"keys": ["name", "age"]}, '{"name": "x", "age": 3}', True),
    ("json_keys", {"keys": ["name", "age"]}, '```\n{"name": 1, "age": 2, "x": 3}\n```', True),
    ("json_keys", {"keys": ["name", "age"]}, '{"name": "x"}', False),
    ("json_keys", {"keys": ["name", "age"]}, '["name", "age"]', False),
    ("starts_with", {"phrase": "Yes"}, "yes, of course.", True),
    ("starts_with", {"phrase": "Yes"}, "**Yes** indeed.", True),
    ("starts_with", {"phrase": "Yes"}, "Yesterday was fun.", False),
    ("starts_with", {"phrase": "Yes"}, "Well, yes.", False),
    ("ends_with", {"phrase": "That is all."}, "Some text. That is all.  \n", True),
    ("ends_with", {"phrase": "That is all."}, "so... that is all.", True),
    ("ends_with", {"phrase": "That is all."}, "That is all. More text.", False),
    ("question_mark_end", {}, "Do you agree?", True),
    ("question_mark_end", {}, "**Ready?**", True),
    ("question_mark_end", {}, "Why? Because.", False),
    ("no_commas", {}, "a b c.", True),
    ("no_commas", {}, "a, b", False),
    ("include_number", {}, "I have 2 cats.", True),
    ("include_number", {}, "I have two cats.", False),
    ("no_digits", {}, "I have two cats.", True),
    ("no_digits", {}, "Call 911.", False),
    ("wrapped_in_quotes", {}, '"Hello there."', True),
    ("wrapped_in_quotes", {}, 'Hello "there"', False),
]


@pytest.mark.parametrize("kind,params,response,expected", CASES)
def test_check_examples(kind, params, response, expected):
    assert check_results(response, [{"type": kind, **params}]) == [expected]


def test_every_builtin_check_has_examples_and_there_are_at_least_12():
    kinds = {c[0] for c in CASES}
    assert kinds == set(CHECKS)
    assert len(kinds) >= 12
    # each kind is shown both passing and failing
    for k in kinds:
        assert {e for kk, _, _, e in CASES if kk == k} == {True, False}, k


def test_satisfaction_is_the_fraction_met():
    checks = [{"type": "max_words", "n": 4}, {"type": "include_word", "word": "river"},
              {"type": "no_commas"}, {"type": "include_number"}]
    assert satisfaction("The river is wide.", checks) == 0.75
    assert satisfaction("The river is 9.", checks) == 1.0
    assert satisfaction("Lakes, ponds, and seas are wider.", checks) == 0.0
    assert satisfaction("Anything at all.", []) == 1.0


def test_empty_answer_meets_nothing():
    checks = [{"type": "max_words", "n": 40}, {"type": "no_commas"}, {"type": "no_digits"}]
    assert satisfaction("", checks) == 0.0
    assert satisfaction("  \n ... ** ", checks) == 0.0
    assert satisfaction("ok", checks) == 1.0


def test_unknown_check_type_is_named_in_the_error():
    with pytest.raises(ValueError, match="no_such_check"):
        satisfaction("hello", [{"type": "no_such_check"}])
    with pytest.raises(ValueError, match="no_such_check"):
        satisfaction("", [{"type": "no_such_check"}])


def test_register_check_plain_and_decorator():
    try:
        register_check("mentions_cat", lambda r: "cat" in r.lower())

        @register_check("shouts")
        def shouts(r, min_bangs=1):
            return r.count("!") >= min_bangs

        checks = [{"type": "mentions_cat"}, {"type": "shouts", "min_bangs": 2}]
        assert satisfaction("My Cat!!", checks) == 1.0
        assert satisfaction("My cat!", checks) == 0.5
        P = VerifiableJudge()(["p"], [["dog", "cat!!"]], [{"checks": checks}])[0]
        assert P[1, 0] == pytest.approx(sig(1.0 / 0.1), abs=1e-12)
    finally:
        CHECKS.pop("mentions_cat", None)
        CHECKS.pop("shouts", None)


# -----------------------------------------------------------------------------
# verifiable judge: closed form


def test_verifiable_judge_closed_form():
    row = {"checks": [{"type": "max_words", "n": 5}, {"type": "include_word", "word": "river"}]}
    cands = ["The river is wide.",  # r = 1
             "The lake is wide.",  # r = 0.5
             "A much longer answer that never names the water we were asked about"]  # r = 0
    for tau in (0.1, 0.5):
        P = make_judge("verifiable", tau=tau)(["Describe a river."], [cands], [row])[0]
        assert_pref_matrix(P, 3)
        assert P[0, 1] == pytest.approx(sig(0.5 / tau), abs=1e-12)
        assert P[0, 2] == pytest.approx(sig(1.0 / tau), abs=1e-12)
        assert P[1, 2] == pytest.approx(sig(0.5 / tau), abs=1e-12)
        assert P[2, 0] == pytest.approx(1 - sig(1.0 / tau), abs=1e-12)
    # equal scores -> exactly a coin flip
    P = VerifiableJudge()(["x"], [["a river", "the river"]], [row])[0]
    assert P[0, 1] == 0.5
    with pytest.raises(ValueError):
        VerifiableJudge()(["x"], [["a"]])


# -----------------------------------------------------------------------------
# prompt sets


def load(name):
    with open(os.path.join(ROOT, "prompts", f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def instruction_of(prompt):
    # the part that names what to do: the paragraph for summaries, else the first sentence
    blocks = prompt.split("\n\n")
    return blocks[1] if len(blocks) > 1 else re.split(r"(?<=[.?!])\s", prompt)[0]


def test_prompt_files_shape_and_checks():
    train, heldout = load("train"), load("heldout")
    assert len(train) >= 300 and len(heldout) >= 300  # 300+: a run's interval about +/-0.05, not +/-0.08
    ids = [r["id"] for r in train + heldout]
    assert len(set(ids)) == len(ids)
    for r in train + heldout:
        assert set(r) == {"id", "prompt", "checks"}
        assert 1 <= len(r["checks"]) <= 3
        satisfaction("A short made-up answer.", r["checks"])  # every type is known, params fit
        text = r["prompt"]
        for c in r["checks"]:  # the constraint is stated in the prompt itself
            for key in ("word", "phrase"):
                if key in c:
                    assert f"'{c[key]}'" in text, (c, text)
            if c["type"] in ("max_words", "min_words", "max_chars", "bullet_count", "numbered_list"):
                assert str(c["n"]) in text, (c, text)
            if c["type"] == "json_keys":
                assert all(f'"{k}"' in text for k in c["keys"])
            if c["type"] == "include_keywords":
                assert all(f"'{k}'" in text for k in c["keywords"]), (c, text)
            if c["type"] == "word_frequency":
                assert f"{c['n']} " in text, (c, text)
    kinds = {c["type"] for r in train for c in r["checks"]}
    assert len(kinds) >= 12


UPPER, LOWER = ("max_words", "max_sentences"), ("min_words", "min_sentences")


@pytest.mark.parametrize("name", ["train", "heldout"])
def test_prompt_sets_have_as_many_lower_as_upper_length_bounds(name):
    checks = [c["type"] for r in load(name) for c in r["checks"]]
    upper, lower = sum(c in UPPER for c in checks), sum(c in LOWER for c in checks)
    assert upper >= len(load(name)) // 4 and abs(upper - lower) <= 1, (upper, lower)
    # every prompt carries at most one length bound (word ranges: one of each side)
    for r in load(name):
        kinds = [c["type"] for c in r["checks"] if c["type"] in UPPER + LOWER]
        assert len(kinds) <= 1 or sorted(kinds) == ["max_words", "min_words"], r


@pytest.mark.parametrize("name", ["train", "heldout"])
def test_saying_less_meets_no_more_length_bounds(name):
    # one-sentence filler answers of 10 and 50 words: with bounds mirrored at the same word counts,
    # both meet the same share of the set's length bounds (the old sets: 0.85 vs 0.57 on train)
    bounds = [c for r in load(name) for c in r["checks"] if c["type"] in UPPER + LOWER]

    def met(n):
        answer = " ".join(["word"] * n) + "."
        return np.mean([check_results(answer, [c])[0] for c in bounds])

    assert abs(met(10) - met(50)) <= 0.05, (met(10), met(50))


def test_heldout_instructions_are_disjoint_from_train():
    train = {instruction_of(r["prompt"]) for r in load("train")}
    heldout = {instruction_of(r["prompt"]) for r in load("heldout")}
    assert len(heldout) >= 30
    assert not train & heldout


def load_make_prompts():
    spec = importlib.util.spec_from_file_location("make_prompts", os.path.join(ROOT, "scripts", "make_prompts.py"))
    mp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mp)
    return mp


def test_the_first_110_heldout_prompts_are_the_110_prompt_set_the_earlier_runs_evaluated_on():
    """The held-out set grew from 110 to 330 by drawing on: the generator asked for 110 gives the
    file's first 110 lines byte for byte, so `make iterate`'s first 100 (--eval-prompts 100) and
    every run made before are unchanged."""
    mp = load_make_prompts()
    mp.N_HELDOUT = 110
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in mp.build()["heldout"]]
    with open(os.path.join(ROOT, "prompts", "heldout.jsonl"), encoding="utf-8") as f:
        assert f.readlines()[:110] == lines


def test_prompt_files_are_reproducible_from_script():
    mp = load_make_prompts()
    built = mp.build()
    assert built["train"] == load("train")
    assert built["heldout"] == load("heldout")


# -----------------------------------------------------------------------------
# PairRM: a tiny random one, built the way llm-blender expects, run through its real code

@pytest.fixture(scope="module")
def pairrm_dir(tmp_path_factory):
    return judge.build_pairrm(tmp_path_factory.mktemp("pairrm"), "tiny")


PAIRRM_PROMPTS = ["<|im_start|>user\nwrite a short poem about the sea<|im_end|>\n<|im_start|>assistant\n",
                  "<|im_start|>user\nwhat is the moon made of<|im_end|>\n<|im_start|>assistant\n"]
PAIRRM_CANDS = [["the sea is wide and the wind is bright", "bees make honey", "a dog sleeps",
                 "the quiet harbor at night with the stars"],
                ["rock and dust", "the moon pulls the tides up and down each day", "bread in the oven",
                 "yes"]]


def reference_blender(ranker, backbone):
    import llm_blender
    from llm_blender.blender.config import BlenderConfig
    b = llm_blender.Blender(BlenderConfig(device="cpu", use_tqdm=False))
    b.loadranker(str(ranker), device="cpu", model_name=str(backbone))
    return b


# a prompt whose longest answer is cut: to the candidate length plus half the prompt's unused length
LONG = ("the river runs past the old mill and the children watch the boats go by in the morning light while a "
        "small dog sleeps under the kitchen table and rain taps on the window all afternoon")
LONG_PROMPT = "<|im_start|>user\nwrite about the river<|im_end|>\n<|im_start|>assistant\n"
LONG_CANDS = [LONG, "the old mill", LONG + " " + LONG, "boats go by in the morning light"]


def test_pairrm_scores_mode_matches_llm_blender_rank_at_batch_size_1(pairrm_dir):
    """Our feed (length-sorted rows, 3 to a forward, padded to each batch's longest) against
    llm-blender's own rank() as the authors' rank.py calls it, batch_size=1 (no padding at all)."""
    ranker, backbone = pairrm_dir
    prompts, cands = PAIRRM_PROMPTS + [LONG_PROMPT], PAIRRM_CANDS + [LONG_CANDS]
    j = make_judge("pairrm", ranker_dir=ranker, backbone_dir=backbone, mode="scores", batch_size=3, device="cpu")
    Ps = j(prompts, cands)
    ref = reference_blender(ranker, backbone)
    s = ref.rank(prompts, cands, return_scores=True, batch_size=1)
    tok = ref.ranker.tokenizer
    assert len(tok(LONG + " " + LONG)["input_ids"]) > 64, "the long answer must be cut for this test to cover it"
    assert len(Ps) == 3
    for P, sn in zip(Ps, s):
        assert_pref_matrix(P, 4)
        expected = np.array([[sig(float(sn[a]) - float(sn[b])) for b in range(4)] for a in range(4)])
        np.testing.assert_allclose(P, expected, rtol=0, atol=1e-6)
        off = P[~np.eye(4, dtype=bool)]
        assert off.max() - off.min() > 0.05  # the tiny model really discriminates: test can fail


def test_pairrm_pairwise_mode_matches_llm_blender_compare(pairrm_dir):
    ranker, backbone = pairrm_dir
    j = judge.PairRMJudge(ranker, mode="pairwise", batch_size=5, device="cpu", backbone_dir=backbone)
    Ps = j(PAIRRM_PROMPTS, PAIRRM_CANDS)
    ref = reference_blender(ranker, backbone)
    s = ref.rank(PAIRRM_PROMPTS, PAIRRM_CANDS, return_scores=True, batch_size=1)
    for n, P in enumerate(Ps):
        assert_pref_matrix(P, 4)
        c = PAIRRM_CANDS[n]
        # C[a][b]: llm-blender's logit that c[a] (shown first) beats c[b], one pair per call
        C = np.zeros((4, 4))
        for a in range(4):
            for b in range(4):
                if a != b:
                    C[a, b] = ref.compare([PAIRRM_PROMPTS[n]], [c[a]], [c[b]], mode="[A,B]", return_logits=True)[0]
        expected = np.array([[sig((C[a, b] - C[b, a]) / 2) for b in range(4)] for a in range(4)])
        np.testing.assert_allclose(P, expected, rtol=0, atol=1e-5)
        # llm-blender's rank() score is mean_b (C[a,b] - C[b,a]) = mean_b 2 * logit(P[a,b])
        D = 2 * np.log(P / (1 - P))
        np.testing.assert_allclose(D.mean(axis=1), s[n], rtol=0, atol=1e-4)


def test_pairrm_gets_the_device_string_llm_blender_halves_for_and_runs_on_its_card(tmp_path, monkeypatch):
    """llm-blender switches the ranker to fp16 only when its device is the string "cuda": a judge
    asked for "cuda:1" must hand it "cuda" (and make card 1 current while it loads and judges),
    "cpu" stays "cpu". A stand-in Blender records what llm-blender would be given."""
    import llm_blender
    seen = []

    class StandIn:
        def __init__(self, config):
            seen.append(("config", config.device))

        def loadranker(self, path, device=None, **kw):
            seen.append(("loadranker", device))

        def rank(self, prompts, candidates, **kw):
            return [[0.0] * len(c) for c in candidates]

    monkeypatch.setattr(llm_blender, "Blender", StandIn)
    monkeypatch.setattr(judge.PairRMJudge, "comparisons", lambda self, p, c: np.zeros((len(p), len(c[0]), len(c[0]))))
    for asked, given in (("cuda:1", "cuda"), ("cuda", "cuda"), ("cpu", "cpu")):
        seen.clear()
        j = judge.PairRMJudge(tmp_path, device=asked)
        assert seen == [("config", given), ("loadranker", given)], asked
        assert j.card == {"cuda:1": 1, "cuda": None, "cpu": None}[asked]  # None: the current card
        assert_pref_matrix(j(["p"], [["a", "b"]])[0], 2)


def test_pairrm_render_and_refusals(pairrm_dir, tmp_path):
    ranker, backbone = pairrm_dir
    raw = ["write a short poem about the sea", "what is the moon made of"]
    render = lambda p: f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"  # noqa: E731
    j = judge.PairRMJudge(ranker, batch_size=2, device="cpu", backbone_dir=backbone, render=render)
    s = reference_blender(ranker, backbone).rank(PAIRRM_PROMPTS, PAIRRM_CANDS, return_scores=True, batch_size=1)
    P = j(raw, PAIRRM_CANDS)[1]
    assert P[1, 0] == pytest.approx(sig(float(s[1][1]) - float(s[1][0])), abs=1e-6)
    with pytest.raises(ValueError, match="PairRM folder not found"):
        judge.PairRMJudge(tmp_path / "missing", device="cpu")
    with pytest.raises(ValueError, match="phi"):
        judge.PairRMJudge(ranker, device="cpu", backbone_dir=tmp_path / "dolphin")


# -----------------------------------------------------------------------------
# LLM judge with stand-ins for data.Tokenizer and model.Transformer


class ByteTokenizer:
    """Same methods as data.Tokenizer: bytes + 3, 1/2 open/close a chat turn, 0 pads."""
    pad_id = 0

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def encode_chat(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            ids += [1] + self.encode(m["role"] + "\n" + m["content"]) + [2]
        return ids + ([1] + self.encode("assistant\n") if add_generation_prompt else [])


class TinyCausalLM(torch.nn.Module):
    """Random, causal, order-sensitive: h_t = tanh(sum_{s<=t} w[t-s] * emb(x_s) * mask_s).
    Depends only on offsets to real tokens, so left padding must not change the last logits."""

    def __init__(self, vocab=259, d=16, maxlen=4096):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, d, generator=g))
        self.w = torch.nn.Parameter(torch.randn(maxlen, generator=g) / 10)
        self.out = torch.nn.Parameter(torch.randn(d, vocab, generator=g))

    def forward(self, idx, attn_mask, last_only=False):
        T = idx.shape[1]
        x = self.emb[idx] * attn_mask[..., None]
        off = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        W = torch.where(off >= 0, self.w[off.clamp(min=0)], torch.zeros(()))
        logits = torch.tanh(W @ x) @ self.out
        return logits[:, -1:] if last_only else logits


LLM_PROMPTS = ["Describe rain in one sentence.", "Name a fruit."]
LLM_CANDS = [["Rain is water falling from clouds.", "I like turtles.", "Drops fall.", "Rain."],
             ["Apple.", "A banana is a fruit.", "Blue"]]


def test_llm_judge_matches_unpadded_reference():
    tok, model = ByteTokenizer(), TinyCausalLM()
    j = make_judge("llm", model=model, tokenizer=tok, batch_size=4)
    Ps = j(LLM_PROMPTS, LLM_CANDS)
    a_id, b_id = ord("A") + 3, ord("B") + 3

    def p_a(prompt, ya, yb):  # one sequence, no padding
        text = judge.JUDGE_TEMPLATE.format(instruction=prompt, a=ya, b=yb)
        ids = torch.tensor([tok.encode_chat([{"role": "user", "content": text}])])
        with torch.no_grad():
            last = model(ids, attn_mask=torch.ones_like(ids, dtype=torch.bool))[0, -1].double()
        return 1 / (1 + math.exp(-(last[a_id] - last[b_id]).item()))  # softmax over {A, B}

    for prompt, cands, P in zip(LLM_PROMPTS, LLM_CANDS, Ps):
        k = len(cands)
        assert_pref_matrix(P, k)
        for a in range(k):
            for b in range(k):
                if a != b:  # P[a][b] = (pA(a, b) + pB(b, a)) / 2
                    expected = (p_a(prompt, cands[a], cands[b]) + 1 - p_a(prompt, cands[b], cands[a])) / 2
                    assert P[a, b] == pytest.approx(expected, abs=1e-6)
        off = P[~np.eye(k, dtype=bool)]
        assert off.max() - off.min() > 0.02


def test_llm_judge_swap_transposes_and_batching_does_not_matter():
    tok, model = ByteTokenizer(), TinyCausalLM()
    P = judge.LLMJudge(model, tok, batch_size=3)(LLM_PROMPTS[:1], LLM_CANDS[:1])[0]
    # reordering the candidates reorders rows and columns alike
    perm = [2, 0, 3, 1]
    Pp = judge.LLMJudge(model, tok, batch_size=3)(LLM_PROMPTS[:1], [[LLM_CANDS[0][i] for i in perm]])[0]
    np.testing.assert_allclose(Pp, P[np.ix_(perm, perm)], rtol=0, atol=1e-6)
    # swapping the two candidates of a pair transposes P
    P2 = judge.LLMJudge(model, tok)(LLM_PROMPTS[:1], [LLM_CANDS[0][:2]])[0]
    P2s = judge.LLMJudge(model, tok)(LLM_PROMPTS[:1], [LLM_CANDS[0][1::-1]])[0]
    np.testing.assert_allclose(P2s, P2.T, rtol=0, atol=1e-6)
    # one sequence per forward vs. all at once (left padding) give the same matrix
    P1 = judge.LLMJudge(model, tok, batch_size=1)(LLM_PROMPTS[:1], LLM_CANDS[:1])[0]
    Pall = judge.LLMJudge(model, tok, batch_size=64)(LLM_PROMPTS[:1], LLM_CANDS[:1])[0]
    np.testing.assert_allclose(P1, P, rtol=0, atol=1e-6)
    np.testing.assert_allclose(Pall, P, rtol=0, atol=1e-6)


class AlwaysSaysA(torch.nn.Module):
    """Pure position bias: prefers "A" by a logit of 3 whatever the content."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, attn_mask):
        logits = torch.zeros(*idx.shape, 259)
        logits[..., ord("A") + 3] = 3.0
        return logits


def test_llm_judge_reads_the_raw_instruction_from_rows():
    tok, model = ByteTokenizer(), TinyCausalLM()
    j = judge.LLMJudge(model, tok)
    raw = j(LLM_PROMPTS[:1], LLM_CANDS[:1])[0]
    rendered = ["<|im_start|>user\n" + LLM_PROMPTS[0] + "<|im_end|>\n<|im_start|>assistant\n"]
    via_rows = j(rendered, LLM_CANDS[:1], [{"prompt": LLM_PROMPTS[0], "checks": []}])[0]
    np.testing.assert_allclose(via_rows, raw, rtol=0, atol=1e-6)
    assert np.abs(j(rendered, LLM_CANDS[:1])[0] - raw).max() > 1e-4  # the prompt text does matter


def test_llm_judge_cancels_position_bias():
    P = judge.LLMJudge(AlwaysSaysA(), ByteTokenizer())(LLM_PROMPTS[:1], LLM_CANDS[:1])[0]
    np.testing.assert_allclose(P, np.full((4, 4), 0.5), rtol=0, atol=1e-12)


def test_make_judge_rejects_unknown_name():
    with pytest.raises(ValueError, match="bogus"):
        make_judge("bogus")
