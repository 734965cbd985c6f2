"""Steering: multiply (or add to) chosen units' activations at the image positions, and read what changes: the
regenerated caption, P(target) teacher-forced as in attribution, and the logits of each unit's decoded tokens.

Shares the stacks' hook sites and the teacher-forced pass with ablation (`mmtui.experiments.ablation_ops`):
scale 1 is no steering and scale 0 is zero ablation of the units at every image position, bit for bit.
`label_tokens` is the hook for data labels (`mmtui explain`): token ids whose logit change is reported with
the decoded tokens'. torch loads inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmtui.errors import MmtuiError, NotFoundError
from mmtui.experiments.ablation_ops import generate_captions, last_logits, load_result_image
from mmtui.store import Store
from mmtui.store.records import check_neuron

if TYPE_CHECKING:
    import torch

    from mmtui.stacks.base import Stack
    from mmtui.store import Run

MODES = ("scale", "add")
Unit = tuple[int, int]


class SteerError(MmtuiError):
    """A steering run cannot go as asked (bad unit, bad value)."""


@dataclass
class SteerRow:
    """One image under one setting: the caption, P(target) and the logit change of each watched token."""

    image: str
    mode: str
    value: float
    caption: str
    p_target: float
    tokens: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "L.u" -> [{token, id, logit, delta}]


def steer_hook(
    units: Sequence[Unit], values: Sequence[float], mode: str, positions: slice
) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
    """A `stack.hooks` function that multiplies (mode scale) or adds to (mode add) the units' activations at
    the image positions (`Stack.image_slice`); batch row b takes values[b]. Passes that do not reach the last
    image position (cached decoding steps) are left alone, as in ablation."""
    import torch

    if mode not in MODES:
        raise SteerError(f"unknown steering mode {mode!r}; use one of {', '.join(MODES)}")
    by_layer: dict[int, list[int]] = {}
    for layer, unit in units:
        by_layer.setdefault(layer, []).append(unit)
    index = {layer: torch.tensor(sorted(set(us)), dtype=torch.long) for layer, us in by_layer.items()}
    column = torch.tensor(list(values), dtype=torch.float64)

    def hook(layer: int, act: torch.Tensor) -> torch.Tensor | None:  # act [B, T, d_mlp]
        idx = index.get(layer)
        if idx is None or act.shape[1] < positions.stop:
            return None
        idx = idx.to(act.device)
        v = column.to(device=act.device, dtype=act.dtype)[:, None, None]  # [B, 1, 1]
        image = act[:, positions].clone()
        picked = image[:, :, idx]
        image[:, :, idx] = picked * v if mode == "scale" else picked + v
        return torch.cat([act[:, : positions.start], image, act[:, positions.stop :]], dim=1)

    return hook


def p_of(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """P(token) from logits, as `ablation_ops.target_probs` computes it: [B]."""
    import torch

    return torch.log_softmax(logits, dim=-1)[:, token_id].exp()


def parse_unit(text: str) -> Unit:
    """'L7.u1234', '7.1234' or 'L7.1234' -> (7, 1234)."""
    raw = text.strip()
    left, dot, right = raw.partition(".")
    left = left[1:] if left[:1] in "Ll" else left
    right = right[1:] if right[:1] in "Uu" else right
    if not dot or not left.isdigit() or not right.isdigit():
        raise SteerError(f"{text!r} is not a unit; write it as LAYER.UNIT, e.g. L7.u1234 or 7.1234")
    return int(left), int(right)


def check_units(run: Run, units: Sequence[Unit]) -> None:
    """Raise SteerError naming the first unit the run's stack does not have (records.check_neuron's check)."""
    for layer, unit in units:
        try:
            check_neuron(layer, unit, run.shape, noun="unit")
        except NotFoundError as error:
            raise SteerError(str(error)) from None


def steer(
    stack: Stack,
    store: Store,
    run: Run,
    units: Sequence[Unit],
    images: Sequence[str],
    values: Sequence[float],
    *,
    mode: str = "scale",
    label_tokens: Mapping[Unit, Sequence[tuple[str, int]]] | None = None,
    max_new_tokens: int = 20,
    on_error: Callable[[str, str], None] | None = None,
    on_image: Callable[[list[SteerRow]], None] | None = None,
) -> list[SteerRow]:
    """Each image of the run under each value, after a reference row (scale 1 or add 0: no steering) that the
    deltas are taken against; all of an image's rows go through one batch. Images that cannot be read or are
    not in the run go to on_error (raised without one) and are skipped. on_image gets each image's rows as
    they are done (the browser's progress)."""
    check_units(run, units)
    if mode not in MODES:
        raise SteerError(f"unknown steering mode {mode!r}; use one of {', '.join(MODES)}")
    watched: dict[str, list[tuple[str, int]]] = {}
    for layer, unit in units:
        found = store.tokens(run.lm_id, "raw", layer, unit)
        pairs = list((label_tokens or {}).get((layer, unit), []))  # first: the table shows the first few
        pairs += list(zip(found["tokens"], found["token_ids"], strict=True)) if found else []
        watched[f"L{layer}.u{unit}"] = pairs
    neutral = 1.0 if mode == "scale" else 0.0
    settings = [neutral, *values]
    rows: list[SteerRow] = []
    for image in images:
        try:
            result = store.result(run.id, image)
            picture = load_result_image({"path": result["path"], "image_sha256": result["image_sha256"]})
        except MmtuiError as error:
            if on_error is None:
                raise
            on_error(image, str(error))
            continue
        prefix = stack.encode([picture]).expand(len(settings), -1, -1)
        hook = steer_hook(units, settings, mode, stack.image_slice)
        context = json_ids(result["context_ids"])
        logits = last_logits(stack, prefix, context, hook, site=run.site)
        probs = p_of(logits, int(result["target_token_id"])).tolist()
        captions = generate_captions(stack, prefix, hook, site=run.site, max_new_tokens=max_new_tokens)
        for b, value in enumerate(settings):
            tokens = {
                name: [
                    {
                        "token": tok,
                        "id": tid,
                        "logit": float(logits[b, tid]),
                        "delta": float(logits[b, tid] - logits[0, tid]),
                    }
                    for tok, tid in pairs
                ]
                for name, pairs in watched.items()
            }
            rows.append(SteerRow(result["path"], mode, float(value), captions[b], float(probs[b]), tokens))
        if on_image is not None:
            on_image(rows[-len(settings) :])
    return rows


def data_label_tokens(
    stack: Stack, store: Store, run: Run, units: Sequence[Unit], fdr: float = 0.05
) -> dict[Unit, list[tuple[str, int]]]:
    """The first token of " LABEL" for each unit's data labels that beat chance (q < fdr, `mmtui explain`),
    as `steer`'s label_tokens: {unit: [("label: token", id)]}. Units without such a label are left out."""
    from mmtui.store.labels import unit_labels

    out: dict[Unit, list[tuple[str, int]]] = {}
    for layer, unit in units:
        for found in unit_labels(store, run.key, layer, unit):
            ids = stack.tokenize(" " + str(found["label"])) if found["q"] < fdr else []
            if ids:
                out.setdefault((layer, unit), []).append((f"label {found['label']}", int(ids[0])))
    return out


def json_ids(text: str | Sequence[int] | None) -> list[int]:
    import json

    if text is None:
        return []
    return list(json.loads(text)) if isinstance(text, str) else list(text)
