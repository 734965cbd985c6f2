"""The report's figures (matplotlib, PNG): dose-response curves with intervals, the layer histogram, the KS CDFs of
decoded prompts, the specificity of the top units, and a grid of heatmaps of the top neurons. Each names what it
shows in a caption line; torch is only needed for the heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtui.defaults import THRESHOLD_Q
from mmtui.experiments import specificity
from mmtui.experiments.stats import ecdf
from mmtui.store import Run, Store
from mmtui.store import experiments as xs
from mmtui.words import printable

if TYPE_CHECKING:
    from mmtui.stacks.base import Stack

COLORS = {"top": "#d62728", "interpretable": "#ff7f0e", "random": "#1f77b4"}
PROMPT_COLORS = {"prompt": "#d62728", "random": "#1f77b4", "nouns": "#2ca02c", "caption": "#9467bd"}


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
    ax.set_ylabel(f"IoU with the COCO mask (> {THRESHOLD_Q} quantile)")
    ax.set_title(f"top beats random in {summary['wins']} of {summary['n_categories']} categories", fontsize=9)
    ax.legend(fontsize=7)
    _suptitle(fig, title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def heatmap_grid(stack: Stack, store: Store, run: Run, out: Path, n_images: int = 6, n_units: int = 5) -> Path | None:
    """Rows: images; columns: the mean of the top units' maps, then each top unit (with its top tokens)."""
    from mmtui.experiments.heatmap import batch_activation_maps, encoder_view, frame_size, render_heatmap, upsample
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
                ax.imshow(render_heatmap(view, upsample(grids[c], frame)))
                ax.set_title(titles[c], fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
