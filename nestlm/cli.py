"""`nestlm` console script: dispatches sub-commands to the modules that own them.

nestlm fit|validate|test [...]   LightningCLI (nestlm.train.cli)
nestlm export CKPT OUT_DIR       Lightning .ckpt -> config.json + model.safetensors
nestlm prepare-data ...          tokenize local text files into memmapped shards
nestlm eval --ckpt PATH ...      Agent Continuation Bench (nestlm.eval.cli)

An error ends every command with one line on stderr, `nestlm <command>: <what is wrong>`, naming the
file, field or flag, and exit code 2 for a wrong command line (UsageError) or 1 for a failure.
NESTLM_DEBUG=1 shows the traceback instead. Each command's entry point is wrapped by `command`, so
calling it from Python behaves the same (a CommandExit, a SystemExit whose str() is that line).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

COMMANDS = {
    "fit": ("nestlm.train.cli", "run_lightning"),
    "validate": ("nestlm.train.cli", "run_lightning"),
    "test": ("nestlm.train.cli", "run_lightning"),
    "export": ("nestlm.train.export", "main"),
    "prepare-data": ("nestlm.train.prepare", "main"),
    "eval": ("nestlm.eval.cli", "main"),
}
# the exceptions whose message says what is wrong by itself; any other type is named in the line
_SELF_EXPLAINING = (ValueError, OSError)


class UsageError(ValueError):
    """A wrong flag, flag value or combination of them: one line, exit code 2."""


class CommandExit(SystemExit):
    """The exit of a command that failed: `code` 1 or 2; str() is the line already printed on stderr."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a one-line UsageError instead of the usage text."""

    def error(self, message: str):
        raise UsageError(message)


def debug() -> bool:
    """NESTLM_DEBUG=1: errors keep their traceback."""
    return os.environ.get("NESTLM_DEBUG", "") not in ("", "0")


def error_line(e: BaseException) -> str:
    """The one-line message of `e` (whitespace collapsed; the type named unless it explains itself)."""
    from nestlm.models.loading import root_error

    e = root_error(e)
    text = " ".join(str(e).split())
    if isinstance(e, _SELF_EXPLAINING) and text:
        return text
    return f"{type(e).__name__}: {text or 'no message'} (NESTLM_DEBUG=1 shows the traceback)"


def handle(name: str, call: Callable[[], Any]) -> Any:
    """Run `call`; any error becomes one line `nestlm <name>: ...` on stderr and a CommandExit."""
    try:
        return call()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print(f"nestlm {name}: interrupted", file=sys.stderr)
        raise CommandExit(f"nestlm {name}: interrupted", 130) from None
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if debug():
            raise
        line = f"nestlm {name}: {error_line(e)}"
        print(line, file=sys.stderr, flush=True)
        raise CommandExit(line, 2 if isinstance(e, UsageError) else 1) from None


def command(name: str | None = None):
    """Decorator of a command's entry point `fn(argv)`: errors are handled by `handle` (name None: the
    sub-command in argv[0], for fit / validate / test)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(argv: list[str] | None = None):
            args = sys.argv[1:] if argv is None else argv
            return handle(name or (args[0] if args else "fit"), lambda: fn(argv))

        return run

    return wrap


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
    handle(cmd, lambda: getattr(importlib.import_module(module), fn)(rest))
