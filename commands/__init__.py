"""The `mmtui` command line: one module per command, all registered on one Typer app."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from commands._app import INTERRUPTED, ExitCode, app

# each module registers its commands on `app` when imported
from commands import ablate, attribute, browse, caption, doctor, explain, heatmap, layers, merge, neurons, prompts, report, runs, samples, specificity, steer, train_projection, verify  # noqa: E402,F401  isort: skip  # fmt: skip

__all__ = ["ExitCode", "app", "main"]


def _closed_pipe() -> NoReturn:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(int(ExitCode.OK))


def main() -> None:
    """Entry point: run the app; a closed stdout pipe (`| head`) ends quietly, with status 0."""
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
