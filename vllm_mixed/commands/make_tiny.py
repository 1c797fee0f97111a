"""``vllm-mixed make-tiny DIR [--arch NAME] [--formats LIST] [--trained]``: a
tiny random model of a supported architecture in published checkpoint
formats plus a recipe (default: Qwen3-MoE in bf16, fp8 and gptq-int4);
``--trained``: the tiny Qwen3-MoE trained on the Python standard library's
sources, plus ``heldout.txt`` (:mod:`vllm_mixed.training`)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-tiny", help="write a tiny random model in published checkpoint formats plus a recipe"
    )
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", help="architecture (default qwen3-moe); an unknown name lists the supported ones")
    p.add_argument(
        "--formats",
        help="comma-separated formats to write, by format name or directory (default: bf16,fp8,gptq-int4; "
        "other published configs by directory: gptq-int4-actorder, gptq-int4-channel, ct-w4a16-asym-g64, "
        "ct-fp8-tensor-static, ct-fp8-block)",
    )
    p.add_argument(
        "--trained", action="store_true",
        help="train the tiny Qwen3-MoE on the Python standard library's sources (about a minute on one core) and "
        "write DIR/heldout.txt, held-out prompts for eval and fit",
    )  # fmt: skip
    p.add_argument("--train-steps", type=int, help="training steps with --trained (default: the tested setting)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vllm_mixed.errors import MixedError
    from vllm_mixed.formats import FORMATS, TINY_FORMATS, TINY_VARIANTS
    from vllm_mixed.tiny import make_tiny

    if args.trained:
        return _trained(args)
    formats = TINY_FORMATS
    if args.formats:
        known = {f.name: f for f in FORMATS.values() if f.tiny} | {
            f.tiny.directory: f for f in (*FORMATS.values(), *TINY_VARIANTS) if f.tiny
        }
        wanted = [w.strip() for w in args.formats.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in known]
        if unknown or not wanted:
            raise MixedError(
                f"--formats {args.formats!r}: unknown {unknown or 'empty list'}; use any of: {', '.join(sorted(known))}"
            )
        formats = tuple(dict.fromkeys(known[w] for w in wanted))
    dirs = make_tiny(args.dir, seed=args.seed, arch=args.arch, formats=formats)
    for name, path in dirs.items():
        print(f"{name:10s} {path}")
    return 0


def _trained(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from vllm_mixed.errors import MixedError
    from vllm_mixed.training import TrainSettings, make_trained

    if args.arch not in (None, "qwen3-moe") or args.formats:
        raise MixedError("--trained makes the tiny Qwen3-MoE in bf16, fp8 and gptq-int4; drop --arch/--formats")
    settings = TrainSettings(seed=args.seed)
    if args.train_steps is not None:
        if args.train_steps < 1:
            raise MixedError(f"--train-steps {args.train_steps}: give 1 or more")
        settings = dataclasses.replace(settings, steps=args.train_steps)
    dirs = make_trained(args.dir, settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    for name, path in dirs.items():
        print(f"{name:10s} {path}")
    return 0
