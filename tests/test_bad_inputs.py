"""Every bad input is one line: each file the loader reads (config.json, the safetensors shards and
their index, tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json,
chat_template.jinja, the prompt files), broken one way at a time, through the command line.

Each row breaks one thing in a copy of a valid tiny model folder or prompt file and runs
`sppo.main`; three properties must hold: exactly one line on stderr, `error: ...`, naming the
file (and its line or field where there is one); exit status 2; and the run folder untouched
(absent, since it was absent). A row whose input got past the start-up checks would reach the
sampler, which is replaced by a stand-in that fails the row.

Rows marked xfail(strict=True) are checks that belong in the start-up of sppo.run and are not
made yet; they turn into passes (and strict xfail into a failure, to be unmarked) once they are.
"""
import importlib.util
import json
import shutil
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file

import sppo
from machinery import checks
from tiny import make_tiny_chat_model

PROMPTS = [{"prompt": f"say something short number {i} please", "checks": [{"type": "no_digits"}]} for i in range(4)]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """One valid tiny model and prompt file, copied by every row (building the model takes seconds)."""
    d = tmp_path_factory.mktemp("valid")
    make_tiny_chat_model(d / "model")
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return d


# ----------------------------------------------------------------------------- ways to break a file

def edit_json(file, **changes):
    """Set (or, with None as the value, remove) top-level fields of a JSON file."""
    obj = json.loads(file.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    file.write_text(json.dumps(obj, indent=2))
    return file


def edit_tensors(file, fn):
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def cut(file, keep=0.5):
    raw = file.read_bytes()
    file.write_bytes(raw[:int(len(raw) * keep)])
    return file


def latin1(file):
    """An e-acute in Latin-1 inside the file's first string: not UTF-8 from there on."""
    raw = file.read_bytes()
    at = raw.index(b'"') + 1
    file.write_bytes(raw[:at] + b"\xe9" + raw[at:])
    return file


def shard(m):
    """The single model.safetensors split in two shards with an index, as save_pretrained shards.
    -> (index file, {shard name: [tensor names]})."""
    tensors = load_file(m / "model.safetensors")
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, part in parts.items():
        save_file({n: tensors[n] for n in part}, m / f, metadata={"format": "pt"})
    (m / "model.safetensors").unlink()
    index = m / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: f for f, part in parts.items() for n in part}}))
    return index, parts


def index_moves_a_tensor(m):
    index, parts = shard(m)
    obj = json.loads(index.read_text())
    moved = parts["model-00002-of-00002.safetensors"][0]
    obj["weight_map"][moved] = "model-00001-of-00002.safetensors"  # the index says shard 1; it is in shard 2
    index.write_text(json.dumps(obj))
    return index


def index_names_a_missing_shard(m):
    index, parts = shard(m)
    (m / "model-00002-of-00002.safetensors").unlink()
    return index


def vocab_smaller_than_tokenizer(m):
    """config.json and the embedding agree on 300 rows; the tokenizer still has 320 tokens (a
    tokenizer grown without resizing the embedding): ids 300-319 would index past it."""
    edit_json(m / "config.json", vocab_size=300)
    edit_tensors(m / "model.safetensors", lambda t: t.update(
        {"model.embed_tokens.weight": t["model.embed_tokens.weight"][:300].clone()}))
    return m / "tokenizer.json"


def no_head_dim(m, **changes):
    return edit_json(m / "config.json", head_dim=None, **changes)


def all_empty(p):
    p.write_text('{"prompt": "  "}\n{"messages": []}\n{"prompt": ""}\n')
    return p


def folder_named_jsonl(p):
    p.unlink()
    p.mkdir()
    return p


def write(p, text):
    p.write_text(text)
    return p


def write_raw(p, raw):
    p.write_bytes(raw)
    return p


def write_bytes_head(file):
    raw = file.read_bytes()
    file.write_bytes((10 ** 12).to_bytes(8, "little") + raw[8:])  # a header length past the end of the file
    return file


NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # as Gemma's template refuses one


def several_splits(p):
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = p.parent / "dataset"
    (folder / "data").mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.Table.from_pylist(PROMPTS), folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder / "data"


@dataclass
class Bad:
    id: str
    target: str           # "model" (break the model copy) or "prompts"/"heldout" (break that file)
    breaks: object        # fn(model folder or prompt file) -> the path the message must name
    says: str             # words the message must contain after the path
    flags: dict = field(default_factory=dict)
    xfail: str = ""
    model_too: object = None  # fn(model folder): a change to the (otherwise valid) model the row needs


