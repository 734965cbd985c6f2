"""`mmtui neurons` and `mmtui neuron LAYER INDEX`: read the cache (never imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import JustifyMethod
from rich.table import Table

from commands._app import DbOption, JsonOption, app, core_errors, db_path, emit_json, fail, out, warn
from mmtui.defaults import INTERPRETABLE_MARK, NEURON_IMAGES, Convention

if TYPE_CHECKING:
    from mmtui.store import Run, Store

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
        str | None,
        typer.Option("--token", help="Only neurons with this decoded token (whole token; case and spaces ignored)."),
    ] = None,
    token_contains: Annotated[
        str | None,
        typer.Option("--token-contains", help="Only neurons whose decoded tokens contain this text (any case)."),
    ] = None,
    interpretable: Annotated[
        bool | None,
        typer.Option("--interpretable/--any", help="Only units passing (or failing) the 7-of-10 word filter."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many rows.")] = 30,
    specific: Annotated[
        bool,
        typer.Option(
            "--specific",
            help="Hide generic units (in the top 100 of too many of the run's images); with --image, rank the "
            "image's units by lift (their z-score on it against the run).",
        ),
    ] = False,
    label: Annotated[
        str | None, typer.Option("--label", help="Only units whose data label (`mmtui explain`) is this word.")
    ] = None,
    fdr: Annotated[float, typer.Option("--fdr", min=0.0, max=1.0, help="With --label: labels with q below it.")] = 0.05,
    run: RunOption = None,
    decode: ConventionOption = Convention.RAW,
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """List the cached neurons, best first, with their decoded top tokens."""
    from mmtui.store import Store
    from mmtui.store import prevalence as pv

    if token is not None and token_contains is not None:
        fail("give --token (a whole token) or --token-contains (any text), not both")
    if label is not None and (image or token or token_contains or interpretable is not None or specific):
        fail("--label lists the units of a data label; pass it without --image, --token, --interpretable, --specific")
    with core_errors(), Store.open(db_path(db), create=False) as store:
        chosen = store.run(run)
        n_layers = chosen.shape["n_layers"]
        if layer is not None and not 0 <= layer < n_layers:
            fail(f"--layer {layer}: run {chosen.id} has layers 0..{n_layers - 1}")
        _fold(store, chosen.id)  # a running (or interrupted) job's cache: count every finished image
        n_results = pv.run_size(store, chosen)
        if specific and pv.generic_above(n_results) is None:
            warn(f"the run has {n_results} result(s), under {pv.MIN_GENERIC_RESULTS}: no unit is called generic yet")
        rows = _neuron_rows(
            store,
            chosen,
            n_results,
            layer=layer,
            image=image,
            sort=sort,
            token=token if token_contains is None else token_contains,
            contains=token_contains is not None,
            interpretable=interpretable,
            limit=limit,
            specific=specific,
            label=label,
            fdr=fdr,
            decode=decode,
        )
        if label is not None and not rows and not json_out:
            out.print(f"No unit has the data label {label!r} at q < {fdr:g} (see `mmtui explain`).")
            return
        if json_out:
            emit_json({"type": "neuron", **row} for row in rows)
            return
        _print_neurons(rows, chosen, n_results, image=image, lifts=specific and image is not None, label=label)


def _neuron_rows(
    store: Store,
    chosen: Run,
    n_results: int,
    *,
    layer: int | None,
    image: str | None,
    sort: str,
    token: str | None,
    contains: bool,
    interpretable: bool | None,
    limit: int,
    specific: bool,
    label: str | None,
    fdr: float,
    decode: Convention,
) -> list[dict[str, Any]]:
    """The rows `neurons` lists: a data label's units, an image's units by lift (--specific --image), or the
    run's units through the one neuron listing; each with its prevalence."""
    from mmtui.store import prevalence as pv
    from mmtui.store.queries import list_neurons

    if label is not None:
        from mmtui.store.labels import labelled_neurons

        found = labelled_neurons(
            store, chosen.key, chosen.lm_id, label, fdr=fdr, layer=layer, limit=limit, convention=decode
        )
        return pv.annotate(found, n_results)
    if specific and image:
        return pv.specific_units(
            store,
            chosen,
            image,
            layer=layer,
            token=token,
            contains=contains,
            interpretable=interpretable,
            limit=limit,
            convention=decode,
        )
    listed = list_neurons(
        store,
        chosen,
        layer=layer,
        image=image,
        sort=sort,
        token=token,
        contains=contains,
        interpretable=interpretable,
        limit=limit,
        convention=decode,
        max_n_top=pv.generic_above(n_results) if specific else None,
    )
    return pv.annotate(listed, n_results)


