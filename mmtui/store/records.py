"""What the store takes and returns, as plain data: a result to write (`ResultRecord`, packed by `pack_result`),
a stack's identity (`StackIdentity`) and a stored run (`Run`); how a run's id and an image's path are made."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmtui.errors import NotFoundError

if TYPE_CHECKING:
    import numpy as np


def run_id_for(stack_id: str, prompt: str, site: str, y_kind: str) -> str:
    blob = json.dumps([stack_id, prompt, site, y_kind]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class ResultRecord:
    """One image's attribution, ready to store (plain data; see mmtui.run.attribution.Attribution)."""

    image_sha256: str
    image_path: str
    width: int
    height: int
    target_spec: str
    target: str
    target_token_id: int
    target_token: str
    target_source: str
    target_split: bool
    caption: str
    context: str
    context_ids: list[int]
    y_c: float
    p_target: float
    top_layer: np.ndarray
    top_unit: np.ndarray
    top_patch: np.ndarray
    top_score: np.ndarray
    unit_max: np.ndarray  # [n_layers, d_mlp]
    unit_sum: np.ndarray
    human_caption: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StackIdentity:
    """What a run records of its stack (`Stack.identify()`): fingerprint id and name, the fingerprint itself,
    the shape, the LM's own fingerprint id (its neuron decodings) and the prompt."""

    id: str
    name: str
    fingerprint: dict[str, Any]
    shape: dict[str, Any]
    lm_id: str
    prompt: str

    @property
    def units(self) -> int:
        """MLP units of the LM: n_layers x d_mlp."""
        return int(self.shape["n_layers"]) * int(self.shape["d_mlp"])


def target_mode(target_spec: str) -> str:
    """How a result's target was chosen, from its resume key: `auto` (first noun of the greedy caption), `human`
    (first noun of a human caption, --captions) or `word:<w>` (--target w). One run may hold several modes (one
    result per image and mode); counts name them ("24 results on 8 images, 3 target modes")."""
    return "human" if target_spec.startswith("human:") else target_spec


TARGET_MODE_SQL = "CASE WHEN target_spec LIKE 'human:%' THEN 'human' ELSE target_spec END"  # target_mode in SQL


@dataclass(frozen=True)
class Run:
    """A stored run (`Store.run`, `Store.runs`): its id and integer key, its stack, what was attributed (site,
    y_kind), its settings, and how many results and images it holds."""

    id: str
    key: int
    stack: StackIdentity
    site: str
    y_kind: str
    settings: dict[str, Any]
    created: str
    n_results: int = 0
    n_images: int = 0
    last_write: str | None = None
    n_modes: int = 1  # target modes among its results (see target_mode)

    @property
    def counts(self) -> str:
        """Its results, images and target modes in words, the same in every view: "8 images" when each image has
        one result, else "24 results on 8 images, 3 target modes"."""
        if self.n_results == self.n_images and self.n_modes <= 1:
            return f"{self.n_images:,} image{'s' * (self.n_images != 1)}"
        modes = f", {self.n_modes} target modes" if self.n_modes > 1 else ""
        return f"{self.n_results:,} results on {self.n_images:,} image{'s' * (self.n_images != 1)}{modes}"

    @property
    def shape(self) -> dict[str, Any]:
        return self.stack.shape

    @property
    def lm_id(self) -> str:
        return self.stack.lm_id

    @property
    def prompt(self) -> str:
        return self.stack.prompt

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Run:
        """From a row of the query in `Store.runs` (JSON columns still text)."""
        stack = StackIdentity(
            id=row["stack_id"],
            name=row["stack"],
            fingerprint=json.loads(row["fingerprint"]),
            shape=json.loads(row["shape"]),
            lm_id=row["lm_id"],
            prompt=row["prompt"],
        )
        return cls(
            id=row["id"],
            key=int(row["run_key"]),
            stack=stack,
            site=row["site"],
            y_kind=row["y_kind"],
            settings=json.loads(row["settings"]),
            created=row["created"],
            n_results=int(row["n_results"]),
            n_images=int(row["n_images"]),
            last_write=row["last_write"],
            n_modes=int(row.get("n_modes") or 1),
        )

    def to_json(self) -> dict[str, Any]:
        """The run as `mmtui runs --json` prints it."""
        return {
            "id": self.id,
            "run_key": self.key,
            "stack_id": self.stack.id,
            "stack": self.stack.name,
            "prompt": self.stack.prompt,
            "site": self.site,
            "y_kind": self.y_kind,
            "settings": self.settings,
            "created": self.created,
            "shape": self.stack.shape,
            "fingerprint": self.stack.fingerprint,
            "lm_id": self.stack.lm_id,
            "n_results": self.n_results,
            "n_images": self.n_images,
            "n_target_modes": self.n_modes,
            "last_write": self.last_write,
        }


Packed = tuple[bytes, bytes, bytes]  # a result's unit_max, unit_sum and top triples, packed


def pack_result(rec: ResultRecord) -> Packed:
    """The blobs of a result: its two unit arrays and its top triples (mmtui.store.arrays; thread-safe)."""
    from mmtui.store.arrays import pack_array, pack_triples

    return (
        pack_array(rec.unit_max),
        pack_array(rec.unit_sum),
        pack_triples(rec.top_layer, rec.top_unit, rec.top_patch, rec.top_score),
    )


def storable_path(path: str | Path) -> str:
    """A path as text SQLite can store: a name that is not valid UTF-8 (os.fsdecode gives it lone surrogates,
    which sqlite3 refuses) keeps its undecodable bytes as backslash escapes (`\\xe9`); valid names are unchanged.
    The image's key is the sha256 of its bytes, so this text is for display and lookup only."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks (how the cache keys images, and stacks their files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_neuron(layer: int, unit: int, shape: dict[str, Any], owner: str = "this stack", noun: str = "neuron") -> None:
    """Raise NotFoundError unless (layer, unit) is an MLP unit of a stack of this `shape` (n_layers, d_mlp);
    the message ("no {noun} L1.u2: ...") names the ranges, and `owner` (the stack, or the run) has them."""
    n_layers, d_mlp = int(shape["n_layers"]), int(shape["d_mlp"])
    if not (0 <= layer < n_layers and 0 <= unit < d_mlp):
        raise NotFoundError(
            f"no {noun} L{layer}.u{unit}: {owner} has layers 0..{n_layers - 1} and units 0..{d_mlp - 1}"
        )


def match_run(runs: Sequence[Run], run_id: str, path: Path | str) -> Run:
    """The one run of `runs` (the runs of the cache at `path`) whose id starts with `run_id`; NotFoundError
    naming them all when none or several do."""
    matches = [r for r in runs if r.id.startswith(run_id)]
    if len(matches) != 1:
        ids = ", ".join(r.id for r in runs)
        what = "no run" if not matches else "several runs"
        raise NotFoundError(f"{what} with id {run_id!r} in {path} (runs: {ids}); see `mmtui runs`")
    return matches[0]
