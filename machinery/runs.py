"""runs.py: the run folder's machinery, so that sppo.py can read as the algorithm.

runs/<name>/ holds every artifact of a run, keyed by iteration and stage. What keeps it
trustworthy when a run is killed, resumed, or started with a typo:

- `in_chunks`: a stage that works through rows in chunks (sampling, judging, reference
  scoring) appends each finished chunk, and a resumed run redoes only the unfinished ones.
- `resume_point(stage)`: called each time a stage has saved a point it can resume from; tests
  set SPPO_KILL_AT=<stage>:<n> to SIGKILL the run there and prove that it resumes to the same
  result.
- `lock_run_folder`: one run at a time in a folder; a second start is refused, naming the
  process that holds it. A killed run's lock goes with it (the kernel drops a flock).
- `check_settings`: a run folder made with other settings is refused, naming the setting.
- `record_provenance`: the commit and machine a run is made at, so results name them (results.py).
- `remove_leftovers`: temporary files a killed process left behind are removed on resume.
- `stage`: out of GPU memory in a stage is one line naming the flag to lower, a full disk one
  line naming the stage; `not_finite`: a NaN/inf loss stops training before it reaches the weights.
"""
import contextlib
import dataclasses
import errno
import fcntl
import gc
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from machinery import files, kernels, parallel

REPO = Path(__file__).resolve().parents[1]  # the code a run is made with (provenance.json)


class RunError(RuntimeError):
    """A run that cannot go on (NaN loss, out of memory, mixed settings): a one-line message."""


def resume_point(stage):
    """Test hook: SPPO_KILL_AT=<stage>:<n> SIGKILLs this process the n-th time `stage` has
    just written a resume point (stages: generate, judge, pairs, train, merge, evaluate), so
    tests can prove a killed run resumes to the same result."""
    want = os.environ.get("SPPO_KILL_AT", "")
    if want.partition(":")[0] != stage:
        return
    resume_point.seen[stage] = resume_point.seen.get(stage, 0) + 1
    if resume_point.seen[stage] == int(want.partition(":")[2] or 1):
        os.kill(os.getpid(), 9)


resume_point.seen = {}


def in_chunks(rows, size, out_path, work, stage, desc, unit, setup=None, per=None):
    """The shape of every stage that works through rows in chunks (sampling, judging, scoring).

    size: rows per chunk, or the chunks themselves (lists of rows, in any order); the artifact
    lists the rows in `rows` order either way. work(c, chunk, ctx) turns chunk c into output lines (one per row, with its id); they are
    appended to out_path's `.partial.jsonl` as each chunk finishes, so a killed run redoes only
    the unfinished chunks (lines are read back by id: a chunk done twice counts once). setup(todo
    rows) -> ctx runs once, only when work is left (loading a model). With torchrun the chunks
    are dealt over the ranks, `per` per round (default one per rank), and rank 0 appends each
    round's chunks in order, so the artifact is the one a single process writes (parallel.py)."""
    if out_path.exists():
        return files.read_jsonl(out_path)
    part = out_path.with_suffix(".partial.jsonl")
    done = files.done_ids(part)
    parallel.barrier()  # every rank has read the resume state before rank 0 appends
    chunks = size if isinstance(size, list) else [rows[i:i + size] for i in range(0, len(rows), size)]
    todo = [c for c, chunk in enumerate(chunks) if not all(r["id"] in done for r in chunk)]
    ctx = setup([r for c in todo for r in chunks[c]]) if todo and setup else None
    bar = tqdm(total=len(rows), initial=len(done & {r["id"] for r in rows}), desc=desc, unit=unit)
    for c, group in parallel.rounds(todo, per):
        lines = work(c, chunks[c], ctx) if c is not None else []
        lines = [x for got in parallel.gather(lines) for x in got]  # the round's chunks, in order
        if parallel.is_main():
            files.append_jsonl(part, lines)
            resume_point(stage)
        bar.update(sum(len(chunks[g]) for g in group))
    bar.close()
    out = None
    if parallel.is_main():
        got = {r["id"]: r for r in files.read_jsonl_tolerant(part)}
        out = [got[r["id"]] for r in rows]
        files.write_jsonl(out_path, out)
        part.unlink(missing_ok=True)
    return parallel.share(out)


