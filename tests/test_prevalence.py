"""Generic vs image-specific units: prevalence, lift and the generic flag against a brute-force numpy reading
of a synthetic store; the moments behind the lift across folds, resume, merge and the m010 migration; the
`neurons --specific` and `neuron` commands on that store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_record
from typer.testing import CliRunner

from commands import app
from mmtui.store import COUNT_TOP, ResultRecord, StackIdentity, Store
from mmtui.store import prevalence as pv
from mmtui.store.arrays import pack_array, unpack_array, unpack_triples, unpack_value
from mmtui.store.merge import merge_stores
from mmtui.store.migrations import migrations
from mmtui.store.queries import list_neurons

N_LAYERS, D_MLP, N_PATCHES, KEEP, N_RESULTS = 3, 2000, 9, 150, 30
GENERIC = (0, 0)  # planted: among the first triples of every result
FLAT = (2, D_MLP - 1)  # planted: the same unit_max in every result (no lift), and in every result's stored triples
runner = CliRunner()


def _records(n: int = N_RESULTS, seed: int = 0) -> list[ResultRecord]:
    """Results whose KEEP triples go past COUNT_TOP (so the top-N cut matters), over few units (so units recur),
    with known unit_max arrays whose spread differs by unit."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.1, 2.0, (N_LAYERS, D_MLP))
    out = []
    for i in range(n):
        layer = rng.integers(0, N_LAYERS, KEEP).astype(np.int16)
        unit = rng.integers(0, D_MLP - 1, KEEP).astype(np.int32)
        layer[0], unit[0] = GENERIC
        layer[-1], unit[-1] = FLAT
        unit_max = (1.0 + spread * rng.standard_normal((N_LAYERS, D_MLP))).astype(np.float32)
        unit_max[FLAT] = 0.75
        patch = rng.integers(0, N_PATCHES, KEEP)
        score = np.sort(rng.uniform(0, 1, KEEP))[::-1]
        out.append(
            synthetic_record(
                f"{seed:08x}{i:056x}",
                f"/photos/{seed}-{i}.jpg",
                (layer, unit, patch, score),
                unit_max,
                width=64,
                height=48,
                target_token_id=5,
                context_ids=[1, 2],
                y_c=0.5,
                p_target=0.5,
            )
        )
    return out


def _run_args() -> dict:
    stack = StackIdentity(
        id="s",
        name="synthetic",
        fingerprint={},
        shape={"n_layers": N_LAYERS, "d_mlp": D_MLP, "n_patches": N_PATCHES},
        lm_id="lm",
        prompt="A picture of",
    )
    return {"stack": stack, "site": "post", "y_kind": "prob"}


def _fill(path: Path, records: list[ResultRecord], every: int) -> str:
    """Write the records as a long run does: folded `every` results at a time."""
    with Store.open(path) as store:
        run_id = store.ensure_run(**_run_args())
        for i, rec in enumerate(records):
            store.add_result(run_id, rec, stats=False)
            if (i + 1) % every == 0:
                store.refresh_stats(run_id)
        store.refresh_stats(run_id)
    return run_id


def _brute(store: Store, run_id: str) -> dict[str, np.ndarray]:
    """From every stored result: each unit's prevalence (share of results with it in the first COUNT_TOP
    triples), the stored unit_max arrays, their mean and population std per unit, and each result's z-scores."""
    rows = store.db.execute("SELECT id, top, unit_max FROM results WHERE run_id = ? ORDER BY id", [run_id]).fetchall()
    in_top = np.zeros((len(rows), N_LAYERS, D_MLP), dtype=bool)
    values = np.stack([unpack_array(blob, (N_LAYERS, D_MLP)).astype(np.float64) for _, _, blob in rows])
    for i, (_, top, _) in enumerate(rows):
        layer, unit, _patch, _score = unpack_triples(top)
        in_top[i, layer[:COUNT_TOP], unit[:COUNT_TOP]] = True
    mean, std = values.mean(axis=0), values.std(axis=0)
    return {
        "ids": np.array([r[0] for r in rows]),
        "prevalence": in_top.mean(axis=0),
        "in_top": in_top,
        "values": values,
        "mean": mean,
        "std": std,
        "z": (values - mean) / np.where(std > 0, std, np.nan),
    }


def _moments(store: Store, run_key: int) -> dict[int, tuple[int, np.ndarray, np.ndarray]]:
    rows = store.db.execute("SELECT layer, n, sum, sum_sq FROM unit_moments WHERE run_key = ?", [run_key])
    return {la: (n, np.frombuffer(s), np.frombuffer(sq)) for la, n, s, sq in rows}


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "c.db"
    return path, _fill(path, _records(), every=7)


