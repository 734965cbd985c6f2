"""`mmtui neurons` and `mmtui neuron LAYER INDEX`: read the cache (never imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import JustifyMethod
from rich.table import Table

from commands._app import DbOption, JsonOption, app, core_errors, db_path, emit_json, out
from mmtui.defaults import NEURON_IMAGES, Convention

RunOption = Annotated[
    str | None, typer.Option("--run", help="Run id (prefix); default the most recent. See `mmtui runs`.")
]
ConventionOption = Annotated[Convention, typer.Option("--decode", help="Token decoding shown: raw (paper) or ln_f.")]


@app.command()
def neurons(
    layer: Annotated[int | None, typer.Option("--layer", help="Only this layer (0-based).")] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Only the neurons of this image (path, name or sha256).")
    ] = None,
    sort: Annotated[
        str, typer.Option("--sort", help="score (max), count (images where it is in the top 100) or mean.")
    ] = "score",
    token: Annotated[
        str | None, typer.Option("--token", help="Only neurons whose decoded tokens contain this text.")
    ] = None,
    interpretable: Annotated[
        bool | None,
        typer.Option("--interpretable/--any", help="Only units passing (or failing) the 7-of-10 word filter."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many rows.")] = 30,
    run: RunOption = None,
    decode: ConventionOption = Convention.RAW,
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the cached neurons, best first, with their decoded top tokens."""
    from mmtui.store import Store
    from mmtui.store.queries import list_neurons

    with core_errors(), Store.open(db_path(db), create=False) as store:
        chosen = store.run(run)
        rows = list_neurons(
            store,
            chosen,
            layer=layer,
            image=image,
            sort=sort,
            token=token,
            interpretable=interpretable,
            limit=limit,
            convention=decode.value,
        )
        if json_out:
            emit_json(rows)
            return
        title = f"Neurons of run {chosen['id']} ({chosen['stack']}, {chosen['n_images']} images)"
        table = Table(title=title)
        columns: list[tuple[str, JustifyMethod]] = [
            ("neuron", "left"),
            ("max", "right"),
            ("mean", "right"),
            ("top-100 in", "right"),
        ]
        for name, justify in columns:
            table.add_column(name, justify=justify, no_wrap=True)
        if image:
            table.add_column("this image", justify="right")
        table.add_column("decoded tokens", overflow="fold")
        for r in rows:
            cells = [
                f"L{r['layer']}.u{r['neuron']}",
                f"{r['max_score']:.3g}",
                f"{r['mean_score']:.3g}",
                str(r["n_top"]),
            ]
            if image:
                cells.append(f"{r['image_score']:.3g}")
            mark = "[green]*[/] " if r["interpretable"] else ""
            cells.append(mark + ", ".join(t.strip() or repr(t) for t in r["tokens"]))
            table.add_row(*cells)
        out.print(table)
        out.print("[dim]* interpretable: at least 7 of 10 tokens are dictionary words[/]")


@app.command()
def neuron(
    layer: Annotated[int, typer.Argument(help="Layer, 0-based.")],
    index: Annotated[int, typer.Argument(help="Unit index within the layer's MLP, 0-based.")],
    run: RunOption = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", min=1, max=NEURON_IMAGES, help=f"How many top images (the cache keeps {NEURON_IMAGES})."
        ),
    ] = 10,
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """One neuron: decoded tokens, score statistics and the images where it ranks highest."""
    from mmtui.store import Store
    from mmtui.store.queries import neuron_detail

    with core_errors(), Store.open(db_path(db), create=False) as store:
        detail = neuron_detail(store, store.run(run), layer, index, top_images=limit)
    if json_out:
        emit_json([detail])
        return
    s = detail["stats"]
    out.print(f"[bold]L{layer}.u{index}[/]  run {detail['run']}")
    out.print(
        f"max score {s['max_score']:.4g}   mean {s['mean_score']:.4g}   in the top 100 of {s['n_top']} image(s)   "
        f"stored for {s['n_images']} image(s)"
    )
    for convention, found in detail["decoded"].items():
        if found:
            pairs = ", ".join(
                f"{t.strip() or repr(t)} ({v:.2f})" for t, v in zip(found["tokens"], found["logits"], strict=True)
            )
            flag = "interpretable" if found["interpretable"] else "not interpretable"
            out.print(f"decoded ({convention}, {flag}): {pairs}")
    table = Table(title="Images where it ranks highest")
    for name in ("image", "target", "P(target)", "score", "rank", "patch", "caption"):
        table.add_column(name, overflow="fold")
    for im in detail["images"]:
        table.add_row(
            Path(im["image"]).name,
            im["target"],
            f"{im['p_target']:.4f}",
            f"{im['score']:.4g}",
            str(im["rank"]),
            str(im["patch"]),
            im["caption"],
        )
    out.print(table)
