"""The `nplora` command line: demo (and, as they land, merge, inspect, bench)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `nplora` command."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="nplora", description="LoRA for NumPy, with a fast C++ core.")
    parser.add_argument("--version", action="version", version=f"nplora {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo", help="LoRA-fine-tune a small MLP on scikit-learn's digits (built-in data)")
    from .demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    from .merge_cli import add_inspect_arguments, add_merge_arguments

    add_merge_arguments(commands.add_parser(
        "merge", help="fold a LoRA adapter into a safetensors model (streaming, memory-mapped)"))
    add_inspect_arguments(commands.add_parser("inspect", help="summarise an adapter: config and modules"))
    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(commands.add_parser(
        "bench", help="time every kernel against the NumPy code it replaces (and PyTorch+PEFT)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `nplora` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, OSError, RuntimeError, NotImplementedError) as error:
        print(f"nplora {args.command}: error: {error}", file=sys.stderr)
        return 1
    except MemoryError as error:  # a huge --rank or --size: C++'s bad_alloc arrives as this
        print(f"nplora {args.command}: error: out of memory ({error}): try smaller sizes",
              file=sys.stderr)
        return 1
