"""`mmtui attribute IMAGE_DIR`: score every MLP neuron for each image and cache the results."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from commands._app import (
    BosOption,
    DbOption,
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
    db_path,
    emit_json,
    err,
    fail,
    out,
    warn,
)
from commands._experiments import check_stack_args
from mmtui.defaults import DEFAULT_KEEP, DEFAULT_PRESET, DEFAULT_PROMPT, Convention, Engine, Site, YKind

if TYPE_CHECKING:
    from mmtui.run.events import Event
    from mmtui.run.pipeline import Settings
    from mmtui.store import Run, Store


@app.command()
def attribute(
    image_dir: Annotated[
        Path | None, typer.Argument(help="Folder of images (searched recursively) or one image.", show_default=False)
    ] = None,
    samples: Annotated[bool, typer.Option("--samples", help="Use the sample photos bundled with mmtui.")] = False,
    preset: PresetOption = DEFAULT_PRESET,
    lm: LmOption = None,
    encoder: EncoderOption = None,
    projection: ProjectionOption = None,
    vlm: VlmOption = None,
    bos: BosOption = False,
    target: Annotated[str | None, typer.Option("--target", help="Attribute this word for every image.")] = None,
    captions: Annotated[
        Path | None,
        typer.Option("--captions", help="Human captions (COCO JSON, JSONL or CSV image,caption): target = first noun."),
    ] = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Text after the image prefix.")] = DEFAULT_PROMPT,
    top: Annotated[int, typer.Option("--top", min=1, help="Top neurons to show per image.")] = 10,
    keep: Annotated[
        int, typer.Option("--keep", min=1, help="Top (layer, unit, patch) triples stored per image.")
    ] = DEFAULT_KEEP,
    batch_size: Annotated[
        str, typer.Option("--batch-size", help="Images per forward/backward pass, or auto (4 on CPU; fit the GPU).")
    ] = "auto",
    site: Annotated[
        Site, typer.Option("--site", help="post (the MLP's hidden activation) or pre (before the nonlinearity).")
    ] = Site.POST,
    y: Annotated[
        YKind, typer.Option("--y", help="What is attributed: prob, logit or logprob of the target.")
    ] = YKind.PROB,
    decode: Annotated[
        Convention, typer.Option("--decode", help="Token decoding: raw (paper) or ln_f (final norm gain).")
    ] = Convention.RAW,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="I/N: only the images of shard I of N (0-based), e.g. a SLURM array task."),
    ] = None,
    engine: Annotated[
        Engine, typer.Option("--engine", help="local, or ray (one model replica per worker).")
    ] = Engine.LOCAL,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray workers (model replicas).")] = 2,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0, help="GPUs per Ray worker.")] = 0.0,
    device: DeviceOption = "auto",
    db: DbOption = None,
    json_out: JsonOption = False,
    new_only: Annotated[
        bool, typer.Option("--new-only", help="With --json: leave out images already in the cache.")
    ] = False,
) -> None:
    """Score every MLP neuron (activation x gradient) for each image, decode the top ones, and cache it all."""
    from mmtui.run.images import find_images
    from mmtui.store import Store

    if target and captions:
        fail("--target and --captions both choose the target; pass one of them")
    if samples == (image_dir is not None):
        fail("pass an IMAGE_DIR, or --samples for the bundled photos (not both)")
    shard_pair = _parse_shard(shard) if shard else None
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        fail(f"--batch-size {batch_size!r}: use a positive number or auto")
    _check_before_loading(preset, target, projection, image_dir)
    with core_errors():
        if samples:
            from mmtui.run.samples import sample_dir

            image_dir = sample_dir()
        assert image_dir is not None
        scan = find_images(image_dir)
        for problem in scan.problems:
            warn(str(problem))
        if scan.skipped and not samples:  # the bundled folder also holds its README and captions
            names = ", ".join(p.name for p in scan.skipped[:3]) + (" ..." if len(scan.skipped) > 3 else "")
            warn(f"skipped {len(scan.skipped)} file(s) that are not images by name: {names}")
        from mmtui.run.pipeline import Settings, attribute_images, read_captions

        settings = Settings(
            target=target,
            captions=read_captions(captions) if captions else None,
            batch_size=0 if batch_size == "auto" else int(batch_size),
            keep=keep,
            site=site.value,
            y_kind=y.value,
            convention=decode.value,
            shard=shard_pair,
        )
        load_args: dict[str, Any] = {
            "preset": preset,
            "lm": lm,
            "encoder": encoder,
            "projection": str(projection) if projection else None,
            "prompt": prompt,
            **({"vlm": vlm} if vlm else {}),
            **({"bos": True} if bos else {}),
        }
        with Store.open(db_path(db)) as store:
            if engine is Engine.RAY:
                from mmtui.run.distributed import attribute_images_ray

                events = attribute_images_ray(
                    load_args, store, scan.files, settings, workers=workers, gpus_per_worker=gpus_per_worker
                )
            else:
                with err.status(f"Loading the {vlm or preset} stack..."):
                    from mmtui.stacks import load_stack

                    stack = load_stack(load_args.pop("preset"), device=device, **load_args)
                events = attribute_images(stack, store, scan.files, settings)
            cached = None if new_only or not json_out else _cached_lookup(store, settings, top, decode)
            counts = _consume(events, store, top, decode, json_out, cached)
    _finish(counts)


def _check_before_loading(preset: str, target: str | None, projection: Path | None, image_dir: Path | None) -> None:
    """Arguments a model load would only reject minutes later (and an unknown preset after making the cache)."""
    check_stack_args(preset, projection)
    if target is not None and not target.strip():
        fail("--target is empty; pass a word such as --target dog")
    if image_dir is not None and image_dir.is_file():
        from mmtui.run.images import load_image

        with core_errors():
            load_image(image_dir)  # one file given: it must be an image


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, total = (int(x) for x in text.split("/"))
    except ValueError:
        fail(f"--shard {text!r}: write it as I/N, e.g. 0/4")
    if not 0 <= index < total:
        fail(f"--shard {text!r}: I must be in 0..N-1")
    return index, total


def _spec_of(settings: Settings, path: Path) -> str | None:
    """The target spec a run asks of this image (as the pipeline's `plan`), None where it has no target."""
    from mmtui.run.pipeline import human_target

    if settings.target is not None:
        return f"word:{settings.target}"
    if settings.captions is None:
        return "auto"
    picked = human_target(settings.captions.get(path.name) or [])
    return f"human:{picked[0]}" if picked else None


def _cached_lookup(
    store: Store, settings: Settings, top: int, convention: str
) -> Callable[[Run, str, str], dict | None]:
    """For --json: the summary of an image the cache already holds, marked "cached": true (None if not found).
    Found by the sha256 the run's skip event carries (the same photo may be stored under another name)."""
    from mmtui.errors import MmtuiError
    from mmtui.store.queries import image_summary

    def lookup(run: Run, path: str, sha256: str) -> dict | None:
        try:
            row = store.result(run.id, sha256, _spec_of(settings, Path(path)))
        except MmtuiError:
            return None
        return {**image_summary(store, run, row["id"], top, convention), "cached": True}

    return lookup


def _consume(
    events: Iterable[Event],
    store: Store,
    top: int,
    convention: str,
    json_out: bool,
    cached: Callable[[Run, str, str], dict | None] | None = None,
) -> dict[str, int]:
    from mmtui.run.events import ImageDone, ImageFailed, ImageSkipped, Note, RunStarted
    from mmtui.store.prevalence import image_generic_share
    from mmtui.store.queries import image_summary

    counts = {"done": 0, "skipped": 0, "failed": 0, "other_shard": 0}
    summaries: list[tuple[dict, int]] = []
    run: Run | None = None
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("Attributing", total=None, rate="")
        decode_task = None
        for event in events:
            if isinstance(event, RunStarted):
                run = store.run(event.run_id)
                progress.update(task, total=event.total)
            elif isinstance(event, Note):
                if event.kind == "decoding":
                    if decode_task is None:
                        decode_task = progress.add_task("Decoding neurons", total=event.total, rate="")
                    else:
                        progress.advance(decode_task)
                elif event.kind == "warning":
                    warn(event.message)
                else:
                    err.print(f"[dim]{event.message}[/]", highlight=False, soft_wrap=True)
            elif isinstance(event, ImageFailed):
                counts["failed"] += 1
                progress.advance(task)
                err.print(f"[red]Failed:[/] {event.message}", highlight=False, soft_wrap=True)
            elif isinstance(event, ImageSkipped):
                counts["skipped"] += 1
                counts["other_shard"] += event.reason == "shard"
                progress.advance(task)
                if event.reason == "duplicate":
                    err.print(f"[dim]Skipped:[/] {event.message}", highlight=False, soft_wrap=True)
                elif event.reason == "cached" and cached is not None:
                    assert run is not None
                    emit_json({"type": "image", **row} for row in filter(None, [cached(run, event.path, event.sha256)]))
            elif isinstance(event, ImageDone):
                counts["done"] += 1
                progress.advance(task)
                elapsed = progress.tasks[task].elapsed or 0.0
                rate = counts["done"] / elapsed if elapsed else 0.0
                progress.update(task, rate=f"{rate:.2f} img/s")
                assert run is not None and event.result_id is not None
                summary = {**image_summary(store, run, event.result_id, top, convention), "cached": False}
                if json_out:  # judged on the run's images counted so far (the run's tables fold in batches)
                    summary["generic"] = image_generic_share(store, run, event.result_id)
                    emit_json([{"type": "image", **summary}])
                else:
                    summaries.append((summary, event.result_id))
    if not json_out and summaries:
        assert run is not None
        store.fold_pending(run.id)
        run = store.run(run.id)  # every image of the run counted
        for summary, result_id in summaries:
            summary["generic"] = image_generic_share(store, run, result_id)
        out.print(_table([s for s, _ in summaries], top))
    return counts


def _table(summaries: list[dict], top: int) -> Table:
    from mmtui.store.prevalence import GENERIC_SHARE, MIN_GENERIC_RESULTS

    table = Table(title="Top neurons per image (layer.unit @ patch: score, decoded tokens)", show_lines=True)
    table.add_column("image", overflow="fold")
    table.add_column("target", no_wrap=True)
    table.add_column("P(target)", justify="right")
    table.add_column("caption", overflow="fold", max_width=30)
    table.add_column("generic", justify="right")
    table.add_column("top neurons", overflow="fold")
    for s in summaries:
        lines = [
            f"L{t['layer']}.u{t['unit']} @{t['patch']}: {t['score']:.3g}  {', '.join(_shown(x) for x in t['tokens'][:5])}"
            for t in s["top"][:top]
        ]
        share = s["generic"]["generic_share"]
        generic = "-" if share is None else f"{share:.0%}"
        table.add_row(
            Path(s["image"]).name, s["target"], f"{s['p_target']:.4f}", s["caption"], generic, "\n".join(lines)
        )
    table.caption = (
        "generic: share of the image's top 100 triples whose unit is in the top 100 of over "
        f"{GENERIC_SHARE:.0%} of the run's images (-: under {MIN_GENERIC_RESULTS} images, none called generic)"
    )
    return table


def _shown(token: str) -> str:
    """A decoded token for the table: stripped, but a token of spaces stays visible (as ␣)."""
    return token.strip() or ("␣" * len(token) if token and set(token) == {" "} else repr(token))


def _finish(counts: dict[str, int]) -> None:
    shard = counts.pop("other_shard")
    here = counts["skipped"] - shard
    skipped = f"{here} skipped (cached or duplicate)" + (f", {shard} in another shard" if shard else "")
    err.print(f"{counts['done']} attributed, {skipped}, {counts['failed']} failed")
    if counts["failed"]:
        code = ExitCode.FAILED if counts["done"] + counts["skipped"] == 0 else ExitCode.PARTIAL
        raise typer.Exit(int(code))
