"""`nestlm` console script: dispatches sub-commands to the modules that own them.

nestlm fit|validate|test [...]   LightningCLI (nestlm.train.cli)
nestlm export CKPT OUT_DIR       Lightning .ckpt -> config.json + model.safetensors
nestlm prepare-data ...          tokenize local text files into memmapped shards
nestlm eval --ckpt PATH ...      Agent Continuation Bench (nestlm.eval.cli)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "fit": ("nestlm.train.cli", "run_lightning"),
    "validate": ("nestlm.train.cli", "run_lightning"),
    "test": ("nestlm.train.cli", "run_lightning"),
    "export": ("nestlm.train.export", "main"),
    "prepare-data": ("nestlm.train.prepare", "main"),
    "eval": ("nestlm.eval.cli", "main"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if argv else 2)
    cmd = argv[0]
    if cmd in ("-V", "--version"):
        from nestlm import __version__

        print(__version__)
        return
    if cmd not in COMMANDS:
        print(f"nestlm: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module, fn = COMMANDS[cmd]
    # fit/validate/test keep their sub-command for LightningCLI; the others get their own argv
    rest = argv if module == "nestlm.train.cli" else argv[1:]
    getattr(importlib.import_module(module), fn)(rest)
