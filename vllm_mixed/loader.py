"""``MixedModelLoader`` (``--load-format mixed``): streams exactly the planned
tensors from the source checkpoints into the model.

Each shard is opened once and read front to back by its own thread (a few at
a time); tensors reach ``model.load_weights`` under their checkpoint names,
already in the dtype their parameter holds. Afterwards every model parameter
must have been loaded: vLLM does not check this for quantized models, so a
missing tensor would otherwise serve garbage.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from vllm_mixed.errors import MixedError
from vllm_mixed.plan import LoadPlan, build_plan
from vllm_mixed.safetensors_header import TensorInfo
from vllm_mixed.vllm_compat import OPTIONAL_UNLOADED_PARAMS, normalize_param_name

__all__ = ["MixedModelLoader", "stream_plan"]

logger = init_logger("vllm.vllm_mixed.loader")

READ_THREADS = 4
QUEUE_TENSORS = 64  # bound on tensors read ahead of the model

# (format, checkpoint suffix) -> dtype the vLLM parameter holds; None = the model dtype
RUNTIME_DTYPE: dict[tuple[str, str], torch.dtype | None] = {
    ("unquantized", "weight"): None,
    ("fp8_block", "weight_scale_inv"): torch.float32,
    ("gptq_int4", "scales"): None,
}


def _runtime(t: torch.Tensor, fmt: str, suffix: str, model_dtype: torch.dtype) -> torch.Tensor:
    if (fmt, suffix) not in RUNTIME_DTYPE:
        return t
    target = RUNTIME_DTYPE[(fmt, suffix)] or model_dtype
    return t if t.dtype == target else t.to(target)


def stream_plan(plan: LoadPlan, model_dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(checkpoint name, tensor)`` for every planned tensor, each
    shard read once by a worker thread. Any read fault ends the stream with a
    :class:`MixedError` naming the file and tensor."""
    fmt_of = {}
    for p in plan.layers:
        for t in p.tensors:
            fmt_of[(str(t.file), t.name)] = p.format
    by_file = plan.tensors_by_file()
    total = sum(t.nbytes for items in by_file.values() for _, t in items)
    q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_TENSORS)
    stop = threading.Event()
    done = object()

    def read_file(path: str, items: list[tuple[str, TensorInfo]]) -> None:
        current = None
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for _, info in items:
                    current = info.name
                    if stop.is_set():
                        return
                    t = f.get_tensor(info.name)
                    if tuple(t.shape) != info.shape:
                        raise MixedError(f"{path}: tensor {info.name!r} changed since planning; re-run the load")
                    suffix = info.name.rsplit(".", 1)[-1]
                    q.put((info.name, _runtime(t, fmt_of[(path, info.name)], suffix, model_dtype), info.nbytes))
        except MixedError as exc:
            q.put(exc)
        except Exception as exc:  # I/O or safetensors errors while reading
            where = f"tensor {current!r}" if current else "opening the file"
            q.put(MixedError(f"{path}: read failed at {where}: {exc}; the shard changed or is damaged, restore it"))

    def run_all() -> None:
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="vllm-mixed-read") as pool:
            for fut in [pool.submit(read_file, path, items) for path, items in by_file.items()]:
                fut.result()
        q.put(done)

    producer = threading.Thread(target=run_all, name="vllm-mixed-loader", daemon=True)
    producer.start()
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="vllm-mixed load", disable=not progress)
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            name, tensor, nbytes = item
            bar.update(nbytes)
            yield name, tensor
    finally:
        stop.set()
        while producer.is_alive():  # drain so blocked readers can finish
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        bar.close()


class MixedModelLoader(BaseModelLoader):
    """Loads a model whose quantization config is ``mixed`` from its sources."""

    def download_model(self, model_config: Any) -> None:
        """Sources are local directories named in the recipe: nothing to fetch."""

    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        from vllm_mixed.config import MixedPrecisionConfig

        quant = getattr(model, "quant_config", None)
        if not isinstance(quant, MixedPrecisionConfig) or quant.composition is None:
            raise MixedError(
                "--load-format mixed needs a model whose quantization is 'mixed'; serve a directory written by "
                "`vllm-mixed compose RECIPE -o DIR` (its config.json carries the recipe)"
            )
        comp = quant.composition
        start = time.perf_counter()
        plan = build_plan(comp.recipe)  # re-validates every header against the files now on disk
        routed = {p.layer.name: (p.source, p.format) for p in plan.layers}
        if routed != comp.layers:
            changed = sorted(k for k in set(routed) | set(comp.layers) if routed.get(k) != comp.layers.get(k))
            raise MixedError(
                f"the sources no longer match the composed plan (first changed layer: {changed[0]!r}); "
                "re-run `vllm-mixed compose`"
            )
        loaded = model.load_weights(stream_plan(plan, model_config.dtype))
        elapsed = time.perf_counter() - start
        self._check_complete(model, loaded)
        nbytes = plan.total_bytes
        logger.info(
            "vllm-mixed: loaded %d tensors, %.1f MiB from %d files in %.2f s (%.1f MiB/s)",
            sum(len(p.tensors) for p in plan.layers), nbytes / 2**20, len({t.file for p in plan.layers for t in p.tensors}),
            elapsed, nbytes / 2**20 / max(elapsed, 1e-9),
        )  # fmt: skip

    @staticmethod
    def _check_complete(model: torch.nn.Module, loaded: set[str] | None) -> None:
        if loaded is None:
            return
        done = {normalize_param_name(n) for n in loaded}
        missing = sorted(
            name
            for name, p in model.named_parameters()
            if normalize_param_name(name) not in done
            and p.numel() > 0
            and name.rsplit(".", 1)[-1] not in OPTIONAL_UNLOADED_PARAMS
        )
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise MixedError(
                f"{len(missing)} model parameters were not loaded: {shown}; the plan and the model disagree "
                "(report this with the recipe)"
            )
