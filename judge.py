"""
Judges turn K sampled responses per prompt into a K x K preference matrix.

    P = judge(prompts, candidates, rows)   # list of (K, K) float64 arrays
    P[i][j] = P(y_i better than y_j),  P + P.T = 1,  diag(P) = 0.5

SPPO only ever needs these win probabilities: the target for y_i is
P(y_i beats the current policy) ~= mean_j P[i][j].

Three judges:
  VerifiableJudge  machine-checkable constraints stored with each prompt (default,
                   runs anywhere, no extra model). A 135M model asked "which answer
                   is better?" agrees with people at chance, a word counter does not.
  PairRMJudge      the paper's judge, llm-blender's PairRM (DeBERTa-v3-large, 0.4B).
  LLMJudge         any local causal LM asked "A or B?", both orders averaged.
"""

import inspect
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

# -----------------------------------------------------------------------------
# shared helpers


def sigmoid(x):
    # exp(-logaddexp(0, -x)) never overflows, for any float x
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=np.float64)))


def prob_matrix(upper: Callable[[int, int], float], k: int) -> np.ndarray:
    """Build P from P[i][j] for i < j only, and fill the rest by the rules.
    Why: computing both halves separately leaves P + P.T = 1 true only up to
    rounding; mirroring makes it hold exactly and the diagonal exactly 0.5."""
    P = np.full((k, k), 0.5, dtype=np.float64)
    for i in range(k):
        for j in range(i + 1, k):
            p = float(upper(i, j))
            P[i, j] = p
            P[j, i] = 1.0 - p
    return P


# -----------------------------------------------------------------------------
# 1. verifiable constraints
#
# A check is a plain function fn(response: str, **params) -> bool. A prompt row
# carries a list of them as dicts: {"type": "max_words", "n": 50}. Add your own
# with register_check("name", fn) or the @register_check("name") decorator.

CHECKS: dict[str, Callable[..., bool]] = {}


def register_check(name: str, fn: Callable[..., bool] | None = None):
    """Register fn under name (replacing any earlier one). Returns fn, so it also
    works as a decorator: @register_check("my_kind")."""
    if fn is None:
        return lambda f: register_check(name, f)
    CHECKS[name] = fn
    return fn


# a word is a run of letters/digits, inner apostrophes and hyphens kept
# ("don't", "well-known" are one word); markdown bullets and dashes are not words
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
# markup a small model likes to wrap answers in (**bold**, "quotes", # headings);
# starts_with/ends_with look past it so '**Yes**, ...' still starts with 'Yes'
_MARKUP = " \t\r\n*_#>\"'`“”‘’"


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    # a sentence ends at . ! ? followed by whitespace, or at a line break (list
    # items and headings count as sentences too); "3.5" does not split
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [p for p in parts if _WORD.search(p)]


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _has_word(text: str, word: str) -> int:
    # whole-word, case-insensitive; lookarounds instead of \b so words that end
    # in punctuation ("e.g.") still work
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE))


def parse_json(text: str):
    """Whole response as JSON, or a single ```json fenced block. Raises ValueError."""
    s = text.strip()
    m = re.fullmatch(r"```(?:json)?[ \t]*\n?(.*?)\n?```", s, re.DOTALL | re.IGNORECASE)
    if m:
        s = m.group(1)
    return json.loads(s)  # json.JSONDecodeError is a ValueError


@register_check("max_words")
def max_words(response, n):
    return len(words(response)) <= n


@register_check("min_words")
def min_words(response, n):
    return len(words(response)) >= n


@register_check("max_sentences")
def max_sentences(response, n):
    return len(sentences(response)) <= n


@register_check("min_sentences")
def min_sentences(response, n):
    return len(sentences(response)) >= n


@register_check("max_chars")
def max_chars(response, n):
    return len(response.strip()) <= n


@register_check("include_word")
def include_word(response, word):
    return _has_word(response, word) > 0


@register_check("include_keywords")
def include_keywords(response, keywords):
    # all of them: several required words reward saying more, unlike "avoid a word"
    return all(_has_word(response, w) > 0 for w in keywords)


@register_check("exclude_word")
def exclude_word(response, word):
    return _has_word(response, word) == 0


