"""`mmtui explain`: enrichment p-values and BH q-values against scipy and hand computations, AUROC against brute
force, planted concept units found on a synthetic store (and nothing found on one without), the shuffled control
run by the same code, labels recomputed when the run grows, and the commands that show them."""

from __future__ import annotations

import hashlib
import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_record
from scipy import sparse
from scipy.stats import false_discovery_control, hypergeom
from typer.testing import CliRunner

from commands import app
from mmtui.experiments import enrichment as en
from mmtui.experiments import explain as ex
from mmtui.experiments.specificity import CocoInstances
from mmtui.store import ResultRecord, StackIdentity, Store
from mmtui.store import labels as store_labels

N_LAYERS, D_MLP = 3, 40
PLANTED = [(1, 7), (2, 3), (0, 11)]  # units whose best images all show a dog
POOL = ["cat", "car", "tree", "boat", "table", "pizza", "horse", "street", "kitchen", "beach", "bus", "clock"]
runner = CliRunner()


# -- statistics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "n", "K", "N"), [(3, 5, 10, 50), (5, 5, 5, 50), (1, 20, 2, 80), (0, 4, 9, 30)])
def test_hypergeom_p_matches_scipy_and_the_sum_of_terms(k: int, n: int, K: int, N: int) -> None:
    got = en.hypergeom_p(np.array([k]), np.array([n]), np.array([K]), N)[0]
    exact = sum(comb(K, i) * comb(N - K, n - i) for i in range(k, min(n, K) + 1)) / comb(N, n)
    assert got == pytest.approx(hypergeom.sf(k - 1, N, K, n), rel=1e-12)
    assert got == pytest.approx(exact, rel=1e-9)


def test_hypergeom_p_many_counts_at_once() -> None:
    rng = np.random.default_rng(0)
    K = rng.integers(1, 40, 500)
    n = rng.integers(1, 21, 500)
    k = np.minimum(rng.integers(0, 21, 500), np.minimum(n, K))
    assert np.allclose(en.hypergeom_p(k, n, K, 60), hypergeom.sf(k - 1, 60, K, n), rtol=1e-12, atol=0)


def test_bh_against_a_hand_computation_and_scipy() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # by rank: .005*5/1=.025, .01*5/2=.025, .03*5/3=.05, .04*5/4=.05, .5*5/5=.5 (then the running min from the top)
    assert np.allclose(en.bh(p), [0.025, 0.05, 0.05, 0.025, 0.5])
    rng = np.random.default_rng(1)
    many = rng.uniform(size=300) ** 3
    assert np.allclose(en.bh(many), false_discovery_control(many))
    # tests not given have p = 1: the same as handing them in
    assert np.allclose(en.bh(many[:50], m=300), false_discovery_control(np.r_[many[:50], np.ones(250)])[:50])
    with pytest.raises(ValueError):
        en.bh(many, m=10)


def test_auroc_against_brute_force_with_ties() -> None:
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, (25, 9)).astype(np.float32)  # many ties
    labels = rng.integers(0, 2, (25, 4))
    labels[:, 3] = 0  # no positives: undefined
    got = en.auroc(scores, labels, chunk=4)
    for c in range(3):
        for u in range(9):
            pos, neg = scores[labels[:, c] == 1, u], scores[labels[:, c] == 0, u]
            brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
            assert got[c, u] == pytest.approx(brute)
    assert np.isnan(got[3]).all()


def test_enrichment_picks_each_units_least_p_term() -> None:
    # 6 images; term 0 on images 0-2, term 1 on 3-5, term 2 on every image (not tested)
    table = sparse.csr_matrix(np.array([[1, 0, 1]] * 3 + [[0, 1, 1]] * 3))
    units = sparse.csr_matrix(np.array([[1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 0]]))
    found = en.enrichment(units, table)
    assert found.unit.tolist() == [0, 1]
    assert found.term.tolist() == [0, 1]
    assert found.k.tolist() == [3, 2] and found.n.tolist() == [3, 3] and found.K.tolist() == [3, 3]
    assert found.m == 2 * 2
    assert np.allclose(found.p, hypergeom.sf(found.k - 1, 6, 3, 3))


