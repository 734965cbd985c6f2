"""`mmtui prompts IMAGE_DIR`: decode each image prompt to its nearest tokens, score them against the image and its
captions, and KS-test them against random vectors of matched statistics (the paper's Table 2)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from commands._app import (
    DbOption,
    DeviceOption,
    EncoderOption,
    ExitCode,
    JsonOption,
    LmOption,
    PresetOption,
    ProjectionOption,
    app,
    core_errors,
    db_path,
    emit_json,
    fail,
    out,
    warn,
)
from commands._experiments import (
    BertLayersOption,
    BertModelOption,
    CaptionsOption,
    ClipModelOption,
    NoClipOption,
    check_stack_args,
    fmt,
    load_metrics,
    loading,
    progress_bar,
    stage_progress,
)

if TYPE_CHECKING:
    from mmtui.experiments.prompts import PromptsResult
    from mmtui.run.images import LoadedImage


@app.command()
def prompts(
    image_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively) or one image.")],
    captions: CaptionsOption = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Nearest tokens per prompt (cosine, input embeddings).")] = 5,
    n_random: Annotated[int, typer.Option("--random", min=1, help="Random vectors for the baseline.")] = 1000,
    random_kind: Annotated[
        str, typer.Option("--random-kind", help="matched (per-dimension mean and std of the prompts) or isotropic.")
    ] = "matched",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random vectors and noun samples.")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many images.")] = None,
    preset: PresetOption = "smol",
    lm: LmOption = None,
    encoder: EncoderOption = None,
    projection: ProjectionOption = None,
    bertscore_model: BertModelOption = None,
    bertscore_layers: BertLayersOption = None,
    clip_model: ClipModelOption = None,
    no_clip: NoClipOption = False,
    device: DeviceOption = "auto",
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Decode image prompts into their nearest tokens and test whether they say more than random vectors do."""
    from mmtui.experiments.prompts import RANDOM_KINDS, decode_prompts, table

    if random_kind not in RANDOM_KINDS:
        fail(f"--random-kind {random_kind!r}: use {' or '.join(RANDOM_KINDS)}")
    check_stack_args(preset, projection)
    with core_errors():
        from mmtui.run.images import find_images
        from mmtui.run.pipeline import read_captions
        from mmtui.store import Store

        scan = find_images(image_dir)
        caption_map = read_captions(captions) if captions else None
        images, failed = _read_images(scan.files[:limit] if limit else scan.files, image_dir)
        if caption_map is None:
            warn("no --captions: BERTScore needs human captions, so only CLIPScore can score the prompts")
        bert, clip = load_metrics(
            bertscore=caption_map is not None,
            clip=not no_clip,
            bertscore_model=bertscore_model,
            bertscore_layers=bertscore_layers,
            clip_model=clip_model,
        )
        if bert is None and clip is None:
            fail("no metric can score the prompts: pass --captions FILE (BERTScore) or a --clip-model that loads")
        from mmtui.stacks import load_stack

        with loading(f"Loading the {preset} stack") as load_progress:
            stack = load_stack(
                preset, lm=lm, encoder=encoder, projection=projection, device=device, progress=load_progress
            )
        with Store.open(db_path(db)) as store, progress_bar() as progress:
            result = decode_prompts(
                stack,
                store,
                images,
                caption_map,
                k=k,
                n_random=n_random,
                seed=seed,
                random_kind=random_kind,
                bertscore=bert,
                clipscore=clip,
                progress=stage_progress(progress),
            )
    means = table(result)
    if json_out:
        emit_json({"type": "table", **row} for row in means)
        emit_json({"type": "ks", **t} for t in result.tests)
    else:
        _print_tables(result, means, f"{len(images)} images, {stack.name} stack", random_kind, k)
    if failed:
        raise typer.Exit(int(ExitCode.PARTIAL))


def _read_images(files: list[Path], image_dir: Path) -> tuple[list[LoadedImage], int]:
    """The readable images among `files` (of IMAGE_DIR), each photo once, and how many failed (each warned);
    fails when none is readable."""
    from mmtui.errors import ImageError
    from mmtui.run.images import LoadedImage, iter_images

    failed = 0
    images: list[LoadedImage] = []
    for item in iter_images(files):
        if isinstance(item, ImageError):
            failed += 1
            warn(str(item))
        elif isinstance(item, LoadedImage):
            images.append(item)
        # else a Skip: the same photo under another name, decoded once
    if not images:
        fail(f"no readable image in {image_dir}")
    return images, failed


def _print_tables(result: PromptsResult, means: list[dict[str, Any]], what: str, random_kind: str, k: int) -> None:
    """The mean scores per kind of text, and the KS tests, as two rich tables."""
    t2 = Table(title=f"Decoded image prompts vs baselines ({what})")
    for name in ("text", "BERTScore", "n", "CLIPScore", "n "):
        t2.add_column(name, justify="left" if name == "text" else "right")
    labels = {
        "random": f"random vectors ({random_kind})",
        "prompt": f"image prompts ({k} nearest tokens)",
        "caption": "model captions",
        "nouns": "caption nouns",
    }
    for row in means:
        t2.add_row(
            labels[row["kind"]],
            fmt(row["bertscore"], 4),
            str(row["n_bertscore"]),
            fmt(row["clipscore"], 2),
            str(row["n_clipscore"]),
        )
    t2.caption = f"BERTScore: {result.bertscore_model or 'not run'}; CLIPScore: {result.clipscore_model or 'not run'}"
    out.print(t2)
    ks = Table(title="Two-sample KS tests")
    for name in ("metric", "sample A", "sample B", "n A", "n B", "D", "p"):
        ks.add_column(name, justify="right" if name in ("n A", "n B", "D", "p") else "left")
    for t in result.tests:
        ks.add_row(
            t["metric"],
            t["sample_a"],
            t["sample_b"],
            str(t["n_a"]),
            str(t["n_b"]),
            f"{t['d']:.3f}",
            f"{t['p']:.3g}",
        )
    out.print(ks)
