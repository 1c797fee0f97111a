"""The composed tiny mix served by vLLM's OpenAI server (CPU build) answers a
real ``openai`` client on loopback. The ``server`` fixture (conftest) starts
the server with ``vllm-mixed serve RECIPE`` and stops it."""

from __future__ import annotations


def test_openai_client_completion(server):
    from openai import OpenAI

    base, model, log = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == [model]
    reply = client.completions.create(
        model=model, prompt="Hello, world! The capital of France is", max_tokens=8, temperature=0
    )
    again = client.completions.create(
        model=model, prompt="Hello, world! The capital of France is", max_tokens=8, temperature=0
    )
    assert reply.usage.completion_tokens == 8
    assert reply.choices[0].text, "empty completion"
    assert reply.choices[0].text == again.choices[0].text, "greedy completions must repeat"
    from vllm_mixed.cpu_kernels import cpu_method_name
    from vllm_mixed.formats.gptq_int4 import GPTQ_QUANT_CONFIG

    text = log.read_text()
    experts = cpu_method_name("gptq_int4", "experts", GPTQ_QUANT_CONFIG)  # vLLM's own, or the fallback on this CPU
    assert "vllm-mixed: loaded" in text and f"experts <- source 'int4' (gptq_int4) via {experts}" in text
