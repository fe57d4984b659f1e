"""More than one process: torch.distributed data parallel, launched by torchrun.

    torchrun --nproc_per_node 8 sppo.py ...                      # 8 GPUs in one node
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint host0:29500 sppo.py ...  # and node_rank 1 on host1

Every rank runs the same loop (sppo.run). A plain `python sppo.py` is one rank: it never
creates a process group and every helper here is then the identity.

- Sampling, judging, reference scoring: a stage's units of work (a generation chunk, a judge
  batch, a scoring batch) are dealt round-robin, rank r taking units r, r + W, ... . Each
  unit is computed exactly as one process computes it (the same prompts batched together,
  the same seed), and the results are gathered in unit order, so the artifacts are those of
  one process. (Dealing single prompts instead would change the batches, and with them the
  left padding and the random stream of the batched sampler.)
- Training: DistributedDataParallel over the LoRA parameters (the NF4 base is frozen and
  identical everywhere, so DDP neither broadcasts nor buckets it). `--batch-size` stays the
  global micro-batch: its pairs are dealt across ranks and each rank's loss is weighted so
  that the averaged gradient is the one-process gradient of the whole micro-batch.
- Files: only rank 0 writes. Every rank reads a stage's resume state (which files exist,
  which chunks are done) and meets the others in a collective before rank 0 writes, so all
  ranks decide the same; what rank 0 then writes reaches the others by collectives, not by
  the filesystem. The models and --runs-dir must still be on a filesystem every node sees
  (each rank loads pi_t from iter<t>/model).
"""
import datetime
import functools
import os
import sys

import torch
import torch.distributed as dist

import data
import model as M


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def setup(device, devices):
    """Join torchrun's process group (WORLD_SIZE > 1 in the environment) and return this rank's
    (device, devices). CUDA indices are shifted by local_rank x (devices per rank): with 8 ranks
    the default device of local rank r is cuda:r; `--devices cuda:0,cuda:1` with 4 ranks gives
    rank 1 cuda:2,cuda:3 (each rank a two-stage pipeline). CPU entries stay as they are."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, devices
    local = int(os.environ.get("LOCAL_RANK", "0"))
    names = devices.split(",") if devices else [device or ("cuda" if torch.cuda.is_available() else "cpu")]
    names = [_shift(n, local * len(names), local) for n in names]
    first = torch.device(names[0])
    if first.type == "cuda":
        torch.cuda.set_device(first)
    if not dist.is_initialized():
        # rank 0 alone merges and evaluates while the others wait in a collective: a long timeout
        dist.init_process_group("nccl" if first.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    if rank() > 0:  # one rank speaks; errors still go to stderr
        sys.stdout = open(os.devnull, "w")
        import tqdm
        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
    return (device if devices else names[0]), (",".join(names) if devices else "")


def _shift(name, by, local):
    d = torch.device(name)
    if d.type != "cuda":
        return name
    i = (d.index or 0) + by
    if i >= torch.cuda.device_count():
        raise SystemExit(f"error: --device/--devices: local rank {local} would use cuda:{i}, but this node has "
                         f"{torch.cuda.device_count()} GPUs (give the devices of local rank 0; see README)")
    return f"cuda:{i}"


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def rounds(units, per=None):
    """Deal units in rounds of `per` (default: one per rank), for stages that save after each
    round: yields (this rank's unit or None, the round's units)."""
    per = per or world()
    for j in range(0, len(units), per):
        group = units[j:j + per]
        yield (group[rank()] if rank() < len(group) else None), group


def gather(obj):
    """Every rank's obj, in rank order, on every rank ([obj] in one process)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def share(obj):
    """Rank 0's obj on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if world() > 1:
        dist.barrier()


def share_of(batch):
    """This rank's rows of a training micro-batch and the weight of their mean loss: their share
    of the rows, times the world size since DDP averages gradients, so that the sum over ranks is
    the one-process gradient of the whole micro-batch. A rank dealt no row runs one with weight 0
    (DDP needs a backward from every rank). One process: (batch, 1.0)."""
    mine = batch[rank()::world()]
    return mine or batch[:1], len(mine) / len(batch) * world()


def whole_batch(loss, log, weight):
    """-> (the whole micro-batch's mean loss, every rank's log merged: lists joined, "tokens"
    summed), from this rank's mean loss, log and weight (share_of)."""
    if world() == 1:
        return loss.item(), log
    merged = {}
    for theirs in gather(log if weight else {}):
        merge_log(merged, theirs)
    return sum(gather(loss.item() * weight / world())), merged


def merge_log(into, log):
    """A training step's log added to another: lists joined, "tokens" summed."""
    for k, v in log.items():
        into[k] = into.get(k, 0 if k == "tokens" else []) + v


class _Scorer(torch.nn.Module):
    """data.sequence_logps as a module: DDP arms its gradient all-reduce in its own forward
    call, and a training step's forward is sequence_logps (one model call per length group),
    not one model() call."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, ids, mask):
        return data.sequence_logps(self.net, ids, mask)


def ddp(net):
    """score(ids, mask) -> log-probs of net's responses, with DistributedDataParallel over the
    trainable parameters only: the frozen ones (the NF4 base) and the buffers are identical on
    every rank already, so they are neither broadcast at the start nor bucketed.
    device_ids=None: a module split over devices is allowed."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    module = _Scorer(net)
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DDP(module, device_ids=None, broadcast_buffers=False)