LOCK = "lock"  # in the run folder while a run holds it: "<pid> <start time>"
_held = []  # (fd, path) of the lock this process holds


def lock_run_folder(run_dir):
    """Take the run folder's lock for this process: an exclusive flock on run_dir/lock, with
    our pid and start time written in it. -> None when taken, or the one-line reason it is not
    (another process holds it), having written nothing. The kernel drops a flock when its
    holder dies, however it dies (SIGKILL too), so a killed run's lock file blocks no one: the
    next start takes it and writes its own pid. unlock_run_folder gives it back."""
    path = run_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # no O_TRUNC: the holder's pid is read below
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, since = os.read(fd, 200).decode("utf-8", "replace").strip().partition(" ")
            os.close(fd)
            who = f"pid {pid} (since {since})" if pid else "another process (starting)"
            return f"{run_dir} is in use by {who}; wait for it to end, or use another --name"
        # a holder that ended between our open and our flock removed the file (unlock_run_folder):
        # a lock on a file that is no longer at the path keeps no one out, so take the one that is
        try:
            here = os.stat(path)
            if (here.st_dev, here.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _held.append((fd, path))
    return None


def unlock_run_folder():
    """Give back the lock this process holds (if any). The file goes while the lock is still held,
    so that a start that opens it from then on makes a new one (lock_run_folder); a run folder
    that is not in use has no lock file."""
    while _held:
        fd, path = _held.pop()
        path.unlink(missing_ok=True)
        os.close(fd)  # closing the last descriptor drops the flock


def open_run_folder(run_dir, s, harmless, devices=()):
    """The run folder, made if new, for this run alone: locked (one run at a time in a folder,
    before anything in it is written or cleaned), its settings checked against those it was made
    with, a killed process's leftovers removed. With torchrun rank 0 holds the lock for the whole
    launch (only it writes) and tells the others, so that a refused launch stops on every rank
    instead of leaving them waiting for rank 0 in a collective. devices: the run's, which
    provenance.json names with the commit and the CPU (record_provenance)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    refused = parallel.share(lock_run_folder(run_dir) if parallel.is_main() else None)
    if refused:
        raise RunError(refused)
    check_settings(s, run_dir, harmless)
    if parallel.is_main():  # with torchrun only rank 0 writes, so only it cleans and records
        remove_leftovers(run_dir)
        record_provenance(run_dir, REPO, devices)
    return run_dir


def check_settings(s, run, harmless):
    """Refuse to mix artifacts made with different settings in one run folder. harmless: the
    settings that change no artifact (a run may be resumed with other values)."""
    mine = {k: v for k, v in dataclasses.asdict(s).items() if k not in harmless}
    f = run / "settings.json"
    if f.exists():
        old = json.loads(f.read_text())
        for k, v in mine.items():
            if k in old and old[k] != v:
                raise RunError(f"{f}: this run was made with {k}={old[k]!r}, not {v!r}; "
                               f"use another --name or the same setting")
    if parallel.is_main():
        files.write_json(f, mine)


def git(root, *args):
    """git's answer in root, stripped, or None where there is no git or no repository."""
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def provenance(root, devices=()):
    """What a run's numbers depend on besides its settings: the code's commit (`git rev-parse
    HEAD` in root; "unknown" outside a repository), whether tracked files differ from it ("dirty":
    then the commit does not pin the code), and the machine: kernels.cpu_description() (the CPU's
    kernels change the last digits of every product, so a seeded run's numbers) and the CUDA
    cards among devices."""
    commit = git(root, "rev-parse", "HEAD")
    out = {"commit": commit or "unknown",
           "dirty": bool(git(root, "status", "--porcelain", "--untracked-files=no")) if commit else None,
           "machine": kernels.cpu_description()}
    cards = sorted({torch.cuda.get_device_name(torch.device(d)) for d in devices if torch.device(d).type == "cuda"})
    if cards:
        out["gpus"] = cards
    return out


def record_provenance(run_dir, root, devices=()):
    """run_dir/provenance.json: the provenance of the run's first start; a resume at another commit
    or on another machine adds itself to "resumed" (once each), so a run made at two commits says
    so. A resume at the same one leaves the file as it was: a killed and resumed run's artifacts
    stay byte-identical to an uninterrupted run's."""
    f, now = run_dir / "provenance.json", provenance(root, devices)
    if not f.exists():
        return files.write_json(f, now)
    got = json.loads(f.read_text())
    seen = [{k: v for k, v in got.items() if k != "resumed"}, *got.get("resumed", [])]
    if now not in seen:
        files.write_json(f, dict(got, resumed=[*got.get("resumed", []), now]))


def remove_leftovers(run_dir):
    """A killed process leaves its temporary files and folders (*.tmp*): every artifact appears by a
    rename, so nothing reads them; remove them so a resumed run folder is the same as a clean one."""
    for p in sorted(run_dir.rglob("*.tmp*"), reverse=True):
        files.remove(p)


OOM_FLAGS = {  # out of GPU memory in a stage -> what to lower
    "generate": "--gen-batch (--eval-batch in the evaluation) or --max-new-tokens",
    "judge": "--judge-batch",
    "pairs": "--batch-size or --max-len (or raise --micro-batches with --devices)",
    "train": "--batch-size (raising --grad-accum keeps the effective batch) or --max-len, or add --grad-ckpt",
    "merge": "nothing: merge works shard by shard; free the GPU of other processes",
    "evaluate": "--eval-batch or --judge-batch",
}


@contextlib.contextmanager
def stage(where, name):
    """One stage: CUDA out-of-memory becomes a one-line error naming the flag to lower, and a
    summary line is printed at the end (the block fills info["summary"]). Every model a stage
    loads is a local of its functions, so it is garbage when the stage ends; its GPU memory goes
    back to the device here, so the next stage (or vLLM's process) finds the cards empty."""
    info, t0 = {"summary": ""}, time.time()
    try:
        yield info
    except torch.OutOfMemoryError:
        raise RunError(f"out of GPU memory in {where} {name}: lower {OOM_FLAGS[name]} (finished work is kept; "
                       f"flags that change results need a new --name)") from None
    except Exception as e:
        if not disk_full(e):
            raise
        # files.atomic has removed the half-written file: what was saved before stays whole
        raise RunError(f"the disk is full in {where} {name} ({one_line(e)}): free some space and run the same "
                       f"command again, it resumes here") from None
    finally:
        free_memory()
    print(f"{where} {name}: {info['summary']}{', ' if info['summary'] else ''}{time.time() - t0:.0f} s", flush=True)


def disk_full(e):
    """No space left (or over quota): an OSError, or a library's own error that says so
    (safetensors writes from Rust: 'I/O error: No space left on device (os error 28)')."""
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(e)


def one_line(e):
    return " ".join(str(e).split())


def free_memory():
    gc.collect()  # cycles, if any: a model must not wait for the collector to give its memory back
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def not_finite(what, step, ckpt):
    """Stop before a NaN/inf reaches the weights: ckpt (if any) holds the last good ones."""
    kept = f"the last good checkpoint {ckpt} (step {torch.load(ckpt)['step']}) is kept" if ckpt.exists() else "no checkpoint was written yet"
    raise RunError(f"training {what} at step {step + 1}; {kept}. Lower --lr or --eta, or check the pairs in "
                   f"{ckpt.parent.parent}/pairs.jsonl for inf/NaN reference log-probs")


def save_train_state(ckpt, params, opt, sched, step, log):
    """Training's resume point: the LoRA weights, AdamW's moments, the schedule, the log."""
    files.save_torch(ckpt, {"lora": [p.detach().cpu() for p in params], "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "step": step, "log": log})


def load_train_state(ckpt, params, opt, sched):
    """-> (step, log) of the checkpoint, its weights and optimizer state put back in place."""
    # to the CPU: AdamW's `step` counters stay where they are loaded, and a split model's
    # parameters live on several devices (the moments follow each parameter by themselves)
    st = torch.load(ckpt, map_location="cpu")
    with torch.no_grad():
        for p, v in zip(params, st["lora"]):
            p.copy_(v)
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    return st["step"], st["log"]
