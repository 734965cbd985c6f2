"""`mmtui caption IMAGE...`: greedy captions of images from any stack (what the LM reads in the image prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from commands._app import (
    BosOption,
    DeviceOption,
    EncoderOption,
    ExitCode,
    JsonOption,
    LmOption,
    PresetOption,
    ProjectionOption,
    VlmOption,
    app,
    core_errors,
    emit_json,
    err,
    fail,
    out,
    warn,
)
from commands._experiments import check_stack_args
from mmtui.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PRESET, DEFAULT_PROMPT


def _image_files(paths: list[Path]) -> tuple[list[Path], int]:
    """Image files under each path (file or folder); each path that cannot be used is named on stderr."""
    from mmtui.errors import ImageDirError
    from mmtui.run.images import find_images

    files: list[Path] = []
    failed = 0
    for path in paths:
        try:
            scan = find_images(path)
        except ImageDirError as error:
            warn(str(error))
            failed += 1
            continue
        for problem in scan.problems:
            warn(str(problem))
        files += scan.files
    return files, failed


@app.command()
def caption(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    preset: PresetOption = DEFAULT_PRESET,
    lm: LmOption = None,
    encoder: EncoderOption = None,
    projection: ProjectionOption = None,
    vlm: VlmOption = None,
    bos: BosOption = False,
    prompt: Annotated[str, typer.Option("--prompt", help="Text after the image prefix.")] = DEFAULT_PROMPT,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Most tokens generated per caption.")
    ] = DEFAULT_MAX_NEW_TOKENS,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images captioned together.")] = 8,
    device: DeviceOption = "auto",
    json_out: JsonOption = False,
) -> None:
    """Caption images greedily (temperature 0) with a stack: image prefix + prompt, then the LM's continuation."""
    from mmtui.errors import ImageError
    from mmtui.run.images import Skip, iter_images

    check_stack_args(preset, projection)
    files, failed = _image_files(images)
    if not files:
        fail("no image to caption; pass image files or folders of images")
    table = Table("image", "caption", box=None, header_style="bold")
    with core_errors():
        from mmtui import load_stack

        stack = load_stack(
            preset, lm=lm, encoder=encoder, projection=projection, device=device, prompt=prompt, vlm=vlm, bos=bos
        )
        done = 0
        columns = (TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task("caption", total=len(files))
            batch = []
            for item in iter_images(files):
                if isinstance(item, Skip):
                    err.print(f"[dim]Skipped:[/] {item.path}: {item.reason}", highlight=False, soft_wrap=True)
                    progress.advance(task)
                elif isinstance(item, ImageError):
                    warn(str(item))
                    failed += 1
                    progress.advance(task)
                else:
                    batch.append(item)
                if len(batch) == batch_size:
                    done += _emit(stack, batch, max_tokens, json_out, table, preset)
                    progress.advance(task, len(batch))
                    batch = []
            if batch:
                done += _emit(stack, batch, max_tokens, json_out, table, preset)
    if not json_out and done:
        out.print(table)
    if not done:
        raise typer.Exit(int(ExitCode.FAILED))
    if failed:
        raise typer.Exit(int(ExitCode.PARTIAL))


def _emit(stack, batch: list, max_tokens: int, json_out: bool, table: Table, preset: str) -> int:
    """Caption one batch of LoadedImages; JSON Lines at once, or rows of the table printed at the end."""
    texts = stack.caption([im.image for im in batch], max_new_tokens=max_tokens)
    if json_out:
        emit_json(
            {
                "type": "caption",
                "image": str(im.path),
                "sha256": im.sha256,
                "caption": text,
                "prompt": stack.prompt,
                "preset": preset,
            }
            for im, text in zip(batch, texts, strict=True)
        )
    else:
        for im, text in zip(batch, texts, strict=True):
            table.add_row(str(im.path), text)
    return len(batch)
