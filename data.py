"""
Data plumbing for SPPO: the tokenizer + chat template, prompt files (and prompts too long for
training), and token ids as the tensors that scoring and training run (a pair as one row). From
a K x K preference matrix to a (chosen, rejected) pair is the SPPO maths, in sppo.py.

Ground floor: imports only files.py (reading JSON lines with file:line errors).
"""

import functools
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from datetime import datetime

import jinja2
import tokenizers
import torch
import torch.nn.functional as F
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from machinery.files import DataError, decode, json_lines


# -----------------------------------------------------------------------------
# Tokenizer + chat template

# the special-token names transformers passes to chat templates as variables
SPECIAL_TOKEN_NAMES = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]


def _read_json(path, default=None):
    """A JSON object from a tokenizer or model file, or default when there is no such file. A
    file that is there but unreadable, not UTF-8, not JSON or not an object is a DataError
    naming it (and the line)."""
    if not os.path.exists(path):
        return default
    try:
        with open(path, "rb") as f:
            text = decode(path, f.read())
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _token_str(v, file, field):
    # tokenizer_config.json stores a token either as "<s>" or as {"content": "<s>", "lstrip": ..., ...}
    s = v.get("content") if isinstance(v, dict) else v
    if v is not None and not isinstance(s, str):
        raise DataError(f"{file}: field {field!r} must be a token string or {{'content': str}}, got {v!r}")
    return s


