"""One HTML page (plus PNGs, matplotlib) with the paper's figures for a run of the store: dose-response curves with
intervals, the layer histogram, the KS CDFs of decoded prompts, a grid of heatmaps of the top neurons, the IoU
of receptive fields with COCO masks, Table 1 and a table of the top multimodal neurons with their tokens.

Every figure names its baseline, its number of images and the stack fingerprint. Sections whose experiment has
not been run say which command fills them. torch is only needed for the heatmaps (pass a stack to draw them).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.experiments import agreement, layers, specificity
from mmtui.experiments.ablation import summarize as summarize_ablation
from mmtui.experiments.stats import ecdf
from mmtui.store import Run, Store
from mmtui.store import experiments as xs
from mmtui.store.queries import list_neurons

if TYPE_CHECKING:
    from mmtui.stacks.base import Stack

COLORS = {"top": "#d62728", "interpretable": "#ff7f0e", "random": "#1f77b4"}
PROMPT_COLORS = {"prompt": "#d62728", "random": "#1f77b4", "nouns": "#2ca02c", "caption": "#9467bd"}


@dataclass
class Report:
    """Where the page and its figures went, and the numbers they show (plain data, JSON-ready)."""

    path: Path
    figures: dict[str, Path] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _suptitle(fig: Any, text: str) -> None:
    """The figure's caption line(s): wrapped to the figure's width so that nothing is cut off."""
    import textwrap

    width = int(fig.get_figwidth() * 17)  # characters of 8 pt text per inch, roughly
    fig.suptitle(textwrap.fill(text, width), fontsize=8)


def printable(text: str) -> str:
    """Text safe for a figure title: control and unprintable characters shown as their escapes."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _stack_line(run: Run) -> str:
    fp = run.stack.fingerprint
    parts = [f"stack {run.stack.name} ({run.stack.id})"]
    parts += [f"{k}={fp[k]}" for k in ("lm", "encoder", "dtype") if fp.get(k)]
    if fp.get("projection_sha256"):
        parts.append(f"projection {fp['projection_sha256'][:12]}")
    return ", ".join(parts) + f"; prompt {run.prompt!r}, site {run.site}, y {run.y_kind}"


