"""Visual specificity (method.md, experiment 3; the paper's Fig. 5 and S.1): does a multimodal unit's receptive field
cover the object?

For each image of a run with COCO instance annotations: take its top distinct units (from the stored triples, in
rank order), their activation maps over the patch grid, upsample bilinearly to the encoder frame, keep pixels
above the 0.95 quantile, and compute the IoU with the COCO mask of the image's category (all instances merged,
mapped into the encoder frame by the encoder's own resize and crop). Baseline: for each top unit a random unit
of the same layer (several seeds). Also the "average mask": the mean map of the top (or random) units.

The category of an image: the COCO category named by its attribution target ("dog", "men" -> person,
"table" -> dining table, ...) among the categories annotated in it; else, with category="auto", the
category covering the largest area.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from mmtui.defaults import THRESHOLD_Q
from mmtui.errors import MmtuiError
from mmtui.experiments.stats import iou, mean_interval, quantile_mask
from mmtui.store import Run, Store
from mmtui.store import experiments as xs

if TYPE_CHECKING:
    from mmtui.stacks.base import Stack

CATEGORY_RULES = ("auto", "target", "largest")
DEFAULT_TOP_UNITS = 10
_SYNONYMS = {
    "person": "man men woman women person people boy boys girl girls child children kid kids player players lady "
    "ladies guy guys skier skiers surfer surfers skateboarder snowboarder rider riders baby couple crowd family team",
    "airplane": "plane planes jet jets aircraft airliner airplanes",
    "bicycle": "bike bikes bicycles",
    "motorcycle": "motorbike motorbikes motorcycles",
    "couch": "sofa sofas couches",
    "tv": "television televisions tvs",
    "cell phone": "phone phones cellphone smartphone",
    "dining table": "table tables",
    "potted plant": "plant plants",
    "wine glass": "glass glasses",
    "sports ball": "ball balls",
    "fire hydrant": "hydrant",
    "stop sign": "sign",
    "parking meter": "meter",
    "donut": "doughnut doughnuts donuts",
    "hot dog": "hotdog hotdogs",
    "teddy bear": "teddy",
    "baseball bat": "bat",
    "baseball glove": "glove mitt",
    "tennis racket": "racket racquet",
    "traffic light": "light lights",
}
SYNONYMS: dict[str, set[str]] = {name: set(words.split()) for name, words in _SYNONYMS.items()}


class SpecificityError(MmtuiError):
    """The specificity experiment cannot run as asked (no instance file, no matching images)."""


# -- COCO instances --------------------------------------------------------------------------------------
@dataclass
class CocoInstances:
    """The parts of a COCO instances JSON this experiment needs, indexed by image file name."""

    images: dict[str, dict[str, Any]]  # file name -> {id, width, height}
    categories: dict[int, str]
    annotations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # image id -> annotations

    @classmethod
    def load(cls, path: Path | str) -> CocoInstances:
        path = Path(path)
        if not path.is_file():
            raise SpecificityError(f"{path}: instance file not found; pass --instances instances_*.json (COCO)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            images = {im["file_name"]: im for im in data["images"]}
            categories = {c["id"]: c["name"] for c in data["categories"]}
            annotations: dict[int, list[dict[str, Any]]] = {}
            for ann in data["annotations"]:
                annotations.setdefault(ann["image_id"], []).append(ann)
        except (ValueError, KeyError, TypeError) as err:
            raise SpecificityError(
                f"{path}: not a COCO instances file ({type(err).__name__}: {err}); pass instances_*.json"
            ) from err
        return cls(images, categories, annotations)

    def categories_of(self, file_name: str) -> dict[str, list[dict[str, Any]]]:
        """Category name -> the image's annotations of it ({} when the image is not in the file)."""
        info = self.images.get(file_name)
        out: dict[str, list[dict[str, Any]]] = {}
        for ann in self.annotations.get(info["id"], []) if info else []:
            out.setdefault(self.categories[ann["category_id"]], []).append(ann)
        return out


def match_category(word: str, present: Sequence[str]) -> str | None:
    """The category among `present` named by `word` (name, plural, last word of the name, or a synonym)."""
    w = word.strip().lower()
    forms = {w, w.rstrip("s"), w[:-2] if w.endswith("es") else w}
    for name in present:
        if name in forms or name.split()[-1] in forms or forms & SYNONYMS.get(name, set()):
            return name
    return None


