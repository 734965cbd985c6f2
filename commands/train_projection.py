"""`mmtui train-projection`: train a stack's projection (linear or MLP) on image-caption pairs, LM and encoder
frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
from rich.table import Table

from commands._app import (
    DeviceOption,
    EncoderOption,
    ExitCode,
    JsonOption,
    LmOption,
    PresetOption,
    app,
    core_errors,
    emit_json,
    err,
    fail,
    out,
    warn,
)
from mmtui.defaults import DEFAULT_PRESET, DEFAULT_PROMPT, ProjectionKind

DEFAULT_OUT = Path("cache") / "projections" / "projection.safetensors"
PHASES = {"features": "encoding images", "train": "training", "eval": "held-out eval"}


def _norm(value: str) -> float | str | None:
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        return float(value)
    except ValueError:
        fail(f"--norm must be auto, none or a number, not {value!r}")


class _Bars:
    """One rich progress bar per phase on stderr, with the running loss while training."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, p) -> None:
        if p.phase not in self.tasks:
            self.tasks[p.phase] = self.progress.add_task(PHASES.get(p.phase, p.phase), total=p.total, loss="")
        loss = f"loss {p.loss:.3f}  lr {p.lr:.1e}" if p.loss is not None else ""
        self.progress.update(self.tasks[p.phase], completed=p.done, total=p.total, loss=loss)


@app.command("train-projection")
def train_projection(
    flickr8k: Annotated[
        Path | None, typer.Option("--flickr8k", help="Flickr8k folder (captions.tsv + images/); test split held out.")
    ] = None,
    coco: Annotated[
        Path | None, typer.Option("--coco", help="COCO captions JSON (e.g. captions_train2017.json).")
    ] = None,
    coco_images: Annotated[
        Path | None, typer.Option("--coco-images", help="Its image folder (default: ../<split> beside the JSON).")
    ] = None,
    classes: Annotated[
        Path | None, typer.Option("--classes", help="Folder of <id>_<class name>.JPEG images (ImageNet style).")
    ] = None,
    holdout: Annotated[
        int, typer.Option("--holdout", min=0, help="COCO / class-folder images kept out of training, per source.")
    ] = 40,
    exclude: Annotated[
        list[Path] | None,
        typer.Option("--exclude", help="Folder of images never trained on (the bundled samples always are)."),
    ] = None,
    out_path: Annotated[
        Path, typer.Option("--out", help="Projection file to write (.safetensors; card beside it).")
    ] = (DEFAULT_OUT),
    kind: Annotated[
        ProjectionKind,
        typer.Option("--kind", help="linear (LiMBeR) or mlp (LLaVA's Linear-GELU-Linear, d_model wide)."),
    ] = ProjectionKind.LINEAR,
    epochs: Annotated[float, typer.Option("--epochs", min=0.01, help="Passes over the training captions.")] = 6.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Captions per step.")] = 128,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak AdamW learning rate (warm-up, cosine).")] = 5e-3,
    norm: Annotated[
        str, typer.Option("--norm", help="Each projected token's L2 norm: auto (word embeddings' mean), none, or N.")
    ] = "auto",
    learn_scale: Annotated[
        bool, typer.Option("--learn-scale/--fixed-scale", help="Train that norm, or keep it fixed.")
    ] = True,
    captions: Annotated[
        str, typer.Option("--captions", help="all (every caption per epoch) or one (a random one per image).")
    ] = "all",
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation and sample order.")] = 0,
    cache_dir: Annotated[Path, typer.Option("--cache-dir", help="Where encoder features are cached.")] = Path("cache")
    / "features",
    restart: Annotated[bool, typer.Option("--restart", help="Ignore (delete) an existing checkpoint.")] = False,
    preset: PresetOption = DEFAULT_PRESET,
    lm: LmOption = None,
    encoder: EncoderOption = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Text after the image prefix.")] = DEFAULT_PROMPT,
    device: DeviceOption = "auto",
    json_out: JsonOption = False,
) -> None:
    """Train the projection (image features -> LM input; linear or MLP) with the LM and encoder frozen.

    Loss: next-token loss of human captions after the image prefix and the prompt. Resumable: a checkpoint
    (<out>.ckpt) is written as it goes and on Ctrl-C; run the same command again to go on.
    """
    from mmtui.run.samples import sample_dir
    from mmtui.training import caption_data
    from mmtui.training import train as training

    if captions not in training.CAPTION_MODES:
        fail(f"--captions must be one of {', '.join(training.CAPTION_MODES)}, not {captions!r}")
    config = training.TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        norm=_norm(norm),
        learn_scale=learn_scale,
        captions=captions,
        seed=seed,
        kind=kind.value,
    )
    checkpoint = out_path.with_name(out_path.name + ".ckpt")
    if restart:
        checkpoint.unlink(missing_ok=True)
    columns = (
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with core_errors():
        sources = []
        if flickr8k:
            sources.append(caption_data.read_flickr8k(flickr8k))
        if coco:
            sources.append(caption_data.read_coco(coco, coco_images, holdout=holdout))
        if classes:
            sources.append(caption_data.read_class_folder(classes, holdout=holdout))
        if not sources:
            fail("no training data; pass --flickr8k DIR, --coco JSON and/or --classes DIR")
        excluded = caption_data.image_sha256s([sample_dir(), *(exclude or [])])
        stack = training.load_training_stack(preset, lm=lm, encoder=encoder, device=device, prompt=prompt)
        try:
            with Progress(*columns, console=err) as progress:
                result = training.train_projection(
                    stack,
                    sources,
                    out_path,
                    config,
                    cache_dir=cache_dir,
                    checkpoint=checkpoint,
                    exclude=excluded,
                    on_progress=_Bars(progress),
                )
        except training.TrainingInterrupted as stop:
            err.print(str(stop), highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    card = result.card
    if card["unreadable_images"]:
        warn(f"{card['unreadable_images']} images could not be read and were left out")
    if json_out:
        emit_json([{"type": "projection", "projection": str(result.path), **card}])
    else:
        _print_card(result.path, card)
    raise typer.Exit(int(ExitCode.PARTIAL if card["unreadable_images"] else ExitCode.OK))


def _print_card(path: Path, card: dict) -> None:
    facts = card["training"]
    out.print(
        f"Wrote {path} ({card['projection_kind']} projection; card: {path.name}.json): {facts['steps']} steps, train loss {facts['train_loss']:.3f}, "
        f"token norm {facts['final_scale']:.2f}",
        highlight=False,
    )
    table = Table("held-out", "images", "captions", "matched", "shuffled", "margin", box=None, header_style="bold")
    for name, r in card["heldout"].items():
        table.add_row(
            name,
            str(r["images"]),
            str(r["captions"]),
            f"{r['matched']:.3f}",
            f"{r['shuffled']:.3f}",
            f"{r['margin']:.3f}",
        )
    out.print(table)
    examples = Table("image", "caption", "human", box=None, header_style="bold")
    for ex in card["examples"]:
        examples.add_row(ex["image"], ex["caption"], ex["human"].strip())
    out.print(examples)
