"""The child process of ``vllm-mixed eval``: one vLLM engine, one model
directory, teacher-forced prompt logprobs written to a JSON file.

Each engine runs in a fresh interpreter so that two models never share one
process (vLLM keeps global state, and its CPU engine sometimes aborts during
interpreter teardown). Run as::

    python -m vllm_mixed.evaluate_worker REQUEST.json OUT.json

REQUEST = ``{"model": DIR, "load_format": "mixed", "engine": {LLM kwargs},
"prompts": [text | [token ids]], "top_k": K}`` (``K = -1``: the whole
vocabulary). OUT = ``{"prompt_token_ids": [[...]], "positions": [[{"ids":
[...], "logprobs": [...]}, ...]], "vocab_size": V, "top_k": K, "init_s": s,
"run_s": s}``
where position ``i`` of a prompt scores its token ``i + 1``; or ``{"error":
"..."}`` when vLLM rejected the prompts. The last line of the log is
``EVAL_WORKER_OK`` once OUT is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from vllm_mixed.vllm_compat import client_errors, prompt_logprob_rows, prompt_logprobs_options

__all__ = ["OK_MARK", "run_request"]

OK_MARK = "EVAL_WORKER_OK"


def run_request(request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Start the engine and score the prompts; returns (result, llm)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    top_k = int(request["top_k"])
    start = time.perf_counter()
    llm = LLM(
        model=request["model"],
        load_format=request["load_format"],
        max_logprobs=top_k,  # -1: no cap (the whole vocabulary may be requested)
        **request["engine"],
    )
    init_s = time.perf_counter() - start
    prompts = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in request["prompts"]]
    # max_tokens=1: only the prompt is scored, the one sampled token is ignored;
    # no detokenizing of the (up to vocabulary-many) logprob tokens, flat lists where the release has them
    params = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False, **prompt_logprobs_options()
    )
    start = time.perf_counter()
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    except client_errors() as exc:  # a prompt too long for max_model_len, an empty prompt, ...
        return {"error": str(exc), "init_s": init_s}, llm
    run_s = time.perf_counter() - start
    result: dict[str, Any] = {
        "prompt_token_ids": [],
        "positions": [],
        "vocab_size": llm.llm_engine.model_config.get_vocab_size(),
        "top_k": top_k,
        "init_s": init_s,
        "run_s": run_s,
    }
    for out in outputs:
        result["prompt_token_ids"].append(list(out.prompt_token_ids))
        result["positions"].append(_positions(out.prompt_logprobs))
    return result, llm


def _positions(prompt_logprobs: Any) -> list[dict[str, list[Any]]]:
    """Per scored position (all but the first token) the token ids and
    logprobs vLLM returned, each token once (the actual token may also be in
    the top-K: flat lists repeat it)."""
    rows = prompt_logprob_rows(prompt_logprobs)
    return [{"ids": list(r), "logprobs": list(r.values())} for r in rows[1:]]  # row 0 has no context


def main(argv: list[str]) -> None:
    request_path, out_path = argv
    with open(request_path) as f:
        request = json.load(f)
    result, llm = run_request(request)
    with open(out_path, "w") as f:
        json.dump(result, f)
    print(OK_MARK, json.dumps({"init_s": result.get("init_s"), "run_s": result.get("run_s")}), flush=True)
    # Stop the engine-core process explicitly, then leave without interpreter
    # teardown: vLLM's CPU engine sometimes aborts there ("terminate called
    # without an active exception") after all work is done.
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
