"""Which vLLM MoE backend the plugin asks for, per experts layer, and which
linear backend, per source.

vLLM picks one MoE backend for the whole engine (``--moe-backend``, default
``auto``: its own priority list). A mix holds experts of several formats whose
fastest kernels differ: on an H200, GPTQ int4 experts run 11 % faster on
Humming than on Marlin (vLLM's ``auto`` choice), while a global
``--moe-backend humming`` would also move every FP8 expert layer. So the
plugin sets the backend per experts layer, in this order:

1. the user's ``--moe-backend`` (anything but ``auto``) wins for every layer;
2. the recipe's ``kernels: {SOURCE: {moe_backend: NAME}}``;
3. the format's measured table (``Format.measured_moe_backend``: CUDA
   capability -> backend, for the variants measured, written from
   ``benchmarks/RESULTS.md``), where that backend's package is importable;
4. otherwise ``auto``: vLLM's own choice.

vLLM's own check still decides: a backend it refuses for a layer (its
``is_supported_config``) falls back to ``auto`` for choices 2 and 3, with the
reason logged; the user's explicit choice is never overridden.

Linear layers: vLLM's ``--linear-backend`` is global too, and a mix's int4
and FP8 linears have no backend in common (``--linear-backend machete`` leaves
FP8 layers without a kernel). The recipe's ``kernels: {SOURCE:
{linear_backend: NAME}}`` applies to that source's linears only: vLLM reads
``kernel_config.linear_backend`` when a linear method picks its kernel (at
construction and in ``create_weights``), so it is set for exactly that span.
The user's own ``--linear-backend`` (anything but ``auto``) wins. A backend
with no kernel for a layer: vLLM 0.26 raises (an error naming the recipe key
here), vLLM 0.32 logs a warning and keeps its own choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_mixed.formats.base import Format
    from vllm_mixed.recipe import Recipe

__all__ = ["AUTO", "KernelChoice", "choose_linear_backend", "choose_moe_backend", "linear_backend_set"]

AUTO = "auto"
USER, RECIPE, MEASURED, DEFAULT = "--moe-backend", "recipe", "measured table", "vLLM's choice"


@dataclass(frozen=True)
class KernelChoice:
    """The backend asked of vLLM for one layer (experts or linear), and who chose it."""

    backend: str
    by: str  # USER, RECIPE, MEASURED or DEFAULT
    detail: str = ""

    @property
    def binding(self) -> bool:
        """Whether a refusal by vLLM is an error (the user's own choice) rather
        than a reason to fall back to vLLM's choice."""
        return self.by == USER

    def describe(self) -> str:
        return f"{self.backend} ({self.by}{': ' + self.detail if self.detail else ''})"


def choose_moe_backend(
    fmt: Format,
    source: str,
    recipe: Recipe,
    user_backend: str,
    capability: int | None,
    available: Callable[[str], bool],
    quant_config: dict[str, Any] | None = None,
) -> KernelChoice:
    """The MoE backend for experts of ``fmt`` from ``source`` (see the module
    docstring for the order). ``available(name)`` says whether a backend's
    optional package is importable where the engine runs."""
    if user_backend and user_backend != AUTO:
        return KernelChoice(user_backend, USER)
    chosen = recipe.kernels.get(source)
    if chosen is not None and chosen.moe_backend:
        return KernelChoice(chosen.moe_backend, RECIPE, f"kernels.{source}.moe_backend")
    measured = fmt.measured_moe_backend(capability, quant_config) if capability is not None and fmt.quantized else None
    if measured and available(measured):
        return KernelChoice(measured, MEASURED, f"{fmt.name} on sm{capability}")
    return KernelChoice(AUTO, DEFAULT)


def choose_linear_backend(source: str, recipe: Recipe, user_backend: str) -> KernelChoice:
    """The linear backend for the quantized linears of ``source``: the user's
    ``--linear-backend`` when set, else the recipe's ``kernels.<source>``,
    else vLLM's choice."""
    if user_backend and user_backend != AUTO:
        return KernelChoice(user_backend, "--linear-backend")
    chosen = recipe.kernels.get(source)
    if chosen is not None and chosen.linear_backend and chosen.linear_backend != AUTO:
        return KernelChoice(chosen.linear_backend, RECIPE, f"kernels.{source}.linear_backend")
    return KernelChoice(AUTO, DEFAULT)


@contextmanager
def linear_backend_set(kernel_config: Any, backend: str) -> Iterator[None]:
    """``kernel_config.linear_backend`` is ``backend`` inside the block (vLLM's
    linear kernel selection reads it there), its previous value after."""
    before = kernel_config.linear_backend
    kernel_config.linear_backend = backend
    try:
        yield
    finally:
        kernel_config.linear_backend = before