# -- a synthetic store ------------------------------------------------------------------------------------
def _record(i: int, caption: str, top: list[tuple[int, int, float]], unit_max: np.ndarray) -> ResultRecord:
    layer, unit, score = (np.array(c) for c in zip(*top, strict=True))
    order = np.argsort(-score, kind="stable")
    return synthetic_record(
        hashlib.sha256(f"image {i}".encode()).hexdigest(),
        f"/photos/{i:04d}.jpg",
        (layer[order], unit[order], np.zeros(len(order)), score[order]),
        unit_max,
        width=64,
        height=64,
        target="thing",
        target_token_id=1,
        target_token=" thing",
        caption="a thing",
        y_c=0.5,
        p_target=0.5,
        unit_sum=unit_max,
        human_caption=caption,
    )


def build_store(
    db: Path, n_images: int = 60, planted: bool = True, seed: int = 0, start: int = 0
) -> tuple[Path, list[int]]:
    """n_images results whose human captions name 2 words of POOL; every 4th shows a dog. With `planted`, the
    PLANTED units score highest on the dog images only (and their unit_max is high there); every image also has
    random units. Returns the db and the indices of the dog images."""
    rng = np.random.default_rng(seed)
    dogs = [i for i in range(start, start + n_images) if i % 4 == 0]
    with Store.open(db) as store:
        stack = StackIdentity(
            id="synthetic",
            name="synthetic",
            fingerprint={},
            shape={"n_layers": N_LAYERS, "d_mlp": D_MLP, "n_patches": 4, "grid": [2, 2], "d_model": 8},
            lm_id="synthetic-lm",
            prompt="A picture of",
        )
        run_id = store.ensure_run(stack, site="post", y_kind="prob")
        for i in range(start, start + n_images):
            words = list(rng.choice(POOL, 2, replace=False))
            if i in dogs:
                words.append("dog")
            caption = "a " + " and a ".join(words)
            top = [
                (int(la), int(u), float(s))
                for la, u, s in zip(
                    rng.integers(0, N_LAYERS, 30), rng.integers(0, D_MLP, 30), rng.uniform(0, 1, 30), strict=True
                )
            ]
            unit_max = rng.uniform(0, 1, (N_LAYERS, D_MLP)).astype(np.float32)
            if planted:
                top = [t for t in top if (t[0], t[1]) not in PLANTED]
                for la, u in PLANTED:
                    unit_max[la, u] = 0.0
                    if i in dogs:
                        top.append((la, u, 5.0 + rng.uniform()))
                        unit_max[la, u] = 5.0
            store.add_result(run_id, _record(i, caption, top, unit_max), stats=False)
        store.refresh_stats(run_id)
        store.add_tokens(
            "synthetic-lm",
            "raw",
            [
                {"layer": la, "unit": u, "tokens": [" dog", " puppy"], "token_ids": [1, 2], "logits": [1.0, 0.5]}
                | {"interpretable": False}
                for la, u in PLANTED
            ],
        )
    return db, dogs


def _coco(dogs: list[int], n_images: int) -> CocoInstances:
    images = {f"{i:04d}.jpg": {"id": i, "width": 64, "height": 64} for i in range(n_images)}
    annotations = {i: [{"category_id": 1 if i in dogs else 2}] for i in range(n_images)}
    return CocoInstances(images, {1: "dog", 2: "cat"}, annotations)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    return build_store(tmp_path_factory.mktemp("explain") / "planted.db")


