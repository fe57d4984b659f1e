"""What a researcher watches: the per-step training log against values computed by hand, and
the TensorBoard event files read back by TensorBoard's own reader."""
import json
import math

import pytest
import torch

import data
import lora
import model as M
import quant
import sppo
from machinery import report
from tiny import make_tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics")
    make_tiny_chat_model(d / "model", layers=2)
    return d


def pairs_for(tok):
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()
    wins = [(0.9, 0.2, 0.8), (0.7, 0.4, 0.6), (0.6, 0.1, 0.9)]
    refs = [(-30.0, -20.0), (-25.0, -35.0), (-5.0, -60.0)]  # the last pair's rejected gets the larger log-ratio
    return [{"id": str(i), "prompt_ids": ids(5 + i), "chosen_ids": ids(4 + i), "rejected_ids": ids(6 - i),
             "chosen_probs_win": pw, "chosen_probs_lose": pl, "chosen_probs": pwl,
             "ref_chosen_logp": rw, "ref_rejected_logp": rl} for i, ((pw, pl, pwl), (rw, rl)) in enumerate(zip(wins, refs))]


def test_step_log_holds_hand_computed_margin_accuracy_targets_and_clip_grad_norm(tiny, tmp_path):
    """One optimizer step over three pairs. By hand, from the policy's own log-probs (a twin of
    the trained model, built the same way: NF4 base, LoRA with B = 0): the log-ratios, their
    margin, the fraction of pairs where chosen's is larger, the SPPO targets eta (p_hat - 1/2);
    and the gradient norm is what torch.nn.utils.clip_grad_norm_ returns for the hand-written
    square loss on the twin."""
    s = sppo.Settings(model=str(tiny / "model"), device="cpu", batch_size=3, epochs=1, eta=4.0, lora_r=4, lr=1e-3)
    tok = data.Tokenizer.from_dir(s.model)
    pairs = pairs_for(tok)
    (tmp_path / "train").mkdir()
    log = sppo.train(s, tok, tiny / "model", pairs, tmp_path / "train", tmp_path / "adapter")
    assert len(log) == 1
    got = log[0]

    torch.manual_seed(s.seed)  # as train() does before it builds the model
    twin = quant.quantize_model(s.model, torch.float32, "cpu", product_dtype=quant.product_dtype("cpu"))
    lora.add_lora(twin, sppo.lora_config(s))
    twin.train()
    ids, mask = data.pair_tensors(pairs, s, tok.pad_id, "cpu")
    logp = data.sequence_logps(twin, ids, mask)
    lw = [logp[i, 0].item() - p["ref_chosen_logp"] for i, p in enumerate(pairs)]
    ll = [logp[i, 1].item() - p["ref_rejected_logp"] for i, p in enumerate(pairs)]
    tw = [4.0 * (p["chosen_probs_win"] - 0.5) for p in pairs]
    tl = [4.0 * (p["chosen_probs_lose"] - 0.5) for p in pairs]
    assert got["logr_chosen"] == pytest.approx(sum(lw) / 3, abs=1e-4)
    assert got["logr_rejected"] == pytest.approx(sum(ll) / 3, abs=1e-4)
    assert got["margin"] == pytest.approx(sum(a - b for a, b in zip(lw, ll)) / 3, abs=1e-4)
    assert got["accuracy"] == pytest.approx(sum(a > b for a, b in zip(lw, ll)) / 3)
    assert 0 < got["accuracy"] < 1  # the case is not degenerate: some pairs each way
    assert got["target_chosen"] == pytest.approx(sum(tw) / 3) and got["target_rejected"] == pytest.approx(sum(tl) / 3)
    assert got["abs_logr"] == pytest.approx(sum(map(abs, lw + ll)) / 6, abs=1e-4)
    loss = sum((a - x) ** 2 + (b - y) ** 2 for a, b, x, y in zip(
        [logp[i, 0] - p["ref_chosen_logp"] for i, p in enumerate(pairs)],
        [logp[i, 1] - p["ref_rejected_logp"] for i, p in enumerate(pairs)], tw, tl)) / 2 / 3
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(lora.lora_params(twin).values()), s.clip)
    assert got["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    assert got["lr"] == pytest.approx(1e-3) and got["tokens_per_s"] > 0  # the first step's lr: warm-up of 1 step
    assert json.loads((tmp_path / "train" / "losses.jsonl").read_text().splitlines()[0]) == got


def test_tensorboard_event_files_read_back_by_tensorboard_side_by_side(tiny, tmp_path):
    """--report-to tensorboard: the per-step scalars and the per-iteration measures go to event
    files under runs/<name>/tensorboard; TensorBoard's own reader, pointed at runs/, finds each
    run by its folder and reads back exactly the logged values."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    s = sppo.Settings(model=str(tiny / "model"), device="cpu", batch_size=1, epochs=1, lora_r=4)
    tok = data.Tokenizer.from_dir(s.model)
    runs = tmp_path / "runs"
    logs = {}
    for name in ("a", "b"):
        work = runs / name / "iter0" / "train"
        work.mkdir(parents=True)
        track = report.Tracker("tensorboard", runs / name, name, {})
        logs[name] = sppo.train(s, tok, tiny / "model", pairs_for(tok), work, work.parent / "adapter", track, 0)
        track({"heldout/win_rate": 0.625, "heldout/win_rate_ci": 0.1}, 1)
        track.close()
    mux = EventMultiplexer().AddRunsFromDirectory(str(runs))
    mux.Reload()
    assert set(mux.Runs()) == {"a/tensorboard", "b/tensorboard"}
    for name, log in logs.items():
        acc = mux.GetAccumulator(f"{name}/tensorboard")
        assert {"train/loss", "train/margin", "train/accuracy", "train/grad_norm", "train/lr", "train/tokens_per_s",
                "train/target_chosen", "heldout/win_rate"} <= set(acc.Tags()["scalars"])
        back = [(e.step, e.value) for e in acc.Scalars("train/loss")]
        assert [st for st, _ in back] == [x["step"] for x in log] == [1, 2, 3]
        assert all(math.isclose(v, x["loss"], rel_tol=1e-6) for (_, v), x in zip(back, log))
        assert [(e.step, e.value) for e in acc.Scalars("heldout/win_rate")] == [(1, 0.625)]


def test_iteration_scalars_are_each_measure_and_its_ci():
    res = {"iter": 2, "win_rate": [0.6, 0.05], "n_eval": 100, "train_loss": 3.5, "sat_gain": [0.1, 0.08],
           "per_kind": {"max_words": {"n": 3}}}
    assert report.iteration_scalars(res) == {"heldout/win_rate": 0.6, "heldout/win_rate_ci": 0.05, "heldout/n_eval": 100,
                                             "heldout/train_loss": 3.5, "heldout/sat_gain": 0.1, "heldout/sat_gain_ci": 0.08}


def test_iteration_estimate_scales_each_stage_by_its_work_against_the_defaults():
    """report.iteration_estimate, checked by hand: at the defaults an iteration is the sum of the
    stage ratios times the held-out answers' seconds; twice the prompts doubles every stage but
    the evaluation; twice the epochs doubles training alone; half the held-out prompts in the
    same seconds means each took twice as long."""
    r, e = report.STAGE_RATIOS, 10.0
    d = report.AT_DEFAULTS
    base = report.iteration_estimate(d["prompts"], d["k"], d["epochs"], d["eval_prompts"], e)
    assert base == pytest.approx(e * sum(r.values()))
    more = report.iteration_estimate(2 * d["prompts"], d["k"], d["epochs"], d["eval_prompts"], e)
    assert more == pytest.approx(e * (2 * (r["generate"] + r["pairs"] + r["train"]) + r["evaluate"]))
    longer = report.iteration_estimate(d["prompts"], d["k"], 2 * d["epochs"], d["eval_prompts"], e)
    assert longer == pytest.approx(base + e * r["train"])
    slower = report.iteration_estimate(d["prompts"], d["k"], d["epochs"], d["eval_prompts"] // 2, e)
    assert slower == pytest.approx(2 * base - e * r["evaluate"])
