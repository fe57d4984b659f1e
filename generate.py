"""generate.py: the sampler. A batch of prompts left-padded into a KV cache, prefilled in blocks
of similar length, then decoded a token at a time (on CUDA the decode step captured once and
replayed as CUDA graphs, CapturedDecode), each row until its stop token; several seeds of the
same prompts share one prefill where rows do not depend on each other (generate_seeds).
Its twin, the scorer of given tokens, is data.sequence_logps."""
import torch

from data import length_groups
from machinery import kernels
from model import layer_device, to_layer


def sample_next(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """Next token ids (B,) from last-position logits (B, V). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # The nucleus of an LM's distribution is nearly always within its top 64 tokens: sorting only
    # those is exact whenever they reach top_p. Flat distributions (high temperature, random or
    # early models) get the top 1024 (8x cheaper than a full sort of a 49k vocabulary), then the sort.
    for k in (64, 1024):
        sorted_p, order = probs.topk(min(k, probs.shape[-1]), dim=-1)
        if bool((sorted_p.sum(-1) >= top_p).all()):
            break
    else:
        sorted_p, order = probs.sort(-1, descending=True)
    # Drop a token when the tokens strictly above it already reach top_p (keeps >= 1).
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
             stop_ids=(), seed=None, pad_id=0, static_cache=None):
    """Sample continuations for a batch of token-id lists with a KV cache.

    Prompts are left-padded so every row's last prompt token sits in the same slot; each row
    stops at its first stop id (which is kept in its output) or after max_new_tokens. The
    same seed gives the same samples. Returns a list of new-token lists.

    static_cache: decode with CapturedDecode's fixed-shape step, CUDA graphs on CUDA. None (the
    default) does so when the whole model is on CUDA cards; elsewhere each step attends over
    the cache filled so far and rows that are done leave the batch.
    """
    return generate_seeds(model, prompts, max_new_tokens, temperature, top_p, top_k, stop_ids, [seed], pad_id,
                          static_cache)[0]


@torch.no_grad()
def generate_seeds(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                   stop_ids=(), seeds=(None,), pad_id=0, static_cache=None):
    """generate() once per seed, the same prompts: a list with one result per seed, each equal
    to generate(..., seed=that seed).

    On CPU in float32 (oneDNN, where its probe shows a row's result independent of the other rows) the seeds
    run as one batch of len(seeds) x len(prompts) rows: the prompts are prefilled once, their
    KV cache copied to every seed's rows, and each decode step is one forward for all rows, each
    seed's rows sampled with that seed's own generator, so every seed draws the random numbers
    it would draw alone. Elsewhere, and for a single prompt (oneDNN's one-row product is
    another kernel), the seeds run one after another.
    """
    device = model.embed_tokens.weight.device
    if len(seeds) > 1 and (len(prompts) == 1 or not kernels.rows_independent(model)):
        return [generate_seeds(model, prompts, max_new_tokens, temperature, top_p, top_k, stop_ids, [s], pad_id,
                               static_cache)[0] for s in seeds]
    if static_cache is None:
        static_cache = {p.device.type for p in model.parameters()} == {"cuda"}
    # Longest prompts first, so rows of similar length are neighbours and prefill() can run
    # them as blocks cut to their own longest prompt; results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    prompts = [prompts[i] for i in order]
    B, T, G = len(prompts), max(len(p) for p in prompts), len(seeds)
    idx = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = True
    gens = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]
    model.setup_cache(G * B, T + max_new_tokens)
    try:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = prefill(model, idx, mask, pos, [len(p) for p in prompts])  # into rows 0..B-1
        for layer in model.layers:  # every seed starts from the same prompt cache
            c = layer.self_attn.cache
            for g in range(1, G):
                c.k[g * B:(g + 1) * B, :, :T].copy_(c.k[:B, :, :T])
                c.v[g * B:(g + 1) * B, :, :T].copy_(c.v[:B, :, :T])
        model.cache_valid[B:, :T] = model.cache_valid[:B, :T].repeat(G - 1, 1)
        out = decode_n_tokens(model, logits.repeat(G, 1), (pos[:, -1:] + 1).repeat(G, 1), T, B, max_new_tokens,
                              temperature, top_p, top_k, stop_ids, gens, pad_id,
                              CapturedDecode(model, G * B) if static_cache else None)
    finally:
        model.clear_cache()
    results = []
    for g in range(G):
        result = [None] * B
        for i in range(B):
            row = out[g * B + i].tolist()
            hit = [j for j, t in enumerate(row) if t in set(stop_ids)]
            result[order[i]] = row[:hit[0] + 1] if hit else row
        results.append(result)
    return results


def decode_n_tokens(model, logits, next_pos, slot, B, n, temperature, top_p, top_k, stop_ids, gens, pad_id,
                    step_fn=None):
    """The decode loop: sample a token for every row not done yet (rows g*B..(g+1)*B-1 with
    generator gens[g], in row order), write it, run the one-token forward over the cache from
    `slot`, until every row has met a stop id or n tokens. Returns the (rows, steps) new tokens,
    pad_id after a row's stop.

    Rows that are done leave the forward: once a quarter of the rows it runs are done, the KV
    cache is cut to the others (one copy each time, a few times per call). A row's logits do not
    depend on the other rows (generate_seeds), so this changes no row's tokens; at least two rows
    stay, as oneDNN's one-row product is another kernel. With a fixed-shape step_fn
    (CapturedDecode) every row runs to the end: on a GPU a step costs the same for 1 row or 16."""
    device = logits.device
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    rows = logits.shape[0]
    out = torch.full((rows, n), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    run = torch.arange(rows, device=device)  # the rows the model runs, in cache order: logits[i] is row run[i]'s
    for step in range(n):
        tok = torch.full((len(run),), pad_id, dtype=torch.long, device=device)
        todo = ~done[run]
        for g, gen in enumerate(gens):
            mine = (todo & (run // B == g)).nonzero().squeeze(1)
            if len(mine):
                tok[mine] = sample_next(logits[mine], temperature, top_p, top_k, gen)
        out[run, step] = tok
        done[run] |= todo & torch.isin(tok, stop)
        if bool(done.all()) or step == n - 1:
            return out[:, :step + 1]
        todo = ~done[run]
        if step_fn is None and len(run) > 2 and 4 * int(todo.sum()) <= 3 * len(run):
            keep = todo.nonzero().squeeze(1)
            if len(keep) < 2:  # fill with rows that are done
                keep = torch.cat([keep, (~todo).nonzero().squeeze(1)[:2 - len(keep)]]).sort().values
            for layer in model.layers:
                layer.self_attn.cache.keep(keep)
            model.cache_valid = model.cache_valid[keep.to(model.cache_valid.device)]
            run, tok, next_pos = run[keep], tok[keep], next_pos[keep]
        logits = step_fn(tok, next_pos, slot + step) if step_fn else decode_one_token(model, tok, next_pos, slot + step)
        next_pos = next_pos + 1


def decode_one_token(model, tok, pos, slot):
    """Last-position logits (rows, vocab) of one new token per row, written to the cache at slot."""
    return model(tok[:, None], None, pos, slot=slot)[:, -1].to(pos.device)


class CapturedDecode:
    """decode_one_token with fixed shapes, captured once as CUDA graphs and replayed each step:
    what gpt-fast gets from torch.compile(mode="reduce-overhead"), by hand. An 8B model's step
    is ~1,300 kernel launches, each a few microseconds of Python and driver for much less GPU
    work at small batches; a replay launches them all at once.

    Fixed shapes: the token, positions and slot live in tensors of their own that each call
    refills, and the step attends over the whole preallocated cache (slots not yet written are
    masked out; their zeros cost a read, no more). A model split over cards (pipeline.py) gets
    one graph per stage, and between two replays its activations hop to the next card, as in
    forward. Off CUDA the same step runs eagerly (the tests)."""

    def __init__(self, model, rows):
        dev = model.embed_tokens.weight.device
        self.model, self.graphs, self.logits = model, None, None
        self.tok = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        bounds = getattr(model, "stage_bounds", None) or [0, len(model.layers)]
        self.stages = [model.layers[a:b] for a, b in zip(bounds, bounds[1:])]

    def __call__(self, tok, pos, slot):
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.slot.fill_(slot)
        if self.tok.device.type != "cuda":
            return self.eager()
        if self.graphs is None:
            self.capture()
        for graph, hops in self.graphs:
            for dst, src in hops:
                dst.copy_(src)
            graph.replay()
        return self.logits.to(self.tok.device)  # the last graph's own output: read it before the next call

    def stage(self, i, x=None, ctx=None):
        """Stage i of the one-token forward: after the embedding for stage 0, the head after the last."""
        if i == 0:
            x, ctx = self.model.embed(self.tok[:, None], None, self.pos, self.slot)
        for layer in self.stages[i]:
            x = layer(x, *ctx)
        return self.model.finish(x)[:, -1] if i == len(self.stages) - 1 else (x, ctx)

    def eager(self):
        """The stages one after another, hopping between cards as forward does."""
        out = self.stage(0)
        for i in range(1, len(self.stages)):
            out = self.stage(i, *to_layer(self.stages[i][0], *out))
        return out.to(self.tok.device)

    def capture(self):
        # A first eager step on a side stream loads the kernels and cuBLAS' workspace, which a
        # capture must not do; it writes this step's K/V, which the replay writes again.
        side = torch.cuda.Stream(self.tok.device)
        side.wait_stream(torch.cuda.current_stream(self.tok.device))
        with torch.cuda.stream(side):
            self.eager()
        torch.cuda.current_stream(self.tok.device).wait_stream(side)
        self.graphs, out = [], None
        for i, layers in enumerate(self.stages):
            dev, hops, args = layer_device(layers[0]), [], ()
            if i > 0:  # the previous stage's outputs, copied to this card if it is another (fixed buffers)
                args = [t.to(dev) if torch.is_tensor(t) else t for t in (out[0], *out[1])]
                hops = [(a, t) for a, t in zip(args, (out[0], *out[1])) if torch.is_tensor(t) and a is not t]
                args = (args[0], tuple(args[1:]))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(dev), torch.cuda.graph(graph, stream=torch.cuda.Stream(dev)):
                out = self.stage(i, *args)
            self.graphs.append((graph, hops))
        self.logits = out


def prefill(model, idx, mask, pos, lengths, waste=0.15):
    """Last-position logits of left-padded prompts (sorted longest first), their K/V written to
    the cache. A block of rows runs cut to its own longest prompt, starting at that slot: the
    padding that the batch's longest prompt forces on short rows is mostly never computed."""
    T, out = idx.shape[1], []
    caches, valid = [layer.self_attn.cache for layer in model.layers], model.cache_valid
    try:
        for g in length_groups(lengths, waste):  # sorted input: each group is a run of rows a..b-1
            a, b = g[0], g[-1] + 1
            for layer, c in zip(model.layers, caches):
                layer.self_attn.cache = c.rows(a, b)
            model.cache_valid = valid[a:b]
            s = T - lengths[a]
            out.append(model(idx[a:b, s:], mask[a:b, s:], pos[a:b, s:], slot=s, last_only=True)[:, -1])
    finally:
        for layer, c in zip(model.layers, caches):
            layer.self_attn.cache = c
        model.cache_valid = valid
    return torch.cat([o.to(idx.device) for o in out])