def test_explain_finds_the_planted_units_and_the_shuffled_control_does_not(planted: tuple[Path, list[int]]) -> None:
    db, dogs = planted
    with Store.open(db) as store:
        run = store.run()
        summary = ex.explain_run(store, run, instances=_coco(dogs, 60))
        words = store_labels.labels(store, run.key, kind="word", fdr=0.05)
        categories = store_labels.labels(store, run.key, kind="category", fdr=0.05)
        control = store_labels.labels(store, run.key, kind="word", control=1, fdr=0.05)
    assert {(r["layer"], r["unit"]) for r in words} == set(PLANTED)
    assert {r["label"] for r in words} == {"dog"}
    assert all(r["k"] == r["n"] == 15 and r["K"] == 15 and r["N"] == 60 for r in words)
    assert {(r["layer"], r["unit"], r["label"]) for r in categories} == {(*u, "dog") for u in PLANTED}
    assert control == []
    word = next(k for k in summary.kinds if k.kind == "word")
    assert (word.labelled, word.shuffled, word.N, word.computed) == (3, 0, 60, True)
    assert word.best_p == pytest.approx(1 / comb(60, 15)) and word.best_p_shuffled > 1e-6
    dog = next(c for c in summary.categories if c.category == "dog")
    assert dog.best in PLANTED and dog.auroc == 1.0
    assert dog.above >= 3 and dog.shuffled < 1.0


def test_the_control_is_the_same_code_on_shuffled_rows(planted: tuple[Path, list[int]]) -> None:
    db, _ = planted
    with Store.open(db) as store:
        run = store.run()
        ex.explain_run(store, run, recompute=True, seed=5)
        best = store_labels.best_images(store, run.id)
        texts = store_labels.result_texts(store, run.id)
        stored = store_labels.labels(store, run.key, kind="word", control=1)
    terms, table = ex.term_table(ex.content_words([t["human_caption"] for t in texts], drop=["A picture of"]))
    assert "dog" in terms and "picture" not in terms
    again = en.enrichment(best.table, en.shuffled(table, 5))
    assert len(stored) == len(again.unit)
    by_unit = {(r["layer"], r["unit"]): r for r in stored}
    for u, t, p, q in zip(again.unit, again.term, again.p, again.q, strict=True):
        row = by_unit[(int(best.layer[u]), int(best.unit[u]))]
        assert (row["label"], row["p"], row["q"]) == (terms[t], pytest.approx(p), pytest.approx(q))


def test_nothing_passes_on_a_store_without_concept_units(tmp_path: Path) -> None:
    db, _ = build_store(tmp_path / "null.db", planted=False, seed=3)
    with Store.open(db) as store:
        run = store.run()
        summary = ex.explain_run(store, run)
        assert store_labels.labels(store, run.key, fdr=0.05) == []
        assert store_labels.labels(store, run.key, fdr=1.01)  # every unit has a best word, none passes
    assert summary.kinds[0].labelled == summary.kinds[0].shuffled == 0


def test_labels_are_recomputed_when_the_run_grows(tmp_path: Path) -> None:
    db, _ = build_store(tmp_path / "grow.db", n_images=40)
    with Store.open(db) as store:
        first = ex.explain_run(store, store.run()).kinds[0]
        again = ex.explain_run(store, store.run()).kinds[0]
    assert first.computed and not again.computed and again.labelled == first.labelled and again.N == 40
    assert again.best_p == pytest.approx(first.best_p) and again.best_p_shuffled == pytest.approx(first.best_p_shuffled)
    build_store(db, n_images=20, start=40, seed=9)
    with Store.open(db) as store:
        grown = ex.explain_run(store, store.run()).kinds[0]
    assert grown.computed and grown.N == 60