def _id_list(v, file, field):
    # generation_config / config eos_token_id may be an int, a list of ints, or missing
    ids = [] if v is None else [v] if isinstance(v, int) else v
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{file}: field {field!r} must be a token id or a list of token ids, got {v!r}")
    return ids


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
    # Every prompt is rendered with it, so a folder without one, or with one that does not compile,
    # is refused here, naming the file, rather than at the first prompt.
    jinja_file = os.path.join(path, "chat_template.jinja")
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(jinja_file):
        try:
            with open(jinja_file, "rb") as f:
                t, where = decode(jinja_file, f.read()), f"{jinja_file}:"
        except OSError as e:
            raise DataError(f"{jinja_file}: cannot read ({e.strerror or e})") from None
    else:
        t, where = cfg.get("chat_template"), f"{cfg_file}: field 'chat_template', template line "
        if isinstance(t, list):
            if not all(isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("template"), str)
                       for d in t):
                raise DataError(f"{cfg_file}: field 'chat_template' must be a string or a list of "
                                "{'name': str, 'template': str}")
            t = {d["name"]: d["template"] for d in t}.get("default")
        elif t is not None and not isinstance(t, str):
            raise DataError(f"{cfg_file}: field 'chat_template' must be a string, got {type(t).__name__}")
    if not t:
        raise DataError(f"{path}: no chat template (chat_template.jinja, or 'chat_template' in tokenizer_config.json): "
                        "prompts are rendered with the model's own template, so use an instruct/chat model")
    try:
        _compile_template(t)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{where}{e.lineno}: chat template syntax error ({e.message})") from None
    return t, where.rstrip(": ").removesuffix(", template line")


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
        """The tokenizer of a Hugging Face folder. Every file it reads is checked, alone and against
        the others (token ids within config.json's vocab_size, eos ids within range, special tokens
        in the vocabulary); anything wrong is a one-line DataError naming the file and field."""
        path = str(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise DataError(f"{tok_file}: missing (need a Hugging Face fast tokenizer, tokenizer.json)")
        try:
            tok = tokenizers.Tokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises a bare Exception, its message ending "at line L column C"
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            at = re.search(r" at line (\d+) column \d+$", msg)
            raise DataError(f"{tok_file}:{at.group(1) + ':' if at else ''} not a readable tokenizer ({msg})") from None
        cfg_file, map_file = os.path.join(path, "tokenizer_config.json"), os.path.join(path, "special_tokens_map.json")
        gen_file, model_file = os.path.join(path, "generation_config.json"), os.path.join(path, "config.json")
        cfg = _read_json(cfg_file, {})
        old_map = _read_json(map_file, {})  # older repos keep tokens here
        gen_cfg = _read_json(gen_file, {})
        model_cfg = _read_json(model_file, {})

        # tokens declared only in tokenizer_config.json (rare) still have to exist in the vocab
        added = cfg.get("added_tokens_decoder", {})
        if not (isinstance(added, dict) and all(k.isdigit() and isinstance(d, dict) and isinstance(d.get("content"), str)
                                                for k, d in added.items())):
            raise DataError(f"{cfg_file}: field 'added_tokens_decoder' must map token ids to {{'content': str, ...}}")
        for _, d in sorted(added.items(), key=lambda kv: int(kv[0])):
            if tok.token_to_id(d["content"]) is None:
                opts = {k: d[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in d}
                tok.add_tokens([tokenizers.AddedToken(d["content"], special=d.get("special", True), **opts)])

        special, source = {}, {}
        for name in SPECIAL_TOKEN_NAMES:
            file = cfg_file if cfg.get(name) is not None else map_file
            s = _token_str(cfg.get(name, old_map.get(name)), file, name)
            if s:
                special[name], source[name] = s, file
        file = cfg_file if cfg.get("additional_special_tokens") is not None else map_file
        extra = cfg.get("additional_special_tokens", old_map.get("additional_special_tokens")) or []
        if not isinstance(extra, list):
            raise DataError(f"{file}: field 'additional_special_tokens' must be a list, got {type(extra).__name__}")
        extra = [_token_str(t, file, "additional_special_tokens") for t in extra]
        if extra:
            special["additional_special_tokens"] = extra

        def tid(name):
            if name not in special:
                return None
            i = tok.token_to_id(special[name])
            if i is None:  # the tokenizer would split it into pieces: generation would never stop on it
                raise DataError(f"{source[name]}: {name} {special[name]!r} is not a token of {tok_file}")
            return i

        # Every id the model is given must have an embedding row: config.json's vocab_size bounds them.
        ids = tok.get_vocab(with_added_tokens=True)
        top = max(ids.values(), default=-1)
        vocab = model_cfg.get("vocab_size")
        if isinstance(vocab, int) and not isinstance(vocab, bool) and top >= vocab:
            token = next(t for t, i in ids.items() if i == top)
            raise DataError(f"{tok_file}: token {token!r} has id {top}, beyond {model_file}'s vocab_size {vocab}")
        bound = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else top + 1
        gen_eos = []
        for file, c in ((gen_file, gen_cfg), (model_file, model_cfg)):
            for i in _id_list(c.get("eos_token_id"), file, "eos_token_id"):
                if not 0 <= i < bound:
                    raise DataError(f"{file}: eos_token_id {i} is out of range (the vocabulary has ids 0-{bound - 1})")
                gen_eos.append(i)

        bos_id = tid("bos_token")
        eos_id = tid("eos_token")
        if eos_id is None:
            if not gen_eos:
                raise DataError(f"{path}: no eos token in tokenizer_config.json, generation_config.json or config.json")
            eos_id = gen_eos[0]
        pad_id = tid("pad_token")
        pad_id = eos_id if pad_id is None else pad_id
        stop_ids = sorted(set([eos_id] + gen_eos))

        # Does the tokenizer itself put BOS in front (post-processor), e.g. Llama-3, Mistral; SmolLM2 doesn't.
        # An explicit add_bos_token in the config is the model author's word and wins.
        with_special = tok.encode("x", add_special_tokens=True).ids
        add_bos = bos_id is not None and with_special[:1] == [bos_id]
        if cfg.get("add_bos_token") is not None and not isinstance(cfg["add_bos_token"], bool):
            raise DataError(f"{cfg_file}: field 'add_bos_token' must be true or false, got {cfg['add_bos_token']!r}")
        add_bos = bool(cfg.get("add_bos_token", add_bos)) and bos_id is not None

        template, source = _load_chat_template(path, cfg)
        out = cls(tok, template, special, bos_id, eos_id, pad_id, stop_ids, add_bos)
        try:  # a template that cannot render one user turn is broken, whatever the prompts
            out.render_chat([{"role": "user", "content": "Hello"}])
        except Exception as e:
            raise DataError(f"{source}: the chat template fails on a one-turn chat "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return out

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


def _read_text(path):
    try:
        with open(path, "rb") as f:
            text = decode(path, f.read())
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise DataError(f"{path}:1: file is empty")
    return text


def _jsonl_records(path):
    for i, obj in json_lines(path, _read_text(path)):
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


PROMPT_FIELDS = ("prompt", "messages", "id", "checks")  # the only columns read from a Parquet file


def _parquet_records(path):
    import pyarrow.parquet as pq  # imported here: only Parquet inputs need pyarrow

    try:
        f = pq.ParquetFile(path)
        names = f.schema_arrow.names
        # only the columns we use: a preference set's chosen/rejected answers can be most of the file
        cols = [c for c in names if c in PROMPT_FIELDS]
        if "prompt" not in cols and "messages" not in cols:
            raise DataError(f"{path}: row 1: missing field 'prompt' (or 'messages'); its columns are "
                            f"{', '.join(names) or 'none'}")
        rows = f.read(columns=cols).to_pylist()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not rows:
        raise DataError(f"{path}: row 1: file has no rows")
    for i, row in enumerate(rows, 1):
        yield f"{path}: row {i}", row


def _messages(value, field, where):
    """A chat as a list of {"role", "content"} ending with the user's turn (the one to answer)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be a list, got {type(value).__name__}")
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: field '{field}[{j}]' must be {{'role': str, 'content': str}}")
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if messages and messages[-1]["role"] != "user":
        raise DataError(f"{where}: field '{field}' must end with a user turn, got '{messages[-1]['role']}'")
    return messages


def _clean_row(raw, where):
    """One input record -> {"id", "prompt", "messages"[, "checks"]}, or None if the prompt is empty."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object, got {type(raw).__name__}")
    # "prompt" wins over "messages": in UltraFeedback-style data "messages" also holds the answer.
    # A "prompt" may itself be a chat: TRL's conversational prompt-only format.
    prompt = raw.get("prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = _messages(prompt, "prompt", where)
    elif prompt is not None:
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    elif raw.get("messages") is not None:
        messages = _messages(raw["messages"], "messages", where)
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


PROMPT_READERS = {".jsonl": _jsonl_records, ".ndjson": _jsonl_records, ".json": _json_records,
                  ".parquet": _parquet_records}


def _split_of(file):
    # a dataset download names its shards <split>-00000-of-00003.parquet
    m = re.match(r"(.+?)-\d+-of-\d+\.parquet$", os.path.basename(file))
    return m.group(1) if m else None


def prompt_files(path):
    """The files a prompt argument names, in the order they are read: a file; a folder of Parquet
    shards, as a dataset download leaves them (its *.parquet files, or else those in its data/
    folder), in name order; or a glob such as 'data/train_prefs-*.parquet'. A folder that holds
    several splits (train-..., test-...) is refused, naming them: mixing them is never wanted."""
    path = str(path)
    if os.path.isdir(path):
        folder = path
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))
        if not files and os.path.isdir(os.path.join(path, "data")):
            folder = os.path.join(path, "data")
            files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))
        if not files:
            raise DataError(f"{path}: a folder with no *.parquet files (nor data/*.parquet); give a .jsonl, "
                            ".json or .parquet file, or a folder of Parquet shards")
        splits = sorted({_split_of(f) or "?" for f in files})
        if len(splits) > 1:
            eg = next((x for x in splits if x.startswith("train")), splits[0])
            raise DataError(f"{folder}: holds the splits {', '.join(splits)}; give one split's files, "
                            f"e.g. '{os.path.join(folder, eg)}-*.parquet'")
        return files
    if not os.path.exists(path) and any(c in path for c in "*?["):
        import glob
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise DataError(f"{path}: matches no file")
        return files
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    return [path]


