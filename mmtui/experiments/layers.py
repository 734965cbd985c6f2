"""Where the multimodal neurons live (method.md, experiment 2; the paper's Fig. S.4): per layer, the unique units
in each image's top triples, all and interpretable only. Reads the store only; never imports torch.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from mmtui.store import COUNT_TOP, Store


def layer_histogram(
    store: Store, run: dict[str, Any], *, top: int = COUNT_TOP, convention: str = "raw"
) -> dict[str, Any]:
    """Per layer: `units` = sum over images of the unique units among the image's first `top` triples,
    `interpretable` = those passing the 7-of-10 word filter, `distinct` = distinct units over all images.

    Also the totals, the interpretable rate (method.md asks to report it; the paper keeps ~50%) and n_images.
    """
    counts: Counter[tuple[int, int]] = Counter()
    for (result_id,) in store.db.execute("SELECT id FROM results WHERE run_id = ?", [run["id"]]).fetchall():
        counts.update(u[:2] for u in store.top_units(result_id, int(top)))
    rows = store.db.execute(
        """SELECT json_extract(tn.value, '$[0]'), json_extract(tn.value, '$[1]'), json_extract(tn.value, '$[2]'),
                  coalesce(t.interpretable, 0)
            FROM json_each(?) tn
            LEFT JOIN neuron_tokens t ON t.lm_id = ? AND t.convention = ? AND t.layer = json_extract(tn.value, '$[0]')
                                     AND t.unit = json_extract(tn.value, '$[1]')""",
        [json.dumps([[layer, unit, n] for (layer, unit), n in counts.items()]), run["lm_id"], convention],
    ).fetchall()
    n_layers = run["shape"]["n_layers"]
    per: list[dict[str, Any]] = [
        {"layer": i, "units": 0, "interpretable": 0, "distinct": 0, "distinct_interpretable": 0}
        for i in range(n_layers)
    ]
    for layer, _unit, n_images, good in rows:
        cell = per[layer]
        cell["units"] += n_images
        cell["distinct"] += 1
        if good:
            cell["interpretable"] += n_images
            cell["distinct_interpretable"] += 1
    total = sum(c["units"] for c in per)
    good_total = sum(c["interpretable"] for c in per)
    for cell in per:
        cell["share"] = cell["units"] / total if total else 0.0
    n_images = store.db.execute("SELECT count(*) FROM results WHERE run_id = ?", [run["id"]]).fetchone()[0]
    return {
        "run": run["id"],
        "top": top,
        "n_images": n_images,
        "layers": per,
        "total_units": total,
        "interpretable_units": good_total,
        "interpretable_rate": good_total / total if total else 0.0,
        "decoded": store.has_tokens(run["lm_id"], convention),
    }
