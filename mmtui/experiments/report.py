"""One HTML page (plus PNGs, matplotlib) with the paper's figures for a run of the store: dose-response curves with
intervals, the layer histogram, the KS CDFs of decoded prompts, a grid of heatmaps of the top neurons, the IoU
of receptive fields with COCO masks, Table 1 and a table of the top multimodal neurons with their tokens.

Every figure names its baseline, its number of images and the stack fingerprint. Sections whose experiment has
not been run say which command fills them. torch is only needed for the heatmaps (pass a stack to draw them).
The figures are drawn by mmtui.experiments.figures.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.defaults import THRESHOLD_Q
from mmtui.experiments import agreement, layers, specificity
from mmtui.experiments.ablation import summarize as summarize_ablation
from mmtui.experiments.figures import (
    dose_response_figure,
    heatmap_grid,
    ks_figure,
    layer_figure,
    specificity_figure,
)
from mmtui.store import Run, Store
from mmtui.store import experiments as xs
from mmtui.store.queries import list_neurons

if TYPE_CHECKING:
    from mmtui.stacks.base import Stack


@dataclass
class Report:
    """Where the page and its figures went, and the numbers they show (plain data, JSON-ready)."""

    path: Path
    figures: dict[str, Path] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _stack_line(run: Run) -> str:
    fp = run.stack.fingerprint
    parts = [f"stack {run.stack.name} ({run.stack.id})"]
    parts += [f"{k}={fp[k]}" for k in ("lm", "encoder", "dtype") if fp.get(k)]
    if fp.get("projection_sha256"):
        parts.append(f"projection {fp['projection_sha256'][:12]}")
    return ", ".join(parts) + f"; prompt {run.prompt!r}, site {run.site}, y {run.y_kind}"


# -- the page ------------------------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


@dataclass
class _Page:
    """What every section of the page reads: the store, the run, the folder, and the report it fills."""

    store: Store
    run: Run
    out: Path
    report: Report
    stack_line: str


def build_report(
    store: Store,
    run: Run,
    out_dir: Path | str,
    *,
    stack: Stack | None = None,
    heatmap_images: int = 6,
    top_neurons: int = 25,
) -> Report:
    """Write index.html and its PNGs into out_dir for `run`; returns where, and the numbers shown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = _Page(store, run, out, Report(out / "index.html"), _stack_line(run))
    sections = [
        *_dose_response_sections(page),
        _layers_section(page),
        _agreement_section(page),
        _prompts_section(page),
        _specificity_section(page),
        _explain_part(page),
        _heatmaps_section(page, stack, heatmap_images),
        _top_neurons_section(page, top_neurons),
    ]
    report = page.report
    report.path.write_text(
        _page_html(run, page.stack_line, [s for s in sections if s], report.missing), encoding="utf-8"
    )
    (out / "numbers.json").write_text(json.dumps(report.numbers, indent=1, default=str), encoding="utf-8")
    return report


def _dose_response_sections(page: _Page) -> list[str]:
    """One section per ablation mode stored: the dose-response figure and its table."""
    store, run, out, report = page.store, page.run, page.out, page.report
    sections = []
    modes = xs.ablation_modes(store, run.id)
    for mode, unit_mode, n in modes:
        points = xs.ablation_points(store, run.id, mode=mode, unit_mode=unit_mode)
        rows = summarize_ablation(points, shape=run.shape)
        name = f"dose_response_{mode}_{unit_mode}"
        title = f"{mode} ablation of {unit_mode}; baseline: random units of the same layers at the same patches; {n} images; {page.stack_line}"
        models = sorted({p["bertscore_model"] for p in points} - {None, "identical"})
        report.figures[name] = dose_response_figure(rows, out / f"{name}.png", title, ", ".join(models) or None)
        report.numbers[name] = rows
        cols = [
            ("condition", "condition"),
            ("k", "k"),
            ("n", "images"),
            ("mean_drop", "mean relative drop"),
            ("lo", "95% lo"),
            ("hi", "95% hi"),
            ("p_before", "mean p before"),
            ("p_after", "mean p after"),
            ("bertscore", "caption BERTScore"),
            ("units", "distinct units"),
            ("frac_units", "fraction of all units"),
            ("frac_triples", "fraction of all triples"),
        ]
        sections.append(
            f"<h2>Causal effect: {mode} ablation of {unit_mode}</h2><img src='{name}.png'><p>{html.escape(title)}</p>"
            + _table(rows, cols)
        )
    if not modes:
        report.missing.append("dose-response: run `mmtui ablate --from-store`")
    return sections


