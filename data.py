"""
Data plumbing for SPPO: the tokenizer + chat template, prompt files, JSONL
artifacts, and turning a K x K preference matrix into one (chosen, rejected) pair.

Ground-floor module: imports nothing else from this project.
"""

import functools
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime

import jinja2
import numpy as np
import tokenizers
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class DataError(ValueError):
    """A bad input file. The message is one line: file, line (or row), field."""


# -----------------------------------------------------------------------------
# Tokenizer + chat template

# the special-token names transformers passes to chat templates as variables
SPECIAL_TOKEN_NAMES = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]


def _read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(v):
    # tokenizer_config.json stores a token either as "<s>" or as {"content": "<s>", "lstrip": ..., ...}
    return v.get("content") if isinstance(v, dict) else v


def _id_list(v):
    # generation_config / config eos_token_id may be an int, a list of ints, or missing
    if v is None:
        return []
    return [v] if isinstance(v, int) else list(v)


class _GenerationTag(Extension):
    # Some templates mark assistant text with {% generation %}...{% endgeneration %} (transformers
    # uses it for assistant masks). We only render, so the tag just outputs its body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes '<', '>', '&'; chat templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile_template(source):
    # Same environment as transformers' apply_chat_template, so templates render byte-identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _load_chat_template(path, cfg):
    # Newer checkpoints keep the template in chat_template.jinja, which wins over tokenizer_config.json
    # (as in transformers). A config may also hold a list of named templates; we want "default".
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    t = cfg.get("chat_template")
    if isinstance(t, list):
        t = {d["name"]: d["template"] for d in t}.get("default")
    return t