def choose_category(
    word: str, by_category: dict[str, list[dict[str, Any]]], rule: str = "auto"
) -> tuple[str, str] | None:
    """(category, how it was chosen: target | largest) for an image, or None."""
    if rule not in CATEGORY_RULES:
        raise SpecificityError(f"unknown category rule {rule!r}; use one of {', '.join(CATEGORY_RULES)}")
    if not by_category:
        return None
    if rule in ("auto", "target"):
        found = match_category(word, list(by_category))
        if found is not None:
            return found, "target"
        if rule == "target":
            return None
    largest = max(by_category, key=lambda c: sum(a.get("area", 0.0) for a in by_category[c]))
    return largest, "largest"


def _rle_counts(counts: list[int] | str) -> list[int]:
    """COCO RLE counts: a list, or the compressed string form (6-bit chunks, deltas from 2 runs back)."""
    if isinstance(counts, list):
        return counts
    out: list[int] = []
    i = 0
    while i < len(counts):
        x, k, more = 0, 0, True
        while more:
            c = ord(counts[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """One annotation's mask: bool [height, width] from polygons or RLE (column-major runs, zeros first)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in seg:
            if len(poly) >= 6:
                draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)], fill=1)
        return np.asarray(canvas, dtype=bool)
    h, w = seg["size"]
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for run in _rle_counts(seg["counts"]):
        flat[pos : pos + run] = value
        pos += run
        value = not value
    mask = flat.reshape(w, h).T
    if (h, w) != (height, width):
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST), dtype=bool)
    return mask


def category_mask(anns: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """All instances merged: bool [height, width]."""
    mask = np.zeros((height, width), dtype=bool)
    for ann in anns:
        mask |= annotation_mask(ann, height, width)
    return mask


# -- the experiment ----------------------------------------------------------------------------------------
def top_units(store: Store, result_id: int, n: int, interpretable: set[tuple[int, int]] | None = None) -> list:
    """The first n distinct (layer, unit) of a result's stored triples in rank order (optionally only those
    in `interpretable`)."""
    seen: list[tuple[int, int]] = []
    for layer, unit, _patch in xs.top_triples_array(store, result_id).tolist():
        key = (layer, unit)
        if key not in seen and (interpretable is None or key in interpretable):
            seen.append(key)
            if len(seen) == n:
                break
    return seen


def random_units(units: Sequence[tuple[int, int]], d_mlp: int, seed: int, result_id: int) -> list[tuple[int, int]]:
    """For each unit a distinct random unit of the same layer, not among `units`; seeded by (seed, result_id)."""
    rng = np.random.default_rng([seed, result_id, 7])
    taken = set(units)
    out = []
    for layer, _unit in units:
        while (pick := (layer, int(rng.integers(d_mlp)))) in taken:
            pass
        taken.add(pick)
        out.append(pick)
    return out


@dataclass
class ImageIoU:
    """What one image gave: its rows (kind, seed, layer, unit, iou) and the category used."""

    result_id: int
    image: str
    category: str
    category_source: str
    rows: list[dict[str, Any]]


def score_images(
    stack: Stack,
    store: Store,
    run: Run,
    instances: CocoInstances,
    *,
    result_ids: Sequence[int] | None = None,
    n_units: int = DEFAULT_TOP_UNITS,
    seeds: int = 3,
    q: float = THRESHOLD_Q,
    category: str = "auto",
    single: bool = False,
    interpretable_only: bool = False,
    convention: str = "raw",
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[ImageIoU]:
    """IoU of each image's top units (and random same-layer units) with its category's mask; stored per image.

    single: only images with exactly one instance of the category (the paper's "single object annotations").
    on_skip(image, reason) is called for each image left out (not in the instance file, no category, ...).
    """
    from mmtui.experiments.heatmap import batch_activation_maps, encoder_view_mask, frame_size
    from mmtui.run.images import load_image

    skip = on_skip or (lambda *_: None)
    settings = {
        "n_units": n_units,
        "seeds": seeds,
        "q": q,
        "category": category,
        "single": single,
        "interpretable_only": interpretable_only,
        "convention": convention,
        "site": run.site,
    }
    good = xs.interpretable_units(store, run.lm_id, convention) if interpretable_only else None
    frame = frame_size(stack)
    for row in xs.result_rows(store, run.id, result_ids):
        name = Path(row["path"]).name
        by_cat = instances.categories_of(name)
        if not by_cat:
            skip(row["path"], "not in the instance file, or no annotations")
            continue
        chosen = choose_category(row["target"], by_cat, category)
        if chosen is None:
            skip(row["path"], f"no annotated category matches the target {row['target']!r}")
            continue
        cat, source = chosen
        if single and len(by_cat[cat]) != 1:
            skip(row["path"], f"{len(by_cat[cat])} instances of {cat}, not one")
            continue
        units = top_units(store, row["id"], n_units, good)
        if not units:
            skip(row["path"], "no top units (none interpretable?)")
            continue
        try:
            loaded = load_image(row["path"])
        except MmtuiError as err:
            skip(row["path"], str(err))
            continue
        info = instances.images[name]
        mask = category_mask(by_cat[cat], info["height"], info["width"])
        if mask.shape != (loaded.size[1], loaded.size[0]):
            mask = np.asarray(Image.fromarray(mask).resize(loaded.size, Image.Resampling.NEAREST), dtype=bool)
        target = encoder_view_mask(stack, mask)  # bool [H, W] in the encoder frame
        randoms = [random_units(units, stack.d_mlp, s, row["id"]) for s in range(seeds)]
        every = list(dict.fromkeys([*units, *(u for r in randoms for u in r)]))
        maps = dict(zip(every, batch_activation_maps(stack, [loaded.image], every, run.site)[0], strict=True))
        xs.put_activation_maps(
            store, run.stack.id, row["image_sha256"], run.site, units, np.stack([maps[u] for u in units])
        )

        rows = _iou_rows(maps, units, randoms, target, frame, q)
        for r in rows:
            r.update(result_id=row["id"], category=cat, category_source=source)
        xs.add_specificity(store, run.id, settings, rows)
        yield ImageIoU(row["id"], row["path"], cat, source, rows)


def _iou_rows(
    maps: dict[tuple[int, int], np.ndarray],
    units: Sequence[tuple[int, int]],
    randoms: Sequence[Sequence[tuple[int, int]]],
    target: np.ndarray,
    frame: tuple[int, int],
    q: float,
) -> list[dict[str, Any]]:
    """IoU rows of one image: each top unit, their mean map, and per seed each random unit and their mean map."""
    from mmtui.experiments.heatmap import upsample

    def score(grid: np.ndarray) -> float:
        return iou(quantile_mask(upsample(grid, frame), q), target)

    rows = [{"kind": "top", "seed": None, "layer": u[0], "unit": u[1], "iou": score(maps[u])} for u in units]
    top_mean = score(np.mean([maps[u] for u in units], axis=0))
    rows.append({"kind": "top-mean", "seed": None, "layer": -1, "unit": -1, "iou": top_mean})
    for seed, rand in enumerate(randoms):
        rows += [{"kind": "random", "seed": seed, "layer": u[0], "unit": u[1], "iou": score(maps[u])} for u in rand]
        rand_mean = score(np.mean([maps[u] for u in rand], axis=0))
        rows.append({"kind": "random-mean", "seed": seed, "layer": -1, "unit": -1, "iou": rand_mean})
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per category and overall: mean IoU of top units, random units and both average masks (per image first),
    and how many categories the top units beat the random ones in."""

    def per_image(kind: str, subset: Sequence[dict[str, Any]]) -> dict[int, float]:
        vals: dict[int, list[float]] = {}
        for r in subset:
            if r["kind"] == kind:
                vals.setdefault(r["result_id"], []).append(r["iou"])
        return {k: float(np.mean(v)) for k, v in vals.items()}

    def block(subset: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n_images": len({r["result_id"] for r in subset})}
        for kind in ("top", "random", "top-mean", "random-mean"):
            iv = mean_interval(list(per_image(kind, subset).values()))
            out[kind.replace("-", "_")] = iv.mean
            out[f"{kind.replace('-', '_')}_lo"] = iv.lo
            out[f"{kind.replace('-', '_')}_hi"] = iv.hi
        top, rand = per_image("top", subset), per_image("random", subset)
        diff = mean_interval([top[i] - rand[i] for i in top if i in rand])
        out.update(diff=diff.mean, diff_lo=diff.lo, diff_hi=diff.hi)
        return out

    categories = sorted({r["category"] for r in rows})
    per_cat = [{"category": c, **block([r for r in rows if r["category"] == c])} for c in categories]
    wins = sum(1 for c in per_cat if c["top"] > c["random"])
    return {"categories": per_cat, "overall": block(rows), "wins": wins, "n_categories": len(per_cat)}
