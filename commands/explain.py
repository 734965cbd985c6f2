"""`mmtui explain`: label units from the data (caption words, COCO categories) against a shuffled control, and,
with --instances, each category's most selective units by AUROC against shuffled labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from commands._app import DbOption, DeviceOption, ExitCode, JsonOption, app, core_errors, db_path, emit_json, out, warn
from commands._experiments import BertLayersOption, BertModelOption, RunOption, fmt, load_metrics, open_store
from commands._integrated import ig_check
from mmtui.defaults import DEFAULT_FDR, IG_STEPS, IgRule


@app.command()
def explain(
    instances: Annotated[
        Path | None, typer.Option("--instances", help="COCO instances JSON: also label units by COCO category.")
    ] = None,
    fdr: Annotated[
        float, typer.Option("--fdr", min=0.0, max=1.0, help="False discovery rate: show labels with q below it.")
    ] = DEFAULT_FDR,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shuffled-labels control.")] = 0,
    bertscore: Annotated[
        bool, typer.Option("--bertscore", help="Score each label against the unit's decoded tokens (slow on CPU).")
    ] = False,
    bertscore_model: BertModelOption = None,
    bertscore_layers: BertLayersOption = None,
    recompute: Annotated[
        bool, typer.Option("--recompute", help="Recompute the word labels even when the run has not grown.")
    ] = False,
    layer: Annotated[int | None, typer.Option("--layer", help="Only list this layer's units (0-based).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many labelled units to list.")] = 30,
    ig: Annotated[
        int,
        typer.Option(
            "--ig", min=0, help="Also cross-check grad x act with integrated gradients on the first N images."
        ),
    ] = 0,
    ig_top: Annotated[int, typer.Option("--ig-top", min=1, help="With --ig: each image's top triples.")] = 20,
    ig_steps: Annotated[
        int,
        typer.Option(
            "--ig-steps",
            min=2,
            help="With --ig: points of the integration rule (each image is also checked at about half as many).",
        ),
    ] = IG_STEPS,
    ig_rule: Annotated[
        IgRule, typer.Option("--ig-rule", help="With --ig: the integration rule (gausslegendre: Captum's default).")
    ] = IgRule.TRAPEZOID,
    ig_control: Annotated[
        bool,
        typer.Option(
            "--ig-control/--no-ig-control", help="With --ig: the same for as many random triples of the same layers."
        ),
    ] = True,
    device: DeviceOption = "auto",
    run: RunOption = None,
    db: DbOption = None,
    json_out: JsonOption = False,
) -> None:
    """Explain units from the data: the caption word (or COCO category) most enriched among each unit's best
    images, with its hypergeometric p and Benjamini-Hochberg q, against the same computation on shuffled labels."""
    from mmtui.experiments.explain import explain_run
    from mmtui.store import labels as store_labels

    with core_errors():
        coco = None
        if instances is not None:
            from mmtui.experiments.specificity import CocoInstances  # PIL: only with --instances

            coco = CocoInstances.load(instances)
        scorer = None
        if bertscore:
            scorer, _ = load_metrics(
                bertscore=True, clip=False, bertscore_model=bertscore_model, bertscore_layers=bertscore_layers
            )
        with open_store(db_path(db)) as store:
            chosen = store.run(run)
            run_id, run_key, lm_id = chosen.id, chosen.key, chosen.lm_id
            summary = explain_run(store, chosen, instances=coco, fdr=fdr, seed=seed, recompute=recompute, scorer=scorer)
            shown = store_labels.labels(store, run_key, fdr=fdr, layer=layer, limit=limit)
            tokens = store_labels.decoded_tokens(store, lm_id, [(r["layer"], r["unit"]) for r in shown])
            ig_failed = (
                ig_check(
                    store,
                    chosen,
                    n_images=ig,
                    top=ig_top,
                    steps=ig_steps,
                    method=ig_rule.value,
                    control=ig_control,
                    device=device,
                    json_out=json_out,
                )
                if ig
                else 0
            )
    for note in summary.notes:
        warn(note)
    if json_out:
        emit_json({"type": "summary", "fdr": fdr, **vars(k)} for k in summary.kinds)
        emit_json({"type": "label", **r, "tokens": t} for r, t in zip(shown, tokens, strict=True))
        emit_json({"type": "category", **vars(c), "best": list(c.best)} for c in summary.categories)
        if ig_failed:
            raise typer.Exit(int(ExitCode.PARTIAL))
        return
    for k in summary.kinds:
        where = "computed now" if k.computed else "stored (the run has not grown since)"
        tested = f", {k.n_terms} terms, {k.m:,} tests" if k.computed else ""
        out.print(
            f"[bold]{k.kind} labels[/] ({k.source}; {k.N} images; {k.n_units} units{tested}; {where}): "
            f"{k.labelled} unit(s) with q < {fdr:g}, against {k.shuffled} with the labels shuffled across images "
            f"(least p {k.best_p:.2g}, shuffled {k.best_p_shuffled:.2g})",
            highlight=False,
        )
    if not shown:
        out.print(f"No unit has a label that beats chance at q < {fdr:g}.")
    else:
        table = Table(title=f"Units with a data label (q < {fdr:g}), run {run_id}")
        for name in ("neuron", "kind", "label", "k/n", "K/N", "p", "q", "agreement", "decoded tokens"):
            table.add_column(name, overflow="fold", justify="right" if name in ("p", "q", "agreement") else "left")
        for r, t in zip(shown, tokens, strict=True):
            table.add_row(
                f"L{r['layer']}.u{r['unit']}",
                r["kind"],
                r["label"],
                f"{r['k']}/{r['n']}",
                f"{r['K']}/{r['N']}",
                f"{r['p']:.2e}",
                f"{r['q']:.3g}",
                fmt(r["agreement"]),
                ", ".join(x.strip() or repr(x) for x in t[:8]),
            )
        table.caption = "k of the unit's n best images carry the label, K of the run's N do; q: Benjamini-Hochberg"
        out.print(table)
    if summary.categories:
        table = Table(title="Category selectivity: AUROC of unit_max, images with the category vs without")
        for name in ("category", "images", "best unit", "AUROC", "shuffled best", "units above shuffled"):
            table.add_column(name, justify="left" if name == "category" else "right")
        for c in summary.categories:
            table.add_row(
                c.category,
                f"{c.n_pos}/{c.N}",
                f"L{c.best[0]}.u{c.best[1]}",
                fmt(c.auroc),
                fmt(c.shuffled),
                str(c.above),
            )
        table.caption = "shuffled best: the best AUROC of any unit with the category's labels shuffled across images"
        out.print(table)
    if ig_failed:
        raise typer.Exit(int(ExitCode.PARTIAL))
