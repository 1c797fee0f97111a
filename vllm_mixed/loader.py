"""``MixedModelLoader`` (``--load-format mixed``): streams exactly the planned
tensors from the source checkpoints into the model.

Before reading data it plans exactly the composed layers on the files now on
disk, each shard's header read once and its identity compared with what
``compose`` recorded (``Composition.verified_plan``): a shard damaged or
replaced since then stops the engine start with the file (and tensor) named.
Just before a shard's data is read, its reader checks that the header still
holds the planned tensors (a shard changed during the load).
Each shard is opened once and read front to back by its own thread (a few at
a time), in large reads that cover exactly the planned bytes; tensors reach
``model.load_weights`` under their checkpoint names, already in the dtype
their parameter holds. Afterwards every model parameter
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
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from vllm_mixed.errors import MixedError
from vllm_mixed.formats import get_format
from vllm_mixed.plan import LoadPlan
from vllm_mixed.safetensors_header import TensorInfo, read_header
from vllm_mixed.vllm_compat import OPTIONAL_UNLOADED_PARAMS, normalize_param_name

__all__ = ["MixedModelLoader", "stream_plan", "unloadable"]

logger = init_logger("vllm.vllm_mixed.loader")

READ_THREADS = 4  # files read at once
CHUNK_BYTES = 32 * 2**20  # planned tensors that sit back to back are read together, up to this much per read
GAP_BYTES = 4096  # a gap up to this (alignment padding) between planned tensors is read through
QUEUE_CHUNKS = 8  # bound on chunks read ahead of the model

# safetensors dtype name -> torch dtype (the names of safetensors_header.DTYPE_SIZES)
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}  # fmt: skip


def _runtime(t: torch.Tensor, fmt: str, suffix: str, model_dtype: torch.dtype) -> torch.Tensor:
    """The tensor in the dtype vLLM's parameter for it holds (its format says)."""
    target = get_format(fmt).runtime_dtype(suffix, model_dtype)
    return t if target is None or t.dtype == target else t.to(target)


def _chunks(infos: list[TensorInfo]) -> list[list[TensorInfo]]:
    """Planned tensors (in file order) grouped into runs that one read
    covers: back to back in the file, at most ``CHUNK_BYTES`` (a larger
    tensor is a run of its own)."""
    runs: list[list[TensorInfo]] = []
    for info in infos:
        run = runs[-1] if runs else None
        if run and 0 <= info.start - run[-1].end <= GAP_BYTES and info.end - run[0].start <= CHUNK_BYTES:
            run.append(info)
        else:
            runs.append([info])
    return runs


def _check_header(path: str, infos: list[TensorInfo], size: int) -> None:
    """The shard still holds each planned tensor as planned (it may have
    changed since ``Composition.verified_plan``): the same dtype, shape and bytes."""
    short = next((info for info in infos if info.end > size), None)
    if short is not None:
        raise MixedError(
            f"{path}: truncated: tensor {short.name!r} ends at byte {short.end} but the file now holds only "
            f"{size}; the shard changed during the load, restore it"
        )
    now = read_header(Path(path))
    for info in infos:
        cur = now.get(info.name)
        if cur is None:
            raise MixedError(
                f"{path}: read failed at tensor {info.name!r}: it is no longer in the shard's header; the shard "
                "changed during the load, restore it"
            )
        if cur.shape != info.shape:
            raise MixedError(
                f"{path}: tensor {info.name!r} has shape {list(cur.shape)} but {list(info.shape)} when "
                "the load was planned; the shard changed during the load, restore it and load again"
            )
        if (cur.dtype, cur.start, cur.end) != (info.dtype, info.start, info.end):
            raise MixedError(
                f"{path}: tensor {info.name!r} is now {cur.dtype} at bytes {cur.start}-{cur.end}, planned as "
                f"{info.dtype} at {info.start}-{info.end}; the shard changed during the load, restore it"
            )


def _read_run(fd: int, path: str, run: list[TensorInfo]) -> list[torch.Tensor]:
    """One ``preadv`` (the GIL released) of a run's bytes into a fresh
    buffer; the tensors are views of it, in the file's dtype and shape (the
    buffer is freed with the last of them). Unlike a memory-mapped read, a
    file cut short meanwhile is an error naming the tensor, not a SIGBUS."""
    start = run[0].start
    buf = torch.empty(run[-1].end - start, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], start + got)
        if n == 0:
            at = next(i for i in run if i.end > start + got)
            raise MixedError(
                f"{path}: truncated: tensor {at.name!r} ends at byte {at.end} but the file ends at byte "
                f"{start + got}; the shard changed during the load, restore it"
            )
        got += n
    out = []
    for info in run:
        raw = buf[info.start - start : info.end - start]
        dtype = TORCH_DTYPES[info.dtype]
        if (info.start - start) % dtype.itemsize:  # unaligned for its dtype: give it its own storage
            raw = raw.clone()
        out.append(raw.view(dtype).reshape(info.shape))
    return out


