"""The Typer app, the options every command shares, exit codes and output helpers.

Commands are thin: parse, make one core call, print. stdout carries results only (a rich table, or JSON
Lines with --json); progress, logs and warnings go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from mmtui.errors import MmtuiError, is_corruption


class ExitCode(IntEnum):
    OK = 0  # all done
    PARTIAL = 1  # finished, but some items failed (each named on stderr)
    FAILED = 2  # usage error, or nothing could be done


DEFAULT_DB = Path("cache") / "mmtui.db"
INTERRUPTED = "Interrupted; finished items are kept in the cache. Run the same command again to resume."

app = typer.Typer(
    name="mmtui",
    help="Find and explain multimodal neurons: MLP units of a frozen text-only LM that turn images into words.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    # A callback keeps `mmtui` a group of commands when `commands.main` registers the one command asked for
    # (a Typer app of one command and no callback would run that command directly). No docstring: the app's
    # help above stays the help.
    pass


class _ResultConsole(Console):
    def on_broken_pipe(self) -> None:
        """The reader closed stdout (`| head`): end quietly with 0; rich's own handler exits 1, "some failed"."""
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(int(ExitCode.OK))


out = _ResultConsole(soft_wrap=True)  # results
err = Console(stderr=True)  # progress, warnings, errors

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db", envvar="MMTUI_DB", help="SQLite cache file (default cache/mmtui.db, or $MMTUI_DB).", show_default=False
    ),
]
PresetOption = Annotated[
    str, typer.Option("--preset", help="Model stack: smol (default, offline CPU), limber-beit-gptj (the paper), tiny.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout (JSON Lines).")]
LmOption = Annotated[
    str | None, typer.Option("--lm", help="LM: hub id, local folder or .gguf file (overrides the preset).")
]


def _check_encoder(value: str | None) -> str | None:
    """A malformed --encoder is refused before any model loads."""
    if value is not None:
        from mmtui.defaults import parse_encoder_spec
        from mmtui.errors import StackError

        try:
            parse_encoder_spec(value)
        except StackError as error:
            fail(str(error).replace("[", r"\["))
    return value


EncoderOption = Annotated[
    str | None,
    typer.Option(
        "--encoder",
        help="Image encoder: hf:<id|folder>[@LAYER][+cls] (CLIP, SigLIP, DINOv2), timm:<name>[@LAYER][+cls], "
        "beit:<id|folder> or efficientnet-lite0. LAYER: hidden state as LLaVA's vision_feature_layer (-2).",
        callback=_check_encoder,
    ),
]
VlmOption = Annotated[
    str | None,
    typer.Option(
        "--vlm",
        help="A whole VLM checkpoint as the stack (LLaVA-1.5, LLaVA-NeXT, Idefics3, SmolVLM, SmolVLM2): hub id or "
        "folder; replaces --preset, --lm, --encoder and --projection; --prompt is the instruction after the image.",
    ),
]
BosOption = Annotated[
    bool,
    typer.Option("--bos", help="Put the LM's document-start token before the image prefix (a separate stack)."),
]
ProjectionOption = Annotated[
    Path | None, typer.Option("--projection", help="Projection file: LiMBeR proj.ckpt or our .safetensors.")
]


def fail(message: str, code: ExitCode = ExitCode.FAILED) -> NoReturn:
    """Print one error line on stderr and exit with `code`."""
    err.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(int(code))


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/] {message}", highlight=False, soft_wrap=True)


@contextmanager
def core_errors() -> Iterator[None]:
    """Turn a core exception into one CLI error line (exit 2), and Ctrl-C into a note on what was kept (130)."""
    try:
        yield
    except MmtuiError as error:
        fail(str(error).replace("[", r"\["))
    except Exception as error:  # sqlite3's DatabaseError met after the open (a damaged page read later): one line
        if not is_corruption(error):
            raise
        cache = _last_db or "CACHE.db"
        fail(
            f"the cache file {cache} is damaged ({error}); nothing more is written to it. Salvage what is readable "
            f"with `mmtui doctor --db {cache} --salvage recovered.db` (or `sqlite3 {cache} .recover | sqlite3 "
            "recovered.db`) and pass --db recovered.db"
        )
    except KeyboardInterrupt:
        err.print(INTERRUPTED, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def emit_json(rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON Lines on stdout, lazily, flushing each line."""
    for row in rows:
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()


_last_db: Path | None = None  # the cache the command resolved, for the damaged-cache message of core_errors


def db_path(db: Path | None) -> Path:
    global _last_db
    _last_db = db if db is not None else Path(os.environ.get("MMTUI_DB", DEFAULT_DB))
    return _last_db
