"""The SPPO update and the loop: closed-form math, game theory, and end-to-end runs."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import model as M
import sppo
from machinery import runs
from tiny import make_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]


def T(x):
    return torch.tensor([float(x)], requires_grad=True)


# ----------------------------------------------------------------------------- losses

def test_each_loss_equals_hand_computed_value_with_both_terms_nonzero():
    """Every loss on one pair, against the paper's formulas worked out by hand below. Both the
    chosen and the rejected term are non-zero (and differ), and every input is used by some loss, so
    a wrong factor on either term shows. Mutations this catches (each tried by hand): the
    rejected term x0 or x2, the sign of the target flipped, eta in place of 1/eta or 1/eta in
    place of eta, p_win and p_lose swapped, the -1/2 centring dropped, the /2 dropped, dpo
    without beta, ipo's margin 1/(2 beta) written 1/beta, 2 beta or beta/2."""
    # logr_w = -10 - (-11.5) = 1.5, logr_l = -20 - (-19.5) = -0.5; eta = 4, beta = 0.2
    # p_hat_w = 0.75, p_hat_l = 0.125, P(y_w > y_l) = 0.8125 (all exact in binary)
    args = lambda: (T(-10), T(-20), T(-11.5), T(-19.5), T(0.75), T(0.125), T(0.8125))
    f = lambda kind: sppo.preference_loss(kind, *args(), eta=4.0, beta=0.2).item()
    # sppo (eq. 4.2 on both): chosen (1.5 - 4 (0.75 - 0.5))^2 = 0.5^2 = 0.25,
    #   rejected (-0.5 - 4 (0.125 - 0.5))^2 = (-0.5 + 1.5)^2 = 1; (0.25 + 1) / 2
    assert f("sppo") == pytest.approx(0.625, abs=1e-12)
    # sppo_single: target 4 (0.8125 - 0.5) = 1.25 up for chosen, down for rejected:
    #   (1.5 - 1.25)^2 = 0.0625, (-0.5 + 1.25)^2 = 0.5625; (0.0625 + 0.5625) / 2
    assert f("sppo_single") == pytest.approx(0.3125, abs=1e-12)
    # dpo: -log sigmoid(beta (logr_w - logr_l)) = -log sigmoid(0.2 * 2) = log(1 + e^-0.4)
    assert f("dpo") == pytest.approx(math.log1p(math.exp(-0.4)), abs=1e-6)
    # ipo: (logr_w - logr_l - 1/(2 beta))^2 = (2 - 2.5)^2
    assert f("ipo") == pytest.approx(0.25, abs=1e-6)