@register_check("word_frequency")
def word_frequency(response, word, n):
    return _has_word(response, word) >= n


@register_check("all_lowercase")
def all_lowercase(response):
    return any(c.isalpha() for c in response) and response == response.lower()


@register_check("all_uppercase")
def all_uppercase(response):
    return any(c.isalpha() for c in response) and response == response.upper()


@register_check("bullet_count")
def bullet_count(response, n):
    # lines starting with "- ", "* " or "• " ("**bold**" is not a bullet)
    return len(re.findall(r"^[ \t]*[-*•][ \t]+\S", response, re.MULTILINE)) == n


@register_check("numbered_list")
def numbered_list(response, n):
    # lines starting with "1. " or "1) "
    return len(re.findall(r"^[ \t]*\d+[.)][ \t]+\S", response, re.MULTILINE)) == n


@register_check("number_of_paragraphs")
def number_of_paragraphs(response, n):
    return len(paragraphs(response)) == n


@register_check("valid_json")
def valid_json(response):
    try:
        parse_json(response)
        return True
    except ValueError:
        return False


@register_check("json_keys")
def json_keys(response, keys):
    try:
        obj = parse_json(response)
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys)


@register_check("starts_with")
def starts_with(response, phrase):
    s, p = response.lstrip(_MARKUP).lower(), phrase.strip(_MARKUP).lower()
    if not s.startswith(p):
        return False
    # "Yes" must not match "Yesterday"
    rest = s[len(p):]
    return not (p[-1:].isalnum() and rest[:1].isalnum())


@register_check("ends_with")
def ends_with(response, phrase):
    # case-insensitive, ignoring trailing whitespace and wrapping markup/quotes
    return response.strip(_MARKUP).lower().endswith(phrase.strip(_MARKUP).lower())


@register_check("question_mark_end")
def question_mark_end(response):
    return response.rstrip(_MARKUP).endswith("?")


@register_check("no_commas")
def no_commas(response):
    return "," not in response


@register_check("include_number")
def include_number(response):
    return re.search(r"\d", response) is not None


@register_check("no_digits")
def no_digits(response):
    return re.search(r"\d", response) is None


@register_check("wrapped_in_quotes")
def wrapped_in_quotes(response):
    s = response.strip()
    return len(s) >= 2 and s[0] in "\"“" and s[-1] in "\"”"


def _lookup(check: dict) -> tuple[Callable[..., bool], dict]:
    params = dict(check)
    kind = params.pop("type", None)
    if kind not in CHECKS:
        raise ValueError(f"unknown check type {kind!r}; known types: {', '.join(sorted(CHECKS))}"
                         " (add one with judge.register_check)")
    return CHECKS[kind], params


def check_problem(check) -> str | None:
    """What is wrong with one check as a prompt row gives it (unknown type, parameters its
    function does not take), or None: found at start-up, not hours later in the judge stage."""
    if not isinstance(check, dict):
        return f"a check must be an object like {{'type': 'max_words', 'n': 40}}, got {check!r}"
    try:
        fn, params = _lookup(check)
        fn("A short sample answer, with 7 words.", **params)
    except ValueError as e:
        return str(e)
    except Exception as e:  # a wrong or missing parameter: TypeError, or whatever the check does with it
        return f"check {check!r}: {type(e).__name__}: {e}"
    return None


def check_results(response: str, checks: list[dict]) -> list[bool]:
    """One bool per check."""
    fns = [_lookup(c) for c in checks]  # fail on an unknown type even for empty answers
    if not _WORD.search(response):
        # an empty or symbols-only answer satisfies "at most 40 words", "no commas",
        # "no digits"... and self-play would happily learn to say nothing
        return [False] * len(checks)
    return [bool(fn(response, **params)) for fn, params in fns]


def satisfaction(response: str, checks: list[dict]) -> float:
    """Fraction of checks satisfied, in [0, 1]. No checks -> 1.0."""
    if not checks:
        return 1.0
    res = check_results(response, checks)
    return sum(res) / len(res)