M = "model"
ROWS = [
    # config.json
    Bad("config_missing", M, lambda m: (m / "config.json").unlink() or m / "config.json", ": missing"),
    Bad("config_syntax", M, lambda m: cut(m / "config.json", 0.5), ": bad JSON"),
    Bad("config_not_utf8", M, lambda m: latin1(m / "config.json"), ":2: not valid UTF-8"),
    Bad("config_not_an_object", M, lambda m: write(m / "config.json", "[1, 2]"), ": expected a JSON object, got list"),
    Bad("config_missing_field", M, lambda m: edit_json(m / "config.json", hidden_size=None),
        ": missing field 'hidden_size'"),
    Bad("config_wrong_type", M, lambda m: edit_json(m / "config.json", num_hidden_layers="2"),
        ": field 'num_hidden_layers' must be a positive integer, got '2'"),
    Bad("config_architectures_a_string", M, lambda m: edit_json(m / "config.json", architectures="LlamaForCausalLM"),
        ": field 'architectures' must be a list of names"),
    Bad("config_hidden_size_not_divisible_by_heads", M, lambda m: no_head_dim(m, num_attention_heads=3),
        ": hidden_size 64 is not divisible by num_attention_heads 3"),
    Bad("config_heads_not_multiple_of_kv_heads", M, lambda m: edit_json(m / "config.json", num_key_value_heads=3),
        ": num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    Bad("config_rope_scaling_incomplete", M,
        lambda m: edit_json(m / "config.json", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        ": missing field 'rope_scaling.low_freq_factor'"),
    Bad("config_contradicts_weights", M, lambda m: edit_json(m / "config.json", hidden_size=32) and m / "model.safetensors",
        ": tensor model.embed_tokens.weight has shape (320, 64), config.json asks for (320, 32)"),
    Bad("config_vocab_smaller_than_tokenizer", M, vocab_smaller_than_tokenizer, " has id 319, beyond "),
    Bad("config_eos_out_of_range", M, lambda m: edit_json(m / "config.json", eos_token_id=5000),
        ": eos_token_id 5000 is out of range (the vocabulary has ids 0-319)"),
    # safetensors shards
    Bad("safetensors_missing", M, lambda m: (m / "model.safetensors").unlink() or m,
        ": no model.safetensors or model.safetensors.index.json"),
    Bad("safetensors_a_folder", M, lambda m: (m / "model.safetensors").unlink() or (m / "model.safetensors").mkdir()
        or m / "model.safetensors", ": not a file"),
    Bad("safetensors_truncated", M, lambda m: cut(m / "model.safetensors", 0.6),
        ": cannot read safetensors header (Error while deserializing header: incomplete metadata"),
    Bad("safetensors_empty", M, lambda m: cut(m / "model.safetensors", 0), ": cannot read safetensors header"),
    Bad("safetensors_header_length_garbage", M, lambda m: write_bytes_head(m / "model.safetensors"),
        ": cannot read safetensors header"),
    Bad("safetensors_tensor_missing", M, lambda m: edit_tensors(m / "model.safetensors",
                                                                lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        ": missing tensor model.layers.1.mlp.up_proj.weight"),
    Bad("safetensors_unexpected_tensor", M, lambda m: edit_tensors(m / "model.safetensors",
                                                                   lambda t: t.update({"model.extra.weight": torch.zeros(3)})),
        ": unexpected tensor model.extra.weight"),
    Bad("safetensors_integer_weights", M, lambda m: edit_tensors(m / "model.safetensors", lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"].to(torch.int8)})), ": tensor model.norm.weight has dtype I8"),
    # the shards' index
    Bad("index_syntax", M, lambda m: cut(shard(m)[0], 0.5), ": bad JSON"),
    Bad("index_without_weight_map", M, lambda m: write(shard(m)[0], '{"metadata": {}}'),
        ": field 'weight_map' must map each tensor name to a shard file name"),
    Bad("index_names_a_missing_shard", M, index_names_a_missing_shard, ": shard model-00002-of-00002.safetensors"),
    Bad("index_puts_a_tensor_in_a_shard_that_lacks_it", M, index_moves_a_tensor,
        ": names tensor model.layers.1.input_layernorm.weight in model-00001-of-00002.safetensors, which does not hold it"),
    # tokenizer files
    Bad("tokenizer_json_missing", M, lambda m: (m / "tokenizer.json").unlink() or m / "tokenizer.json", ": missing"),
    Bad("tokenizer_json_truncated", M, lambda m: cut(m / "tokenizer.json", 0.5), " not a readable tokenizer (EOF"),
    Bad("tokenizer_json_not_utf8", M, lambda m: latin1(m / "tokenizer.json"), " not a readable tokenizer"),
    Bad("tokenizer_config_syntax", M, lambda m: cut(m / "tokenizer_config.json", 0.5), ": bad JSON"),
    Bad("tokenizer_config_eos_wrong_type", M, lambda m: edit_json(m / "tokenizer_config.json", eos_token=2),
        ": field 'eos_token' must be a token string"),
    Bad("tokenizer_config_eos_not_in_vocab", M, lambda m: edit_json(m / "tokenizer_config.json", eos_token="<|end|>"),
        ": eos_token '<|end|>' is not a token of"),
    Bad("tokenizer_config_no_chat_template", M, lambda m: edit_json(m / "tokenizer_config.json", chat_template=None)
        and m, ": no chat template"),
    Bad("tokenizer_config_chat_template_syntax", M, lambda m: edit_json(
        m / "tokenizer_config.json", chat_template="{% for m in messages %}{{ m['content'] }}"),
        ": field 'chat_template', template line 1: chat template syntax error"),
    Bad("tokenizer_config_chat_template_fails_on_one_turn", M, lambda m: edit_json(
        m / "tokenizer_config.json", chat_template="{{ raise_exception('this template is broken') }}"),
        ": field 'chat_template': the chat template fails on a one-turn chat (TemplateError: this template is broken)"),
    Bad("chat_template_jinja_not_utf8", M, lambda m: write_raw(m / "chat_template.jinja", b"{{ messages[0]['content'] }}\xe9"),
        ":1: not valid UTF-8"),
    Bad("special_tokens_map_syntax", M, lambda m: write(m / "special_tokens_map.json", '{"eos_token": "<|im_end|>",'),
        ":1: bad JSON"),
    Bad("special_tokens_map_wrong_type", M, lambda m: edit_json(m / "tokenizer_config.json", pad_token=None) and write(
        m / "special_tokens_map.json", '{"pad_token": ["<|im_end|>"]}'), ": field 'pad_token' must be a token string"),
    Bad("generation_config_syntax", M, lambda m: cut(m / "generation_config.json", 0.5), ": bad JSON"),
    Bad("generation_config_eos_wrong_type", M, lambda m: edit_json(m / "generation_config.json", eos_token_id="2"),
        ": field 'eos_token_id' must be a token id or a list of token ids, got '2'"),
    Bad("generation_config_eos_out_of_range", M, lambda m: edit_json(m / "generation_config.json", eos_token_id=[2, 320]),
        ": eos_token_id 320 is out of range (the vocabulary has ids 0-319)"),
    # prompt files
    Bad("prompts_missing", "prompts", lambda p: p.unlink() or p, ": no such file"),
    Bad("prompts_a_folder_named_jsonl", "prompts", folder_named_jsonl, ": a folder with no *.parquet files"),
    Bad("prompts_bad_json", "prompts", lambda p: cut(p, 0.6), ":3: bad JSON"),
    Bad("prompts_not_utf8", "prompts", lambda p: latin1(p), ":1: not valid UTF-8"),
    Bad("prompts_all_empty", "prompts", all_empty, ": no prompts left (3 rows: 3 empty, 0 duplicates)"),
    Bad("prompts_list_of_strings", "prompts", lambda p: write(p.with_suffix(".json"), '["a", "b"]'),
        ":1: expected an object, got str"),
    Bad("prompts_trl_prompt_ends_with_assistant", "prompts", lambda p: write(p, json.dumps(
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"),
        ":1: field 'prompt' must end with a user turn"),
    Bad("prompts_refused_by_the_chat_template", "prompts", lambda p: write(p, json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}) + "\n"),
        ":1: the model's chat template refuses this prompt (System role not supported)",
        model_too=lambda m: edit_json(m / "tokenizer_config.json", chat_template=NO_SYSTEM)),
    Bad("prompts_parquet_folder_of_several_splits", "prompts", several_splits, ": holds the splits test, train"),
    Bad("heldout_not_parquet", "heldout", lambda p: write_raw(p.with_suffix(".parquet"), b"PAR1 not really"),
        ": not a readable Parquet file"),
    Bad("heldout_all_empty", "heldout", all_empty, ": no prompts left"),
    # checks the start-up makes once the files are read (checks.check_prompts)
    Bad("prompts_unknown_check_type", "prompts", lambda p: write(p, json.dumps(
        {"prompt": "hi", "checks": [{"type": "no_such_check"}]}) + "\n"), ":1: unknown check type 'no_such_check'"),
    Bad("prompts_check_with_a_wrong_parameter", "prompts", lambda p: write(p, json.dumps(
        {"prompt": "hi", "checks": [{"type": "max_words", "words": 5}]}) + "\n"), ":1: check {'type': 'max_words'"),
    Bad("prompts_fewer_than_iters", "prompts", lambda p: write(p, '{"prompt": "only one"}\n'),
        ": 1 prompts for --iters 2: iteration 1 has none", flags={"iters": 2}),
    # bad flags (checks.check_flags): one line naming the flag, before anything is read
    Bad("flag_iters_0", "flag", None, "--iters must be >= 1, got 0", flags={"iters": 0}),
    Bad("flag_iters_negative", "flag", None, "--iters must be >= 1, got -1", flags={"iters": -1}),
    Bad("flag_k_1", "flag", None, "--k must be >= 2", flags={"k": 1}),
    Bad("flag_lr_negative", "flag", None, "--lr must be > 0, got -1.0", flags={"lr": -1}),
    Bad("flag_eta_negative", "flag", None, "--eta must be > 0, got -5.0", flags={"eta": -5}),
    Bad("flag_top_p_above_1", "flag", None, "--top-p must be in (0, 1], got 1.5", flags={"top-p": 1.5}),
    Bad("flag_top_p_0", "flag", None, "--top-p must be in (0, 1], got 0.0", flags={"top-p": 0}),
    Bad("flag_temperature_negative", "flag", None, "--temperature must be >= 0", flags={"temperature": -0.1}),
    Bad("flag_batch_size_0", "flag", None, "--batch-size must be >= 1, got 0", flags={"batch-size": 0}),
    Bad("flag_gen_batch_0", "flag", None, "--gen-batch must be >= 1, got 0", flags={"gen-batch": 0}),
    Bad("flag_warmup_1", "flag", None, "--warmup must be in [0, 1)", flags={"warmup": 1}),
    Bad("flag_prompt_len_not_below_max_len", "flag", None, "--max-prompt-len (256) must be below --max-len (256)",
        flags={"max-prompt-len": 256, "max-len": 256}),
    Bad("flag_name_is_a_path", "flag", None, "--name must be a plain folder name", flags={"name": "a/b"}),
    Bad("flag_lora_targets_unknown", "flag", None, "--lora-targets must be a comma-separated subset",
        flags={"lora-targets": "q_proj,qkv"}),
    Bad("flag_beta_with_sppo_loss", "flag", None, "--beta is not used by --loss sppo (its strength is --eta)",
        flags={"beta": 0.5}),
    Bad("flag_device_tpu", "flag", None, "--device: 'tpu' is not", flags={"device": "tpu"}),
    Bad("flag_devices_banana", "flag", None, "--devices: 'banana' is not a device", flags={"devices": "cpu,banana"}),
    Bad("flag_devices_cards_not_there", "flag", None, "asked for, but",  # no CUDA here; elsewhere no 10th card
        flags={"devices": "cuda:0,cuda:9"}),
    Bad("flag_pairrm_without_dir", "flag", None, "--judge pairrm needs --pairrm-dir", flags={"judge": "pairrm"}),
    Bad("flag_pairrm_dir_missing", "flag", None, "PairRM folder not found",
        flags={"judge": "pairrm", "pairrm-dir": "/nonexistent/PairRM"}),
    Bad("flag_pairrm_backbone_under_llama", "flag", None, "contains 'llama'; llm-blender would treat it as",
        flags={"judge": "pairrm", "pairrm-dir": "/", "pairrm-backbone": "/models/llama-stuff/deberta"}),
    Bad("flag_report_to_wandb_without_wandb", "flag", None, "--report-to wandb: wandb is not installed (pip install wandb",
        flags={"report-to": "wandb"}, xfail="" if importlib.util.find_spec("wandb") is None else "wandb is installed here"),
    Bad("flag_judge_llm_without_model", "flag", None, "--judge llm needs --judge-model", flags={"judge": "llm"}),
    Bad("flag_judge_model_not_a_model", "flag", None, "--judge-model /: no config.json there",
        flags={"judge": "llm", "judge-model": "/"}),
]


def argv(model, prompts, heldout, runs, **flags):
    a = {"model": model, "prompts": prompts, "heldout": heldout, "runs-dir": runs, "name": "r", "iters": 1, "k": 2,
         "max-new-tokens": 4, "device": "cpu", "lora-r": 4, **flags}
    return [x for k, v in a.items() for x in (f"--{k}", str(v))]


class StartedRunning(Exception):
    """The stand-in sampler was reached: the bad input got past every start-up check."""


def run_bad(row, valid, tmp_path, capsys, monkeypatch, runs):
    model, prompts = tmp_path / "model", tmp_path / "prompts.jsonl"
    shutil.copytree(valid / "model", model)
    shutil.copy(valid / "prompts.jsonl", prompts)
    heldout = prompts
    named = None
    if row.model_too:
        row.model_too(model)
    if row.target == "model":
        named = row.breaks(model)
    elif row.target in ("prompts", "heldout"):
        bad = tmp_path / "bad.jsonl"
        shutil.copy(prompts, bad)
        named = row.breaks(bad)
        prompts, heldout = (named, prompts) if row.target == "prompts" else (prompts, named)

    def stand_in(*a, **k):
        raise StartedRunning("the run started: this input got past the start-up checks")

    monkeypatch.setattr(sppo, "sample", stand_in)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sppo.main(argv(model, prompts, heldout, runs, **row.flags))
    err = capsys.readouterr().err
    return e.value.code, err, named


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else [])
                                 for r in ROWS])
def test_bad_input_is_one_line_naming_the_file_exit_2_and_nothing_written(row, valid, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    code, err, named = run_bad(row, valid, tmp_path, capsys, monkeypatch, runs)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    line = lines[0]
    where = f"error: {named}" if named is not None else "error: "
    assert line.startswith(where) and row.says in line[len(where):], (line, where, row.says)
    assert code == 2
    assert not runs.exists(), "a bad input must leave no run folder behind"


def test_bad_input_leaves_an_existing_run_folder_as_it_was(valid, tmp_path, capsys, monkeypatch):
    """The same three properties when the run folder already exists (a run being resumed with a
    file that went bad since): not a byte of it changes."""
    runs = tmp_path / "runs"
    (runs / "r" / "iter0").mkdir(parents=True)
    (runs / "r" / "settings.json").write_text('{"k": 2}\n')
    (runs / "r" / "iter0" / "responses.partial.jsonl").write_text('{"id": "a"}\n{"id": "b"')  # a torn line
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    by_id = {r.id: r for r in ROWS}
    for rid in ("config_contradicts_weights", "tokenizer_config_eos_not_in_vocab", "prompts_all_empty"):
        case = tmp_path / rid
        case.mkdir()
        code, err, named = run_bad(by_id[rid], valid, case, capsys, monkeypatch, runs)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {named}"), err
        assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before, rid


# ----------------------------------------------------------------------------- checks.check_flags

def test_check_flags_refuses_the_strength_of_the_other_loss():
    """--beta means nothing to the SPPO losses (their strength is --eta) and --eta nothing to
    dpo/ipo: a non-default value is an error naming both flags; defaults and the loss's own
    strength pass."""
    ok = [sppo.Settings(), sppo.Settings(eta=1000.0), sppo.Settings(loss="sppo_single", eta=3.0),
          sppo.Settings(loss="dpo", beta=0.5), sppo.Settings(loss="ipo", beta=0.01)]
    for s in ok:
        assert checks.check_flags(s) is None
    for s, msg in ((sppo.Settings(beta=0.5), "--beta is not used by --loss sppo (its strength is --eta)"),
                   (sppo.Settings(loss="sppo_single", beta=0.01), "--beta is not used by --loss sppo_single (its strength is --eta)"),
                   (sppo.Settings(loss="dpo", eta=10.0), "--eta is not used by --loss dpo (its strength is --beta)"),
                   (sppo.Settings(loss="ipo", eta=1000.0), "--eta is not used by --loss ipo (its strength is --beta)")):
        with pytest.raises(ValueError) as e:
            checks.check_flags(s)
        assert str(e.value) == msg and isinstance(e.value, checks.FlagError)
