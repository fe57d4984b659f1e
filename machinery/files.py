"""files.py: how every file of a run is written and read back.

- Atomically: a file or a whole folder is written beside its final name and renamed into
  place (`atomic`), so a reader, or a run resumed after a kill, sees the old version or the
  new one, never half of one. One helper for JSON, JSONL, torch checkpoints, plots, merged
  models, adapters and the converted embedded model. What it writes follows the umask, as a
  plain open() does, whatever the library that wrote it (`follow_umask`).
- Appended: stages that save as they go append whole JSON lines and fsync (`append_jsonl`);
  after a kill, `read_jsonl_tolerant` drops the one torn last line and the stage goes on.
- Read back with `file:line` in every error (`DataError`).

Ground floor: imports nothing of this project.
"""
import contextlib
import json
import os
import shutil
from pathlib import Path


class DataError(ValueError):
    """A bad input file. The message is one line: file, line (or row), field."""


def decode(path, raw):
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate a leading BOM from Windows editors
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None


def json_lines(path, text):
    """-> (line number, object) per non-blank line; blank lines (a trailing newline) are fine."""
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: bad JSON ({e.msg} at column {e.colno})") from None


# ----------------------------------------------------------------------------- atomic writes

def _fsync(path):
    # make the data, or a rename inside a directory, durable (POSIX); harmless to skip where a
    # directory cannot be opened
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic(path, folder=False):
    """Yield a temporary path beside `path` (a file, or with folder=True an empty folder) to
    write; when the block ends it replaces `path` in one rename. If the block fails, the
    temporary goes and `path` is as it was. The temporary's name holds ".tmp" so that a run
    killed mid-write can find and remove it (runs.remove_leftovers); it is in the same folder
    because a rename is only atomic within one filesystem."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    remove(tmp)
    if folder:
        tmp.mkdir(parents=True)
    else:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        follow_umask(tmp)
        if folder:
            remove(path)  # an older or partial version: the rename needs the name free
        else:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    _fsync(path.parent)


def umask():
    """The process's umask. Linux shows it in /proc (reading it there changes nothing); elsewhere
    the only way is to set it and put it back."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def follow_umask(path):
    """Give a written file, or every file of a written folder, the mode a plain open() gives
    under the umask (0644 under 0022). safetensors creates its files 0600 whatever the umask
    (requirements.txt pins the version this was seen with): a vLLM server or a colleague on the
    same machine could read every artifact of a run but not its weights."""
    mode = 0o666 & ~umask()
    for p in [path] if path.is_file() else [q for q in path.rglob("*") if q.is_file() and not q.is_symlink()]:
        os.chmod(p, mode)


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


def _dumps(row):
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_text(path, text):
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path, rows):
    write_text(path, "".join(_dumps(r) for r in rows))


def write_json(path, obj):
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def save_torch(path, obj):
    import torch
    with atomic(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------- JSON lines

def read_jsonl(path):
    with open(path, "rb") as f:
        return [obj for _, obj in json_lines(path, decode(path, f.read()))]


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
    return [obj for _, obj in json_lines(path, decode(path, head))]


def done_ids(path):
    """ids already written to a resumable JSONL stage (skip these when resuming)."""
    return {r["id"] for r in read_jsonl_tolerant(path)}