def test_prevalence_and_the_generic_flag_equal_a_brute_force_count(filled):
    path, run_id = filled
    with Store.open(path) as store:
        run = store.run(run_id)
        want = _brute(store, run_id)
        n = pv.run_size(store, run)
        assert n == N_RESULTS
        rows = pv.annotate(list_neurons(store, run, limit=None), n)
        assert len(rows) > 50
        for r in rows:
            assert r["prevalence"] == pytest.approx(want["prevalence"][r["layer"], r["unit"]], abs=1e-12)
            assert r["generic"] == (want["prevalence"][r["layer"], r["unit"]] > pv.GENERIC_SHARE)
        by_unit = {(r["layer"], r["unit"]): r for r in rows}
        assert by_unit[GENERIC]["prevalence"] == 1.0 and by_unit[GENERIC]["generic"]
        assert by_unit[FLAT]["prevalence"] == 0.0 and not by_unit[FLAT]["generic"]  # stored, never in a top 100
        assert {r["generic"] for r in rows} == {True, False}  # both kinds occur: the test can fail either way
        # --specific without an image: the generic units left out, the others in the same order
        above = pv.generic_above(n)
        specific = list(list_neurons(store, run, limit=None, max_n_top=above))
        assert [(r["layer"], r["unit"]) for r in specific] == [
            (r["layer"], r["unit"]) for r in rows if not r["generic"]
        ]


def test_lift_ranks_an_images_non_generic_units_by_their_z_score(filled):
    path, run_id = filled
    with Store.open(path) as store:
        run = store.run(run_id)
        want = _brute(store, run_id)
        i = 4
        image = f"/photos/0-{i}.jpg"
        rows = pv.specific_units(store, run, image, limit=None)
        layer, unit, _patch, _score = unpack_triples(
            store.db.execute("SELECT top FROM results WHERE id = ?", [int(want["ids"][i])]).fetchone()[0]
        )
        candidates = {(la, u) for la, u in zip(layer.tolist(), unit.tolist(), strict=True)}
        expected = {
            (la, u) for la, u in candidates if not want["prevalence"][la, u] > pv.GENERIC_SHARE
        }  # the image's stored units, less the generic ones
        assert {(r["layer"], r["unit"]) for r in rows} == expected
        assert GENERIC not in expected and FLAT in expected
        for r in rows:
            la, u = r["layer"], r["unit"]
            assert r["unit_max"] == pytest.approx(want["values"][i, la, u], rel=1e-6)
            if (la, u) == FLAT:
                assert r["lift"] is None  # its values do not vary
            else:
                assert r["lift"] == pytest.approx(want["z"][i, la, u], rel=1e-9, abs=1e-9)
        lifts = [r["lift"] for r in rows if r["lift"] is not None]
        assert lifts == sorted(lifts, reverse=True) and rows[-1]["lift"] is None  # no lift: last
        one_layer = pv.specific_units(store, run, image, layer=1, limit=5)
        assert [r["lift"] for r in one_layer] == [r["lift"] for r in rows if r["layer"] == 1][:5]


def test_an_images_generic_share_counts_its_top_triples(filled):
    path, run_id = filled
    with Store.open(path) as store:
        run = store.run(run_id)
        want = _brute(store, run_id)
        for i in (0, 11):
            result_id = int(want["ids"][i])
            got = pv.image_generic_share(store, run, result_id)
            layer, unit, _patch, _score = (a[:COUNT_TOP] for a in store.triples(result_id))
            generic = want["prevalence"][layer, unit] > pv.GENERIC_SHARE
            units = set(zip(layer.tolist(), unit.tolist(), strict=True))
            assert got["triples"] == COUNT_TOP and got["units"] == len(units)
            assert got["generic_triples"] == int(generic.sum()) > 0
            assert got["generic_units"] == len(
                {u for u, g in zip(zip(layer, unit, strict=True), generic, strict=True) if g}
            )
            assert got["generic_share"] == pytest.approx(generic.mean())


def test_a_small_run_calls_nothing_generic(tmp_path):
    path = tmp_path / "c.db"
    run_id = _fill(path, _records(pv.MIN_GENERIC_RESULTS - 1), every=4)
    with Store.open(path) as store:
        run = store.run(run_id)
        rows = pv.annotate(list_neurons(store, run, limit=None), pv.run_size(store, run))
        assert not any(r["generic"] for r in rows) and rows[0]["prevalence"] is not None
        share = pv.image_generic_share(store, run, int(store.results(run_id).__next__()["id"]))
        assert share["generic_share"] is None and share["run_results"] == pv.MIN_GENERIC_RESULTS - 1