def stream_plan(
    plan: LoadPlan, model_dtype: torch.dtype, progress: bool = True, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(checkpoint name, tensor)`` for every planned tensor. Each
    shard is read once, front to back, by a worker thread, in large reads
    of back-to-back planned tensors (``_chunks``) with the kernel's readahead
    off, so the bytes read are the bytes planned and the reads run outside
    the GIL; the model gets a chunk's tensors in one queue hand-off. Any read
    fault ends the stream with a :class:`MixedError` naming the file and
    tensor.

    However the stream ends (exhausted, a fault, the consumer raising or
    closing it early), the reader threads are stopped and joined and the
    tensors read ahead are dropped before control returns; the raised error
    carries no reference to tensor data. Close the generator (or exhaust it)
    rather than abandon it: until it is closed the readers wait on the queue.
    ``skip``: planned tensor names not to read (see :func:`unloadable`)."""
    fmt_of = {}
    for p in plan.layers:
        for t in p.tensors:
            fmt_of[(str(t.file), t.name)] = p.format
    by_file = {
        f: kept for f, items in plan.tensors_by_file().items() if (kept := [i for i in items if i[1].name not in skip])
    }
    total = sum(t.nbytes for items in by_file.values() for _, t in items)
    q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_CHUNKS)
    stop = threading.Event()
    done = object()

    def read_file(path: str, infos: list[TensorInfo]) -> None:
        current = None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            q.put(
                MixedError(
                    f"{path}: read failed at opening the file: {exc}; the shard changed or is damaged, restore it"
                )
            )
            return
        try:
            # planned ranges are read explicitly; readahead would pull in the tensors between them
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            _check_header(path, infos, os.fstat(fd).st_size)
            for run in _chunks(infos):
                if stop.is_set():
                    return
                current = run[0].name
                batch = [
                    (info.name, _runtime(t, fmt_of[(path, info.name)], info.name.rsplit(".", 1)[-1], model_dtype), info.nbytes)
                    for info, t in zip(run, _read_run(fd, path, run), strict=True)
                ]  # fmt: skip
                q.put(batch)
                batch = None  # the queue (then the consumer) holds it now
        except MixedError as exc:
            q.put(exc.with_traceback(None))  # the traceback would pin this frame's tensors
        except Exception as exc:  # I/O errors while reading
            where = f"tensor {current!r}" if current else "opening the file"
            q.put(MixedError(f"{path}: read failed at {where}: {exc}; the shard changed or is damaged, restore it"))
        finally:
            os.close(fd)

    def run_all() -> None:
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="vllm-mixed-read") as pool:
            for fut in [pool.submit(read_file, path, [t for _, t in items]) for path, items in by_file.items()]:
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
            batch, item = item[::-1], None
            while batch:
                name, tensor, nbytes = batch.pop()
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
        item = tensor = batch = None
        bar.close()


def unloadable(model: torch.nn.Module, plan: LoadPlan) -> frozenset[str]:
    """Planned optional tensors (``OPTIONAL_UNLOADED_PARAMS``, e.g. GPTQ's
    ``g_idx``) whose layer registered no parameter for them: vLLM 0.26's GPTQ
    methods and the act-order fallback load ``g_idx``, vLLM 0.32's GPTQ
    methods have none (its own loader drops every ``.g_idx``, the plugin's
    config keeps them: ``MixedPrecisionConfig.get_checkpoint_weight_mapper``)."""
    out = set()
    for p in plan.layers:
        optional = [t for t in p.tensors if t.name.rsplit(".", 1)[-1] in OPTIONAL_UNLOADED_PARAMS]
        if not optional:
            continue
        try:
            names = {n.rsplit(".", 1)[-1] for n, _ in model.get_submodule(p.layer.name).named_parameters()}
        except AttributeError:
            continue
        for t in optional:
            suffix = t.name.rsplit(".", 1)[-1]
            if not any(n == suffix or n.endswith("_" + suffix) for n in names):
                out.add(t.name)
    return frozenset(out)


class MixedModelLoader(BaseModelLoader):
    """Loads a model whose quantization config is ``mixed`` from its sources."""

    def download_model(self, model_config: Any) -> None:
        """Sources are local directories named in the recipe: nothing to fetch."""

    def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> torch.nn.Module:
        """vLLM's ``load_model``; on the CPU build it then logs what the model
        holds against the plan's prediction (:mod:`vllm_mixed.resident`)."""
        from vllm_mixed.vllm_compat import is_cpu

        if not is_cpu():
            return super().load_model(vllm_config, model_config, prefix)
        from vllm_mixed import resident
        from vllm_mixed.cpu_kernels import cpu_resident_bytes

        before = resident.snapshot()
        model = super().load_model(vllm_config, model_config, prefix)
        report = resident.measure(model, before, model_config.dtype.itemsize, cpu_resident_bytes(self._plan))
        logger.info("%s", report.line())
        return model

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
        plan = self._plan = comp.verified_plan()  # every shard's header and identity against the files on disk
        stream = stream_plan(plan, model_config.dtype, skip=unloadable(model, plan))
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
