"""``make-tiny --trained``: the tiny Qwen3-MoE trained on real text, so that
accuracy numbers (``eval``, ``fit``) and the demo mean something.

The text is the Python standard library's own top-level ``.py`` modules
(sources, comments and docstrings; under ``sysconfig``'s stdlib path, so on
every machine without a download), in sorted file order. A fixed split holds
every :data:`HELDOUT_EVERY`-th file out: those files are never trained on and
give ``heldout.txt``. The byte-level BPE tokenizer is trained on the training
files only.

Training is transformers' own ``Qwen3MoeForCausalLM`` in float32 on the CPU,
seeded, with deterministic algorithms and one thread, so one Python
version and one torch build give the same weights on every run. The text
differs between Python versions (each ships its own stdlib), and so do the
weights.
"""

from __future__ import annotations

import math
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "HELDOUT_EVERY", "TrainResult", "TrainSettings", "corpus_files", "heldout_prompts", "make_trained", "split_files",
    "train_master",
]  # fmt: skip

HELDOUT_EVERY = 10  # file i (sorted) is held out when i % HELDOUT_EVERY == HELDOUT_EVERY // 2
PROMPT_MIN_CHARS = 48  # a held-out prompt is one source line at least this long


@dataclass(frozen=True)
class TrainSettings:
    """The run: ``steps`` Adam steps on ``batch`` windows of ``seq_len``
    tokens drawn from the training text by a seeded generator."""

    steps: int = 200
    batch: int = 8
    seq_len: int = 128
    lr: float = 6e-3
    warmup: int = 10
    threads: int = 1  # one thread: the same weights on any machine, and no spinning under load
    seed: int = 0
    max_train_bytes: int = 3_000_000  # enough text for the steps (about 1.1M tokens); tokenizing more costs time


@dataclass(frozen=True)
class TrainResult:
    master: dict[str, torch.Tensor]  # checkpoint member name -> float32 weight
    losses: list[float]  # training loss per step (nats/token)
    tokens_seen: int
    seconds: float


def corpus_files(root: str | Path | None = None) -> list[Path]:
    """The stdlib's top-level ``.py`` files in sorted (byte) order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name.encode())
    if len(files) < 2 * HELDOUT_EVERY:
        raise RuntimeError(f"{root}: only {len(files)} .py files; the trained tiny model needs the standard library")
    return files


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): a fixed split by sorted position."""
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY // 2]
    return [f for f in files if f not in held], held


def read_text(files: list[Path], max_bytes: int | None = None) -> str:
    """The files' text (UTF-8, undecodable bytes replaced), one after another
    up to ``max_bytes`` characters in all."""
    parts, size = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if max_bytes is not None and size >= max_bytes:
            break
    return "\n\n".join(parts)[:max_bytes]


def heldout_prompts(files: list[Path], count: int = 48) -> list[str]:
    """Up to ``count`` distinct source lines of the held-out files, at least
    :data:`PROMPT_MIN_CHARS` long after stripping indentation, taken evenly
    over the files (one prompt per line, no line of training text)."""
    per_file: list[list[str]] = []
    for f in files:
        seen: list[str] = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if len(line) >= PROMPT_MIN_CHARS and line.isprintable() and line not in seen:
                seen.append(line)
        per_file.append(seen)
    out: list[str] = []
    for rank in range(max((len(p) for p in per_file), default=0)):
        for lines in per_file:
            if rank < len(lines) and lines[rank] not in out:
                out.append(lines[rank])
                if len(out) == count:
                    return out
    return out


def _model_config(cfg: dict[str, Any]) -> Any:
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        **{k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    )
    config._attn_implementation = "eager"
    return config