def test_sppo_gradient_is_zero_when_log_ratio_hits_its_target():
    """The fixed point of eq. 4.2: zero loss and gradient exactly at logr = eta (p_hat - 1/2) for
    each response. Mutations this catches (tried by hand): the sign of the target flipped, 1/eta
    or 2 eta for eta, p_win/p_lose swapped, the -1/2 centring dropped."""
    eta, p_win, p_lose = 7.0, 0.85, 0.2
    logp_w, logp_l = T(-3 + eta * (p_win - 0.5)), T(-4 + eta * (p_lose - 0.5))
    loss = sppo.preference_loss("sppo", logp_w, logp_l, T(-3), T(-4), T(p_win), T(p_lose), T(0.9), eta, 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert logp_w.grad.abs().item() < 1e-6 and logp_l.grad.abs().item() < 1e-6
    # and away from the target the gradient is not zero (the check above can fail)
    logp_w2 = T(-3)
    sppo.preference_loss("sppo", logp_w2, T(-4), T(-3), T(-4), T(p_win), T(p_lose), T(0.9), eta, 0.1).backward()
    assert logp_w2.grad.abs().item() > 1.0


def tabular_sppo_step(pi_t, win, eta):
    """pi_{t+1} of one SPPO iteration over a tabular policy (one logit per response): the
    paper's objective E_{y ~ pi_t}[(log pi(y)/pi_t(y) - eta (P(y > pi_t) - 1/2))^2], with
    sppo.preference_loss as the per-response term, minimised to convergence by L-BFGS."""
    ref = pi_t.log()
    theta = ref.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = theta.log_softmax(-1)
        # every response is "chosen" and "rejected" of itself: the loss is (logr - eta (win - 1/2))^2,
        # weighted by pi_t, the distribution the responses are sampled from
        per = sppo.preference_loss("sppo", logp, logp, ref, ref, win, win, win, eta, 0.1)
        loss = (pi_t * per).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach().softmax(-1)


def test_sppo_step_moves_probability_towards_responses_that_beat_pi_t_as_multiplicative_weights():
    """One exact tabular SPPO step from pi_t against the closed form of the paper (sections 3-4):
    the multiplicative-weights update pi_{t+1}(y) = pi_t(y) exp(eta P(y > pi_t)) / Z.

    The square loss targets log(pi/pi_t) = eta (P(y > pi_t) - 1/2): it puts eta/2 where the
    exact step has log Z. Since E_{pi_t}[P(y > pi_t)] = 1/2 (P + P^T = 1), log Z = eta/2 +
    O(eta^2), and the softmax's normalisation leaves the fitted step within
    eta^2 Var_{pi_t}(P(y > pi_t)) of the exact one at small eta, while the step itself moves
    each log-probability by about eta |P(y > pi_t) - 1/2|, 45 to 100 times more here.
    Mutations this catches (each tried by hand): the sign of the update flipped (probability
    moves away from the winners: the von Neumann test below cannot see this, since
    anti-multiplicative weights cycle around the interior equilibrium too), eta replaced by
    1/eta, eta doubled, the -1/2 centring dropped. It cannot see a factor on the rejected term
    or p_win/p_lose swapped (each response is its own chosen and rejected here): the
    hand-computed test catches those."""
    A = torch.tensor([[0, .3, -.2, .1], [-.3, 0, .25, -.15], [.2, -.25, 0, .35], [-.1, .15, -.35, 0]],
                     dtype=torch.float64)  # antisymmetric: P = 1/2 + A has P + P^T = 1
    P = 0.5 + A
    pi_t = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    win = P @ pi_t  # P(y > pi_t) = (0.56, 0.415, 0.54, 0.435): responses 0 and 2 beat pi_t
    assert (pi_t @ win).item() == pytest.approx(0.5)
    eta = 0.2
    new = tabular_sppo_step(pi_t, win, eta)
    moved = new.log() - pi_t.log()
    # direction: up exactly for the responses that beat pi_t, down for the others
    assert torch.equal(moved > 0, win > 0.5), (moved.tolist(), win.tolist())
    # size: the multiplicative-weights step, up to the square loss's normalisation error
    mw = pi_t * torch.exp(eta * win)
    mw = mw / mw.sum()
    var = (pi_t * (win - 0.5) ** 2).sum().item()
    assert (new.log() - mw.log()).abs().max().item() <= eta ** 2 * var
    assert (mw.log() - pi_t.log()).abs().min().item() > 40 * eta ** 2 * var  # the step is much larger


def test_tabular_sppo_average_policy_converges_to_von_neumann_winner():
    """The paper's theorem on a rock-paper-scissors-like game, with the project's own loss.

    P[i][j] = 1/2 + A[i][j] with A antisymmetric [[0, a, -b], [-a, 0, c], [b, -c, 0]]: every
    response beats one and loses to another (intransitive). The game's von Neumann winner,
    pi with pi^T A >= 0, is (c, b, a) / (a + b + c) in closed form (A (c, b, a)^T = 0).
    Each SPPO iteration fits a tabular policy to the exact targets eta (P(y > pi_t) - 1/2)
    by minimising sppo.preference_loss; the average of the iterates must reach the winner.
    Mutations this catches (tried by hand): eta replaced by 1/eta (steps of 1/0.3 overshoot
    and the average misses the winner). It does NOT catch the update's sign flipped:
    anti-multiplicative weights cycle around the same interior equilibrium, and their average
    converges too; the direction test above catches that.
    """
    a, b, c = 0.4, 0.2, 0.1
    A = torch.tensor([[0, a, -b], [-a, 0, c], [b, -c, 0]], dtype=torch.float64)
    P = 0.5 + A
    winner = torch.tensor([c, b, a], dtype=torch.float64) / (a + b + c)
    eta, iters = 0.3, 2000
    logits = torch.zeros(3, dtype=torch.float64)
    avg = torch.zeros(3, dtype=torch.float64)
    for t in range(iters):
        pi_t = logits.softmax(-1)
        avg += pi_t / iters
        win = P @ pi_t                       # P(y > pi_t) for each response y
        logits = tabular_sppo_step(pi_t, win, eta).log()
    dist = (avg - winner).abs().sum().item()
    assert dist < 0.02, (avg.tolist(), winner.tolist())
    # the last iterate cycles around the winner instead of settling (why the average matters)
    assert (logits.softmax(-1) - winner).abs().sum().item() > dist


# ----------------------------------------------------------------------------- the loop on a tiny model

def tiny_prompts(path, n, tag):
    rows = [{"id": f"{tag}{i}", "prompt": f"say something short number {i} please",
             "checks": [{"type": "no_digits"}, {"type": "max_chars", "n": 18}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_chat_model(d / "model")
    return d


def run_args(tiny, runs, name="r"):
    return ["--model", str(tiny / "model"), "--prompts", str(tiny_prompts(tiny / "train.jsonl", 12, "p")),
            "--heldout", str(tiny_prompts(tiny / "heldout.jsonl", 4, "h")), "--runs-dir", str(runs), "--name", name,
            "--iters", "2", "--prompts-per-iter", "6", "--eval-prompts", "4", "--k", "3", "--max-new-tokens", "8",
            "--gen-batch", "2", "--batch-size", "2", "--epochs", "2", "--ckpt-every", "1", "--lora-r", "4",
            "--device", "cpu", "--lr", "1e-2", "--eta", "2", "--judge-batch", "2", "--kl-samples", "3"]


def run_sppo(args, crash=None):
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("SPPO_KILL_AT", None)
    if crash:
        env["SPPO_KILL_AT"] = crash
    return subprocess.run([sys.executable, str(ROOT / "sppo.py"), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def artifacts(run):
    """Every file a run leaves, by relative path -> bytes (safetensors compared by tensors).
    Temporary files are not skipped: a resumed run must not leave any behind. The one thing
    no two runs share is a clock: losses.jsonl's tokens_per_s is left out of its lines."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(run.rglob("*")):
        if f.is_dir() or f.name in ("ckpt.pt",):
            continue
        rel = str(f.relative_to(run))
        if f.suffix == ".safetensors":
            out[rel] = {k: v.numpy().tobytes() for k, v in load_file(f).items()}
        elif f.name == "losses.jsonl":
            out[rel] = [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in f.read_text().splitlines()]
        else:  # the run's own folder is named in some files (an adapter's base model path)
            out[rel] = f.read_bytes().replace(str(run.parent).encode(), b"<runs>")
    return out


@pytest.fixture(scope="module")
def reference_run(tiny_setup, tmp_path_factory):
    """One uninterrupted run (2 iterations), the reference for the kill-and-resume test."""
    runs = tmp_path_factory.mktemp("ref")
    r = run_sppo(run_args(tiny_setup, runs))
    assert r.returncode == 0, r.stderr[-3000:]
    return runs / "r", r


def test_sequence_logps_equal_transformers_log_probs_of_response_tokens(tiny_setup):
    """A pair row (prompt once, then chosen, then rejected) scores each response as transformers
    does with the prompt and that response alone; so do rows of one response."""
    import model as M
    from transformers import AutoModelForCausalLM
    s = sppo.parse_args(run_args(tiny_setup, tiny_setup) + ["--max-len", "20", "--max-prompt-len", "6"])
    pairs = [{"prompt_ids": [5, 6, 7, 8, 9, 10, 11, 12], "chosen_ids": [20, 21, 22, 2], "rejected_ids": [30] * 15},
             {"prompt_ids": [40, 41], "chosen_ids": [50, 51, 52, 53, 54, 55], "rejected_ids": [60, 61, 62]},
             {"prompt_ids": [70, 71, 72], "chosen_ids": [80], "rejected_ids": [90, 91]}]
    ids, seg = data.pair_tensors(pairs, s, 0, "cpu")
    # truncation: the prompt keeps its last 6 tokens, each response fills up to max_len = 20
    assert ids[0, :10].tolist() == [7, 8, 9, 10, 11, 12, 20, 21, 22, 2] and ids[0, 10:].tolist() == [30] * 14
    hf = AutoModelForCausalLM.from_pretrained(tiny_setup / "model", torch_dtype=torch.float32)
    model = M.load_model(tiny_setup / "model")

    def want(prompt, resp):
        row = torch.tensor(prompt + resp)
        logp = hf(row[None]).logits[0].log_softmax(-1)
        return sum(logp[t - 1, row[t]].item() for t in range(len(prompt), len(row)))
    with torch.no_grad():
        got = data.sequence_logps(model, ids, seg)
        cut = [(p["prompt_ids"][-6:], 20 - len(p["prompt_ids"][-6:])) for p in pairs]
        ref = [[want(x, p["chosen_ids"][:n]), want(x, p["rejected_ids"][:n])] for p, (x, n) in zip(pairs, cut)]
        assert torch.allclose(got, torch.tensor(ref), atol=1e-4)
        ids, mask = data.seq_tensors([x for x, _ in cut], [p["rejected_ids"] for p in pairs], s, 0, "cpu")
        got = data.sequence_logps(model, ids, mask)
    assert torch.allclose(got, torch.tensor(ref)[:, 1], atol=1e-4)


def test_length_groups_cover_every_row_once_and_bound_padding():
    lengths = [200, 64, 190, 70, 256, 30, 128, 66]
    groups = data.length_groups(lengths, waste=0.15)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:  # padded to its longest row, a group adds at most 15% of its real tokens
        assert len(g) * max(lengths[i] for i in g) <= 1.15 * sum(lengths[i] for i in g)
    assert len(groups) < len(lengths)  # similar lengths still share a batch
    assert data.length_groups([50] * 4) == [[0, 1, 2, 3]]


def test_reference_logps_are_frozen_and_differ_from_trained_policy(tiny_setup, tmp_path, monkeypatch):
    import lora
    import pipeline
    import quant
    quantized = []  # the scoring's NF4 pi_t is kept for training: one quantization per iteration
    monkeypatch.setattr(quant, "quantize_model", lambda *a, _f=quant.quantize_model, **k: quantized.append(a[0]) or _f(*a, **k))
    s = sppo.parse_args(run_args(tiny_setup, tmp_path) + ["--lr", "5e-2", "--eta", "4"])
    tok = data.Tokenizer.from_dir(s.model)
    rows, _ = data.load_prompts(s.prompts)
    rows = rows[:6]
    it = tmp_path / "it"
    it.mkdir()
    responses = sppo.sample(s, Path(s.model), tok, rows, it / "responses.jsonl", [0, 50, 100])
    judgments = sppo.judge_responses(s, tok, rows, responses, it / "judgments.jsonl")
    nf4 = []
    pairs = sppo.make_pairs(s, tok, Path(s.model), responses, judgments, it / "pairs.jsonl", keep=nf4)
    assert pairs, "the tiny setup must give some pairs"
    assert quantized == [Path(s.model)] and len(nf4) == 1
    before = (it / "pairs.jsonl").read_bytes()
    # the reference is the frozen base: recompute it independently with the plain fp32-loaded
    # model quantized the same way and no adapter
    base = quant.quantize_model(s.model, torch.float32, "cpu", product_dtype=quant.product_dtype("cpu"))
    ids, mask = data.pair_tensors(pairs, s, tok.pad_id, "cpu")
    with torch.no_grad():
        ref = data.sequence_logps(base, ids, mask)
    stored = torch.tensor([[p["ref_chosen_logp"], p["ref_rejected_logp"]] for p in pairs])
    assert torch.allclose(ref, stored, atol=1e-4)
    (it / "train").mkdir()
    quantized.clear()
    sppo.train(s, tok, Path(s.model), pairs, it / "train", it / "adapter", model=nf4.pop())
    assert quantized == []  # training took the scoring's model
    assert (it / "pairs.jsonl").read_bytes() == before, "training must not touch the stored reference"
    pol = quant.quantize_model(s.model, torch.float32, "cpu", product_dtype=quant.product_dtype("cpu"))
    lora.add_lora(pol, sppo.lora_config(s))
    lora.load_adapter(pol, it / "adapter")
    with torch.no_grad():
        now = data.sequence_logps(pol, ids, mask)
    assert (now - stored).abs().max().item() > 1e-2, "policy still equals the reference: reference == policy bug"


def test_end_to_end_two_iterations_leave_every_artifact(tiny_setup, reference_run):
    run_a, clean = reference_run
    for t in (0, 1):
        for f in ("responses.jsonl", "judgments.jsonl", "pairs.jsonl", "adapter/adapter_model.safetensors",
                  "model/config.json", "eval_answers.jsonl", "eval.json", "alpaca_eval/model_outputs.json"):
            assert (run_a / f"iter{t}" / f).exists(), f"iter{t}/{f}"
    metrics = [json.loads(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in metrics] == [0, 1]
    assert "| 2 |" in clean.stdout  # the final table, also in summary.md, with length beside every figure
    assert (run_a / "summary.md").read_text() in clean.stdout
    ev = json.loads((run_a / "iter1" / "eval.json").read_text())
    assert {"words_base", "words_new", "win_rate_lc", "sat_gain_lc", "per_kind", "kl"} <= set(ev)
    assert set(ev["per_kind"]) == {"no_digits", "max_chars"} and len(ev["kl"]) == 2
    # a summary line per stage, e.g. "iter 1 generate: 18 responses, 0.1k tokens, 3 s"
    for stage in ("generate", "judge", "pairs", "train", "merge", "evaluate"):
        assert re.search(rf"^iter 1 {stage}: .*\d+ s$", clean.stdout, re.M), stage
    assert re.search(r"^iter 0 generate: 18 responses, [\d.k]+ tokens, \d+ s$", clean.stdout, re.M)
    assert re.search(r"^base generate: 4 held-out answers", clean.stdout, re.M)
    # before the long part, how long it will take here, naming the machine; after an iteration, what is left
    est = re.search(r"^estimate: ~(\d+) s per iteration, ~(\d+) s for 2 at this machine's speed \(from pi_0's "
                    r"answers; (.+), (\d+) cores, (.+)\)$", clean.stdout, re.M)
    assert est and abs(2 * int(est[1]) - int(est[2])) <= 1 and int(est[4]) == os.cpu_count(), clean.stdout
    assert re.search(r"^iteration 0: \d+ s; ~\d+ s to go$", clean.stdout, re.M)
    # AlpacaEval's model_outputs.json: a list of {instruction, output, generator}, one per held-out prompt
    heldout = [json.loads(x)["prompt"] for x in (tiny_setup / "heldout.jsonl").read_text().splitlines()]
    for folder, answers, name in [(run_a, "eval_base.jsonl", "r_pi0"), (run_a / "iter1", "iter1/eval_answers.jsonl", "r_sppo_iter2")]:
        out = json.loads((folder / "alpaca_eval" / "model_outputs.json").read_text())
        greedy = [json.loads(x)["responses"][0] for x in (run_a / answers).read_text().splitlines()]
        assert out == [{"instruction": p, "output": g, "generator": name} for p, g in zip(heldout, greedy)]
    from PIL import Image
    with Image.open(run_a / "metrics.png") as im:
        assert im.format == "PNG" and im.size == (1000, 400)


# Kill points, in order, all in one run folder: each process resumes what the previous one left and is
# SIGKILLed at its n-th resume point of a stage (counts are per process). Every stage is cut at least
# once, generation at three places; one process per kill keeps the test near a minute on 2 cores.
KILLS = ["generate:1",  # base held-out answers, after chunk 1 of 2
         "generate:3",  # iteration 0 sampling, after chunk 2 of 3
         "judge:2",     # iteration 0 judging, after batch 2 of 3
         "pairs:1",     # iteration 0 reference log-probs, after batch 1 of 2
         "train:2",     # iteration 0 training, after step 2 of 4
         "merge:1",     # iteration 0 merge: the shard written, the folder not yet renamed into place
         "generate:1",  # pi_1's held-out answers, after chunk 1 of 2
         "evaluate:3",  # eval.json written (after 2 judged batches), metrics.jsonl / metrics.png not yet
         "train:3",     # iteration 1 training, after step 3 of 4
         ]


def test_sigkill_at_every_stage_then_resume_gives_the_same_artifacts(tiny_setup, reference_run, tmp_path):
    args = run_args(tiny_setup, tmp_path)
    for crash in KILLS:
        r = run_sppo(args, crash)
        assert r.returncode == -9, (crash, r.returncode, r.stderr[-2000:])
        for part in (tmp_path / "r").rglob("*.partial.jsonl"):  # a resumed chunk is never written twice
            ids = [json.loads(x)["id"] for x in part.read_text().splitlines() if x.endswith("}")]
            assert len(ids) == len(set(ids)), (crash, part)
    r = run_sppo(args)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = artifacts(reference_run[0]), artifacts(tmp_path / "r")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], f"{k} differs after kill + resume"


def test_run_folder_refuses_different_settings(tiny_setup, tmp_path):
    s = sppo.parse_args(run_args(tiny_setup, tmp_path))
    run = tmp_path / "r"
    run.mkdir()
    runs.check_settings(s, run, sppo.Settings.HARMLESS)
    s2 = sppo.parse_args(run_args(tiny_setup, tmp_path) + ["--eta", "3"])
    with pytest.raises(runs.RunError, match="eta=2.0, not 3.0"):
        runs.check_settings(s2, run, sppo.Settings.HARMLESS)


def test_vllm_plumbing_gives_each_prompt_its_own_samples_and_resumes_by_chunk(tiny_setup, tmp_path, monkeypatch):
    """`--backend vllm` through sppo.sample with vLLM's process replaced by a stand-in (the real
    one is checked against our sampler by `make test-vllm`): every prompt gets the outputs made
    for its own token ids, a stop token is kept in the ids (they are what gets scored), left out
    of the text and flagged, and a resumed stage asks only for the prompts of its unfinished chunks."""
    from machinery import files, vllm_backend
    tok = data.Tokenizer.from_dir(tiny_setup / "model")
    rows = data.load_prompts(tiny_prompts(tmp_path / "p.jsonl", 5, "q"))[0]
    asked = []

    def stand_in(model_dir, prompts, max_new_tokens, temperature, top_p, top_k, stop_ids, seeds, **kw):
        asked.append(len(prompts))
        return [[[sum(p) % 200 + 3, 7 + k] + ([stop_ids[0]] if sum(p) % 2 else []) for p in prompts]
                for k in range(len(seeds))]

    monkeypatch.setattr(vllm_backend, "generate", stand_in)
    s = sppo.Settings(backend="vllm", gen_batch=2, max_new_tokens=4)
    out = tmp_path / "responses.jsonl"
    got = sppo.sample(s, tiny_setup / "model", tok, rows, out, [0, 50])
    assert asked == [5] and [g["id"] for g in got] == [r["id"] for r in rows]
    for g, r in zip(got, rows):
        ids = tok.encode_chat(data.messages_of(r))
        assert g["prompt_ids"] == ids
        stop = [tok.stop_ids[0]] if sum(ids) % 2 else []
        assert g["response_ids"] == [[sum(ids) % 200 + 3, 7 + k] + stop for k in range(2)]
        assert g["finished"] == [bool(stop)] * 2
        assert g["responses"] == [tok.decode([sum(ids) % 200 + 3, 7 + k]) for k in range(2)]
    assert len({g["response_ids"][0][0] for g in got}) > 1  # the prompts really differ
    out.unlink()
    files.append_jsonl(out.with_suffix(".partial.jsonl"), got[:2])  # as if killed after the first chunk
    assert sppo.sample(s, tiny_setup / "model", tok, rows, out, [0, 50]) == got
    assert asked == [5, 3]


def turn_end_is_not_eos_model(path):
    """A tiny chat model whose eos (<|endoftext|>, 0) is not its chat template's turn end
    (<|im_end|>, 2), with generation_config stopping on both (as Gemma-2-it and early Llama-3-Instruct
    folders), and whose turn end is likely, so that a fair part of the samples end their turn."""
    from safetensors.torch import load_file, save_file
    make_tiny_chat_model(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    t = load_file(path / "model.safetensors")
    e = t["model.embed_tokens.weight"]
    e[:, 0] = 3.0  # every token's embedding leans one way along dimension 0, so the final hidden state does,
    e[2, 0] += 0.3  # and the (tied) head row of <|im_end|> a little further: it gets a steady lead
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    return data.Tokenizer.from_dir(path)


def test_pairs_score_exactly_the_sampled_ids_when_the_turn_end_is_not_eos(tmp_path):
    """The ids scored for chosen and rejected are, token for token, the ids sampled: a response
    that ended its turn keeps the <|im_end|> it ended on, and nothing (no eos) is appended, so no
    part of the SPPO signal goes into a token the model never sampled. The stored reference
    log-prob, end token included, is transformers' log-prob of exactly those ids."""
    from transformers import AutoModelForCausalLM
    tok = turn_end_is_not_eos_model(tmp_path / "model")
    assert tok.eos_id == 0 and tok.stop_ids == [0, 2]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say a thing {i}", "checks": [{"type": "min_words", "n": 2}]}) + "\n"
                               for i in range(8)))
    s = sppo.Settings(model=str(tmp_path / "model"), prompts=str(prompts), device="cpu", k=4, max_new_tokens=8,
                      batch_size=3, lora_r=4)
    rows = data.load_prompts(prompts)[0]
    responses = sppo.sample(s, Path(s.model), tok, rows, tmp_path / "responses.jsonl", [0, 50, 100, 150])
    judgments = sppo.judge_responses(s, tok, rows, responses, tmp_path / "judgments.jsonl")
    pairs = sppo.make_pairs(s, tok, Path(s.model), responses, judgments, tmp_path / "pairs.jsonl")
    by_id = {g["id"]: g for g in responses}
    ended = [x[-1] for p in pairs for x in (p["chosen_ids"], p["rejected_ids"]) if x and x[-1] in tok.stop_ids]
    assert len(pairs) >= 3 and ended.count(2) >= 2  # turn ends were sampled and are in the pairs
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    for p in pairs:
        g = by_id[p["id"]]
        assert p["chosen_ids"] == g["response_ids"][p["chosen_idx"]]
        assert p["rejected_ids"] == g["response_ids"][p["rejected_idx"]]
        for key, ref in (("chosen_ids", "ref_chosen_logp"), ("rejected_ids", "ref_rejected_logp")):
            ids = torch.tensor([p["prompt_ids"] + p[key]])
            with torch.no_grad():
                logp = hf(ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            # the reference is NF4 (4-bit rounding of the weights): close to the fp32 model, not equal
            assert abs(p[ref] - logp[len(p["prompt_ids"]) - 1:].sum().item()) < 0.05 * len(p[key]), key


def test_kl_estimate_covers_the_exact_kl_of_one_new_token(tiny_setup, tmp_path):
    """With one new token KL(pi_new || pi_old) is a finite sum over the vocabulary, computed here
    from transformers' logits; kl_estimate samples pi_new and averages log-ratios, so its 95%
    interval must cover the sum (measured: 1.99 +/- 0.23 against 2.00). Mutations caught (tried by
    hand): the log-ratio's sign flipped, sampling with the loop's temperature 0.7 and top-p 0.9
    (one token left: 4.10 +/- 0); KL(old || new) = 1.05 would be caught too."""
    import shutil
    from transformers import AutoModelForCausalLM
    old = tiny_setup / "model"
    hf = AutoModelForCausalLM.from_pretrained(old, torch_dtype=torch.float32)
    with torch.no_grad():
        hf.model.norm.weight.mul_(6.0)  # a sharper next-token distribution: a KL far from 0
    new = tmp_path / "new"
    hf.save_pretrained(new, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(old / f, new / f)
    s = sppo.parse_args(run_args(tiny_setup, tmp_path) + ["--max-new-tokens", "1", "--gen-batch", "100", "--batch-size", "100"])
    tok = data.Tokenizer.from_dir(old)
    rows = [{"id": f"k{i}", "prompt": "say something short"} for i in range(400)]
    kl, half = sppo.kl_estimate(s, tok, old, new, rows, tmp_path / "kl.jsonl")
    ids = torch.tensor([tok.encode_chat(data.messages_of(rows[0]))])
    with torch.no_grad():
        lp_new = hf(ids).logits[0, -1].log_softmax(-1)
        lp_old = AutoModelForCausalLM.from_pretrained(old, torch_dtype=torch.float32)(ids).logits[0, -1].log_softmax(-1)
    exact = float((lp_new.exp() * (lp_new - lp_old)).sum())
    reverse = float((lp_old.exp() * (lp_old - lp_new)).sum())
    assert abs(kl - exact) < 1.5 * half, (kl, half, exact)  # 1.5 x the 95% half-width: ~3 standard errors
    assert abs(reverse - exact) > 3 * half, "the test must tell the two directions apart"


def test_vllm_child_gets_a_context_no_longer_than_needed_and_its_own_error_ends_the_run(tmp_path):
    """vLLM reserves KV cache for max_model_len tokens: unset, that is the model's whole context
    (8k for Llama-3) and vLLM refuses to start beside a 24 GB card's other tenants. The child is
    asked for the longest prompt + max_new_tokens. When it fails, its last stderr line is the
    error (a stand-in python that records the request and fails)."""
    from machinery import vllm_backend
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncp \"$2\" {tmp_path}/req.json\necho 'loading...' >&2\n"
                    "echo 'ValueError: not enough KV cache for 1 sequence' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(runs.RunError) as e:
        vllm_backend.generate("m", [[1, 2, 3], [4] * 10], 64, 0.7, 0.9, 0, [2], [0, 50], python=str(fake))
    assert str(e.value).endswith(": ValueError: not enough KV cache for 1 sequence")
    assert json.loads((tmp_path / "req.json").read_text())["max_model_len"] == 10 + 64