def _layers_section(page: _Page) -> str:
    hist = layers.layer_histogram(page.store, page.run)
    page.report.figures["layers"] = layer_figure(hist, page.out / "layers.png", page.stack_line)
    page.report.numbers["layers"] = hist
    return (
        "<h2>Layers of the top units</h2><img src='layers.png'>"
        + f"<p>{hist['n_images']} images; top {hist['top']} triples per image; "
        + f"interpretable rate {hist['interpretable_rate']:.1%}. {html.escape(page.stack_line)}</p>"
    )


def _agreement_section(page: _Page) -> str | None:
    """Table 1."""
    agree = agreement.summarize(xs.agreement_rows(page.store, page.run.id))
    if not agree:
        page.report.missing.append("Table 1: run `mmtui layers --captions FILE`")
        return None
    page.report.numbers["agreement"] = agree
    cols = [("metric", "metric"), ("kind", "kind"), ("mean", "mean"), ("lo", "95% lo"), ("hi", "95% hi")]
    return (
        "<h2>Decoded units vs the image (Table 1)</h2>"
        + _table(agree, [*cols, ("n", "images"), ("model", "model")])
        + "<p>multimodal: max over an image's interpretable top units; random: another image's units; "
        + f"caption: the model's own caption. {html.escape(page.stack_line)}</p>"
    )


def _prompts_section(page: _Page) -> str | None:
    """Table 2: the decoded prompts' scores and KS tests, with their CDFs."""
    store, run, report = page.store, page.run, page.report
    texts = xs.prompt_texts(store, run.stack.id)
    tests = xs.ks_tests(store, "prompts", run.stack.id)
    if not texts:
        report.missing.append("prompts: run `mmtui prompts IMAGE_DIR --captions FILE`")
        return None
    settings_id = texts[0]["settings_id"]
    tests = [t for t in tests if t["settings_id"] == settings_id]
    n_img = len({t["image_sha256"] for t in texts if t["kind"] == "prompt"})
    title = f"image prompts vs random vectors of matched statistics; {n_img} images; {page.stack_line}"
    fig = ks_figure(texts, tests, page.out / "ks_cdfs.png", title)
    if fig is not None:
        report.figures["ks_cdfs"] = fig
    report.numbers["ks"] = [
        {k: t[k] for k in ("metric", "sample_a", "sample_b", "n_a", "n_b", "d", "p", "model")} for t in tests
    ]
    means = _prompt_means(texts)
    report.numbers["prompts"] = means
    return (
        "<h2>Are image prompts words? (Table 2, KS tests)</h2><img src='ks_cdfs.png'>"
        + _table(means, [("kind", "kind"), ("bertscore", "BERTScore"), ("clipscore", "CLIPScore"), ("n", "texts")])
        + _table(
            report.numbers["ks"],
            [(k, k) for k in ("metric", "sample_a", "sample_b", "n_a", "n_b", "d", "p", "model")],
        )
        + f"<p>{html.escape(title)}</p>"
    )


def _specificity_section(page: _Page) -> str | None:
    spec_rows = xs.specificity_rows(page.store, page.run.id)
    if not spec_rows:
        page.report.missing.append("specificity: run `mmtui specificity --instances FILE`")
        return None
    summary = specificity.summarize(spec_rows)
    title = f"baseline: random units of the same layers; {summary['overall']['n_images']} images; {page.stack_line}"
    page.report.figures["specificity"] = specificity_figure(summary, page.out / "specificity.png", title)
    page.report.numbers["specificity"] = summary
    return (
        "<h2>Visual specificity (IoU with COCO masks)</h2><img src='specificity.png'>"
        + _table(
            [*summary["categories"], {"category": "all", **summary["overall"]}],
            [("category", "category"), ("n_images", "images"), ("top", "top"), ("random", "random")]
            + [("top_mean", "avg mask top"), ("random_mean", "avg mask random"), ("diff", "top - random")]
            + [("diff_lo", "95% lo"), ("diff_hi", "95% hi")],
        )
        + f"<p>{html.escape(title)}</p>"
    )


def _explain_part(page: _Page) -> str | None:
    """The data labels (mmtui explain)."""
    explained = explain_section(page.store, page.run)
    if explained is None:
        page.report.missing.append("data labels: run `mmtui explain` (and `--instances FILE` for COCO categories)")
        return None
    page.report.numbers["explain"], html_part = explained
    return html_part


