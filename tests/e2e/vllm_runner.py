"""Runs vLLM's CPU build on one model directory in a fresh process and writes
JSON: greedy continuations, teacher-forced prompt logprobs and load timings.

Usage: python vllm_runner.py MODEL_DIR LOAD_FORMAT REQUEST.json OUT.json
REQUEST = {"greedy": [[ids...], ...], "teacher": [[ids...], ...], "max_tokens": N, "text": ["..."],
           "tp": tensor_parallel_size (default 1), "greedy_logprobs": top-k per greedy step (default none)}
At TP 1 the engine runs in this one process (VLLM_MIXED_TEST_MULTIPROC=1: vLLM's default processes).
"""

import json
import os
import sys
import time

if __name__ == "__main__":
    model, load_format, request_path, out_path = sys.argv[1:5]
    req = json.load(open(request_path))
    tp = req.get("tp", 1)
    # At TP 1 the whole engine runs in this process (as `vllm-mixed eval` does): vLLM's default starts an
    # engine-core process and a worker process, and each imports vLLM again (~9 s each on 2 cores)
    in_process = tp == 1 and os.environ.get("VLLM_MIXED_TEST_MULTIPROC") != "1"
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        load_format=load_format,
        dtype="bfloat16",
        max_model_len=512,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_num_seqs=8,
        seed=0,
        tensor_parallel_size=tp,
        **({"distributed_executor_backend": "uni"} if in_process else {}),
    )
    init_s = time.perf_counter() - t0
    greedy = SamplingParams(
        max_tokens=req.get("max_tokens", 16), temperature=0.0, ignore_eos=True, logprobs=req.get("greedy_logprobs")
    )
    out = {"init_s": init_s, "greedy": [], "greedy_logprobs": [], "teacher": [], "text": []}
    for res in llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in req.get("greedy", [])], greedy):
        out["greedy"].append(list(res.outputs[0].token_ids))
        steps = res.outputs[0].logprobs or []
        out["greedy_logprobs"].append([{str(tok): v.logprob for tok, v in step.items()} for step in steps])
    for res in llm.generate(req.get("text", []), greedy):
        out["text"].append(res.outputs[0].text)
    tf = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=20)
    for res in llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in req.get("teacher", [])], tf):
        positions = []
        for lp in res.prompt_logprobs[1:]:
            positions.append({str(tok): [v.logprob, v.rank] for tok, v in lp.items()})
        out["teacher"].append(positions)
    with open(out_path, "w") as f:
        json.dump(out, f)
    print("RUNNER_OK", json.dumps({"init_s": init_s}), flush=True)
    # Stop the engine-core process explicitly, then leave without interpreter
    # teardown: vLLM's CPU engine sometimes aborts there ("terminate called
    # without an active exception") after all work is done.
    llm.llm_engine.engine_core.shutdown()
    sys.stderr.flush()
    os._exit(0)