@dataclass
class VerifiableJudge:
    """r_i = fraction of the prompt's checks y_i satisfies; P[i][j] = sigmoid((r_i - r_j) / tau).
    Small tau -> nearly hard wins; tau=0.1 gives 0.993 for a one-of-two-checks gap."""
    tau: float = 0.1

    def __call__(self, prompts, candidates, rows=None):
        if rows is None:
            raise ValueError("VerifiableJudge needs rows (the prompt rows with their 'checks')")
        assert len(prompts) == len(candidates) == len(rows)
        out = []
        for row, cands in zip(rows, candidates):
            r = [satisfaction(c, row.get("checks", [])) for c in cands]
            out.append(prob_matrix(lambda i, j: sigmoid((r[i] - r[j]) / self.tau), len(cands)))
        return out


# -----------------------------------------------------------------------------
# 2. PairRM (llm-blender)


class PairRMJudge:
    """PairRM loaded by llm-blender's own code from local folders only, and fed its comparisons
    by ours (`comparisons`: the same numbers as llm-blender's rank(batch_size=1), in length-sorted
    batches padded only to each batch's longest row).

    Put the weights on disk once (any machine with internet):

        huggingface-cli download llm-blender/PairRM --local-dir ~/models/PairRM
        huggingface-cli download microsoft/deberta-v3-large --local-dir ~/models/deberta-v3-large

    then PairRMJudge("~/models/PairRM", backbone_dir="~/models/deberta-v3-large").

    How llm-blender 0.0.2 loads a local folder (blender.py: Blender.loadranker):
      ranker_dir/config.json      -> RankerConfig (ranker_type "pairranker", model_type
                                     "deberta", model_name "microsoft/deberta-v3-large",
                                     source/candidate max lengths 1224/412, ...)
      model_name                  -> AutoTokenizer/AutoModel.from_pretrained(model_name):
                                     the backbone is fetched BY HUB NAME. We pass
                                     model_name=backbone_dir to point it at a local
                                     folder (loadranker copies extra kwargs onto the config).
                                     Without backbone_dir, the name must already be in the
                                     Hugging Face cache (set HF_HUB_OFFLINE=1 to stay offline).
      ranker_dir/pytorch_model.bin or model.safetensors
                                  -> full ranker state dict, loaded over the backbone.
    Careful: llm-blender picks tokenizer quirks by substring of model_name, so a backbone
    path containing "phi", "llama" or "alpaca" would be mis-handled; we refuse such paths.

    Prompts: the reference SPPO rank.py feeds PairRM the prompt rendered with the
    policy's chat template. Pass rendered strings, or raw ones plus render=fn.

    mode="scores"   (the paper's) s = blender.rank(..., return_scores=True), i.e.
                    s_i = mean_j (C[i][j] - C[j][i]), P[i][j] = sigmoid(s_i - s_j).
    mode="pairwise" C[i][j] = PairRM logit that y_i beats y_j with y_i shown first,
                    P[i][j] = sigmoid((C[i][j] - C[j][i]) / 2)  (position-debiased).
    batch_size: comparison rows per forward (K (K - 1) rows per prompt).
    """

    def __init__(self, ranker_dir, mode="scores", batch_size=8, device=None, backbone_dir=None,
                 render: Callable[[str], str] | None = None):
        import llm_blender  # heavy (~4 s), so only imported when this judge is used
        import torch
        from llm_blender.blender.config import BlenderConfig

        if mode not in ("scores", "pairwise"):
            raise ValueError(f"mode must be 'scores' or 'pairwise', got {mode!r}")
        problem = pairrm_paths_problem(ranker_dir, backbone_dir)
        if problem:
            raise ValueError(problem)
        ranker_dir, kwargs = os.path.expanduser(str(ranker_dir)), {}
        if backbone_dir is not None:
            kwargs["model_name"] = os.path.abspath(os.path.expanduser(str(backbone_dir)))
        self.mode, self.batch_size, self.render = mode, batch_size, render
        # llm-blender runs the ranker in fp16 only for the device string "cuda" (not "cuda:1"):
        # it gets "cuda", and card N is made the current one while it loads and judges.
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device, self.card = dev.type, dev.index if dev.type == "cuda" else None
        with self.on_card():
            self.blender = llm_blender.Blender(BlenderConfig(device=self.device, use_tqdm=False))
            self.blender.loadranker(ranker_dir, device=self.device, **kwargs)

    def on_card(self):
        import contextlib
        import torch
        return torch.cuda.device(self.card) if self.card is not None and torch.cuda.is_available() else contextlib.nullcontext()

    def __call__(self, prompts, candidates, rows=None):
        with self.on_card():
            return self.judge(prompts, candidates)

    def judge(self, prompts, candidates):
        if self.render is not None:
            prompts = [self.render(p) for p in prompts]
        prompts, candidates = list(prompts), [list(c) for c in candidates]
        k = len(candidates[0])
        assert all(len(c) == k for c in candidates), "PairRM needs the same K for every prompt"
        C = self.comparisons(prompts, candidates)
        if self.mode == "scores":
            # llm-blender's rank() score (get_scores_from_cmps): s_i = mean_j (C[i][j] - C[j][i])
            scores = [(Cn - Cn.T).mean(axis=1) for Cn in C]
            return [prob_matrix(lambda i, j, sn=sn: sigmoid(sn[i] - sn[j]), k) for sn in scores]
        return [prob_matrix(lambda i, j, Cn=Cn: sigmoid((Cn[i, j] - Cn[j, i]) / 2), k) for Cn in C]

    def comparisons(self, prompts, candidates):
        """C[n][i][j] = PairRM's logit that candidates[n][i], shown first, beats candidates[n][j]
        (i != j), what llm-blender's rank() and compare(mode="[A,B]") compute, fed the fast way.

        Each prompt is tokenized by llm-blender's own collator, alone, as rank(batch_size=1) does
        (in a batch of prompts it would cut candidates to a length set by the batch's longest
        prompt, so a prompt's P would depend on its neighbours). Each ordered pair is then one
        row, [source][candidate 1][candidate 2] as CrossCompareReranker._forward lays it out; the
        rows of the whole call are sorted by length and run batch_size at a time, padded at the end
        only to their batch's longest (a padded key gets no attention weight; DeBERTa's relative
        positions do not depend on the row's length), so batching changes nothing but rounding.
        On CUDA the ranker runs in half precision: fp16 where llm-blender halved it, bf16 autocast otherwise."""
        import torch
        ranker, collate = self.blender.ranker, self.blender.ranker_collator
        tok = ranker.tokenizer
        rows = []  # (n, i, j, token ids, positions of the source's and both candidates' prefixes)
        for n, (prompt, cands) in enumerate(zip(prompts, candidates)):
            b = collate([{"index": 0, "source": prompt, "candidates": cands}])
            src = real_tokens(b["source_ids"][0], ranker.sep_token_id)
            cand = [real_tokens(c, ranker.sep_token_id) for c in b["candidate_ids"][0]]
            for i in range(len(cands)):
                for j in range(len(cands)):
                    if i != j:
                        one = [tok.cand1_prefix_id if t == tok.cand_prefix_id else t for t in cand[i]]
                        two = [tok.cand2_prefix_id if t == tok.cand_prefix_id else t for t in cand[j]]
                        at = (src.index(tok.source_prefix_id), len(src) + one.index(tok.cand1_prefix_id),
                              len(src) + len(one) + two.index(tok.cand2_prefix_id))
                        rows.append((n, i, j, src + one + two, at))
        rows.sort(key=lambda r: -len(r[3]))  # longest first: an out-of-memory shows at once
        p = next(ranker.parameters())
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=p.is_cuda and p.dtype == torch.float32)
        C = np.zeros((len(prompts), len(candidates[0]), len(candidates[0])))
        with torch.no_grad(), amp:
            for b in range(0, len(rows), self.batch_size):
                chunk = rows[b:b + self.batch_size]
                T = len(chunk[0][3])
                ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), T), dtype=torch.long)
                for r, (_, _, _, seq, _) in enumerate(chunk):
                    ids[r, :len(seq)] = torch.tensor(seq)
                    mask[r, :len(seq)] = 1
                h = ranker.pretrained_model(input_ids=ids.to(p.device), attention_mask=mask.to(p.device)).last_hidden_state
                at = torch.tensor([r[4] for r in chunk], device=p.device)
                rr = torch.arange(len(chunk), device=p.device)
                left, right, _ = ranker.reduce(h[rr, at[:, 0]], h[rr, at[:, 1]], h[rr, at[:, 2]])
                for (n, i, j, _, _), c in zip(chunk, (left - right).mean(dim=-1).float().cpu().tolist()):
                    C[n, i, j] = c
        return C