def test_moments_add_up_across_folds_resume_merge_and_the_migration(tmp_path):
    records = _records()
    once = tmp_path / "once.db"
    run_id = _fill(once, records, every=len(records))
    with Store.open(once) as store:
        key = store.run_key(run_id)
        want = _moments(store, key)
        brute = _brute(store, run_id)
    assert set(want) == set(range(N_LAYERS)) and {m[0] for m in want.values()} == {N_RESULTS}
    for layer, (_, total, total_sq) in want.items():
        np.testing.assert_allclose(total, brute["values"][:, layer].sum(axis=0), rtol=1e-12)
        np.testing.assert_allclose(total_sq, (brute["values"][:, layer] ** 2).sum(axis=0), rtol=1e-12)

    def same(path: Path) -> None:
        with Store.open(path) as store:
            got = _moments(store, store.run_key(store.run().id))
        assert got.keys() == want.keys()
        for layer in want:
            assert got[layer][0] == want[layer][0]
            np.testing.assert_allclose(got[layer][1], want[layer][1], rtol=1e-12)
            np.testing.assert_allclose(got[layer][2], want[layer][2], rtol=1e-12)

    one_by_one = tmp_path / "one.db"
    _fill(one_by_one, records, every=1)
    same(one_by_one)
    resumed = tmp_path / "resumed.db"  # interrupted: 12 results written, 5 folded; the rest added later
    with Store.open(resumed) as store:
        rid = store.ensure_run(**_run_args())
        for rec in records[:12]:
            store.add_result(rid, rec, stats=False)
            if rec is records[4]:
                store.refresh_stats(rid)
    with Store.open(resumed) as store:
        store.run()  # settles what the interruption left unfolded
        for rec in records[12:]:
            store.add_result(rid, rec, stats=True)
    same(resumed)
    shards = [tmp_path / "shard0.db", tmp_path / "shard1.db"]
    _fill(shards[0], records[::2], every=3)
    _fill(shards[1], records[1::2], every=3)
    merged = tmp_path / "merged.db"
    with Store.open(merged) as target:
        assert sum(e.kind == "added" for e in merge_stores(target, shards)) == N_RESULTS
    same(merged)
    # a cache written before m010: its moments filled in from the results it had folded
    with Store.open(once) as store:
        store.db.execute("DROP TABLE unit_moments")
        store.db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm010_unit_max_moments'")
        store.db.conn.commit()
    same(once)
    with Store.open(once) as store:
        assert "m010_unit_max_moments" in {m.name for m in migrations.applied(store.db)}


def test_neurons_specific_and_neuron_commands(filled, monkeypatch):
    path, run_id = filled
    monkeypatch.setenv("MMTUI_DB", str(path))
    listed = runner.invoke(app, ["neurons", "--json", "--limit", "100000"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert any(r["generic"] for r in rows) and all("prevalence" in r for r in rows)
    specific = runner.invoke(app, ["neurons", "--specific", "--json", "--limit", "100000"])
    kept = [json.loads(line) for line in specific.stdout.splitlines()]
    assert kept == [r for r in rows if not r["generic"]]
    by_lift = runner.invoke(app, ["neurons", "--specific", "--image", "0-3.jpg", "--json", "--limit", "5"])
    assert by_lift.exit_code == 0, by_lift.output
    lifted = [json.loads(line) for line in by_lift.stdout.splitlines()]
    assert len(lifted) == 5 and [r["lift"] for r in lifted] == sorted((r["lift"] for r in lifted), reverse=True)
    table = runner.invoke(app, ["neurons", "--specific", "--image", "0-3.jpg"])
    assert table.exit_code == 0 and "lift" in table.stdout
    detail = runner.invoke(app, ["neuron", *map(str, GENERIC), "--json"])
    assert detail.exit_code == 0, detail.output
    found = json.loads(detail.stdout)
    assert found["prevalence"]["prevalence"] == 1.0 and found["prevalence"]["generic"]
    assert all(isinstance(im["lift"], float) for im in found["images"])
    shown = runner.invoke(app, ["neuron", *map(str, GENERIC)])
    assert "prevalence 100.0% of 30 image(s): generic" in shown.stdout


def test_attribute_says_how_much_of_each_images_top_is_generic(isolated_db):
    tiny = ["--samples", "--preset", "tiny", "--device", "cpu"]
    first = runner.invoke(app, ["attribute", *tiny, "--target", "dog", "--json"])
    assert first.exit_code == 0, first.output
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(lines) == 8  # each judged on the run as counted so far: too few images to call a unit generic
    assert all(line["generic"]["generic_share"] is None and line["generic"]["triples"] == COUNT_TOP for line in lines)
    second = runner.invoke(app, ["attribute", *tiny, "--target", "cat"])  # 16 results: judged, in the table
    assert second.exit_code == 0, second.output
    assert "generic: share of the image's top 100 triples" in second.stdout
    with Store.open(isolated_db) as store:
        run = store.run()
        assert pv.run_size(store, run) == 16
        shares = [pv.image_generic_share(store, run, r["id"])["generic_share"] for r in store.results(run.id)]
    assert all(share is not None for share in shares)
    for share in shares[8:]:  # the table's rows: this run's images
        assert f"{share:.0%}" in second.stdout


def test_one_value_of_a_packed_array_equals_the_unpacked_arrays():
    rng = np.random.default_rng(7)
    for shape in ((3, 40), (28, 16384)):  # float16, and 8-bit log codes
        values = rng.normal(0, 1e-3, shape).astype(np.float32)
        values[1, 5] = 0.0
        blob = pack_array(values)
        full = unpack_array(blob, shape)
        for row, col in ((0, 0), (1, 5), (shape[0] - 1, shape[1] - 1), (2, 17)):
            assert unpack_value(blob, shape, row, col) == float(full[row, col])