def load_prompts(path):
    """-> (rows, stats) from a prompt file, a folder of Parquet shards or a glob (prompt_files).
    Drops empty and duplicate prompts (counted in stats); raises DataError on a bad row, and when
    nothing is left."""
    path = str(path)
    files = prompt_files(path)
    for f in files:
        ext = os.path.splitext(f)[1].lower()
        if ext not in PROMPT_READERS:
            raise DataError(f"{f}: unknown prompt file type '{ext}' (want .jsonl, .json or .parquet)")
    rows, seen_text, seen_id = [], set(), {}
    stats = {"rows": 0, "kept": 0, "empty": 0, "duplicate": 0}
    for f in files:
        for where, raw in PROMPT_READERS[os.path.splitext(f)[1].lower()](f):
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
    if not rows:  # nothing to train or evaluate on: say so now, not as an empty stage later
        raise DataError(f"{path}: no prompts left ({stats['rows']} rows: {stats['empty']} empty, "
                        f"{stats['duplicate']} duplicates)")
    stats["kept"] = len(rows)
    return rows, stats


def split_prompts(rows, parts, per_part=0, seed=0):
    """The pool shuffled once (seeded) and cut into `parts` disjoint parts (one per SPPO
    iteration), each cut to its first per_part rows (0 = all)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    out = [rows[i::parts] for i in range(parts)]
    return [p[:per_part] if per_part else p for p in out]


def messages_of(row):
    """A prompt row as chat messages (rows from load_prompts always carry them)."""
    return row.get("messages") or [{"role": "user", "content": row["prompt"]}]


def fit_prompts(rows, tok, max_prompt_len, long_prompts="error"):
    """Prompts longer than max_prompt_len tokens once chat-rendered: an error naming the file
    and line, or (long_prompts "truncate" / "skip") cut or dropped. -> (rows, how many were too long)."""
    out, n = [], 0
    for r in rows:
        try:
            ids = tok.encode_chat(messages_of(r))
        except jinja2.TemplateError as e:  # e.g. Gemma's template refuses a system turn, Mistral's two user turns in a row
            raise DataError(f"{r['where']}: the model's chat template refuses this prompt ({e.message or e})") from None
        if len(ids) <= max_prompt_len:
            out.append(r)
            continue
        n += 1
        if long_prompts == "error":
            raise DataError(f"{r['where']}: prompt is {len(ids)} tokens, more than --max-prompt-len "
                            f"{max_prompt_len}; raise it or pass --long-prompts truncate or skip")
        if long_prompts == "truncate":
            out.append(truncate_prompt(r, tok, max_prompt_len))
    return out, n


def truncate_prompt(r, tok, max_prompt_len):
    """Cut the start of the last user turn until the rendered prompt fits: its end (usually the
    actual request) stays, as training keeps a prompt's end (fit)."""
    text = tok.encode(r["prompt"])
    while True:
        messages = r["messages"][:-1] + [{"role": "user", "content": tok.decode(text)}]
        over = len(tok.encode_chat(messages)) - max_prompt_len
        if over <= 0:
            return dict(r, prompt=messages[-1]["content"], messages=messages, full_prompt=r["prompt"])
        if over >= len(text):
            raise DataError(f"{r['where']}: the chat template and earlier turns alone are longer than "
                            f"--max-prompt-len {max_prompt_len}")
        text = text[over:]


