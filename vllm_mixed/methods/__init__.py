"""vLLM quantization methods of the plugin's own: only the dequantizing
fallback (:mod:`vllm_mixed.methods.dequant_fallback`), for layers whose
format vLLM has no kernel for on this platform. Everything else runs on the
method vLLM's own config for the format hands out."""
