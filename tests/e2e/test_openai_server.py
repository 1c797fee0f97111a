"""The composed tiny mix served by vLLM's OpenAI server (CPU build) answers a
real ``openai`` client on loopback. The ``server`` fixture (conftest) starts
and stops the server."""

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
    text = log.read_text()
    assert "vllm-mixed: loaded" in text and "CpuDequantGptqMoEMethod" in text
