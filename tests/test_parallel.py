"""torchrun with 2 processes (gloo on CPU) against one process: the same artifacts and LoRA."""
import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from test_sppo import ROOT, run_args
from tiny import make_tiny_chat_model

# 8 prompts in chunks of 2: 4 chunks, dealt 2 + 2 over the ranks; judge batches of 5 and 3, one
# per rank. They give 7 pairs: --batch-size 3 makes micro-batches of 3, 3 and 1 pairs, split
# 2 + 1, 2 + 1 and 1 + 0 (rank 1 runs a pair with weight 0); --grad-accum 2 sums two per step.
ARGS = ["--iters", "1", "--prompts-per-iter", "8", "--k", "4", "--epochs", "1", "--batch-size", "3",
        "--grad-accum", "2", "--judge-batch", "5", "--ckpt-every", "100", "--lr", "1e-3"]
# Why --lr 1e-3 (run_args has 1e-2): B starts at 0, so A's first gradients are ~1e-9 and the
# ranks' sum rounds them differently in the last bits; Adam divides by sqrt(v) ~ |g|, which
# turns that rounding into a difference in A proportional to lr: 1.4e-5 at 1e-2, 9e-7 at 1e-3.


def launch(args, nproc, crash=None):
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    for k in ("SPPO_KILL_AT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if crash:
        env["SPPO_KILL_AT"] = crash
    cmd = [sys.executable, str(ROOT / "sppo.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "sppo.py")]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_two_ranks_killed_and_resumed_equal_one_process(tmp_path):
    make_tiny_chat_model(tmp_path / "model")
    r = launch(run_args(tmp_path, tmp_path / "w1") + ARGS, 1)
    assert r.returncode == 0, r.stderr[-4000:]
    one, two = tmp_path / "w1" / "r", tmp_path / "w2" / "r"
    # rank 0 is killed after its second append: the held-out chunks (one round), then the first
    # round of training responses; torchrun then stops rank 1. The same command resumes.
    r = launch(run_args(tmp_path, tmp_path / "w2") + ARGS, 2, crash="generate:2")
    assert r.returncode != 0 and len((two / "iter0/responses.partial.jsonl").read_text().splitlines()) == 4
    assert not (two / "iter0/responses.jsonl").exists()
    r = launch(run_args(tmp_path, tmp_path / "w2") + ARGS, 2)
    assert r.returncode == 0, r.stderr[-4000:]
    # rank 0 alone prints and shows progress bars
    assert r.stdout.count("sppo: model") == 1 and "| 1 |" in r.stdout
    assert r.stderr.count("reference log-probs: 100%") == 1
    # sampling, judging and reference scoring: byte for byte (each batch computed as one process does)
    for f in ("eval_base.jsonl", "iter0/responses.jsonl", "iter0/judgments.jsonl", "iter0/pairs.jsonl",
              "iter0/eval_answers.jsonl", "settings.json"):
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    pairs = rows(one / "iter0/pairs.jsonl")
    assert len(pairs) == 7 and all("ref_chosen_logp" in p for p in pairs)  # the split described at ARGS
    assert not list(two.rglob("*.partial.jsonl"))
    # training: DDP over the split micro-batches gives the one-process LoRA weights and losses
    wa, wb = (load_file(r / "iter0/adapter/adapter_model.safetensors") for r in (one, two))
    assert wa.keys() == wb.keys() and len(wa) == 2 * 7 * 2
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-5, k
    assert all(wa[k].abs().max() > 5e-4 for k in wa if "lora_B" in k)  # B starts at 0: training moved it
    la, lb = rows(one / "iter0/train/losses.jsonl"), rows(two / "iter0/train/losses.jsonl")
    assert len(la) == len(lb) >= 2
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(x["loss"])) and x["lr"] == y["lr"]
    ma, mb = (load_file(r / "iter0/model/model.safetensors") for r in (one, two))
    for k in ma:
        assert (ma[k] - mb[k]).abs().max() <= 1e-5, k
    ea, eb = (json.loads((r / "iter0/eval.json").read_text()) for r in (one, two))
    assert ea["win_rate"] == eb["win_rate"] and ea["n_eval"] == eb["n_eval"] == 4
    assert not (two / "lock").exists()  # rank 0 gave the run folder's lock back


def test_a_launch_on_a_locked_run_folder_is_refused_on_every_rank(tmp_path):
    """Rank 0 takes the run folder's lock for the whole launch and tells the others: on a folder
    another process holds, every rank stops with the one line (none waits for rank 0 in a
    collective), and the folder is as it was."""
    make_tiny_chat_model(tmp_path / "model")
    run = tmp_path / "w" / "r"
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from machinery import runs; "
                               "assert runs.lock_run_folder(Path(sys.argv[1])) is None; print('held', flush=True); "
                               "time.sleep(120)", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = sorted(run.iterdir())
        r = launch(run_args(tmp_path, tmp_path / "w") + ARGS, 2)
        assert r.returncode != 0
        refused = [ln for ln in r.stderr.splitlines() if ln.startswith(f"error: {run} is in use by pid {holder.pid} ")]
        assert len(refused) == 2, r.stderr[-4000:]  # one line from each rank
        assert sorted(run.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()
