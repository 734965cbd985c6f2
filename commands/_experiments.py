"""Options and helpers shared by the experiment commands (ablate, prompts, heatmap, specificity, layers, report)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from commands._app import err, fail, warn

if TYPE_CHECKING:
    from mmtui.experiments.metrics import BertScorer, ClipScorer
    from mmtui.stacks.base import Stack
    from mmtui.store import Run, Store

RunOption = Annotated[
    str | None, typer.Option("--run", help="Run id (prefix); default the most recent. See `mmtui runs`.")
]
CaptionsOption = Annotated[
    Path | None,
    typer.Option("--captions", help="Human captions: COCO captions JSON, JSONL or CSV (image,caption)."),
]
BertModelOption = Annotated[
    str | None,
    typer.Option(
        "--bertscore-model",
        help="BERTScore model (hub id or folder); default bert-score's own online, all-MiniLM-L6-v2 offline.",
    ),
]
BertLayersOption = Annotated[
    int | None, typer.Option("--bertscore-layers", min=1, help="Layer of the BERTScore model to use.")
]
ClipModelOption = Annotated[
    str | None,
    typer.Option(
        "--clip-model", help="CLIP model for CLIPScore (hub id or folder); default openai/clip-vit-base-patch32."
    ),
]
NoClipOption = Annotated[bool, typer.Option("--no-clip", help="Skip CLIPScore.")]


class LoggedProgress(Progress):
    """A rich progress bar that, where stderr is not a terminal (a log file, a pipe), also writes a plain line
    per task at most every `every` seconds and when the task finishes: rich draws nothing there until the end."""

    def __init__(self, *columns: Any, every: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.every = every
        self._logged: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        if now - self._logged.get(task_id, -self.every) < self.every and not task.finished:
            return
        self._logged[task_id] = now
        total = "?" if task.total is None else f"{task.total:.0f}"
        eta = task.time_remaining
        line = f"{task.description}: {task.completed:.0f}/{total}, {task.elapsed or 0:.0f} s elapsed"
        self.console.print(line + ("" if eta is None else f", ETA {eta:.0f} s"), highlight=False, soft_wrap=True)


def progress_bar(every: float = 30.0) -> Progress:
    """A progress bar on stderr; plain lines every `every` seconds where stderr is not a terminal."""
    return LoggedProgress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        every=every,
    )


def print_eta(label: str, elapsed: float, done: int, total: int) -> None:
    """The ETA up front: one plain line on stderr (a terminal or a log alike) saying how long the first `done`
    of `total` items took and how long the rest will take at that rate."""
    left = elapsed / max(done, 1) * max(total - done, 0)
    minutes, seconds = divmod(round(left), 60)
    eta = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    err.print(
        f"{label}: {done} of {total} took {elapsed:.1f} s; ETA about {eta} for the other {total - done}",
        highlight=False,
        soft_wrap=True,
    )


def stage_progress(progress: Progress) -> Callable[[str, int, int], None]:
    """A core progress callback (stage, done, total) that shows one bar per stage on `progress`. A stage the
    core opens with done = 0 gets an ETA line (`print_eta`) once its first part is done."""
    tasks: dict[str, TaskID] = {}
    started: dict[str, float] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
            if done == 0:
                started[stage] = time.perf_counter()
        elif stage in started and 0 < done < total:
            print_eta(stage, time.perf_counter() - started.pop(stage), done, total)
        progress.update(tasks[stage], completed=done)

    return report


@contextmanager
def loading(title: str) -> Iterator[Callable[[str], None]]:
    """One status line on stderr while a model loads, updated with each stage the core reports through the
    yielded callback; where stderr is not a terminal (a log file), one plain line per stage instead."""
    if err.is_terminal:
        with err.status(f"{title}...") as status:
            yield lambda stage: status.update(f"{title}: {stage}...")
    else:
        err.print(f"{title}...", highlight=False, soft_wrap=True)
        yield lambda stage: err.print(f"{title}: {stage}", highlight=False, soft_wrap=True)


def run_stack(run: Run, device: str) -> Stack:
    """The stack a run was made with (its fingerprint checked), loaded under a status line on stderr."""
    from mmtui.stacks.presets import load_stack_for_run

    with loading(f"Loading the {run.stack.name} stack of run {run.id}") as progress:
        return load_stack_for_run(run, device=device, progress=progress)


def load_metrics(
    *,
    bertscore: bool = True,
    clip: bool = True,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    clip_model: str | None = None,
) -> tuple[BertScorer | None, ClipScorer | None]:
    """Load the scorers that can be loaded; one warning line per metric that cannot, and go on without it."""
    from mmtui.experiments.metrics import load_scorers

    with err.status("Loading the scoring models..."):
        bert, clip_scorer, notes = load_scorers(
            bertscore=bertscore,
            clipscore=clip,
            bertscore_model=bertscore_model,
            bertscore_layers=bertscore_layers,
            clip_model=clip_model,
        )
    for note in notes:
        warn(note)
    if bert is not None:
        err.print(f"[dim]BERTScore model: {bert.name}[/]", highlight=False)
    if clip_scorer is not None:
        err.print(f"[dim]CLIPScore model: {clip_scorer.name}[/]", highlight=False)
    return bert, clip_scorer


@contextmanager
def open_store(db: Path, create: bool = False) -> Iterator[Store]:
    from mmtui.store import Store

    store = Store.open(db, create=create)
    try:
        yield store
    finally:
        store.close()


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def check_stack_args(preset: str | None, projection: Path | None = None) -> None:
    """What a model load would reject only after loading (seconds to minutes): an unknown preset, a missing
    projection file. Commands call it before loading anything."""
    from mmtui.stacks.presets import PRESETS

    if preset is not None and preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if projection is not None and not projection.is_file():
        fail(f"--projection {projection}: no such file; pass a LiMBeR proj.ckpt or our .safetensors")


def check_unit(layer: int, unit: int, shape: dict[str, Any]) -> None:
    """A (layer, unit) outside the stack's shape: a usage error naming the valid range."""
    n_layers, d_mlp = int(shape["n_layers"]), int(shape["d_mlp"])
    if not (0 <= layer < n_layers and 0 <= unit < d_mlp):
        fail(f"L{layer}.u{unit} is not in this stack: layers 0..{n_layers - 1}, units 0..{d_mlp - 1}")