@dataclass
class Tokenizer:
    tok: tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: dict  # template variables: bos_token, eos_token, ... as strings
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: list  # generation stops on any of these
    add_bos: bool  # does this model's input start with BOS?

    @classmethod
    def from_dir(cls, path):
        tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"), {})
        old_map = _read_json(os.path.join(path, "special_tokens_map.json"), {})  # older repos keep tokens here
        gen_cfg = _read_json(os.path.join(path, "generation_config.json"), {})
        model_cfg = _read_json(os.path.join(path, "config.json"), {})

        # tokens declared only in tokenizer_config.json (rare) still have to exist in the vocab
        for _, d in sorted(cfg.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if tok.token_to_id(d["content"]) is None:
                opts = {k: d[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in d}
                tok.add_tokens([tokenizers.AddedToken(d["content"], special=d.get("special", True), **opts)])

        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            s = _token_str(cfg.get(name, old_map.get(name)))
            if s:
                special[name] = s
        extra = cfg.get("additional_special_tokens", old_map.get("additional_special_tokens")) or []
        extra = [_token_str(t) for t in extra]
        if extra:
            special["additional_special_tokens"] = extra

        def tid(name):
            return tok.token_to_id(special[name]) if name in special else None

        bos_id = tid("bos_token")
        gen_eos = _id_list(gen_cfg.get("eos_token_id")) + _id_list(model_cfg.get("eos_token_id"))
        eos_id = tid("eos_token")
        if eos_id is None:
            if not gen_eos:
                raise ValueError(f"{path}: no eos token in tokenizer_config, generation_config or config.json")
            eos_id = gen_eos[0]
        pad_id = tid("pad_token")
        pad_id = eos_id if pad_id is None else pad_id
        stop_ids = sorted(set([eos_id] + gen_eos))

        # Does the tokenizer itself put BOS in front (post-processor), e.g. Llama-3, Mistral; SmolLM2 doesn't.
        # An explicit add_bos_token in the config is the model author's word and wins.
        with_special = tok.encode("x", add_special_tokens=True).ids
        add_bos = bos_id is not None and with_special[:1] == [bos_id]
        add_bos = bool(cfg.get("add_bos_token", add_bos)) and bos_id is not None

        return cls(tok, _load_chat_template(path, cfg), special, bos_id, eos_id, pad_id, stop_ids, add_bos)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        # no BOS/EOS: callers add those deliberately (see encode_chat)
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages, add_generation_prompt=True):
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template")
        # tools/documents=None must be passed explicitly: templates test `tools is not none`,
        # and an undefined variable is "not none" in jinja.
        template = _compile_template(self.chat_template)
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def encode_chat(self, messages, add_generation_prompt=True):
        # The template already writes BOS where the model wants one (Llama-3, Mistral), so we tokenize
        # WITHOUT the post-processor; with it, Llama-3 gets <|begin_of_text|> twice.
        ids = self.encode(self.render_chat(messages, add_generation_prompt))
        if self.add_bos:
            while ids[:2] == [self.bos_id, self.bos_id]:
                ids = ids[1:]
            if ids[:1] != [self.bos_id]:  # a template that forgot BOS for a model trained with it
                ids = [self.bos_id] + ids
        return ids


# -----------------------------------------------------------------------------
# Prompt files: JSONL, JSON (a list of objects), Parquet


def prompt_id(key):
    # short and stable across runs and machines (unlike hash()), so resumed stages line up by id
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _decode(path, raw):
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate a leading BOM from Windows editors
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None


def _read_text(path):
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    if not text.strip():
        raise DataError(f"{path}:1: file is empty")
    return text


def _json_lines(path, text):
    # -> (line number, object) per non-blank line; blank lines (a trailing newline) are fine
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: bad JSON ({e.msg} at column {e.colno})") from None


def _jsonl_records(path):
    for i, obj in _json_lines(path, _read_text(path)):
        yield f"{path}:{i}", obj


def _json_records(path):
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of objects, got {type(data).__name__}")
    # json.loads forgets positions; walk the list again to report each element's line number
    decoder, skip, pos, line = json.JSONDecoder(), re.compile(r"[\s,]*"), text.index("[") + 1, 1
    for item in data:
        start = skip.match(text, pos).end()
        line += text.count("\n", pos, start)
        yield f"{path}:{line}", item
        _, end = decoder.raw_decode(text, start)
        line += text.count("\n", start, end)
        pos = end


def _parquet_records(path):
    import pyarrow.parquet as pq  # imported here: only Parquet inputs need pyarrow

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not rows:
        raise DataError(f"{path}: row 1: file has no rows")
    for i, row in enumerate(rows, 1):
        yield f"{path}: row {i}", row


def _clean_row(raw, where):
    """One input record -> {"id", "prompt", "messages"[, "checks"]}, or None if the prompt is empty."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    # "prompt" wins over "messages": in UltraFeedback-style data "messages" also holds the answer
    if raw.get("prompt") is not None:
        if not isinstance(raw["prompt"], str):
            raise DataError(f"{where}: field 'prompt' must be a string, got {type(raw['prompt']).__name__}")
        messages = [{"role": "user", "content": raw["prompt"]}]
    elif raw.get("messages") is not None:
        messages = raw["messages"]
        if not isinstance(messages, list):
            raise DataError(f"{where}: field 'messages' must be a list, got {type(messages).__name__}")
        for j, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: field 'messages[{j}]' must be {{'role': str, 'content': str}}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages and messages[-1]["role"] != "user":
            raise DataError(f"{where}: field 'messages' must end with a user turn, got '{messages[-1]['role']}'")
    else:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages')")
    if not messages or not messages[-1]["content"].strip():
        return None
    row = {"id": None, "prompt": messages[-1]["content"], "messages": messages}
    if raw.get("id") is not None:
        if isinstance(raw["id"], bool) or not isinstance(raw["id"], (str, int)) or raw["id"] == "":
            raise DataError(f"{where}: field 'id' must be a non-empty string or int, got {raw['id']!r}")
        row["id"] = str(raw["id"])
    if raw.get("checks") is not None:
        if not isinstance(raw["checks"], list):
            raise DataError(f"{where}: field 'checks' must be a list, got {type(raw['checks']).__name__}")
        row["checks"] = raw["checks"]
    return row


def load_prompts(path):
    """-> (rows, stats). Drops empty and duplicate prompts (counted in stats); raises DataError on a bad row."""
    path = str(path)
    ext = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _jsonl_records, ".ndjson": _jsonl_records, ".json": _json_records,
               ".parquet": _parquet_records}
    if ext not in readers:
        raise DataError(f"{path}: unknown prompt file type '{ext}' (want .jsonl, .json or .parquet)")
    rows, seen_text, seen_id = [], set(), {}
    stats = {"rows": 0, "kept": 0, "empty": 0, "duplicate": 0}
    for where, raw in readers[ext](path):
        stats["rows"] += 1
        row = _clean_row(raw, where)
        if row is None:
            stats["empty"] += 1
            continue
        # one canonical text per conversation: a plain prompt and [{"user": prompt}] are the same thing
        m = row["messages"]
        plain = len(m) == 1 and m[0]["role"] == "user"
        key = m[0]["content"] if plain else json.dumps(m, ensure_ascii=False, sort_keys=True)
        if key in seen_text:
            stats["duplicate"] += 1
            continue
        row["id"] = row["id"] or prompt_id(key)
        if row["id"] in seen_id:  # same id, different prompt: resuming by id would silently mix them up
            raise DataError(f"{where}: field 'id' {row['id']!r} already used at {seen_id[row['id']]}")
        seen_text.add(key)
        seen_id[row["id"]] = where
        row["where"] = where  # file:line, for errors found later (e.g. a prompt too long)
        rows.append(row)
    stats["kept"] = len(rows)
    return rows, stats


# -----------------------------------------------------------------------------
# Artifacts: atomic whole-file writes, and append-only JSONL for resumable stages


def _fsync_dir(dirname):
    # make the rename itself durable (POSIX); harmless to skip where directories can't be opened
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write_fn):
    # temp file in the same directory (os.replace is only atomic within one filesystem), fsync, rename:
    # readers see the old file or the new one, never half of one.
    path = os.fspath(path)
    dirname = os.path.dirname(os.path.abspath(path))
    os.makedirs(dirname, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dirname, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(dirname)


def _dumps(row):
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path, rows):
    _atomic_write(path, lambda f: f.writelines(_dumps(r) for r in rows))


def write_json(path, obj):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n"))


def read_jsonl(path):
    with open(path, "rb") as f:
        return [obj for _, obj in _json_lines(path, _decode(path, f.read()))]


def _drop_torn_tail(path):
    # A kill mid-write leaves a last line with no "\n". Cut it off, so the next append starts a
    # fresh line instead of gluing onto garbage. Only the tail is read, files can be big.
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                pos = start + nl + 1
                break
            pos = start
        if pos != end:
            f.truncate(pos)


def append_jsonl(path, rows):
    """Append rows and fsync, for stages that save as they go and may be killed."""
    if os.path.exists(path):
        _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(_dumps(r) for r in rows)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_tolerant(path):
    """read_jsonl for a file append_jsonl may have been writing when killed: a missing file is [], and a
    last line without "\\n" is dropped (append_jsonl writes whole lines, so such a line was never finished,
    and append_jsonl will cut it off). A bad line anywhere else is real damage and still raises."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    # everything up to the last "\n" is whole lines; after it is "" or a torn line (maybe a torn UTF-8 char)
    head = raw[: raw.rfind(b"\n") + 1]
    return [obj for _, obj in _json_lines(path, _decode(path, head))]


def done_ids(path):
    """ids already written to a resumable JSONL stage (skip these when resuming)."""
    return {r["id"] for r in read_jsonl_tolerant(path)}


# -----------------------------------------------------------------------------
# SPPO pairs from a K x K win-probability matrix


def build_pair(P):
    """P[i][j] = P(y_i beats y_j), diagonal 0.5. As in the SPPO reference code: chosen = argmax of the
    row means (self term included), rejected = argmin, first index on ties. None if they tie."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 2:
        raise ValueError(f"P must be a K x K matrix with K >= 2, got shape {P.shape}")
    if not np.isfinite(P).all():
        raise ValueError("P has NaN or inf")
    p_hat = P.mean(axis=1)  # estimated win rate of each response against the K samples
    w, l = int(np.argmax(p_hat)), int(np.argmin(p_hat))
    if p_hat[w] - p_hat[l] <= 1e-9:  # best and worst tie (up to float rounding): nothing to prefer
        return None
    return {
        "chosen_idx": w,
        "rejected_idx": l,
        "chosen_probs": float(P[w, l]),
        "chosen_probs_win": float(p_hat[w]),
        "chosen_probs_lose": float(p_hat[l]),
    }


def build_pairs(rows):
    """rows of {"id", "prompt", "responses": [K str], "P": K x K} -> (pairs, stats)."""
    pairs = []
    stats = {"prompts": 0, "pairs": 0, "identical": 0, "tied": 0, "same_text": 0}
    for row in rows:
        stats["prompts"] += 1
        responses = row["responses"]
        if len(responses) != len(row["P"]):
            raise ValueError(f"prompt {row['id']}: {len(responses)} responses but P is {len(row['P'])} x ...")
        # all K samples identical (e.g. greedy-like sampling): any P is judge noise, skip before looking
        if len(set(responses)) == 1:
            stats["identical"] += 1
            continue
        pair = build_pair(row["P"])
        if pair is None:
            stats["tied"] += 1
            continue
        chosen, rejected = responses[pair["chosen_idx"]], responses[pair["rejected_idx"]]
        if chosen == rejected:  # duplicates among the K scored apart: pushing one text both up and down
            stats["same_text"] += 1
            continue
        out = {"id": row["id"], "prompt": row["prompt"], "chosen": chosen, "rejected": rejected, **pair}
        if "messages" in row:  # keep the chat form so the trainer renders the same prompt the sampler saw
            out["messages"] = row["messages"]
        pairs.append(out)
    stats["pairs"] = len(pairs)
    return pairs, stats
