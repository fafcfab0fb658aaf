"""The `dsv3` command: one table of subcommands, each a `main(argv) -> exit code` imported on demand.

Every subcommand owns its argparse parser (with examples in --help).  Bad input prints one line to
stderr and exits 2; `UsageError` is how subcommands signal that.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, one-line summary); modules expose main(argv: list[str]) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dsv3.train.cli", "train a model (no arguments: the built-in demo on a laptop CPU)"),
    "eval": ("dsv3.train.eval_cli", "validation loss and bits per byte of a checkpoint"),
    "generate": ("dsv3.inference.generate_cli", "generate text from a checkpoint"),
    "chat": ("dsv3.inference.chat_cli", "chat with a checkpoint using the DeepSeek chat template"),
    "plot": ("dsv3.train.plots", "draw loss curves and the expert-load heatmap of a run"),
    "info": ("dsv3.info_cli", "print a preset's or checkpoint's config, parameter counts and FLOPs"),
    "export": ("dsv3.export_cli", "write any checkpoint (distributed ones too) as a Hugging Face folder, BF16/FP8"),
}


class UsageError(Exception):
    """Bad user input: reported as one line on stderr, exit code 2."""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dsv3 <command> [options]", "", "DeepSeek-V3-architecture language models in PyTorch.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "examples:", "  dsv3 train                      # the built-in demo (tiny preset, stdlib corpus, CPU)",
              "  dsv3 train --preset small --steps 2000 --out runs/small",
              "  dsv3 generate --ckpt runs/demo/latest --prompt 'def fib(n):'",
              "", "`dsv3 <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dsv3: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest) or 0
    except UsageError as e:
        print(f"dsv3 {name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout piped into a reader that quit (`dsv3 info 671b | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail
        return 141


if __name__ == "__main__":
    sys.exit(main())