def _print_neurons(
    rows: list[dict[str, Any]], chosen: Run, n_results: int, *, image: str | None, lifts: bool, label: str | None
) -> None:
    """The rows as a rich table, with the columns the filters call for, and its legend."""
    from mmtui.store import prevalence as pv

    title = f"Neurons of run {chosen.id} ({chosen.stack.name}, {chosen.counts})"
    table = Table(title=title)
    columns: list[tuple[str, JustifyMethod]] = [
        ("neuron", "left"),
        ("max", "right"),
        ("mean", "right"),
        ("top-100 in", "right"),
        ("share", "right"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    if image:
        table.add_column("this image", justify="right")
    if lifts:
        table.add_column("lift", justify="right")
    if label is not None:
        table.add_column("label (k/n, q)")
    table.add_column("decoded tokens", overflow="fold")
    for r in rows:
        cells = [
            f"L{r['layer']}.u{r['unit']}",
            f"{r['max_score']:.3g}",
            f"{r['mean_score']:.3g}",
            str(r["n_top"]),
            _share(r["prevalence"], r["generic"]),
        ]
        if image:
            cells.append(f"{r['image_score']:.3g}")
        if lifts:
            cells.append("-" if r["lift"] is None else f"{r['lift']:.2f}")
        if label is not None:
            cells.append(f"{r['label']} ({r['k']}/{r['n']}, q {r['q']:.2g})")
        mark = f"[green]{INTERPRETABLE_MARK}[/] " if r["interpretable"] else ""
        cells.append(mark + ", ".join(t.strip() or repr(t) for t in r["tokens"]))
        table.add_row(*cells)
    out.print(table)
    out.print(f"[dim]{INTERPRETABLE_MARK} interpretable: at least 7 of 10 tokens are dictionary words[/]")
    out.print(
        f"[dim]share: of the run's {n_results} {'images' if chosen.n_results == chosen.n_images else 'results'}, those whose top 100 hold the unit; G: generic "
        f"(over {pv.GENERIC_SHARE:.0%}; --specific hides them){'; lift: z-score of its max on this image' if lifts else ''}[/]"
    )


def _share(prevalence: float | None, generic: bool) -> str:
    if prevalence is None:
        return "-"
    return f"{prevalence:.0%}" + (" [yellow]G[/]" if generic else "")


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
    from mmtui.errors import NotFoundError
    from mmtui.store import Store
    from mmtui.store.core import check_neuron
    from mmtui.store.labels import unit_labels
    from mmtui.store.prevalence import unit_prevalence
    from mmtui.store.queries import neuron_detail

    with core_errors(), Store.open(db_path(db), create=False) as store:
        chosen = store.run(run)
        try:
            check_neuron(layer, index, chosen.shape, owner=f"run {chosen.id}")
        except NotFoundError as error:
            fail(str(error))  # a range is a usage error (exit 2), checked before reading anything
        _fold(store, chosen.id)  # a running (or interrupted) job's cache: count every finished image
        detail = neuron_detail(store, chosen, layer, index, top_images=limit)
        detail["labels"] = unit_labels(store, chosen.key, layer, index)
        found = unit_prevalence(
            store, chosen, layer, index, detail["stats"]["n_top"], [im["result_id"] for im in detail["images"]]
        )
    lifts = found.pop("lifts")
    detail["prevalence"] = found
    for im in detail["images"]:
        im["lift"] = lifts[im["result_id"]]
    if json_out:
        emit_json([{"type": "neuron_detail", **detail}])
        return
    s = detail["stats"]
    out.print(f"[bold]L{layer}.u{index}[/]  run {detail['run']}")
    out.print(
        f"max score {s['max_score']:.4g}   mean {s['mean_score']:.4g}   in the top 100 of {s['n_top']} image(s)   "
        + (
            f"stored for {s['n_images']} image(s)"
            if chosen.n_results == chosen.n_images
            else f"stored for {s['n_images']} of the run's {chosen.counts}"
        )
    )
    p = detail["prevalence"]
    if p["prevalence"] is not None:
        kind = "[yellow]generic[/]" if p["generic"] else "not generic"
        spread = (
            ""
            if p["unit_max_std"] is None
            else f"   its max per image: mean {p['unit_max_mean']:.3g}, std {p['unit_max_std']:.3g}"
        )
        out.print(f"prevalence {p['prevalence']:.1%} of {p['n_results']} image(s): {kind}{spread}")
    for convention, found in detail["decoded"].items():
        if found:
            pairs = ", ".join(
                f"{t.strip() or repr(t)} ({v:.2f})" for t, v in zip(found["tokens"], found["logits"], strict=True)
            )
            flag = "interpretable" if found["interpretable"] else "not interpretable"
            out.print(f"decoded ({convention}, {flag}): {pairs}")
    for found in detail["labels"]:
        verdict = "beats chance" if found["q"] < 0.05 else "not above chance"
        out.print(
            f"data label ({found['kind']}): {found['label']}  {found['k']} of its {found['n']} best images, "
            f"{found['K']} of the run's {found['N']}; p {found['p']:.2e}, q {found['q']:.3g} ({verdict} at q < 0.05)"
            + (f", BERTScore vs decoded tokens {found['agreement']:.3f}" if found["agreement"] is not None else ""),
            highlight=False,
        )
    table = Table(title="Images where it ranks highest")
    for name in ("image", "target", "P(target)", "score", "lift", "rank", "patch", "caption"):
        table.add_column(name, overflow="fold")
    for im in detail["images"]:
        table.add_row(
            Path(im["image"]).name,
            im["target"],
            f"{im['p_target']:.4f}",
            f"{im['score']:.4g}",
            "-" if im["lift"] is None else f"{im['lift']:.2f}",
            str(im["rank"]),
            str(im["patch"]),
            im["caption"],
        )
    out.print(table)


def _fold(store: Store, run_id: str) -> None:
    """Count every finished image before reading the per-unit tables; a read-only cache folds nothing, so say
    what its figures leave out."""
    store.fold_pending(run_id)
    if store.readonly and (left := store.unfolded(run_id)):
        warn(
            f"{store.path} is read-only: {left} result(s) written after the last fold (an interrupted run) are not "
            "in the per-unit figures; run this on a writable copy to count them"
        )