def real_tokens(ids, sep_id):
    """A collated row's tokens up to its last separator (what follows is padding), as a list."""
    ids = ids.tolist()
    return ids[:len(ids) - ids[::-1].index(sep_id)]


def pairrm_paths_problem(ranker_dir, backbone_dir=None):
    """Why PairRM cannot load from these folders, or None. llm-blender would try to download a
    missing folder from the hub; and it picks tokenizer quirks by substring of the backbone's
    name, so a path containing "phi", "llama" or "alpaca" would be mis-handled."""
    ranker_dir = os.path.expanduser(str(ranker_dir))
    if not os.path.isdir(ranker_dir):
        return f"--pairrm-dir {ranker_dir}: PairRM folder not found"
    if backbone_dir is not None:
        backbone_dir = os.path.abspath(os.path.expanduser(str(backbone_dir)))
        bad = [s for s in ("phi", "llama", "alpaca", "starling-rm") if s in backbone_dir.lower()]
        if bad:
            return (f"--pairrm-backbone {backbone_dir!r} contains {bad[0]!r}; llm-blender would treat it as "
                    "that model family. Move it to another path.")
        if not os.path.isdir(backbone_dir):
            return f"--pairrm-backbone {backbone_dir}: folder not found"
    return None


# PairRM-shaped rankers with random weights, built on the spot (nothing downloaded), saved as
# the two folders --pairrm-dir and --pairrm-backbone name: "tiny" for the tests, "large" at
# PairRM's real size for bench.py and gpu_check.py (DeBERTa-v3-large's configuration, a
# 128,000-piece vocabulary as deberta-v3's, PairRM's input lengths 1224 / 412).
PAIRRM_SHAPES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, position_buckets=32,
                 initializer_range=0.5,  # peaky attention so content matters
                 pieces=200, source_maxlength=64, candidate_maxlength=32, fp16=False),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  position_buckets=256, initializer_range=0.02, pieces=128_000, source_maxlength=1224,
                  candidate_maxlength=412, fp16=True),
}
PAIRRM_TEXT = """
the river runs past the old mill and the children watch the boats go by in the morning light
a small dog sleeps under the kitchen table while rain taps on the window all afternoon
write a short poem about the sea and the wind and the bright stars over the quiet harbor
please answer the question in a few simple words and do not use any commas at all
bread rises in a warm oven and the whole house smells sweet and safe on a cold day
my friend planted green beans tomatoes and sunflowers in the garden behind the school
the moon is made of rock and dust and it pulls the ocean tides up and down each day
bees carry nectar home to the hive where they turn it into honey for the long winter
start your answer with the word yes and end it with a question for the reader
a good neighbor helps carry heavy bags shares tools and says hello every single morning
trains cross the long bridge at night with their lights shining on the dark water below
learning a new language takes practice patience and a little courage to make mistakes
the museum keeps old maps keys clocks and letters that tell the history of the town
"""


