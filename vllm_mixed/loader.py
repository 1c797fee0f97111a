"""``MixedModelLoader`` (``--load-format mixed``): streams exactly the planned
tensors from the source checkpoints into the model.

Before reading data it re-plans on the files now on disk and checks them
against what ``compose`` recorded (``Composition.replan``): a shard damaged or
replaced since then stops the engine start with the file (and tensor) named.
Each shard is opened once and read front to back by its own thread (a few at
a time); tensors reach ``model.load_weights`` under their checkpoint names,
already in the dtype their parameter holds. Afterwards every model parameter
must have been loaded: vLLM does not check this for quantized models, so a
missing tensor would otherwise serve garbage.
"""

from __future__ import annotations

import os
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
from vllm_mixed.plan import LoadPlan
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
    :class:`MixedError` naming the file and tensor.

    However the stream ends (exhausted, a fault, the consumer raising or
    closing it early), the reader threads are stopped and joined and the
    tensors read ahead are dropped before control returns; the raised error
    carries no reference to tensor data. Close the generator (or exhaust it)
    rather than abandon it: until it is closed the readers wait on the queue."""
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
            size = os.path.getsize(path)
            short = next((info for _, info in items if info.end > size), None)
            if short is not None:
                raise MixedError(
                    f"{path}: truncated: tensor {short.name!r} ends at byte {short.end} but the file now holds only "
                    f"{size}; the shard changed during the load, restore it"
                )
            with safe_open(path, framework="pt", device="cpu") as f:
                for _, info in items:
                    current = info.name
                    if stop.is_set():
                        return
                    t = f.get_tensor(info.name)
                    if tuple(t.shape) != info.shape:
                        raise MixedError(
                            f"{path}: tensor {info.name!r} has shape {list(t.shape)} but {list(info.shape)} when "
                            "the load was planned; the shard changed during the load, restore it and load again"
                        )
                    t = _runtime(t, fmt_of[(path, info.name)], info.name.rsplit(".", 1)[-1], model_dtype)
                    q.put((info.name, t, info.nbytes))
                    t = None  # the queue (then the consumer) holds it now
        except MixedError as exc:
            q.put(exc.with_traceback(None))  # the traceback would pin this frame's tensor and open file
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
    item: Any = None
    tensor: torch.Tensor | None = None
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            name, tensor, nbytes = item
            item = None
            bar.update(nbytes)
            yield name, tensor
            tensor = None
    finally:
        stop.set()
        while producer.is_alive():  # drain so blocked readers can finish
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        producer.join()
        while not q.empty():  # what the readers put after the last drain
            q.get_nowait()
        # a raised error's traceback keeps this frame (and its locals) alive
        item = tensor = None
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
        plan = comp.replan()  # re-validates every header and shard identity against the files now on disk
        stream = stream_plan(plan, model_config.dtype)
        try:
            loaded = model.load_weights(stream)
        finally:
            stream.close()  # stops and joins the readers at once, also when load_weights raised
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