# -- figures -------------------------------------------------------------------------------------------
def dose_response_figure(rows: list[dict[str, Any]], out: Path, title: str, bert_model: str | None = None) -> Path:
    """Mean relative drop of P(target) vs k per condition with its interval band; caption BERTScore beside."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ks = sorted({r["k"] for r in rows})
    positive = [k for k in ks if k > 0]
    for condition in ("top", "interpretable", "random"):
        sel = sorted((r for r in rows if r["condition"] == condition), key=lambda r: r["k"])
        if not sel:
            continue
        x = [r["k"] for r in sel]
        label = f"{condition} (n={max(r['n'] for r in sel)})"
        ax.plot(x, [r["mean_drop"] for r in sel], "o-", color=COLORS[condition], label=label)
        ax.fill_between(x, [r["lo"] for r in sel], [r["hi"] for r in sel], color=COLORS[condition], alpha=0.18)
        with_bert = [r for r in sel if r["n_bertscore"]]
        if with_bert:
            bx.plot([r["k"] for r in with_bert], [r["bertscore"] for r in with_bert], "o-", color=COLORS[condition])
            bx.fill_between(
                [r["k"] for r in with_bert],
                [r["bertscore_lo"] for r in with_bert],
                [r["bertscore_hi"] for r in with_bert],
                color=COLORS[condition],
                alpha=0.18,
            )
    for a in (ax, bx):
        if positive:
            a.set_xscale("symlog", linthresh=min(positive))
        a.set_xlabel("k ablated (top triples, or random units at the same patches)")
        a.grid(alpha=0.3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("mean relative drop 1 - p_abl / p (95% interval)")
    ax.set_title("P(target) under ablation")
    ax.legend()
    bx.set_ylabel("BERTScore F1, ablated vs original caption")
    bx.set_title(f"Regenerated captions\n(BERTScore: {bert_model or 'identical captions only'})", fontsize=9)
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def layer_figure(hist: dict[str, Any], out: Path, title: str) -> Path:
    plt = _plt()
    per = hist["layers"]
    x = np.arange(len(per))
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(per) + 2), 3.8))
    ax.bar(x, [c["units"] for c in per], color="#9ecae1", label="all top units")
    ax.bar(x, [c["interpretable"] for c in per], color="#3182bd", label="interpretable (7 of 10 words)")
    ax.set_xticks(x)
    ax.set_xticklabels([str(c["layer"]) for c in per], fontsize=7)
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel(f"unique units in each image's top {hist['top']}, summed")
    ax.legend()
    ax.set_title(f"{hist['n_images']} images; interpretable rate {hist['interpretable_rate']:.0%}", fontsize=9)
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def ks_figure(texts: list[dict[str, Any]], tests: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Empirical CDFs of each metric's scores for prompts, random vectors, caption nouns and model captions."""
    metrics = [m for m in ("bertscore", "clipscore") if any(t[m] is not None for t in texts)]
    if not metrics:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for kind, color in PROMPT_COLORS.items():
            vals = [t[metric] for t in texts if t["kind"] == kind and t[metric] is not None]
            if vals:
                x, f = ecdf(vals)
                ax.step(x, f, where="post", color=color, label=f"{kind} (n={len(vals)}, mean {np.mean(vals):.3f})")
        lines = [
            f"{t['sample_a']} vs {t['sample_b']}: D={t['d']:.3f}, p={t['p']:.2g}"
            for t in tests
            if t["metric"] == metric
        ]
        model = next((t[f"{metric}_model"] for t in texts if t.get(f"{metric}_model")), None)
        ax.set_title("\n".join(lines), fontsize=8)
        ax.set_xlabel(f"{metric} ({model})" if model else metric, fontsize=8)
        ax.set_ylabel("fraction <= x")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def specificity_figure(summary: dict[str, Any], out: Path, title: str) -> Path:
    plt = _plt()
    cats = summary["categories"]
    x = np.arange(len(cats))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cats) + 2), 4))
    width = 0.2
    for i, (key, label, color) in enumerate(
        [
            ("top", "top units", "#d62728"),
            ("random", "random units, same layers", "#1f77b4"),
            ("top_mean", "average mask, top", "#ff9896"),
            ("random_mean", "average mask, random", "#aec7e8"),
        ]
    ):
        ax.bar(x + (i - 1.5) * width, [c[key] for c in cats], width, label=label, color=color)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{c['category']}\n(n={c['n_images']})" for c in cats], fontsize=7)
    ax.set_ylabel("IoU with the COCO mask (> 0.95 quantile)")
    ax.set_title(f"top beats random in {summary['wins']} of {summary['n_categories']} categories", fontsize=9)
    ax.legend(fontsize=7)
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def heatmap_grid(stack: Stack, store: Store, run: Run, out: Path, n_images: int = 6, n_units: int = 5) -> Path | None:
    """Rows: images; columns: the mean of the top units' maps, then each top unit (with its top tokens)."""
    from mmtui.experiments.heatmap import batch_activation_maps, encoder_view, frame_size, upsample
    from mmtui.run.images import load_image

    plt = _plt()
    frame = frame_size(stack)
    panels = []
    for row in xs.result_rows(store, run.id)[:n_images]:
        units = specificity.top_units(store, row["id"], n_units)
        try:
            picture = load_image(row["path"]).image
        except Exception:  # noqa: BLE001 - an image gone from disk leaves its row out of the grid
            continue
        stored = xs.get_activation_maps(store, run.stack.id, row["image_sha256"], run.site, units)
        missing = [u for u in units if u not in stored]
        if missing:
            maps = batch_activation_maps(stack, [picture], missing, run.site)[0]
            xs.put_activation_maps(store, run.stack.id, row["image_sha256"], run.site, missing, maps)
            stored.update(zip(missing, maps, strict=True))
        panels.append((row, units, [stored[u] for u in units], encoder_view(stack, picture)))
    if not panels:
        return None
    cols = n_units + 1
    fig, axes = plt.subplots(len(panels), cols, figsize=(2.3 * cols, 2.5 * len(panels)), squeeze=False)
    for r, (row, units, maps, view) in enumerate(panels):
        grids = [np.mean(maps, axis=0), *maps]
        titles = [f"{Path(row['path']).name}\ntarget {printable(row['target'])!r}: mean of top {len(units)}"]
        for layer, unit in units:
            tok = store.tokens(run.lm_id, "raw", layer, unit)
            words = printable(", ".join(t.strip() for t in (tok["tokens"][:2] if tok else [])))
            titles.append(f"L{layer}.u{unit}\n{words}")
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(grids):
                heat = upsample(grids[c], frame)
                ax.imshow(view)
                ax.imshow(heat, cmap="inferno", alpha=0.5)
                ax.contour(heat > np.quantile(heat, 0.95), levels=[0.5], colors="cyan", linewidths=1)
                ax.set_title(titles[c], fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# -- the page ------------------------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k, _ in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


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
    report = Report(out / "index.html")
    stack_line = _stack_line(run)
    sections: list[str] = []

    # dose-response
    modes = xs.ablation_modes(store, run.id)
    for mode, unit_mode, n in modes:
        points = xs.ablation_points(store, run.id, mode=mode, unit_mode=unit_mode)
        rows = summarize_ablation(points, shape=run.shape)
        name = f"dose_response_{mode}_{unit_mode}"
        title = f"{mode} ablation of {unit_mode}; baseline: random units of the same layers at the same patches; {n} images; {stack_line}"
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

    # layers
    hist = layers.layer_histogram(store, run)
    report.figures["layers"] = layer_figure(hist, out / "layers.png", stack_line)
    report.numbers["layers"] = hist
    sections.append(
        "<h2>Layers of the top units</h2><img src='layers.png'>"
        + f"<p>{hist['n_images']} images; top {hist['top']} triples per image; "
        + f"interpretable rate {hist['interpretable_rate']:.1%}. {html.escape(stack_line)}</p>"
    )

    # Table 1
    agree = agreement.summarize(xs.agreement_rows(store, run.id))
    if agree:
        report.numbers["agreement"] = agree
        cols = [("metric", "metric"), ("kind", "kind"), ("mean", "mean"), ("lo", "95% lo"), ("hi", "95% hi")]
        sections.append(
            "<h2>Decoded units vs the image (Table 1)</h2>"
            + _table(agree, [*cols, ("n", "images"), ("model", "model")])
            + "<p>multimodal: max over an image's interpretable top units; random: another image's units; "
            + f"caption: the model's own caption. {html.escape(stack_line)}</p>"
        )
    else:
        report.missing.append("Table 1: run `mmtui layers --captions FILE`")

    # prompts
    texts = xs.prompt_texts(store, run.stack.id)
    tests = xs.ks_tests(store, "prompts", run.stack.id)
    if texts:
        settings_id = texts[0]["settings_id"]
        tests = [t for t in tests if t["settings_id"] == settings_id]
        n_img = len({t["image_sha256"] for t in texts if t["kind"] == "prompt"})
        title = f"image prompts vs random vectors of matched statistics; {n_img} images; {stack_line}"
        fig = ks_figure(texts, tests, out / "ks_cdfs.png", title)
        if fig is not None:
            report.figures["ks_cdfs"] = fig
        report.numbers["ks"] = [
            {k: t[k] for k in ("metric", "sample_a", "sample_b", "n_a", "n_b", "d", "p", "model")} for t in tests
        ]
        means = _prompt_means(texts)
        report.numbers["prompts"] = means
        sections.append(
            "<h2>Are image prompts words? (Table 2, KS tests)</h2><img src='ks_cdfs.png'>"
            + _table(means, [("kind", "kind"), ("bertscore", "BERTScore"), ("clipscore", "CLIPScore"), ("n", "texts")])
            + _table(
                report.numbers["ks"],
                [(k, k) for k in ("metric", "sample_a", "sample_b", "n_a", "n_b", "d", "p", "model")],
            )
            + f"<p>{html.escape(title)}</p>"
        )
    else:
        report.missing.append("prompts: run `mmtui prompts IMAGE_DIR --captions FILE`")

    # specificity
    spec_rows = xs.specificity_rows(store, run.id)
    if spec_rows:
        summary = specificity.summarize(spec_rows)
        title = f"baseline: random units of the same layers; {summary['overall']['n_images']} images; {stack_line}"
        report.figures["specificity"] = specificity_figure(summary, out / "specificity.png", title)
        report.numbers["specificity"] = summary
        sections.append(
            "<h2>Visual specificity (IoU with COCO masks)</h2><img src='specificity.png'>"
            + _table(
                [*summary["categories"], {"category": "all", **summary["overall"]}],
                [("category", "category"), ("n_images", "images"), ("top", "top"), ("random", "random")]
                + [("top_mean", "avg mask top"), ("random_mean", "avg mask random"), ("diff", "top - random")]
                + [("diff_lo", "95% lo"), ("diff_hi", "95% hi")],
            )
            + f"<p>{html.escape(title)}</p>"
        )
    else:
        report.missing.append("specificity: run `mmtui specificity --instances FILE`")

    # data labels (mmtui explain)
    explained = explain_section(store, run)
    if explained is not None:
        report.numbers["explain"], html_part = explained
        sections.append(html_part)
    else:
        report.missing.append("data labels: run `mmtui explain` (and `--instances FILE` for COCO categories)")

    # heatmaps
    if stack is not None:
        grid = heatmap_grid(stack, store, run, out / "heatmaps.png", heatmap_images)
        if grid is not None:
            report.figures["heatmaps"] = grid
            sections.append(
                "<h2>Heatmaps of the top units</h2><img src='heatmaps.png'>"
                + "<p>Activations at the image positions of the captioning pass, bilinear to the encoder frame; "
                + f"cyan: above the 0.95 quantile. {html.escape(stack_line)}</p>"
            )
    else:
        report.missing.append("heatmaps: need the run's stack (mmtui report without --no-heatmaps)")

    # top neurons
    neurons = list(list_neurons(store, run, sort="count", limit=top_neurons))
    report.numbers["top_neurons"] = neurons
    for neuron in neurons:
        neuron["name"] = f"L{neuron['layer']}.u{neuron['unit']}"
        neuron["words"] = ", ".join(t.strip() for t in neuron["tokens"])
    sections.append(
        "<h2>Top multimodal neurons (by images whose top 100 they enter)</h2>"
        + _table(
            neurons,
            [("name", "neuron"), ("n_top", "in top 100 of"), ("max_score", "max g"), ("interpretable", "interpretable")]
            + [("words", "decoded tokens")],
        )
    )
    missing = "".join(f"<li>{html.escape(m)}</li>" for m in report.missing)
    page = (
        "<!doctype html><meta charset='utf-8'><title>mmtui report</title><style>body{font-family:sans-serif;"
        "max-width:1200px;margin:auto}img{max-width:100%}table{border-collapse:collapse;font-size:12px;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px}</style>"
        f"<h1>Multimodal neurons: run {html.escape(run.id)}</h1><p>{html.escape(stack_line)}</p>"
        f"<p>{run.counts} in the run.</p>"
        + "".join(sections)
        + (f"<h2>Not in this report yet</h2><ul>{missing}</ul>" if missing else "")
    )
    report.path.write_text(page, encoding="utf-8")
    (out / "numbers.json").write_text(json.dumps(report.numbers, indent=1, default=str), encoding="utf-8")
    return report


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