def build_pairrm(root, shape="tiny", seed=0):
    """A random PairRM of PAIRRM_SHAPES[shape] under root: -> (ranker folder, backbone folder).
    The backbone folder holds a DeBERTa-v2 model and its sentencepiece tokenizer, trained here on
    PAIRRM_TEXT (deberta-v3's layout: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, [MASK] added); "large"
    pads the vocabulary to 128,000 pieces that never match (the embedding at its real size).
    The ranker folder holds llm-blender's config.json (model_name the hub's id, as PairRM's: the
    judge's backbone_dir points it here) and the full state dict of llm-blender's own
    CrossCompareReranker, its head drawn with a scale that makes P differ from 1/2."""
    import math
    from pathlib import Path

    import sentencepiece as spm
    import torch
    from llm_blender.blender.blender_utils import load_ranker
    from llm_blender.pair_ranker.config import RankerConfig
    from sentencepiece import sentencepiece_model_pb2
    from transformers import DebertaV2Config, DebertaV2Model, DebertaV2Tokenizer

    z = dict(PAIRRM_SHAPES[shape])
    root = Path(root)
    backbone, ranker = root / "backbone", root / "ranker"
    backbone.mkdir(parents=True, exist_ok=True)
    ranker.mkdir(exist_ok=True)
    lines = PAIRRM_TEXT.strip().split("\n") * 3
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(root / "spm"), vocab_size=200, hard_vocab_limit=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
        unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2)
    if z["pieces"] > 200:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((root / "spm.model").read_bytes())
        for n in range(z["pieces"] - len(proto.pieces)):  # pieces no text here contains, scored to lose
            proto.pieces.add(piece=f"\u2581\u00b6{n:06d}", score=-1e4)
        (root / "spm.model").write_bytes(proto.SerializeToString())
    tok = DebertaV2Tokenizer(vocab_file=str(root / "spm.model"))
    tok.save_pretrained(backbone)
    torch.manual_seed(seed)
    cfg = DebertaV2Config(vocab_size=len(tok), hidden_size=z["hidden_size"], num_hidden_layers=z["num_hidden_layers"],
                          num_attention_heads=z["num_attention_heads"], intermediate_size=z["intermediate_size"],
                          max_position_embeddings=512, relative_attention=True, position_buckets=z["position_buckets"],
                          pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                          position_biased_input=False, pad_token_id=0, type_vocab_size=0, layer_norm_eps=1e-7,
                          initializer_range=z["initializer_range"])
    DebertaV2Model(cfg).save_pretrained(backbone)
    config = {"ranker_type": "pairranker", "model_type": "deberta", "model_name": str(backbone),
              "source_maxlength": z["source_maxlength"], "candidate_maxlength": z["candidate_maxlength"], "n_tasks": 1,
              "drop_out": 0.05, "inference_mode": "bubble", "fp16": z["fp16"], "device": "cpu"}
    model, _, _ = load_ranker(RankerConfig.from_dict(config))
    with torch.no_grad():  # default init gives scores ~1e-6, all P ~ 0.5: scale the head up
        for p in model.head_layer.parameters():
            p.normal_(0.0, 2.0 / math.sqrt(p.shape[-1]))
    torch.save(model.state_dict(), ranker / "pytorch_model.bin")
    (ranker / "config.json").write_text(json.dumps({**config, "model_name": "microsoft/deberta-v3-large"}))
    return ranker, backbone


