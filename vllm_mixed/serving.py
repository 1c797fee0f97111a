"""What ``vllm-mixed serve`` serves, and the server command line.

A recipe is composed into a cache directory named by its key: the sha256 of
the canonical JSON of the composition (the resolved recipe, each source's
path, format and quantization config, and the size and header sha256 of every
shard the plan reads) and the package version. Serving the same recipe on the
same checkpoints again reuses the directory; a changed recipe or a replaced
shard gives another key, so another directory. The composition is always
written to a temporary sibling first: when the cached directory holds exactly
those files it is reused untouched, otherwise the new one is renamed into
place (atomically where none existed).

Cache root: ``$VLLM_MIXED_CACHE``, else ``$XDG_CACHE_HOME/vllm-mixed``, else
``~/.cache/vllm-mixed`` (home from ``$HOME``, by :meth:`pathlib.Path.home`).
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vllm_mixed.errors import MixedError

if TYPE_CHECKING:
    from vllm_mixed.composition import Composition

__all__ = ["CACHE_ENV", "Prepared", "cache_root", "composition_key", "is_composed_dir", "prepare", "server_command"]

CACHE_ENV = "VLLM_MIXED_CACHE"
KEY_CHARS = 16  # of the key's hex digits, in the directory name
_FIX = "pass a recipe YAML, or a directory written by `vllm-mixed compose RECIPE -o DIR`"


@dataclass(frozen=True)
class Prepared:
    """The directory to serve and how it came to be."""

    path: Path
    action: Literal["reused", "written", "given"]  # given: a composed directory, served as is
    key: str | None = None  # None for a given directory


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where composed directories are cached (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).absolute()
    xdg = env.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec ignores a relative value
        return Path(xdg) / "vllm-mixed"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".cache" / "vllm-mixed"


def composition_key(composition: Composition) -> str:
    """sha256 (hex) of the composition's canonical JSON and the package version."""
    from vllm_mixed import __version__

    data = {"vllm_mixed": __version__, "composition": composition.to_dict()}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_composed_dir(path: Path) -> bool:
    """Whether ``path/config.json`` has ``quantization_config.quant_method == "mixed"``."""
    from vllm_mixed.composition import QUANT_METHOD

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == QUANT_METHOD


def prepare(target: str | Path, cache: Path | None = None) -> Prepared:
    """The composed directory for ``target``: a composed directory as is, or
    a recipe's cached composition (written or replaced when it differs)."""
    path = Path(target)
    if path.is_dir():
        if not is_composed_dir(path):
            raise MixedError(
                f"{path}: a directory, but not a composed one (its config.json has no quantization_config with "
                f"quant_method 'mixed'); {_FIX}"
            )
        return Prepared(path, "given")
    if not path.is_file():
        raise MixedError(f"{path}: no such file or directory; {_FIX}")
    from vllm_mixed.compose import compose
    from vllm_mixed.composition import Composition
    from vllm_mixed.plan import build_plan
    from vllm_mixed.recipe import load_recipe

    plan = build_plan(load_recipe(path))
    key = composition_key(Composition.from_plan(plan))
    root = (cache if cache is not None else cache_root()) / "composed"
    final = root / key[:KEY_CHARS]
    try:
        root.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    except OSError as exc:
        raise MixedError(
            f"cache directory {root}: cannot write there ({exc}); set {CACHE_ENV} to a writable directory"
        ) from None
    try:
        compose(plan, fresh)
        if _same_files(fresh, final):
            return Prepared(final, "reused", key)
        return Prepared(final, _install(fresh, final), key)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)  # left only when it was not installed


def _same_files(a: Path, b: Path) -> bool:
    """Whether two directories hold the same file names with the same bytes."""
    if not b.is_dir():
        return False
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def _install(fresh: Path, final: Path) -> Literal["reused", "written"]:
    """Rename ``fresh`` to ``final``. Where another process put an equal
    directory there meanwhile, keep that one; a differing one is moved aside
    and removed."""
    try:
        fresh.rename(final)  # atomic; fails when final exists and is not empty
        return "written"
    except OSError:
        if not final.exists():
            raise
    if _same_files(fresh, final):
        return "reused"
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
    final.rename(old / final.name)
    fresh.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return "written"


def server_command(model_dir: str | Path, vllm_args: Sequence[str], cli: bool | None = None) -> list[str]:
    """vLLM's OpenAI-compatible server on ``model_dir`` with ``--load-format
    mixed`` (unless ``vllm_args`` names a load format), then ``vllm_args``
    unchanged. ``cli``: whether vLLM's own CLI runs (default: checked)."""
    from vllm_mixed.composition import QUANT_METHOD
    from vllm_mixed.vllm_compat import openai_server_argv

    rest = list(vllm_args)
    cmd = openai_server_argv(str(model_dir), cli)
    if not any(a.split("=", 1)[0] in ("--load-format", "--load_format") for a in rest):
        cmd += ["--load-format", QUANT_METHOD]
    return [*cmd, *rest]
