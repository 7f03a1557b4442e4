"""The `vitpipe` command: one subcommand per stage.

Each subcommand lives in the module of its stage, which defines

    add_arguments(parser: argparse.ArgumentParser) -> None
    run_cli(args: argparse.Namespace) -> int          # the exit status

Only the module of the subcommand being run is imported, so `vitpipe --help` and `vitpipe shard`
do not pay for importing DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vitpipe import __version__
from vitpipe.errors import UserError

# name -> (module, one-line summary). The order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("pipeline.shard", "pack an image collection into WebDataset .tar shards with an index"),
    "verify": ("pipeline.verify", "recompute a shard set's counts and checksums against its index"),
    "pretrain": ("vit.pretrain", "pretrain a Vision Transformer on shards with DeepSpeed"),
    "finetune": ("vit.finetune", "fine-tune (or linear-probe) a pretrained ViT on a new dataset"),
    "evaluate": ("vit.evaluate", "measure a model on a sharded split: accuracy, per-class metrics, plots"),
    "export": ("vit.export", "write a model as a timm / Hugging Face hub folder that timm loads as it is"),
    "demo": ("flows.demo", "run the whole pipeline on packaged data (digits, photos) in minutes"),
    "deploy": ("flows.deploy", "register the Prefect deployments, schedules and triggers"),
    "launch": ("cluster.launch", "run a training stage locally, with the DeepSpeed launcher, or on Slurm"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the subparser of `command` (if given) gets its full options."""
    parser = argparse.ArgumentParser(
        prog="vitpipe",
        description="From a pile of images to a pretrained and fine-tuned Vision Transformer.",
        epilog="Run 'vitpipe COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"vitpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(func=module.run_cli, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a process of its own (not a call from Python): a rank, or a launcher a flow started
        from cluster.process_tree import die_with_parent_if_asked

        die_with_parent_if_asked()  # never outlive the parent
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage and the options closest to what was typed
        _unknown_options(getattr(args, "_parser", parser), unknown)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"vitpipe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitpipe {args.command}: interrupted", file=sys.stderr)
        return 130


def _unknown_options(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    import difflib

    known = [o for a in parser._actions for o in a.option_strings]
    hints = [close[0] for arg in unknown if arg.startswith("--")
             for close in [difflib.get_close_matches(arg.split("=", 1)[0], known, n=1, cutoff=0.8)] if close]
    parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {', '.join(hints)}?" if hints
                                                                   else f"; see '{parser.prog} --help'"))


if __name__ == "__main__":
    sys.exit(main())
