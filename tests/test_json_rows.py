"""The rule of every `--json` output (README, "JSON Lines"): each line is one object with a "type" that names
what kind of row it is, in every command, so that a pipe can select rows without knowing the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CAPTIONS, INSTANCES, coco_files
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode
from mmtui.store import Store

runner = CliRunner()

# Each command with --json and the types of row it writes. `verify` needs the paper's LM (it runs on a tiny
# LM saved to disk here, whose layers hold none of the paper's units: rows with a note).
TYPES = {
    "runs": {"run"},
    "neurons": {"neuron"},
    "neuron": {"neuron_detail"},
    "attribute": {"image"},
    "caption": {"caption"},
    "heatmap": {"heatmap"},
    "layers": {"layer", "total"},
    "ablate": {"point", "summary"},
    "explain": {"summary", "label", "category"},
    "specificity": {"iou", "category", "overall"},
    "prompts": {"table", "ks"},
    "report": {"report"},
    "steer": {"steer"},
    "train-projection": {"projection"},
    "verify": {"paper_unit"},
}


def _flickr(root: Path) -> Path:
    """A Flickr8k-style folder (images/ and captions.tsv with a split column) of real photos."""
    (root / "images").mkdir(parents=True)
    rows = ["image\tcaption\tsplit"]
    for f, split in zip(coco_files(4), ["train", "train", "dev", "test"], strict=True):
        shutil.copy(f, root / "images" / f.name)
        rows.append(f"{f.name}\tA dog runs on the beach .\t{split}")
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_every_json_row_names_its_type(attributed_db: Path, image_dir: Path, tmp_path: Path) -> None:
    if not INSTANCES.is_file():
        pytest.skip(f"needs {INSTANCES}")
    from mmtui.stacks.tiny import save_tiny_limber
    from mmtui.store import experiments as xs

    db, cpu = ["--db", str(attributed_db)], ["--device", "cpu"]
    tiny = ["--preset", "tiny", *cpu]
    with Store.open(attributed_db) as store:
        run = store.run()
        image = xs.result_rows(store, run.id)[0]["path"]
    lm = save_tiny_limber(tmp_path / "tiny-lm")
    commands = {
        "runs": ["runs", *db],
        "neurons": ["neurons", "--limit", "3", *db],
        "neuron": ["neuron", "1", "7", *db],
        "attribute": ["attribute", str(image_dir), "--target", "dog", *tiny, "--db", str(tmp_path / "a.db")],
        "caption": ["caption", str(image_dir), *tiny],
        "heatmap": ["heatmap", "1", "7", image, *tiny, "--out", str(tmp_path / "h.png"), "--db", str(tmp_path / "n")],
        "layers": ["layers", *db],
        "ablate": ["ablate", "--from-store", "--k", "0,4", "--seeds", "1", "--limit", "1", *cpu, *db],
        "explain": ["explain", "--instances", str(INSTANCES), "--limit", "3", *db],
        "specificity": ["specificity", "--instances", str(INSTANCES), "--units", "2", "--seeds", "1", *cpu, *db],
        "prompts": ["prompts", str(image_dir), "--captions", str(CAPTIONS), "--random", "10", "--limit", "2"]
        + [*tiny, "--no-clip", "--db", str(tmp_path / "p.db")],
        "report": ["report", "--out", str(tmp_path / "report"), "--no-heatmaps", *db],
        "steer": ["steer", "L0.u3", image, "--scale", "0,4", *cpu, *db],
        "train-projection": ["train-projection", "--flickr8k", str(_flickr(tmp_path / "flickr8k")), *tiny]
        + ["--out", str(tmp_path / "p.safetensors"), "--epochs", "1", "--batch-size", "4", "--fixed-scale"]
        + ["--cache-dir", str(tmp_path / "fc")],
        "verify": ["verify", "--lm", str(lm["lm"]), "--revision", "", "--tokenizer", str(lm["tokenizer"])],
    }
    assert commands.keys() == TYPES.keys()
    for name, args in commands.items():
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == ExitCode.OK, (name, result.output)
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert rows, name
        assert all(isinstance(row, dict) and isinstance(row.get("type"), str) for row in rows), name
        assert {row["type"] for row in rows} <= TYPES[name], (name, {row["type"] for row in rows})