def test_the_commands_show_the_labels(planted: tuple[Path, list[int]]) -> None:
    db, _ = planted
    result = runner.invoke(app, ["explain", "--db", str(db), "--json", "--recompute"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(r["layer"], r["unit"]) for r in rows if r["type"] == "label"} == set(PLANTED)
    assert next(r for r in rows if r["type"] == "summary")["shuffled"] == 0
    result = runner.invoke(app, ["explain", "--db", str(db)])
    assert "3 unit(s) with q < 0.05, against 0 with the labels shuffled" in result.stdout
    result = runner.invoke(app, ["neurons", "--db", str(db), "--label", "Dog", "--json"])
    assert result.exit_code == 0, result.output
    assert {(r["layer"], r["unit"]) for r in map(json.loads, result.stdout.splitlines())} == set(PLANTED)
    result = runner.invoke(app, ["neurons", "--db", str(db), "--label", "Dog"])
    assert result.exit_code == 0, result.output
    assert all(f"L{layer}.u{unit}" in result.stdout for layer, unit in PLANTED)
    layer, unit = PLANTED[0]
    result = runner.invoke(app, ["neuron", str(layer), str(unit), "--db", str(db), "--json"])
    detail = json.loads(result.stdout)
    assert [x["label"] for x in detail["labels"] if x["kind"] == "word"] == ["dog"]
    result = runner.invoke(app, ["neuron", str(layer), str(unit), "--db", str(db)])
    assert "data label (word): dog" in result.stdout
    result = runner.invoke(app, ["explain", "--db", str(db), "--instances", str(db.parent / "missing.json")])
    assert result.exit_code == 2 and "instance file not found" in result.output


def test_the_report_section_counts_labels_per_layer_against_the_control(
    planted: tuple[Path, list[int]], tmp_path: Path
) -> None:
    from mmtui.experiments.report import build_report, explain_section

    db, dogs = planted
    with Store.open(db) as store:
        run = store.run()
        ex.explain_run(store, run, instances=_coco(dogs, 60), recompute=True)
        numbers, part = explain_section(store, run)
        report = build_report(store, run, tmp_path / "report")
    words = [r for r in numbers["per_layer"] if r["kind"] == "word"]
    assert {r["layer"]: r["labelled"] for r in words} == {0: 1, 1: 1, 2: 1}
    assert sum(r["shuffled"] for r in words) == 0
    dog = next(c for c in numbers["categories"] if c["category"] == "dog")
    assert (dog["layer"], dog["unit"]) in {(la, f"L{la}.u{u}") for la, u in PLANTED} and dog["auroc"] == 1.0
    assert "Units with a data label vs a shuffled control" in report.path.read_text()


def test_bertscore_agreement_of_labels_with_decoded_tokens(planted: tuple[Path, list[int]]) -> None:
    from mmtui.experiments.metrics import BertScorer, MetricUnavailable

    try:
        scorer = BertScorer.load()
    except MetricUnavailable as err:
        pytest.skip(str(err))
    db, _ = planted
    with Store.open(db) as store:
        run = store.run()
        ex.explain_run(store, run, recompute=True, scorer=scorer)
        words = store_labels.labels(store, run.key, kind="word", fdr=0.05)
    expected = float(scorer.f1(["dog, puppy"], ["dog"])[0])
    assert len(words) == 3
    assert all(r["agreement"] == pytest.approx(expected, abs=1e-6) for r in words)
    assert 0 < expected <= 1


@pytest.mark.parametrize("fdr", [0.0, 0.05, 0.5, 1.01])
def test_stored_summary_equals_aggregating_every_label(planted: tuple[Path, list[int]], fdr: float) -> None:
    """kind_counts reads index ranges (m012) and the least p from the least q: the same figures as aggregating
    every stored row."""
    db, dogs = planted
    with Store.open(db) as store:
        run = store.run()
        ex.explain_run(store, run, instances=_coco(dogs, 60))
        for kind in ("word", "category"):
            got = store_labels.kind_counts(store, run.key, kind, fdr)
            row = store.db.execute(
                """SELECT max(source), max(n_all), sum(control = 0), sum(control = 0 AND q < ?),
                          sum(control = 1 AND q < ?), min(CASE WHEN control = 0 THEN p END),
                          min(CASE WHEN control = 1 THEN p END)
                   FROM unit_labels WHERE run_key = ? AND kind = ?""",
                [fdr, fdr, run.key, kind],
            ).fetchone()
            assert got["source"] == row[0] and got["N"] == row[1]
            assert (got["units"], got["labelled"], got["shuffled"]) == tuple(int(v or 0) for v in row[2:5])
            assert got["best_p"] == (1.0 if row[5] is None else row[5])
            assert got["best_p_shuffled"] == (1.0 if row[6] is None else row[6])
            plan = " ".join(
                r[-1]
                for r in store.db.execute(
                    "EXPLAIN QUERY PLAN SELECT count(*) FROM unit_labels "
                    "WHERE run_key = ? AND kind = ? AND control = 0 AND q < ?",
                    [run.key, kind, fdr],
                )
            )
            assert "unit_labels_q" in plan