def _heatmaps_section(page: _Page, stack: Stack | None, n_images: int) -> str | None:
    if stack is None:
        page.report.missing.append("heatmaps: need the run's stack (mmtui report without --no-heatmaps)")
        return None
    grid = heatmap_grid(stack, page.store, page.run, page.out / "heatmaps.png", n_images)
    if grid is None:
        return None
    page.report.figures["heatmaps"] = grid
    return (
        "<h2>Heatmaps of the top units</h2><img src='heatmaps.png'>"
        + "<p>Activations at the image positions of the captioning pass, bilinear to the encoder frame; "
        + f"cyan: above the {THRESHOLD_Q} quantile. {html.escape(page.stack_line)}</p>"
    )


def _top_neurons_section(page: _Page, top_neurons: int) -> str:
    neurons = list(list_neurons(page.store, page.run, sort="count", limit=top_neurons))
    page.report.numbers["top_neurons"] = neurons
    for neuron in neurons:
        neuron["name"] = f"L{neuron['layer']}.u{neuron['unit']}"
        neuron["words"] = ", ".join(t.strip() for t in neuron["tokens"])
    return "<h2>Top multimodal neurons (by images whose top 100 they enter)</h2>" + _table(
        neurons,
        [("name", "neuron"), ("n_top", "in top 100 of"), ("max_score", "max g"), ("interpretable", "interpretable")]
        + [("words", "decoded tokens")],
    )


def _page_html(run: Run, stack_line: str, sections: list[str], missing: list[str]) -> str:
    """The page around its sections, with the list of what is not in it yet."""
    not_yet = "".join(f"<li>{html.escape(m)}</li>" for m in missing)
    return (
        "<!doctype html><meta charset='utf-8'><title>mmtui report</title><style>body{font-family:sans-serif;"
        "max-width:1200px;margin:auto}img{max-width:100%}table{border-collapse:collapse;font-size:12px;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px}</style>"
        f"<h1>Multimodal neurons: run {html.escape(run.id)}</h1><p>{html.escape(stack_line)}</p>"
        f"<p>{run.counts} in the run.</p>"
        + "".join(sections)
        + (f"<h2>Not in this report yet</h2><ul>{not_yet}</ul>" if not_yet else "")
    )


def explain_section(store: Store, run: Run, fdr: float = 0.05) -> tuple[dict[str, Any], str] | None:
    """Units with a data label (q < fdr) vs the shuffled control, per layer, and each category's most selective
    unit by AUROC vs the best under shuffled labels; None before `mmtui explain`."""
    from mmtui.store import labels as store_labels

    per_layer = store_labels.labels_per_layer(store, run.key, fdr)
    if not per_layer:
        return None
    best = {(r["control"], r["category"]): r for r in store_labels.auroc_rows(store, run.key) if r["rank"] == 0}
    categories = [
        {**r, "unit": f"L{r['layer']}.u{r['unit']}", "shuffled": best[(1, cat)]["auroc"] if (1, cat) in best else None}
        for (control, cat), r in sorted(best.items())
        if control == 0
    ]
    numbers = {"fdr": fdr, "per_layer": per_layer, "categories": categories}
    totals: dict[str, Any] = {}
    for r in per_layer:
        t = totals.setdefault(r["kind"], [0, 0, 0])
        t[0], t[1], t[2] = t[0] + r["units"], t[1] + r["labelled"], t[2] + r["shuffled"]
    lines = "; ".join(
        f"{kind}: {t[1]} of {t[0]} units labelled, {t[2]} with shuffled labels" for kind, t in totals.items()
    )
    part = (
        f"<h2>Units with a data label vs a shuffled control, per layer (q &lt; {fdr:g})</h2>"
        + f"<p>{html.escape(lines)}. Label: the caption word or COCO category most enriched among a unit's best "
        + "images (hypergeometric p, Benjamini-Hochberg q over every unit and term); control: the same with the "
        + "images' labels shuffled.</p>"
        + _table(per_layer, [("kind", "kind"), ("layer", "layer"), ("units", "units"), ("labelled", "labelled")]
                 + [("shuffled", "shuffled control")])
    )  # fmt: skip
    if categories:
        part += "<h3>Category selectivity (AUROC of unit_max as a share of the image's total)</h3>" + _table(
            categories,
            [("category", "category"), ("n_pos", "images with it"), ("N", "images"), ("unit", "best unit")]
            + [("auroc", "AUROC"), ("shuffled", "best AUROC, shuffled labels")],
        )
    return numbers, part


def _prompt_means(texts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for kind in ("random", "prompt", "caption", "nouns"):
        sel = [t for t in texts if t["kind"] == kind]
        if not sel:
            continue
        row: dict[str, Any] = {"kind": kind, "n": len(sel)}
        for metric in ("bertscore", "clipscore"):
            vals = [t[metric] for t in sel if t[metric] is not None]
            row[metric] = float(np.mean(vals)) if vals else None
        out.append(row)
    return out
