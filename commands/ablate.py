"""`mmtui ablate IMAGE_DIR | --from-store`: dose-response of P(target) and of the caption when the top-k units
of each image are ablated, against random units of the same layers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
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
from commands._experiments import (
    BertLayersOption,
    BertModelOption,
    CaptionsOption,
    RunOption,
    fmt,
    load_metrics,
    loading,
    print_eta,
    progress_bar,
    run_stack,
)
from mmtui.defaults import DEFAULT_KEEP, AblationMode, Baseline, UnitMode

if TYPE_CHECKING:
    from mmtui.stacks.base import Stack
    from mmtui.store import Run, Store

DEFAULT_K = "0,50,100,200,400,800,1600,3200,6400"


def parse_ks(text: str) -> list[int]:
    """--k as a sorted list (mmtui.defaults.parse_ks, the TUI's parser too); a bad one fails with its reason."""
    from mmtui.defaults import parse_ks as parse

    try:
        return list(parse(text))
    except ValueError as error:
        fail(f"--k {text!r}: {error}")


def _check_k_range(ks: list[int], keep: int) -> None:
    """k ranks the (layer, unit, patch) triples the run stored per image: at most `keep` of them."""
    if ks[-1] > keep:
        fail(f"--k {ks[-1]}: the run stores {keep} triples per image; use k in 0..{keep}")


@app.command()
def ablate(
    image_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Images to attribute (if not cached yet) and ablate; or use --from-store.", show_default=False
        ),
    ] = None,
    from_store: Annotated[bool, typer.Option("--from-store", help="Ablate the images already in the run.")] = False,
    k: Annotated[str, typer.Option("--k", help="Numbers of top units to ablate, comma-separated.")] = DEFAULT_K,
    baseline: Annotated[
        Baseline, typer.Option("--baseline", help="random (same layers, same patches) or none.")
    ] = Baseline.RANDOM,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Random draws per image for the baseline.")] = 3,
    mode: Annotated[
        AblationMode, typer.Option("--mode", help="zero, or mean (the unit's mean over the run's images).")
    ] = AblationMode.ZERO,
    unit_mode: Annotated[
        UnitMode,
        typer.Option("--unit-mode", help="triples (unit at its patch) or units (unit at every image position)."),
    ] = UnitMode.TRIPLES,
    interpretable: Annotated[
        bool, typer.Option("--interpretable/--no-interpretable", help="Also ablate the interpretable top units.")
    ] = True,
    regenerate: Annotated[
        bool,
        typer.Option(
            "--regenerate/--no-regenerate",
            help="Also regenerate the caption under each ablation (BERTScore); slow: a greedy decode per setting.",
        ),
    ] = False,
    captions: CaptionsOption = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many images.")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Ablation settings per forward pass; default all of an image's, as far as the memory allows.",
            show_default=False,
        ),
    ] = None,
    run: RunOption = None,
    preset: PresetOption = "smol",
    lm: LmOption = None,
    encoder: EncoderOption = None,
    projection: ProjectionOption = None,
    vlm: VlmOption = None,
    bos: BosOption = False,
    bertscore_model: BertModelOption = None,
    bertscore_layers: BertLayersOption = None,
    device: DeviceOption = "auto",
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Ablate each image's top-k units (and random ones) and measure P(target) and the regenerated caption.

    The stack options (--preset, --lm, --encoder, --projection, --vlm, --bos) choose the stack that attributes
    IMAGE_DIR, as in `attribute`; with --from-store the run's own stack is loaded.
    k counts (layer, unit, patch) triples in rank order (--unit-mode units: distinct units). The table gives,
    per condition and k, the mean relative drop 1 - p_ablated / p with its 95% t interval over images.
    """
    from mmtui.experiments.ablation import AblationError, dose_response, summarize
    from mmtui.experiments.ablation_ops import ablation_batch_rows

    ks = parse_ks(k)
    if from_store == (image_dir is not None):
        fail("pass an IMAGE_DIR to attribute and ablate, or --from-store for the images already cached (not both)")
    if captions is not None and from_store:
        fail("--captions chooses the targets of new images; with --from-store the cached targets are used")
    stack_args: dict[str, Any] = {
        "lm": lm,
        "encoder": encoder,
        "projection": str(projection) if projection else None,
        **({"vlm": vlm} if vlm else {}),
        **({"bos": True} if bos else {}),
    }
    if from_store and any(stack_args.values()):
        fail(
            "--from-store loads the run's own stack; pass no stack option (--lm, --encoder, --projection, --vlm, --bos)"
        )
    failures: list[str] = []
    n_points = 0
    with core_errors():
        from mmtui.store import Store

        store = Store.open(db_path(db), create=not from_store)
        with store:
            stack, chosen, result_ids = _images_to_ablate(
                store, image_dir, run, ks, preset, stack_args, captions, device, limit, failures
            )
            bert = None
            if regenerate:
                bert, _ = load_metrics(clip=False, bertscore_model=bertscore_model, bertscore_layers=bertscore_layers)

            def on_error(_result_id: int, message: str) -> None:
                failures.append(message)
                warn(message)

            n_conditions = 1 + int(interpretable) + (seeds if baseline == "random" else 0)
            per_image = len(ks) * n_conditions
            n_rows = 1 + sum(1 for value in ks if value > 0) * n_conditions  # the unablated row and the ablations
            passes = len(result_ids) * -(-n_rows // (batch_size or ablation_batch_rows(stack, n_rows)))
            err.print(
                f"Ablating {len(result_ids)} image(s) x {per_image} settings in about {passes} batched pass(es)"
                + (", each setting regenerating its caption" if regenerate else "")
                + "; the ETA follows the first image",
                highlight=False,
                soft_wrap=True,
            )
            # the ETA from the first image computed now (images read back from the cache take no time)
            since, fresh, done, told = time.perf_counter(), False, 0, False

            def on_image(_result_id: int) -> None:
                nonlocal since, fresh, done, told
                done += 1
                if fresh and not told and done < len(result_ids):
                    print_eta("Ablating: the first image", time.perf_counter() - since, 1, 1 + len(result_ids) - done)
                    told = True
                elif not fresh:
                    since = time.perf_counter()
                fresh = False

            points = []
            try:
                with progress_bar() as progress:
                    task = progress.add_task("Ablating", total=len(result_ids) * per_image)
                    for point in dose_response(
                        stack,
                        store,
                        chosen,
                        result_ids,
                        ks,
                        baseline=baseline.value,
                        seeds=seeds,
                        mode=mode.value,
                        unit_mode=unit_mode.value,
                        captions=regenerate,
                        interpretable=interpretable,
                        bertscore=bert,
                        batch_size=batch_size,
                        on_error=on_error,
                        on_image=on_image,
                    ):
                        points.append(point)
                        fresh = fresh or not point.cached
                        progress.update(
                            task,
                            advance=1,
                            description=f"Ablating {Path(point.image).name} k={point.k} {point.condition}",
                        )
                        if json_out:
                            emit_json([{"type": "point", **point.to_json()}])
                    progress.update(task, total=progress.tasks[task].completed)
            except AblationError as error:
                fail(str(error))
            n_points = len(points)
            rows = summarize(points, shape=chosen.shape) if points else []
    if json_out:
        emit_json({"type": "summary", **r} for r in rows)
    elif rows:
        out.print(_table(rows, chosen, len(result_ids)))
    if failures:
        raise typer.Exit(int(ExitCode.PARTIAL if n_points else ExitCode.FAILED))


def _images_to_ablate(
    store: Store,
    image_dir: Path | None,
    run: str | None,
    ks: list[int],
    preset: str,
    stack_args: dict[str, Any],
    captions: Path | None,
    device: str,
    limit: int | None,
    failures: list[str],
) -> tuple[Stack, Run, list[int]]:
    """The stack, the run and the result ids to ablate: the run's cached images (--from-store, no IMAGE_DIR), or
    the images of IMAGE_DIR, attributed first where not cached; fails when k exceeds the triples stored."""
    if image_dir is None:
        chosen = store.run(run)
        _check_k_range(ks, int(chosen.settings.get("keep", DEFAULT_KEEP)))
        result_ids = [r["id"] for r in store.results(chosen.id, limit=limit)]
        if not result_ids:
            fail(f"run {chosen.id} holds no results; run `mmtui attribute IMAGE_DIR` first")
        return run_stack(chosen, device), chosen, result_ids
    _check_k_range(ks, DEFAULT_KEEP)
    return _attribute_first(store, image_dir, preset, stack_args, captions, device, limit, failures)


def _attribute_first(
    store: Store,
    image_dir: Path,
    preset: str,
    stack_args: dict[str, Any],
    captions: Path | None,
    device: str,
    limit: int | None,
    failures: list[str],
) -> tuple[Stack, Run, list[int]]:
    """Attribute the images of IMAGE_DIR not yet cached (the stack: `preset` with `stack_args`, load_stack's
    keywords); return the stack, the run and their result ids."""
    from mmtui.run.events import ImageDone, ImageFailed, ImageSkipped, Note, RunStarted
    from mmtui.run.images import find_images
    from mmtui.run.pipeline import attribute_images, read_captions
    from mmtui.stacks import load_stack
    from mmtui.store.experiments import result_ids_for_images

    scan = find_images(image_dir)
    for problem in scan.problems:
        warn(str(problem))
    files = scan.files[:limit] if limit else scan.files
    caption_map = read_captions(captions) if captions else None
    with loading(f"Loading the {stack_args.get('vlm') or preset} stack") as progress:
        stack = load_stack(preset, device=device, progress=progress, **stack_args)
    run_id = None
    sha256: dict[str, str] = {}  # path -> the image's sha256, from the run's events (nothing is read twice)
    with progress_bar() as progress:
        task = progress.add_task("Attributing", total=len(files))
        for event in attribute_images(stack, store, files, captions=caption_map):
            if isinstance(event, RunStarted):
                run_id = event.run_id
            elif isinstance(event, Note) and event.kind == "warning":
                warn(event.message)
            elif isinstance(event, (ImageDone, ImageSkipped, ImageFailed)):
                progress.advance(task)
                if event.sha256 is not None:
                    sha256[event.path] = event.sha256
                if isinstance(event, ImageFailed):
                    failures.append(event.message)
                    warn(event.message)
    assert run_id is not None
    shas = [sha256[str(path)] for path in files if str(path) in sha256]  # in the order of the files
    result_ids = result_ids_for_images(store, run_id, shas)
    if not result_ids:
        fail(f"none of the images in {image_dir} could be attributed; see the messages above")
    return stack, store.run(run_id), result_ids


def _table(rows: list[dict[str, Any]], run: Run, n_images: int) -> Table:
    first = rows[0]
    table = Table(
        title=f"Dose-response: {first['mode']} ablation of {first['unit_mode']}, run {run.id} ({run.stack.name}), "
        f"{n_images} image(s)"
    )
    for name in ("condition", "k", "n", "drop", "95% CI", "F1", "units (%)"):
        table.add_column(name, justify="left" if name == "condition" else "right", no_wrap=True, min_width=len(name))
    for r in rows:
        table.add_row(
            r["condition"],
            str(r["k"]),
            str(r["n"]),
            fmt(r["mean_drop"]),
            f"[{fmt(r['lo'], 2)}, {fmt(r['hi'], 2)}]",
            fmt(r["bertscore"], 2),
            f"{r['units']:.0f} ({100 * r.get('frac_units', 0.0):.2f}%)",
        )
    table.caption = (
        "drop = mean over the n images of 1 - p_ablated / p (random: seeds averaged first), with its 95% t "
        "interval; F1 = BERTScore of the regenerated caption vs the unablated one; units = distinct units "
        "ablated (share of all units); k counts (unit, patch) triples, or units with --unit-mode units"
    )
    return table
