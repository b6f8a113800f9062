"""The `tessera` command line: one entry point, subcommands registered by module path.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `tessera --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("vision.commands.preprocess", "decode, validate and tile images (Pan & Scan)"),
    "encode": ("vision.commands.encode", "images -> soft tokens with a checkpoint's SigLIP + projector"),
    "generate": ("lm.commands.generate", "generate text with a Gemma 3 or Qwen decoder (and images, Gemma 3 4B-27B)"),
    "caption": ("service.commands.caption", "caption many images into a JSONL file (resumable, sharded)"),
    "bench": ("service.bench", "benchmarks against the reference, side by side"),
    "serve": ("service.commands.serve",
              "run a role: vision, lm or gateway (gRPC), all (the three in one process) or openai (the HTTP API)"),
    "query": ("service.commands.query", "ask a running gateway: text (+ images) in, the answer printed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        _load(module_name).add_arguments(sub)
    return parser


def _load(module_name: str):
    return importlib.import_module(module_name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_load(args._module).run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: the commands' own cleanup (finally blocks) has run; no traceback
        print(f"tessera {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