# -----------------------------------------------------------------------------
# 3. a local causal LM as judge

JUDGE_TEMPLATE = """You are judging two responses to the same instruction.

Instruction:
{instruction}

Response A:
{a}

Response B:
{b}

Which response follows the instruction better and is more helpful? Answer with a single letter: A or B."""


class LLMJudge:
    """P(A better) = softmax over the next-token logits of the verdict tokens "A" and
    "B", read right after the chat template's assistant prompt. Small models pick
    "A" far more often whatever the content, so each pair is judged in both orders:
        P[i][j] = (pA(i, j) + pB(j, i)) / 2,  pA(i, j): y_i shown as A.
    The bias term cancels and P + P.T = 1 holds by construction.

    model(idx, attn_mask=mask) -> logits (B, T, V), idx left-padded, mask True on
    real tokens; tokenizer has encode(text), encode_chat(messages,
    add_generation_prompt=True) and pad_id (our model.py / data.py).
    The instruction shown to the judge is rows[n]["prompt"] (the raw text) when rows
    are given, else prompts[n]: callers may pass chat-rendered prompts for PairRM's
    sake, and a rendered prompt pasted inside another chat turn would confuse the judge."""

    def __init__(self, model, tokenizer, batch_size=8, template=JUDGE_TEMPLATE, max_response_chars=2000):
        self.model, self.tok = model, tokenizer
        self.batch_size, self.template, self.max_chars = batch_size, template, max_response_chars
        # last id: robust to a tokenizer that prepends BOS
        self.a_id, self.b_id = tokenizer.encode("A")[-1], tokenizer.encode("B")[-1]
        assert self.a_id != self.b_id, "verdict tokens 'A' and 'B' must differ"
        # our Transformer can skip the (B, T, vocab) logits we don't read: 16 x 500 x 49k floats
        self.kw = {"last_only": True} if "last_only" in inspect.signature(model.forward).parameters else {}

    def prob_first(self, texts: list[str]) -> np.ndarray:
        """P("A") for each judging message (the user turn), batched with left padding."""
        import torch

        seqs = [self.tok.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True)
                for t in texts]
        device = next(self.model.parameters()).device
        out = np.zeros(len(seqs))
        order = sorted(range(len(seqs)), key=lambda n: len(seqs[n]))  # similar lengths share a batch
        with torch.no_grad():
            for b in range(0, len(order), self.batch_size):
                chunk = order[b:b + self.batch_size]
                T = max(len(seqs[n]) for n in chunk)
                idx = torch.full((len(chunk), T), self.tok.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), T), dtype=torch.bool)
                for r, n in enumerate(chunk):
                    idx[r, T - len(seqs[n]):] = torch.tensor(seqs[n])
                    mask[r, T - len(seqs[n]):] = True
                logits = self.model(idx.to(device), attn_mask=mask.to(device), **self.kw)[:, -1, :]
                ab = logits[:, [self.a_id, self.b_id]].double()
                out[chunk] = torch.softmax(ab, dim=-1)[:, 0].cpu().numpy()
        return out

    def __call__(self, prompts, candidates, rows=None):
        cut = lambda s: s[:self.max_chars]
        if rows is not None:
            prompts = [r["prompt"] if isinstance(r.get("prompt"), str) else p for r, p in zip(rows, prompts)]
        jobs, texts = [], []
        for n, (prompt, cands) in enumerate(zip(prompts, candidates)):
            for i in range(len(cands)):
                for j in range(len(cands)):
                    if i != j:
                        jobs.append((n, i, j))
                        texts.append(self.template.format(instruction=prompt, a=cut(cands[i]), b=cut(cands[j])))
        pa = dict(zip(jobs, self.prob_first(texts)))
        # pB(j, i) = 1 - pA(j, i)
        return [prob_matrix(lambda i, j: (pa[n, i, j] + 1.0 - pa[n, j, i]) / 2, len(c))
                for n, c in enumerate(candidates)]


