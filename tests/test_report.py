"""The HTML report: sections, figures and numbers from a store filled by the experiments; the command."""

from __future__ import annotations

import json

import pytest
from conftest import CAPTIONS, INSTANCES
from PIL import Image
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode
from mmtui.experiments.ablation import dose_response
from mmtui.experiments.agreement import score_agreement
from mmtui.experiments.explain import explain_run
from mmtui.experiments.prompts import decode_prompts
from mmtui.experiments.report import build_report
from mmtui.experiments.specificity import CocoInstances, score_images
from mmtui.run.images import load_image
from mmtui.run.pipeline import read_captions

runner = CliRunner()


def test_report_of_an_empty_run_says_what_is_missing(store_run, tmp_path):
    store, run = store_run
    report = build_report(store, run, tmp_path / "r")
    assert set(report.figures) == {"layers"}
    assert len(report.missing) == 6  # dose-response, Table 1, prompts, specificity, data labels, heatmaps
    page = report.path.read_text()
    assert "Not in this report yet" in page and "mmtui ablate" in page
    assert "Top multimodal neurons" in page and f"L{report.numbers['top_neurons'][0]['layer']}." in page


def test_full_report(tiny_stack, store_run, bert_scorer, tmp_path):
    if not INSTANCES.is_file():
        pytest.skip(f"needs {INSTANCES}")
    store, run = store_run
    ids = [r["id"] for r in store.results(run.id)]
    list(dose_response(tiny_stack, store, run, ids, [0, 5, 40], seeds=2, bertscore=bert_scorer))
    captions = read_captions(CAPTIONS)
    score_agreement(store, run, captions, bertscore=bert_scorer, top=10, interpretable_only=False)
    images = [load_image(r["path"]) for r in store.results(run.id)]
    decode_prompts(tiny_stack, store, images[:2], captions, n_random=10, bertscore=bert_scorer)
    list(score_images(tiny_stack, store, run, CocoInstances.load(INSTANCES), n_units=2, seeds=1))
    explain_run(store, run, instances=CocoInstances.load(INSTANCES))
    report = build_report(store, run, tmp_path / "r", stack=tiny_stack, heatmap_images=2)
    assert set(report.figures) == {"dose_response_zero_triples", "layers", "ks_cdfs", "specificity", "heatmaps"}
    assert report.missing == []
    for path in report.figures.values():
        assert Image.open(path).size[0] > 300
    page = report.path.read_text()
    for heading in (
        "Causal effect",
        "Layers of the top units",
        "Table 1",
        "Table 2",
        "Visual specificity",
        "Heatmaps",
        "Units with a data label",
    ):
        assert heading in page
    assert run.stack.id in page  # every figure names its stack
    numbers = json.loads((tmp_path / "r" / "numbers.json").read_text())
    dose = numbers["dose_response_zero_triples"]
    assert {(r["condition"], r["k"]) for r in dose} >= {("top", 40), ("random", 40)}
    assert {"ks", "prompts", "specificity", "agreement", "layers", "explain"} <= numbers.keys()


def test_report_command(attributed_db, tmp_path):
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", "--out", str(out), "--db", str(attributed_db), "--device", "cpu", "--json"])
    assert result.exit_code == ExitCode.OK, result.stderr
    row = json.loads(result.stdout)
    assert row["report"].endswith("index.html") and "heatmaps" in row["figures"] and (out / "index.html").is_file()
    assert "not in the report" in result.stderr
    plain = runner.invoke(app, ["report", "--out", str(out), "--db", str(attributed_db), "--no-heatmaps"])
    assert plain.exit_code == 0 and "wrote" in plain.stdout
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad = runner.invoke(app, ["report", "--out", str(a_file), "--db", str(attributed_db)])
    assert bad.exit_code == ExitCode.FAILED and "is a file" in bad.stderr
    missing = runner.invoke(app, ["report", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == ExitCode.FAILED and "no cache at" in missing.stderr
