"""``make-tiny``: a tiny random Qwen3-MoE in the three published formats.

One float master model is drawn from a seeded generator; each directory holds
it as the corresponding published checkpoint would (BF16; FP8 block with bf16
scales and a BF16 router/embeddings/head; GPTQ int4 g128 with fp16 for the
rest), written by the project's own format writers. Every GEMM dimension is a
multiple of 128 also at tensor-parallel size 2, so Marlin and FP8 block
kernels accept it. A small byte-level BPE tokenizer makes text prompts work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vllm_mixed.checkpoint_writer import write_checkpoint
from vllm_mixed.formats import TINY_FORMATS, UNQUANTIZED, Format
from vllm_mixed.models import Layer, ModelSpec, layers_for, model_named
from vllm_mixed.models.qwen3_moe import QWEN3_MOE

__all__ = [
    "TINY_CONFIG", "checkpoint_config", "checkpoint_tensors", "encode_member", "init_weight", "make_tiny", "recipe_text",
    "train_tokenizer",
]  # fmt: skip

TINY_CONFIG: dict[str, Any] = QWEN3_MOE.tiny_config  # the default tiny model

CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a few experts.
Attention layers read every token; the experts hold most of the weights. Quantization stores weights
in fewer bits: int4 packs eight values into one word, fp8 keeps a scale for every block of weights.
vLLM serves large language models with paged attention and continuous batching. Hello, world!
Once upon a time there was a small model that learned to count: one, two, three, four, five, six,
seven, eight, nine, ten. The capital of France is Paris. The sun rises in the east and sets in the west.
def main():\n    print("hello")\nfor i in range(10):\n    total += i * 2
"""
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def init_weight(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A float32 master weight of one member: norms near 1, a sharper
    router, small linears (on the generator's device)."""
    if kind == "norm":
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=gen.device)
    return (0.1 if kind == "router" else 0.02) * torch.randn(shape, generator=gen, device=gen.device)


def master_weights(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Float32 master weights, keyed by checkpoint module name (no suffix;
    a bias under ``NAME.bias``)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers_for(cfg, "tiny config"):
        for m in layer.members:
            out[m.name] = init_weight(layer.kind, m.shape, gen)
            if m.bias:  # Qwen2's q/k/v biases: large enough to move the logits
                out[f"{m.name}.bias"] = 0.5 * torch.randn(m.shape[:1], generator=gen, device=gen.device)
    return out


def encode_member(layer: Layer, weight: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
    """One member's checkpoint tensors by suffix, as a checkpoint of ``fmt``
    stores it: quantized where the layer is quantizable, else in the
    format's float dtype."""
    tiny = fmt.tiny
    if layer.quantizable and fmt.quantized:
        return fmt.quantize(weight, tiny.quant_config)
    return UNQUANTIZED.quantize(weight, None, tiny.float_dtype)


def checkpoint_tensors(cfg: dict[str, Any], master: dict[str, torch.Tensor], fmt: Format) -> dict[str, torch.Tensor]:
    """All tensors of one published-format checkpoint of the model."""
    tensors = {}
    for layer in layers_for(cfg, "tiny config"):
        for m in layer.members:
            encoded = encode_member(layer, master[m.name], fmt)
            tensors.update({f"{m.name}.{k}": v for k, v in encoded.items()})
            if m.bias:  # float in every format, in the checkpoint's float dtype
                tensors[f"{m.name}.bias"] = UNQUANTIZED.quantize(master[f"{m.name}.bias"], None, fmt.tiny.float_dtype)[
                    "weight"
                ]
    return tensors


def checkpoint_config(cfg: dict[str, Any], fmt: Format) -> dict[str, Any]:
    """config.json of a checkpoint of ``fmt`` as published: its float dtype
    and ``quantization_config`` (with the modules it leaves in float)."""
    tiny = fmt.tiny
    config = {**cfg, "torch_dtype": tiny.float_dtype}
    if tiny.quant_config is not None:
        config["quantization_config"] = dict(tiny.quant_config)
        unconverted = fmt.unconverted_modules(layers_for(cfg, "tiny config"))
        if unconverted:
            config["quantization_config"]["modules_to_not_convert"] = unconverted
    return config


def train_tokenizer(texts: list[str] | None = None) -> Any:
    """A byte-level BPE tokenizer of the tiny vocabulary (64 ids spare),
    trained on ``texts`` (default: a short built-in corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_CONFIG["vocab_size"] - 64,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or [CORPUS] * 4, trainer=trainer)
    return tok


def write_tokenizer(directory: Path, tok: Any = None) -> None:
    """tokenizer.json (``tok``, default :func:`train_tokenizer`), its config
    and generation_config.json."""
    tok = tok or train_tokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": SPECIAL[0],
                "pad_token": SPECIAL[0],
                "bos_token": None,
                "model_max_length": TINY_CONFIG["max_position_embeddings"],
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 0, "bos_token_id": 0, "do_sample": False}, indent=2)
    )


def recipe_text(spec: ModelSpec, formats: tuple[Format, ...]) -> str:
    """The tiny model's recipe: the architecture's mix over the written
    formats (rules whose source was not written are left out)."""
    names = {f.tiny.source for f in formats}
    base = UNQUANTIZED.tiny.source if UNQUANTIZED in formats else formats[0].tiny.source
    rules = [r for r in spec.tiny_rules if r["source"] in names]
    lines = [
        f"# Tiny {spec.architectures[0]}: "
        + ("; ".join(f"{', '.join(r['targets'])} from {r['source']}" for r in rules) or "one source")
        + f", everything else {base}."
    ]
    lines += ["sources:", *(f"  {f.tiny.source}: {f.tiny.directory}" for f in formats)]
    lines += [f"base: {base}", f"default: {base}", "dtype: bfloat16", "rules:" if rules else "rules: []"]
    for r in rules:
        lines += [f"  - targets: {json.dumps(r['targets'])}", f"    source: {r['source']}"]
    return "\n".join(lines) + "\n"


def make_tiny(
    directory: str | Path, seed: int = 0, shard_bytes: int = 2 * 2**20, arch: str | None = None,
    formats: tuple[Format, ...] = TINY_FORMATS, master: dict[str, torch.Tensor] | None = None, tokenizer: Any = None,
) -> dict[str, Path]:  # fmt: skip
    """Write one directory per format (``DIR/bf16``, ``DIR/fp8``,
    ``DIR/gptq-int4`` by default) of a tiny random model of ``arch`` (a
    ``make-tiny --arch`` name; default Qwen3-MoE), and ``DIR/recipe.yaml``.
    ``master`` (float32 weights by member name) and ``tokenizer`` replace the
    random weights and the built-in tokenizer (``make-tiny --trained``)."""
    root = Path(directory)
    spec = model_named(arch) if arch else QWEN3_MOE
    cfg = dict(spec.tiny_config)
    master = master if master is not None else master_weights(cfg, seed)
    tokenizer = tokenizer or train_tokenizer()
    dirs = {}
    for fmt in formats:
        out = root / fmt.tiny.directory
        write_checkpoint(out, checkpoint_tensors(cfg, master, fmt), checkpoint_config(cfg, fmt), shard_bytes)
        write_tokenizer(out, tokenizer)
        dirs[fmt.tiny.directory] = out
    (root / "recipe.yaml").write_text(recipe_text(spec, formats))
    dirs["recipe"] = root / "recipe.yaml"
    return dirs
