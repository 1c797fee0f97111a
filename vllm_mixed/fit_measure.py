"""What ``vllm-mixed fit`` measures: the budget table (every layer's bytes in
every source that can supply it, from headers alone, at any shape) and
ΔKL(reference || variant) of every (layer, source) candidate, the layer
alone changed.

It runs in one process on transformers' own model class of the architecture
(``ModelSpec.reference_model``, the project's independent reference) in
float32, with each source's weights dequantized exactly by its format's
reference decoder: the reference model is built once, each variant swaps
that one layer's parameters in (``ModelSpec.reference_state``) and back out,
one teacher-forced pass over the prompts per variant. No vLLM engine starts;
the engine's numerics enter when ``fit`` scores the chosen recipe on vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_mixed.errors import MixedError
from vllm_mixed.fit_solver import Option, Unit, minimum_bytes

if TYPE_CHECKING:
    from vllm_mixed.recipe import Recipe

__all__ = ["BudgetTable", "UnitBytes", "budget_table", "layer_weights", "measure", "prompt_token_ids"]


@dataclass(frozen=True)
class UnitBytes:
    layer: str
    kind: str
    bytes_by_source: dict[str, int]  # every source that can supply the layer


@dataclass(frozen=True)
class BudgetTable:
    reference: str
    sources: tuple[str, ...]
    units: tuple[UnitBytes, ...]

    def pure_bytes(self, source: str) -> int | None:
        """The whole model from ``source`` (None: it cannot supply every layer)."""
        if any(source not in u.bytes_by_source for u in self.units):
            return None
        return sum(u.bytes_by_source[source] for u in self.units)

    def candidates(self) -> list[tuple[str, str]]:
        """(layer, source) pairs worth measuring: fewer bytes than the reference."""
        return [c for u in self.units for c in self.candidates_of(u)]

    def solver_units(self, dkl: dict[tuple[str, str], float]) -> list[Unit]:
        units = []
        for u in self.units:
            ref = u.bytes_by_source[self.reference]
            opts = [Option(self.reference, ref, 0.0)]
            opts += [Option(s, u.bytes_by_source[s], dkl[(u.layer, s)]) for _, s in self.candidates_of(u)]
            units.append(Unit(u.layer, tuple(opts)))
        return units

    def candidates_of(self, u: UnitBytes) -> list[tuple[str, str]]:
        ref = u.bytes_by_source[self.reference]
        return [(u.layer, s) for s, b in u.bytes_by_source.items() if s != self.reference and b < ref]

    @property
    def minimum(self) -> int:
        return minimum_bytes([Unit(u.layer, tuple(Option(s, b, 0.0) for s, b in u.bytes_by_source.items()))
                              for u in self.units])  # fmt: skip


def budget_table(recipe: Recipe, reference: str, sources: dict[str, Any] | None = None) -> BudgetTable:
    """Bytes of every layer in every source that can supply it, from the
    safetensors headers only (no tensor data is read)."""
    from vllm_mixed.models import layers_for
    from vllm_mixed.plan import layer_format, open_sources, plan_layer

    sources = sources or open_sources(recipe)
    base = sources[recipe.base]
    units = []
    for layer in layers_for(base.config, f"base {recipe.base!r} ({base.path}/config.json)"):
        by_source = {}
        for name, src in sources.items():
            try:
                by_source[name] = plan_layer(src, layer, layer_format(src, layer)).nbytes
            except MixedError:
                continue  # this source cannot supply the layer
        if reference not in by_source:
            raise MixedError(
                f"layer {layer.name!r}: the reference source {reference!r} cannot supply it; pick another --against"
            )
        units.append(UnitBytes(layer.name, layer.kind, by_source))
    return BudgetTable(reference, tuple(sources), tuple(units))


def layer_weights(src: Any, layer: Any) -> dict[str, Any]:
    """Checkpoint member name -> float32 [out, in] weight of one layer as
    ``src`` holds it (the format's reference decoder)."""
    import torch
    from safetensors import safe_open

    from vllm_mixed.plan import layer_format, plan_layer

    planned = plan_layer(src, layer, layer_format(src, layer))
    by_member: dict[str, dict[str, Any]] = {}
    by_file: dict[str, list[Any]] = {}
    for info in planned.tensors:
        by_file.setdefault(str(info.file), []).append(info)
    for path, infos in by_file.items():
        with safe_open(path, framework="pt") as f:
            for info in infos:
                member, suffix = info.name.rsplit(".", 1)
                by_member.setdefault(member, {})[suffix] = f.get_tensor(info.name)
    qc = src.quant_config if planned.fmt.quantized else None
    return {m: planned.fmt.dequantize(t, qc, torch.float64).to(torch.float32) for m, t in by_member.items()}


def prompt_token_ids(base_path: str | Path, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids as vLLM makes them from text prompts (the base's tokenizer,
    its special tokens added); token-id prompts as given."""
    from transformers import AutoTokenizer

    tok = None
    out = []
    for p in prompts:
        if isinstance(p, str):
            tok = tok or AutoTokenizer.from_pretrained(str(base_path))
            out.append(list(tok(p).input_ids))
        else:
            out.append(list(p))
    return out


def measure(
    recipe: Recipe, table: BudgetTable, token_ids: list[list[int]], sources: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None, threads_used: int | None = 1,
) -> dict[tuple[str, str], float]:  # fmt: skip
    """ΔKL(reference || variant), nats per token averaged over every scored
    position, of each candidate (layer, source) of ``table`` alone, on
    ``threads_used`` torch threads (default one: small models spin rather
    than compute on more threads of a busy machine; None: torch's setting)."""
    import torch

    from vllm_mixed.plan import open_sources

    threads = torch.get_num_threads()
    if threads_used is not None:
        torch.set_num_threads(threads_used)
    try:
        return _measure(recipe, table, token_ids, sources or open_sources(recipe), progress or (lambda _msg: None))
    finally:
        torch.set_num_threads(threads)


def _measure(recipe: Recipe, table: BudgetTable, token_ids: list[list[int]], sources: dict[str, Any],
             say: Callable[[str], None]) -> dict[tuple[str, str], float]:  # fmt: skip
    import torch

    from vllm_mixed.models import layers_for, model_for

    ref_src = sources[table.reference]
    cfg = sources[recipe.base].config
    spec = model_for(cfg, "base config")
    layers = {layer.name: layer for layer in layers_for(cfg, "base config")}
    ref_weights: dict[str, Any] = {}
    for layer in layers.values():
        ref_weights.update(layer_weights(ref_src, layer))
    torch.manual_seed(0)
    model = spec.reference_model(cfg, ref_weights)
    del ref_weights  # the model holds its own copy; each variant saves and restores only its layer
    names = list(model.state_dict())
    scored = [ids for ids in token_ids if len(ids) >= 2]
    if not scored:
        raise MixedError("no prompt has two tokens or more; give longer prompts")

    @torch.no_grad()
    def logprobs() -> list[Any]:
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].to(torch.float64), -1) for ids in scored]

    ref_lp = logprobs()
    positions = sum(len(lp) for lp in ref_lp)
    out = {}
    todo = table.candidates()
    for n, (layer_name, source) in enumerate(todo, 1):
        layer = layers[layer_name]
        swapped = spec.reference_state(cfg, names, layer_weights(sources[source], layer))
        state = model.state_dict()
        restore = {k: state[k].clone() for k in swapped}
        model.load_state_dict(swapped, strict=False)
        var_lp = logprobs()
        model.load_state_dict(restore, strict=False)
        kl = sum(float((r.exp() * (r - v)).sum()) for r, v in zip(ref_lp, var_lp)) / positions
        out[(layer_name, source)] = max(kl, 0.0)
        say(f"fit: measured {n}/{len(todo)}: {layer_name} from {source}: ΔKL {kl:.4g}")
    return out
