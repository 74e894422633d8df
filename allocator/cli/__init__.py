"""The `moeplan` command line: the commands of every stage, listed here, and the one error policy.

    moeplan inventory | solve | sweep      plan_commands   (allocator)
    moeplan profile | evaluate             model_commands  (sensitivity)
    moeplan materialize                    materialize     (the GGUF / safetensors writers)
    moeplan demo                           demo            (the whole pipeline)

This package is the top layer: it imports kernels, sensitivity and allocator, and nothing imports it.
"""

from __future__ import annotations

import argparse
import errno
import sys

from moeplan.kernels.outputs import exit_on_signals

from . import demo, materialize, model_commands, plan_commands
from .args import SYNTHETIC_DEFAULT_FORMATS, Command  # noqa: F401  (the names a program that embeds the CLI uses)

COMMANDS: list[Command] = [*plan_commands.COMMANDS, *model_commands.COMMANDS, materialize.COMMAND, demo.COMMAND]


def register(cmd: Command) -> None:
    """Add a subcommand to COMMANDS (one of the same name is replaced): for a program that embeds the CLI."""
    for i, c in enumerate(COMMANDS):
        if c.name == cmd.name:
            COMMANDS[i] = cmd
            return
    COMMANDS.append(cmd)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeplan", description="Fit a Mixture-of-Experts model into a memory budget: "
                                 "expert pruning, per-tensor formats and top-k from one integer program.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS:
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return ap


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or a bad environment (a file, a flag, the disk), not a bug:
    the CLI reports them in one line with exit code 2. Anything else keeps its traceback."""
    types: list[type[BaseException]] = [ValueError, OSError]
    try:
        from safetensors import SafetensorError  # a broken .safetensors file read by the library
        types.append(SafetensorError)
    except ImportError:
        pass
    return tuple(types)


def error_line(exc: BaseException) -> str:
    """One line for a user error: the message's first line (the rest is counted, not lost in a wall)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
        if exc.errno == errno.ENOSPC:
            text += " (free some space or write elsewhere)"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            text += " (choose a writable place)"
    else:
        text = str(exc) or type(exc).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()] or [type(exc).__name__]
    more = len(lines) - 1
    return lines[0] + (f" (and {more} more: {lines[1].strip()}{' ...' if more > 1 else ''})" if more else "")


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve others on a busy machine
    exit_on_signals()  # SIGTERM / SIGHUP unwind like Ctrl-C: no partial output stays behind
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except user_error_types() as exc:
        print(f"moeplan {args.command}: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moeplan {args.command}: interrupted; nothing was left half written", file=sys.stderr)
        return 130
