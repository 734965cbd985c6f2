"""`mmtui layers`: where the top neurons sit, layer by layer; with --captions, also the paper's Table 1 (do the
decoded units agree with the image's captions better than another image's units do?)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from commands._app import DbOption, JsonOption, app, core_errors, db_path, emit_json, out
from commands._experiments import (
    BertLayersOption,
    BertModelOption,
    CaptionsOption,
    ClipModelOption,
    NoClipOption,
    RunOption,
    fmt,
    load_metrics,
    open_store,
    progress_bar,
    stage_progress,
)


@app.command()
def layers(
    top: Annotated[int, typer.Option("--top", min=1, help="Triples per image that count (the paper: 100).")] = 100,
    captions: CaptionsOption = None,
    all_units: Annotated[
        bool, typer.Option("--all-units", help="Table 1 over all top units, not only interpretable ones.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random image pairing (Table 1).")] = 0,
    bertscore_model: BertModelOption = None,
    bertscore_layers: BertLayersOption = None,
    clip_model: ClipModelOption = None,
    no_clip: NoClipOption = False,
    run: RunOption = None,
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Histogram over layers of the unique units in each image's top triples (all and interpretable)."""
    from mmtui.experiments.layers import layer_histogram

    agree = None
    with core_errors(), open_store(db_path(db)) as store:
        chosen = store.run(run)
        hist = layer_histogram(store, chosen, top=top)
        if captions is not None:
            from mmtui.experiments.agreement import score_agreement, summarize
            from mmtui.run.pipeline import read_captions

            caption_map = read_captions(captions)
            bert, clip = load_metrics(
                clip=not no_clip,
                bertscore_model=bertscore_model,
                bertscore_layers=bertscore_layers,
                clip_model=clip_model,
            )
            with progress_bar() as progress:
                rows = score_agreement(
                    store,
                    chosen,
                    caption_map,
                    bertscore=bert,
                    clipscore=clip,
                    top=top,
                    interpretable_only=not all_units,
                    seed=seed,
                    progress=stage_progress(progress),
                )
            agree = summarize(rows)
    if json_out:
        emit_json({"type": "layer", **cell} for cell in hist["layers"])
        totals = {k: v for k, v in hist.items() if k != "layers"}
        emit_json([{"type": "total", **totals}])
        if agree is not None:
            emit_json({"type": "agreement", **a} for a in agree)
        return
    table = Table(
        title=f"Unique units in each image's top {top} triples, per layer: run {chosen.id} ({chosen.stack.name}), "
        f"{hist['n_images']} image(s)"
    )
    for name in ("layer", "units", "interpretable", "distinct", "share", ""):
        table.add_column(name, justify="left" if name in ("layer", "") else "right", no_wrap=True, min_width=len(name))
    peak = max((c["units"] for c in hist["layers"]), default=0) or 1
    for c in hist["layers"]:
        bar = "█" * round(20 * c["units"] / peak)
        table.add_row(
            str(c["layer"]), str(c["units"]), str(c["interpretable"]), str(c["distinct"]), f"{c['share']:.1%}", bar
        )
    rate = f"{hist['interpretable_rate']:.1%}" if hist["decoded"] else "n/a (units not decoded)"
    table.caption = f"{hist['total_units']} unit-image pairs; interpretable rate {rate} (the paper keeps ~50%)"
    out.print(table)
    if agree is not None:
        t1 = Table(title="Decoded units vs the images' captions (Table 1): mean over images of the max over units")
        for name in ("metric", "pairing", "mean", "95% CI", "images"):
            t1.add_column(name, justify="left" if name in ("metric", "pairing") else "right", no_wrap=True)
        names = {"multimodal": "own top units", "random": "another image's units", "caption": "model caption"}
        for a in agree:
            t1.add_row(
                a["metric"],
                names[a["kind"]],
                fmt(a["mean"], 4),
                f"[{fmt(a['lo'], 3)}, {fmt(a['hi'], 3)}]",
                str(a["n"]),
            )
        t1.caption = "models: " + "; ".join(sorted({f"{a['metric']} {a['model']}" for a in agree}))
        out.print(t1)