# -----------------------------------------------------------------------------
# Token ids to tensors: what scoring and training run

def pair_tensors(pairs, s, pad_id, device):
    """One row per pair, x y_w y_l, so that the prompt is computed once, not once per response:
    right-padded ids and segment ids (0 prompt and padding, 1 chosen, 2 rejected), which
    data.sequence_logps scores as if each response followed the prompt in a row of its own.
    s: the run's settings (sppo.Settings: max_prompt_len, max_len)."""
    rows, segs = [], []
    for p in pairs:
        (x, y_w), y_l = fit(p["prompt_ids"], p["chosen_ids"], s), fit(p["prompt_ids"], p["rejected_ids"], s)[1]
        rows.append(x + y_w + y_l)
        segs.append([0] * len(x) + [1] * len(y_w) + [2] * len(y_l))
    return padded(rows, pad_id, device), padded(segs, 0, device)


def seq_tensors(prompts, responses, s, pad_id, device):
    """Right-padded prompt + response rows and masks of their response tokens."""
    rows = [fit(x, y, s) for x, y in zip(prompts, responses)]
    return padded([x + y for x, y in rows], pad_id, device), padded([[0] * len(x) + [1] * len(y) for x, y in rows], 0, device).bool()


def fit(prompt, resp, s):
    """Prompt and response cut to --max-prompt-len and --max-len. Too-long prompts keep their
    end (the instruction's last words and the assistant header)."""
    prompt = prompt[-s.max_prompt_len:]
    return prompt, resp[:max(1, s.max_len - len(prompt))]


def padded(rows, value, device):
    T = max(map(len, rows))
    return torch.tensor([r + [value] * (T - len(r)) for r in rows], device=device)


