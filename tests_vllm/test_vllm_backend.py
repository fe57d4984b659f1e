"""The vLLM sampler samples the way ours does (run by `make test-vllm`, in .venv-vllm).

vLLM is the independent reference here: same prompt token ids, same settings, greedy answers
token for token, and with sampling the same stop handling and length limits."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import generate  # noqa: E402
import model as M  # noqa: E402
from machinery import convert, kernels, vllm_backend  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write one sentence about rivers."]


def test_vllm_greedy_equals_our_greedy_and_sampling_obeys_the_same_settings():
    d = convert.embedded_model_dir()
    tok = data.Tokenizer.from_dir(d)
    ids = [tok.encode_chat(q) for q in QUESTIONS]
    ours = generate.generate(kernels.use_onednn(M.load_model(d)), ids, 24, temperature=0, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    theirs = vllm_backend.generate(d, ids, 24, 0.0, 1.0, 0, tok.stop_ids, [0], dtype="float32", memory=0.25)[0]
    assert theirs == ours
    assert "Paris" in tok.decode(theirs[0])
    a = vllm_backend.generate(d, ids, 16, 0.7, 0.9, 0, tok.stop_ids, [0, 50], dtype="float32", memory=0.25)
    b = vllm_backend.generate(d, ids, 16, 0.7, 0.9, 0, tok.stop_ids, [0, 50], dtype="float32", memory=0.25)
    assert a == b, "the same seeds must give the same samples"
    assert a[0] != a[1], "different seeds must give different samples"
    for out in a[0] + a[1]:
        assert len(out) <= 16
        assert all(t not in tok.stop_ids for t in out[:-1]), "a stop id ends the sample"