def master_from_state(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """transformers' state dict -> checkpoint member name -> float32 weight
    (the fused experts of transformers >= 5 split into gate/up/down per expert)."""
    out = {}
    inter = int(cfg["moe_intermediate_size"])
    for name, value in state.items():
        value = value.detach().to(torch.float32).contiguous()
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name.removesuffix(".gate_up_proj")
            for e in range(value.shape[0]):
                out[f"{p}.{e}.gate_proj"] = value[e, :inter].clone()
                out[f"{p}.{e}.up_proj"] = value[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            p = name.removesuffix(".down_proj")
            for e in range(value.shape[0]):
                out[f"{p}.{e}.down_proj"] = value[e].clone()
        else:
            out[name.removesuffix(".weight")] = value
    return out


def train_master(
    cfg: dict[str, Any], token_ids: list[int], settings: TrainSettings = TrainSettings(),
    log: Callable[[str], None] | None = None,
) -> TrainResult:  # fmt: skip
    """Train ``Qwen3MoeForCausalLM(cfg)`` from its own seeded initialization
    on windows of ``token_ids``; returns the float32 master weights."""
    from transformers import Qwen3MoeForCausalLM

    say = log or (lambda _msg: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(settings.seed)
        model = Qwen3MoeForCausalLM(_model_config(cfg)).to(torch.float32).train()
        data = torch.tensor(token_ids, dtype=torch.long)
        if len(data) <= settings.seq_len + 1:
            raise RuntimeError(f"{len(data)} training tokens: too few for windows of {settings.seq_len}")
        gen = torch.Generator().manual_seed(settings.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)

        def lr_at(step: int) -> float:
            if step < settings.warmup:
                return (step + 1) / settings.warmup
            done = (step - settings.warmup) / max(settings.steps - settings.warmup, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        losses = []
        start = time.perf_counter()
        for step in range(settings.steps):
            starts = torch.randint(0, len(data) - settings.seq_len - 1, (settings.batch,), generator=gen)
            batch = torch.stack([data[s : s + settings.seq_len] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == settings.steps - 1:
                say(
                    f"train: step {step + 1}/{settings.steps} loss {losses[-1]:.3f} ({time.perf_counter() - start:.0f} s)"
                )
        seconds = time.perf_counter() - start
        master = master_from_state(model.state_dict(), cfg)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    return TrainResult(master, losses, settings.steps * settings.batch * settings.seq_len, seconds)


def heldout_perplexity(cfg: dict[str, Any], master: dict[str, torch.Tensor], token_lists: list[list[int]]) -> float:
    """Teacher-forced perplexity of the float32 master on token lists (the
    held-out prompts): a quick check that training worked."""
    from vllm_mixed.models.qwen3_moe import QWEN3_MOE

    model = QWEN3_MOE.reference_model(cfg, master)
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in token_lists:
            if len(ids) < 2:
                continue
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            n += len(ids) - 1
    return math.exp(nll / max(n, 1))


HAND_RECIPES = {  # name -> (comment, default, rules): the pure sources and the two mixes of configs/
    "bf16": ("every layer BF16", "bf16", []),
    "fp8": ("every layer from the FP8 checkpoint (norms, router, embeddings, head stay BF16 there)", "fp8", []),
    "int4": ("every layer from the GPTQ int4 checkpoint (fp16 where it does not quantize)", "int4", []),
    "mix-a": ("mix A: experts int4, everything else BF16", "bf16", [(["model.layers.*.mlp.experts"], "int4")]),
    "mix-b": (
        "mix B: experts int4, attention q/k/v/o FP8, everything else BF16", "bf16",
        [(["model.layers.*.mlp.experts"], "int4"),
         (["model.layers.*.self_attn.qkv_proj", "model.layers.*.self_attn.o_proj"], "fp8")],
    ),
}  # fmt: skip


def write_hand_recipes(root: Path) -> dict[str, Path]:
    """``root/recipes/NAME.yaml`` for :data:`HAND_RECIPES` over the three
    sources (paths relative to the recipe)."""
    import json

    out = {}
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    for name, (comment, default, rules) in HAND_RECIPES.items():
        lines = [f"# Trained tiny Qwen3-MoE, {comment}.", "sources:", "  bf16: ../bf16", "  fp8: ../fp8",
                 "  int4: ../gptq-int4", "base: bf16", f"default: {default}", "dtype: bfloat16",
                 "rules:" if rules else "rules: []"]  # fmt: skip
        for targets, source in rules:
            lines += [f"  - targets: {json.dumps(targets)}", f"    source: {source}"]
        path = root / "recipes" / f"{name}.yaml"
        path.write_text("\n".join(lines) + "\n")
        out[f"recipe {name}"] = path
    return out


def make_trained(
    directory: str | Path, settings: TrainSettings = TrainSettings(), log: Callable[[str], None] | None = None,
    shard_bytes: int = 2 * 2**20,
) -> dict[str, Path]:  # fmt: skip
    """``make-tiny DIR --trained``: train the tiny Qwen3-MoE (see the module
    docstring) and write it as ``make_tiny`` does (bf16, fp8 block, GPTQ
    int4 by round-to-nearest, recipe.yaml), plus ``DIR/heldout.txt`` (one
    held-out prompt per line) and ``DIR/train.json`` (the run: corpus, split,
    settings, losses, seconds, the float32 master's held-out perplexity)."""
    import json

    from vllm_mixed.tiny import TINY_CONFIG, make_tiny, train_tokenizer

    say = log or (lambda _msg: None)
    start = time.perf_counter()
    files = corpus_files()
    train_files, held_files = split_files(files)
    text = read_text(train_files, settings.max_train_bytes)
    tokenizer = train_tokenizer([text])
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = [i for enc in tokenizer.encode_batch(text.split("\n\n")) for i in [*enc.ids, eos]]
    say(f"train: {len(train_files)} training files, {len(text)} characters, {len(ids)} tokens; "
        f"{len(held_files)} held-out files")  # fmt: skip
    cfg = dict(TINY_CONFIG)
    result = train_master(cfg, ids, settings, say)
    prompts = heldout_prompts(held_files)
    ppl = heldout_perplexity(cfg, result.master, [tokenizer.encode(p).ids for p in prompts])
    dirs = make_tiny(directory, seed=settings.seed, shard_bytes=shard_bytes, master=result.master, tokenizer=tokenizer)
    root = Path(directory)
    (root / "heldout.txt").write_text("\n".join(prompts) + "\n")
    dirs.update(write_hand_recipes(root))
    info = {
        "corpus": str(Path(files[0]).parent), "python": sysconfig.get_python_version(),
        "training_files": [f.name for f in train_files], "heldout_files": [f.name for f in held_files],
        "training_tokens": len(ids), "tokens_seen": result.tokens_seen, "settings": settings.__dict__,
        "loss_first": result.losses[0], "loss_last10": sum(result.losses[-10:]) / min(10, len(result.losses)),
        "train_s": round(result.seconds, 1), "total_s": round(time.perf_counter() - start, 1),
        "heldout_prompts": len(prompts), "heldout_ppl_float32": ppl, "vocab_size": cfg["vocab_size"],
        "int4": "round-to-nearest (the GPTQ writer without the error-compensating solver)",
    }  # fmt: skip
    (root / "train.json").write_text(json.dumps(info, indent=2))
    say(f"train: held-out perplexity {ppl:.1f} (float32, vocabulary {cfg['vocab_size']}); {info['total_s']} s in all")
    dirs["heldout"] = root / "heldout.txt"
    return dirs
