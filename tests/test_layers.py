"""Layer histogram against a direct count; Table 1 (agreement) rows and pairing; the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CAPTIONS
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode
from mmtui.experiments.agreement import AgreementError, score_agreement, summarize, unit_texts
from mmtui.experiments.layers import layer_histogram
from mmtui.run.pipeline import read_captions
from mmtui.store import experiments as xs

runner = CliRunner()


def test_histogram_equals_a_direct_count(store_run):
    store, run = store_run
    hist = layer_histogram(store, run, top=30)
    counts = [0] * run.shape["n_layers"]
    distinct: set[tuple[int, int]] = set()
    for row in xs.result_rows(store, run.id):
        units = {(t["layer"], t["unit"]) for t in store.top_triples(row["id"], 30)}
        distinct |= units
        for layer, _unit in units:
            counts[layer] += 1
    assert [c["units"] for c in hist["layers"]] == counts
    assert sum(c["distinct"] for c in hist["layers"]) == len(distinct)
    assert hist["n_images"] == 4 and hist["total_units"] == sum(counts)
    assert hist["interpretable_units"] == 0 and hist["interpretable_rate"] == 0.0  # the tiny LM decodes no words
    assert sum(c["share"] for c in hist["layers"]) == pytest.approx(1.0)


def test_histogram_from_the_fold_equals_the_triples(tmp_path, monkeypatch):
    """At the default top (COUNT_TOP = 100) the counts are the fold's neuron_stats.n_top: equal to counting every
    result's first 100 triples, on results whose 150 stored triples go past 100; a result not folded yet (an
    interrupted run) sends it back to the triples, so that every result counts."""
    from test_prevalence import _fill, _records

    import mmtui.experiments.layers as layers_module
    from mmtui.store import Store
    from mmtui.store.queries import layer_top_counts

    records = _records(12)
    path = tmp_path / "h.db"
    run_id = _fill(path, records[:10], every=4)
    with Store.open(path) as store:
        run = store.run(run_id)
        # every third unit of the run's top triples decodes to words; one decoded unit is in no top triple
        units = sorted(
            {(la, u) for r in records for la, u in zip(r.top_layer.tolist(), r.top_unit.tolist(), strict=True)}
        )
        rows = [(la, u, i % 3 == 0) for i, (la, u) in enumerate(units)] + [(0, 999, True)]
        store.add_tokens(
            run.lm_id,
            "raw",
            [
                {"layer": la, "unit": u, "tokens": [" a"], "token_ids": [1], "logits": [1.0], "interpretable": good}
                for la, u, good in rows
            ],
        )
        assert layer_top_counts(store, run, "raw")
        folded = layer_histogram(store, run)
        with monkeypatch.context() as patched:
            patched.setattr(layers_module, "layer_top_counts", lambda *_: None)
            counted = layer_histogram(store, run)
        assert folded == counted and folded["total_units"] > 0 and folded["n_images"] == 10
        assert 0 < folded["interpretable_units"] < folded["total_units"]
        assert (
            0
            < sum(c["distinct_interpretable"] for c in folded["layers"])
            < sum(c["distinct"] for c in folded["layers"])
        )
        for record in records[10:]:
            store.add_result(run_id, record, stats=False)
        assert layer_top_counts(store, run, "raw") is None
        later = layer_histogram(store, run)
        store.refresh_stats(run_id)
        assert later == layer_histogram(store, run)
        assert later["n_images"] == 12 and later["total_units"] > folded["total_units"]


def test_histogram_counts_interpretable_units(store_run):
    store, run = store_run
    first = xs.result_rows(store, run.id)[0]
    layer, unit = store.top_triples(first["id"], 1)[0]["layer"], store.top_triples(first["id"], 1)[0]["unit"]
    store.db.execute(
        "UPDATE neuron_tokens SET interpretable = 1 WHERE lm_id = ? AND layer = ? AND unit = ?",
        [run.lm_id, layer, unit],
    )
    store.db.conn.commit()
    hist = layer_histogram(store, run, top=30)
    n_images = sum(
        (layer, unit) in {(t["layer"], t["unit"]) for t in store.top_triples(r["id"], 30)}
        for r in xs.result_rows(store, run.id)
    )
    assert hist["layers"][layer]["interpretable"] == n_images and hist["interpretable_units"] == n_images


def test_table1_rows_pairing_and_storage(store_run, bert_scorer):
    store, run = store_run
    captions = read_captions(CAPTIONS)
    with pytest.raises(AgreementError, match="no metric"):
        score_agreement(store, run, captions, bertscore=None)
    rows = score_agreement(store, run, captions, bertscore=bert_scorer, top=20, interpretable_only=False)
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in ("multimodal", "random", "caption")}
    assert all(len(v) == 4 for v in by_kind.values())
    for r in by_kind["random"]:
        assert r["partner_result_id"] != r["result_id"]
    first = by_kind["multimodal"][0]
    texts = unit_texts(store, run, first["result_id"], 20, "raw", False)
    assert first["n_units"] == len(texts) and first["best_text"] in texts
    path = Path(xs.result_rows(store, run.id, [first["result_id"]])[0]["path"]).name
    best = bert_scorer.f1_mean(texts, [captions[path]] * len(texts)).max()
    assert first["value"] == pytest.approx(float(best), abs=1e-6)
    assert len(xs.agreement_rows(store, run.id)) == 12
    table = summarize(rows)
    assert {(t["metric"], t["kind"]) for t in table} == {("bertscore", k) for k in ("multimodal", "random", "caption")}
    assert all(t["n"] == 4 and t["model"] == bert_scorer.name for t in table)
    # interpretable only: the tiny LM has none, so there is nothing to score but the captions
    only = score_agreement(store, run, captions, bertscore=bert_scorer, top=20)
    assert {r["kind"] for r in only} == {"caption"}
    with pytest.raises(AgreementError, match="at least two images"):
        score_agreement(store, run, {}, bertscore=bert_scorer)


def test_layers_command(attributed_db, tmp_path):
    result = runner.invoke(app, ["layers", "--db", str(attributed_db), "--json"])
    assert result.exit_code == ExitCode.OK, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    layers = [r for r in lines if r["type"] == "layer"]
    assert [r["layer"] for r in layers] == [0, 1]
    assert {"units", "interpretable", "distinct", "share"} <= layers[0].keys()
    total = next(r for r in lines if r["type"] == "total")
    assert total["n_images"] == 4 and "interpretable_rate" in total
    table = runner.invoke(app, ["layers", "--db", str(attributed_db), "--captions", str(CAPTIONS), "--all-units"])
    assert table.exit_code == 0, table.stderr
    assert "per layer" in table.stdout and "Table 1" in table.stdout
    missing = runner.invoke(app, ["layers", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == ExitCode.FAILED and "no cache at" in missing.stderr
    bad_caps = runner.invoke(app, ["layers", "--db", str(attributed_db), "--captions", str(tmp_path / "c.json")])
    assert bad_caps.exit_code == ExitCode.FAILED and "caption file not found" in bad_caps.stderr


def test_layers_command_does_not_import_torch(attributed_db):
    code = (
        "import sys; sys.argv = ['mmtui', 'layers', '--db', sys.argv[1]];\n"
        "from commands import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code, str(attributed_db)], capture_output=True, text=True, cwd=root)
    assert out.stdout.strip().endswith("HEAVY="), out.stdout + out.stderr
