"""The ``diti-fast`` console script.

    diti-fast train --config celeba64 [key=value ...]     (= python diti_fast/train.py ...)
    diti-fast data make --source synthetic --num 10000 --out data/syn   (= python -m data_shards ...)
    diti-fast check FIXTURE.pt                            (= python -m diti_fast.reference.check ...)
    diti-fast demo                                        (= python -m diti_fast.demo, what `make demo` runs)
    diti-fast import-original CKPT.pt --config PRESET --out DIR   (an original run or DDPM -> our export)
    diti-fast doctor                                      (= python -m diti_fast.selfcheck: is this install ready?)
    diti-fast eval ... / diti-fast sample ...             (evaluation of an export: diti_fast/eval/commands.py)

Multi-GPU launches go through a launcher and the script path, e.g.
``deepspeed --num_gpus 8 diti_fast/train.py --config celeba64``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .eval.commands import add_subcommands as add_eval_subcommands


def _forward(module: str, prog: str):
    """A handler passing the remaining arguments to another command's main(argv)."""
    def run(args) -> int:
        mod = importlib.import_module(module)  # lazy: only the chosen command's modules load
        if module == "diti_fast.train":
            return mod.main(args.rest, prog=prog)
        return mod.main(args.rest)
    return run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="diti-fast", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run 'diti-fast COMMAND --help' for a command's options.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, helptext in (
        ("train", "diti_fast.train", "train a DDPM (stage=ddpm) or DiTi (stage=diti); one process"),
        ("data", "data_shards.__main__", "make or verify WebDataset shards (python -m data_shards)"),
        ("check", "diti_fast.reference.check", "check the implementation against a golden fixture"),
        ("demo", "diti_fast.demo", "the CPU demo: synthetic shards -> DDPM -> DiTi -> export -> report"),
        ("import-original", "diti_fast.import_original",
         "an original DiTi/PDAE run or DDPM checkpoint -> this project's export (checked against a preset)"),
        ("doctor", "diti_fast.selfcheck",
         "self-check: versions, the CUDA device, Triton kernels compile, fused Adam loads"),
    ):
        p = sub.add_parser(name, help=helptext, add_help=False, prefix_chars="\0")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_forward(module, f"diti-fast {name}"))
    add_eval_subcommands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
