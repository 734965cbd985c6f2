"""The `mmtui` command line: one module per command, all registered on one Typer app.

`main()` (the `mmtui` entry point) imports only the module of the command it is asked for, so that a query
command does not import the other commands' modules and Typer builds one command, not all of them; `mmtui
--help` and an unknown name import them all. `commands.app` (tests, the documentation checks) is the app with
every command registered.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, NoReturn

from commands._app import INTERRUPTED, ExitCode

if TYPE_CHECKING:
    import typer

__all__ = ["MODULES", "ExitCode", "app", "main"]

# each module registers its commands on the app when imported; a command lives in the module of its name
# (`train-projection`: train_projection), except those in _ELSEWHERE
MODULES = ("ablate", "attribute", "browse", "caption", "doctor", "explain", "heatmap", "layers", "merge", "neurons", "prompts", "report", "runs", "samples", "specificity", "steer", "train_projection", "verify")  # fmt: skip
_ELSEWHERE = {"neuron": "neurons"}


def register(args: list[str]) -> None:
    """Register the command that `args` (the command line after `mmtui`) names, or every command when it names
    none (help, no arguments, an unknown name: Typer then lists them all or suggests one)."""
    name = args[0] if args else ""
    module = _ELSEWHERE.get(name, name.replace("-", "_"))
    for found in [module] if module in MODULES else MODULES:
        importlib.import_module(f"commands.{found}")


def __getattr__(name: str) -> typer.Typer:
    """`commands.app`: the Typer app with every command registered."""
    if name == "app":
        from commands._app import app

        register([])
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _closed_pipe() -> NoReturn:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(int(ExitCode.OK))


def main() -> None:
    """Entry point: register the command asked for and run the app; a closed stdout pipe (`| head`) ends
    quietly, with status 0."""
    from commands._app import app

    register(sys.argv[1:])
    try:
        app()
    except BrokenPipeError:
        _closed_pipe()
    except SystemExit:
        # Typer catches EPIPE itself, wraps stdout in (its vendored copy of) click's PacifyFlushWrapper and exits
        # 1, our "some items failed"; the reader closing the pipe is no failure
        if type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
            _closed_pipe()
        raise
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED + "\n")
        sys.exit(130)