# -----------------------------------------------------------------------------
# Scoring: the log-probability of given responses (sampling's twin, generate.py)

def length_groups(lengths, waste=0.15):
    """Row indices grouped, longest first, so that padding each group to its longest row adds at
    most `waste` of its real tokens: a padded position costs the model as much as a real one.
    Used by prefill and by sequence_logps (pair batches vary threefold in length)."""
    groups = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        g = groups[-1] if groups else []
        if g and (len(g) + 1) * lengths[g[0]] <= (1 + waste) * (sum(lengths[j] for j in g) + lengths[i]):
            g.append(i)
        else:
            groups.append([i])
    return groups


def sequence_logps(model, ids, resp):
    """sum_t log pi(y_t | x, y_<t) over the response tokens of right-padded rows ids (B, T).

    resp (B, T) says which tokens are scored. Bool: True on the one response of each row
    (prompt x then response y) -> (B,). Or integer segment ids for a pair row, x y_w y_l with
    its prompt computed once (data.pair_tensors): 0 on prompt and padding, 1 on y_w, 2 on y_l
    -> (B, 2). y_l attends to x and itself, not to y_w, and its positions restart where y_w's
    began, so each response is scored exactly as in a row of its own (pair_row_layout).
    Rows of one response need no attention mask: causal, no real token sees the right padding.

    Rows run in groups of similar length, each cut to its longest row, so little time goes to
    padding (length_groups). The LM head runs only where a response token is predicted: with a
    49k-128k vocabulary the logits of prompt and padding positions would cost as much as the
    rest of the model. model: a Transformer, or anything with the same forward(ids, head=False,
    attn_mask, pos) and logits(h), e.g. pipeline.GPipe, the micro-batched schedule over split devices."""
    n = 1 if resp.dtype == torch.bool else 2
    seg = resp.long()
    ends = row_ends(seg).clamp(min=1).tolist()
    parts, order = [], []
    for g in length_groups(ends):
        T = ends[g[0]]
        g_ids, g_seg = (ids, seg) if len(g) == len(ends) else (ids[g], seg[g])
        g_ids, g_seg = g_ids[:, :T], g_seg[:, :T]
        prev, kw = pair_row_layout(g_seg) if n == 2 else (torch.arange(-1, T - 1, device=ids.device).expand(len(g), T), {})
        h = model(g_ids, head=False, **kw)
        scored = g_seg > 0
        scored[:, 0] = False  # nothing predicts a row's first token
        b, t = scored.nonzero(as_tuple=True)  # row by row
        b, t, g_ids, g_seg, prev = b.to(h.device), t.to(h.device), g_ids.to(h.device), g_seg.to(h.device), prev.to(h.device)
        logits = model.logits(h[b, prev[b, t]]).float()  # the position that predicts each scored token
        logp = -F.cross_entropy(logits, g_ids[b, t], reduction="none")
        parts.append(torch.zeros(len(g) * n, device=h.device, dtype=logp.dtype).index_add(0, b * n + g_seg[b, t] - 1, logp).view(len(g), n))
        order += g
    out = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.tensor(order, device=parts[0].device).argsort()]
    return out[:, 0] if n == 1 else out


def row_ends(seg):
    """(B,) how far each row of right-padded rows runs: one past its last scored token (0 for none)."""
    return ((seg > 0).long() * torch.arange(1, seg.shape[1] + 1, device=seg.device)).amax(1)


def pair_row_layout(seg):
    """For pair rows x y_w y_l (segment ids 0, 1, 2): which position predicts each token (the one
    before it; y_l's first token: x's last), and the model's positions and (B, 1, T, T) mask:
    causal, except that y_l never sees y_w, and y_l's positions follow x's as in a row of its own."""
    T = seg.shape[1]
    i = torch.arange(T, device=seg.device)
    n_w = (seg == 1).sum(1, keepdim=True)
    x_len = (seg == 1).long().argmax(1, keepdim=True)  # y_w's first token
    pos = i - (seg == 2) * n_w
    prev = torch.where(i == x_len + n_w, x_len - 1, i - 1)
    mask = (i[:, None] >= i[None, :]) & ((seg[:, :, None] != 2) | (seg[:, None, :] != 1))
    return prev, {"attn_mask": mask[:, None], "pos": pos}
