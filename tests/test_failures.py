"""Failures a user meets: each is one line on stderr, exit status 2, no traceback, and nothing
half-written. Covered elsewhere, not repeated here: how each malformed prompt file is parsed
(tests/test_data.py::test_load_prompts_malformed, with 17 kinds of damage), loading errors naming
the tensor (tests/test_model.py::test_loading_errors_name_tensor_and_file, test_missing_shard_is_named),
SIGKILL at every stage (tests/test_sppo.py::test_sigkill_at_every_stage_then_resume_gives_the_same_artifacts)."""
import copy
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import sppo
from machinery import files, runs
from tiny import make_tiny_chat_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fail")
    make_tiny_chat_model(d / "model")
    rows = [{"prompt": f"say something short number {i} please", "checks": [{"type": "no_digits"}]} for i in range(4)]
    (d / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def args(tiny, runs, **over):
    a = {"model": tiny / "model", "prompts": tiny / "good.jsonl", "heldout": tiny / "good.jsonl", "runs-dir": runs,
         "name": "r", "iters": 1, "k": 2, "max-new-tokens": 4, "device": "cpu", "lora-r": 4}
    a.update(over)
    return [x for k, v in a.items() for x in (f"--{k}", str(v))]


def fails(capsys, argv):
    """Run the command line in-process; -> its one stderr line (it must exit with status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sppo.main(argv)
    assert e.value.code == 2
    out = capsys.readouterr().err
    err = out.rstrip("\n").split("\n")[-1]  # progress bars may come before it, each ended by a newline
    assert err.startswith("error: ") and "\r" not in err and "Traceback" not in out, out
    return err


BAD_PROMPTS = [  # file name, bytes, what the message must say (file:line first)
    ("malformed.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n', ":2: bad JSON"),
    ("no_prompt.jsonl", b'{"prompt": "a"}\n{"text": "b"}\n', ":2: missing field 'prompt'"),
    ("empty.jsonl", b"", ":1: file is empty"),
    ("latin1.jsonl", '{"prompt": "caf\u00e9"}\n'.encode("latin-1"), ":1: not valid UTF-8"),
]


@pytest.mark.parametrize("name,content,says", BAD_PROMPTS, ids=[b[0] for b in BAD_PROMPTS])
def test_bad_prompt_file_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, name, content, says):
    bad = tmp_path / name
    bad.write_bytes(content)
    for flag in ("prompts", "heldout"):
        err = fails(capsys, args(tiny, tmp_path / "runs", **{flag: bad}))
        assert err.startswith(f"error: {bad}{says}"), err
    assert not (tmp_path / "runs").exists(), "a bad input must not leave a run folder behind"


def test_prompt_longer_than_max_is_an_error_or_truncated_or_skipped(tiny, tmp_path, capsys):
    long = "please count " + " ".join(["one two three four five"] * 20) + " and then say the last word"
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "short one"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    err = fails(capsys, args(tiny, tmp_path / "runs", prompts=p, **{"max-prompt-len": 40}))
    assert err.startswith(f"error: {p}:2: prompt is ") and "--long-prompts" in err, err
    assert not (tmp_path / "runs").exists()

    tok = data.Tokenizer.from_dir(tiny / "model")
    rows, _ = data.load_prompts(p)
    full = len(tok.encode_chat(rows[1]["messages"]))
    assert full > 40
    s = sppo.parse_args(args(tiny, tmp_path, **{"max-prompt-len": 40, "long-prompts": "skip"}))
    kept, n = data.fit_prompts(rows, tok, s.max_prompt_len, s.long_prompts)
    assert n == 1 and [r["prompt"] for r in kept] == ["short one"]
    s.long_prompts = "truncate"
    kept, n = data.fit_prompts(rows, tok, s.max_prompt_len, s.long_prompts)
    assert n == 1 and kept[0] == rows[0] and kept[1]["id"] == rows[1]["id"]
    cut = kept[1]["prompt"]
    # it fits, lost as little as a token or two more than needed, and kept the request's end
    assert 38 <= len(tok.encode_chat(kept[1]["messages"])) <= 40
    assert long.endswith(cut) and cut.endswith("and then say the last word")
    assert kept[1]["messages"] == [{"role": "user", "content": cut}] and kept[1]["full_prompt"] == long


def model_copy(tiny, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny / "model", d)
    return d


def test_shard_named_in_index_but_missing(tiny, tmp_path, capsys):
    d = model_copy(tiny, tmp_path)
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    err = fails(capsys, args(tiny, tmp_path / "runs", model=d))
    assert f"{d}/model.safetensors.index.json: shard model-00002-of-00002.safetensors" in err and names[-1] in err
    assert not (tmp_path / "runs").exists()


def test_corrupt_safetensors_header(tiny, tmp_path, capsys):
    d = model_copy(tiny, tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes((10 ** 12).to_bytes(8, "little") + raw[8:])  # header length garbage
    err = fails(capsys, args(tiny, tmp_path / "runs", model=d))
    assert err.startswith(f"error: {d}/model.safetensors: cannot read safetensors header"), err
    assert not (tmp_path / "runs").exists()


def test_unsupported_architecture(tiny, tmp_path, capsys):
    d = model_copy(tiny, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["Qwen2MoeForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    err = fails(capsys, args(tiny, tmp_path / "runs", model=d))
    assert err.startswith(f"error: {d}/config.json: architecture 'Qwen2MoeForCausalLM' is not supported"), err
    assert not (tmp_path / "runs").exists()


def test_run_folder_made_with_other_settings_is_refused(tiny, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    runs.check_settings(sppo.parse_args(args(tiny, tmp_path / "runs")), run, sppo.Settings.HARMLESS)
    before = (run / "settings.json").read_bytes()
    err = fails(capsys, args(tiny, tmp_path / "runs", temperature=0.9))
    assert "settings.json: this run was made with temperature=0.7, not 0.9" in err, err
    assert (run / "settings.json").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["settings.json"]


def flocks_of(pid):
    """The flocks the kernel says `pid` holds (/proc/locks: "1: FLOCK ADVISORY WRITE <pid> ...")."""
    return [ln for ln in Path("/proc/locks").read_text().splitlines() if ln.split()[1:2] == ["FLOCK"]
            and ln.split()[4] == str(pid)]


LINUX = pytest.mark.skipif(not Path("/proc/locks").exists(), reason="the kernel's list of locks is read from /proc/locks (Linux)")


@LINUX
def test_a_second_start_on_a_locked_run_folder_is_refused_naming_the_holder_and_writes_nothing(tiny, tmp_path, capsys):
    """Two starts of one command on one run folder (two terminals, a scheduler and a person): the
    one that comes second is one line naming the holder's pid and start time, exit 2, and not a
    byte of the folder changes (a leftover of the holder's that a start would clean stays)."""
    import time
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / ".eval_base.jsonl.tmp123").write_text("the holder is writing this\n")
    t0 = time.time()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from machinery import runs; "
                               "assert runs.lock_run_folder(Path(sys.argv[1])) is None; print('held', flush=True); "
                               "time.sleep(60)", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        t1 = time.time()
        assert flocks_of(holder.pid), "the kernel must list the holder's flock"
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*")}
        err = fails(capsys, args(tiny, tmp_path / "runs"))
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*")} == before
        assert err.startswith(f"error: {run} is in use by pid {holder.pid} (since "), err
        since = time.mktime(time.strptime(err.split("(since ")[1].split(")")[0], "%Y-%m-%d %H:%M:%S"))
        assert int(t0) - 1 <= since <= t1 + 1, err
    finally:
        holder.kill()
        holder.wait()


@LINUX
def test_a_run_killed_with_sigkill_does_not_block_the_next_start_and_a_run_gives_its_lock_back(tiny, tmp_path, capsys):
    """SIGKILL leaves the lock file behind (nothing runs at a SIGKILL), but the kernel dropped the
    dead process's flock: the next start goes on. A start that fails after taking the lock (other
    settings) and a run that finishes both give it back: the kernel lists no flock of this process
    and the folder keeps no lock file."""
    env = dict(os.environ, SPPO_KILL_AT="generate:1")
    killed = subprocess.Popen([sys.executable, str(ROOT / "sppo.py"), *args(tiny, tmp_path / "runs")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = killed.communicate(timeout=300)[1]
    assert killed.returncode == -9, stderr[-2000:]
    run = tmp_path / "runs" / "r"
    assert (run / runs.LOCK).read_text().split()[0] == str(killed.pid)  # the dead holder's pid is still there
    err = fails(capsys, args(tiny, tmp_path / "runs", temperature=0.9))
    assert "settings.json: this run was made with temperature=0.7" in err, err  # past the lock
    assert not flocks_of(os.getpid()) and not (run / runs.LOCK).exists()
    sppo.main(args(tiny, tmp_path / "runs"))
    assert (run / "summary.md").exists()
    assert not flocks_of(os.getpid()) and not (run / runs.LOCK).exists()


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask0022", "umask0027"])
def test_every_file_of_a_run_weights_included_has_the_mode_a_plain_open_gets_under_the_umask(tiny, tmp_path, mask):
    """Weights that only their owner can read stop a vLLM server or a colleague on the same
    machine: every file of a run, the merged model's and the adapter's safetensors among them,
    has the mode the OS gives a file made by a plain open() under the same umask, and every
    folder that of a plain mkdir."""
    old = os.umask(mask)
    try:
        (tmp_path / "plain_file").open("w").close()
        (tmp_path / "plain_dir").mkdir()
        sppo.main(args(tiny, tmp_path / "runs"))
    finally:
        os.umask(old)
    want = {False: stat.S_IMODE((tmp_path / "plain_file").stat().st_mode),
            True: stat.S_IMODE((tmp_path / "plain_dir").stat().st_mode)}
    run = tmp_path / "runs" / "r"
    got = {str(p.relative_to(run)): (p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in run.rglob("*")}
    assert {"iter0/model/model.safetensors", "iter0/adapter/adapter_model.safetensors"} <= set(got)
    assert {k: oct(m) for k, (d, m) in got.items() if m != want[d]} == {}, f"want {oct(want[False])} for files"


# ----------------------------------------------------------------------------- training and memory

def synthetic_pairs(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()
    return [{"id": str(i), "prompt_ids": ids(6), "chosen_ids": ids(5), "rejected_ids": ids(4), "chosen_probs": 0.8,
             "chosen_probs_win": 0.7, "chosen_probs_lose": 0.3, "ref_chosen_logp": -30.0, "ref_rejected_logp": -25.0}
            for i in range(n)]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    argv = args(tiny, tmp_path, **{"batch-size": 1, "epochs": 1, "ckpt-every": 1, "lr": 1e-2})
    s = sppo.parse_args(argv)
    tok = data.Tokenizer.from_dir(tiny / "model")
    pairs = synthetic_pairs(5, tok.vocab_size)
    # The clean run, every checkpoint it saves recorded: the reference for "last good".
    saved = {}
    real_save = files.save_torch
    # (deep copies: on CPU the saved tensors are the live parameters)
    monkeypatch.setattr(files, "save_torch", lambda path, st: (saved.__setitem__(st["step"], copy.deepcopy(st)),
                                                               real_save(path, st)))
    for d in ("clean", "bad"):
        (tmp_path / d / "train").mkdir(parents=True)
    sppo.train(s, tok, tiny / "model", pairs, tmp_path / "clean" / "train", tmp_path / "clean" / "adapter")
    assert sorted(saved) == [1, 2, 3, 4, 5]
    monkeypatch.setattr(files, "save_torch", real_save)
    # the pair the 4th optimizer step uses gets an infinite reference log-prob: its loss is inf
    order = torch.randperm(5, generator=torch.Generator().manual_seed(s.seed * 1000)).tolist()
    bad = [dict(p) for p in pairs]
    bad[order[3]]["ref_chosen_logp"] = float("inf")
    # through the command line: the training stage of a run is this train() call
    monkeypatch.setattr(sppo, "run", lambda s: sppo.train(s, tok, tiny / "model", bad, tmp_path / "bad" / "train",
                                                           tmp_path / "bad" / "adapter"))
    msg = fails(capsys, argv)
    assert "training loss is inf at step 4" in msg and "(step 3) is kept" in msg, msg
    assert not (tmp_path / "bad" / "adapter").exists()
    kept = torch.load(tmp_path / "bad" / "train" / "ckpt.pt")
    untimed = lambda log: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in log]  # only the clock differs
    assert kept["step"] == 3 and untimed(kept["log"]) == untimed(saved[3]["log"])
    for a, b in zip(kept["lora"], saved[3]["lora"]):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(kept["lora"], saved[4]["lora"]))  # 3 is not just "the last"


@pytest.mark.parametrize("stage,flag", [("sample", "--gen-batch"), ("train", "--batch-size")])
def test_out_of_gpu_memory_names_the_flag_to_lower(tiny, tmp_path, capsys, monkeypatch, stage, flag):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(a second line)")

    answers = lambda s, pol, tok, rows, *a, **k: [{"id": r["id"], "responses": ["x"] * 2, "response_ids": [[5]] * 2}
                                                  for r in rows]
    monkeypatch.setattr(sppo, "sample", oom if stage == "sample" else answers)
    monkeypatch.setattr(sppo, "judge_responses", lambda s, tok, rows, *a: [{"id": r["id"]} for r in rows])
    monkeypatch.setattr(sppo, "make_pairs", lambda *a, **k: [])
    monkeypatch.setattr(sppo, "train", oom)
    err = fails(capsys, args(tiny, tmp_path / "runs"))
    where = "base generate" if stage == "sample" else "iter 0 train"
    assert err.startswith(f"error: out of GPU memory in {where}: lower {flag}"), err


def test_full_disk_is_one_line_naming_the_stage_and_leaves_no_half_written_file(tiny, tmp_path, capsys, monkeypatch):
    """The merge's safetensors write fails as it does on a full disk (its own error type, from
    Rust): one line naming the stage, no traceback, no merged model and no temporary left; the
    same command afterwards resumes and finishes. A full disk while a JSON file is written (an
    OSError with ENOSPC, here at the run's start, outside any stage) is one line too."""
    import errno
    import safetensors.torch
    from safetensors import SafetensorError
    real = safetensors.torch.save_file

    def full(tensors, filename, **k):  # the adapter fits, the merged model does not
        if "adapter" in str(filename):
            return real(tensors, filename, **k)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    runs_dir = tmp_path / "runs"
    err = fails(capsys, args(tiny, runs_dir))
    assert err.startswith("error: the disk is full in iter 0 merge (") and "run the same command again" in err, err
    it = runs_dir / "r" / "iter0"
    assert (it / "adapter" / "adapter_config.json").exists() and not (it / "model").exists()
    assert not [p for p in it.iterdir() if ".tmp" in p.name]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    sppo.main(args(tiny, runs_dir))
    assert (it / "model" / "config.json").exists() and (it / "eval.json").exists()

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl")
    monkeypatch.setattr(files, "write_json", enospc)
    err = fails(capsys, args(tiny, tmp_path / "runs2"))
    assert err.startswith("error: the disk is full (") and "No space left on device: 'metrics.jsonl'" in err, err


X86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                         reason="ONEDNN_MAX_CPU_ISA=AVX2 plays an AVX2 CPU only on x86-64")


@X86
def test_nf4_compute_bfloat16_on_a_cpu_without_bf16_products_is_refused_before_anything_is_written(tiny, tmp_path):
    """An AVX2 CPU, played by capping oneDNN (ONEDNN_MAX_CPU_ISA=AVX2, as on a Zen 3 EPYC): oneDNN
    has no bf16 inner product there, so --nf4-compute bfloat16 is one line naming the flag, exit 2,
    no run folder; the same command with float32 (auto's choice on CPU) starts. Run in a fresh
    process: oneDNN reads the cap once, when it is first used."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    cmd = [sys.executable, str(ROOT / "sppo.py"), *args(tiny, tmp_path / "runs", iters=1), "--plan"]
    bad = subprocess.run(cmd + ["--nf4-compute", "bfloat16"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("error: --nf4-compute bfloat16: this CPU has no native bf16 products"), bad.stderr
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in bad.stderr  # the emulation is said
    assert not (tmp_path / "runs").exists()
    good = subprocess.run(cmd + ["--nf4-compute", "float32"], env=env, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