# -----------------------------------------------------------------------------


def win_rates(judge, prompts, new, old, rows, batch_size, on_batch=None):
    """P(new[i] beats old[i]) for each prompt, judged in both orders (to cancel position bias)
    and averaged, batch_size prompts per call; on_batch() after each batch (progress, resume points)."""
    wins = []
    for i in range(0, len(prompts), batch_size):
        sl = slice(i, i + batch_size)
        p1 = judge(prompts[sl], [[a, b] for a, b in zip(new[sl], old[sl])], rows[sl])
        p2 = judge(prompts[sl], [[b, a] for a, b in zip(new[sl], old[sl])], rows[sl])
        wins += [(P[0][1] + Q[1][0]) / 2 for P, Q in zip(p1, p2)]
        if on_batch:
            on_batch()
    return wins


def make_judge(name: str, **opts):
    """make_judge("verifiable", tau=0.1)
    make_judge("pairrm", ranker_dir=..., backbone_dir=..., mode="scores")
    make_judge("llm", model_dir=..., device="cpu")  or  make_judge("llm", model=m, tokenizer=t)"""
    if name == "verifiable":
        return VerifiableJudge(**opts)
    if name == "pairrm":
        return PairRMJudge(**opts)
    if name == "llm":
        if "model" not in opts:
            import torch

            import data
            import model as model_lib
            from machinery import kernels
            path = opts.pop("model_dir")
            dtype, device = opts.pop("dtype", torch.float32), opts.pop("device", "cpu")
            opts["model"] = kernels.use_onednn(model_lib.load_model(path, dtype=dtype, device=device))
            opts["tokenizer"] = data.Tokenizer.from_dir(path)
        return LLMJudge(**opts)
    raise ValueError(f"unknown judge {name!r}; choose 'verifiable', 'pairrm' or 'llm'")
