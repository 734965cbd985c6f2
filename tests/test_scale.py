"""Scale-out gives the same cache as one process: shards + merge, and the Ray engine."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from commands import app
from mmtui.errors import MmtuiError
from mmtui.run.events import ImageDone
from mmtui.run.pipeline import Settings, attribute_images
from mmtui.store import Store
from mmtui.store.merge import merge_stores


def snapshot(store: Store) -> dict:
    """Everything a run stored, keyed by content (ids, timestamps and timings aside)."""
    results = {}
    for r in store.db.query("SELECT * FROM results"):
        for k in ("id", "created", "seconds"):
            r.pop(k)
        results[(r["image_sha256"], r["target_spec"])] = r
    triples = sorted(
        (r["image_sha256"], t["rank"], t["layer"], t["unit"], t["patch"], t["score"])
        for r in store.db.query("SELECT id, image_sha256 FROM results")
        for t in store.top_triples(r["id"])
    )
    stats = {
        (s["run_id"], s["layer"], s["unit"]): s
        for s in store.db.query(
            "SELECT runs.id AS run_id, layer, unit, n_top, n_images, max_score, sum_score, mean_score"
            " FROM neuron_stats JOIN runs USING (run_key)"  # the key is each cache's own: compare by run id
        )
    }
    tokens = store.db.execute("SELECT count(*) FROM neuron_tokens").fetchone()[0]
    runs = sorted((r.id, r.stack.id) for r in store.runs())
    return {"results": results, "triples": triples, "stats": stats, "tokens": tokens, "runs": runs}


def assert_same(a: dict, b: dict) -> None:
    assert a["runs"] == b["runs"]
    assert a["results"].keys() == b["results"].keys()
    for key, ra in a["results"].items():
        rb = b["results"][key]
        exact = {k for k in ra if k not in ("y_c", "p_target", "unit_max", "unit_sum", "top")}
        assert {k: ra[k] for k in exact} == {k: rb[k] for k in exact}
        assert (ra["y_c"], ra["p_target"]) == pytest.approx((rb["y_c"], rb["p_target"]), rel=1e-5)
    # scores equal rank by rank up to float32 rounding (a Ray worker runs torch with its own thread count, and a
    # batch of other images pads differently: both change the order of additions inside matrix products), so
    # near-ties may swap places; the same triples, bar those tied with the last kept score
    for sha in {t[0] for t in a["triples"]}:
        ta = [t[1:] for t in a["triples"] if t[0] == sha]
        tb = [t[1:] for t in b["triples"] if t[0] == sha]
        assert [t[4] for t in ta] == pytest.approx([t[4] for t in tb], rel=1e-5, abs=1e-12)
        edge = max(ta[-1][4], tb[-1][4])
        edge += 1e-5 * abs(edge) + 1e-12
        assert {t[1:4] for t in ta if t[4] > edge} == {t[1:4] for t in tb if t[4] > edge}
    assert a["tokens"] == b["tokens"]
    assert a["stats"].keys() == b["stats"].keys()
    for key, sa in a["stats"].items():
        sb = b["stats"][key]
        assert (sa["n_top"], sa["n_images"]) == (sb["n_top"], sb["n_images"])
        assert sa["max_score"] == pytest.approx(sb["max_score"], rel=1e-5, abs=1e-12)
        # sums also accumulate in a different order across shards
        assert sa["sum_score"] == pytest.approx(sb["sum_score"], rel=1e-5, abs=1e-12)


@pytest.fixture
def single(tiny_stack, image_dir, tmp_path):
    store = Store.open(tmp_path / "single.db")
    list(attribute_images(tiny_stack, store, sorted(image_dir.iterdir()), Settings(target="dog", batch_size=2)))
    return snapshot(store)


def test_shards_merged_equal_a_single_run(tiny_stack, image_dir, tmp_path, single):
    paths = sorted(image_dir.iterdir())
    shard_files = []
    for i in range(3):
        path = tmp_path / f"shard{i}.db"
        with Store.open(path) as store:
            list(attribute_images(tiny_stack, store, paths, Settings(target="dog", batch_size=2, shard=(i, 3))))
        shard_files.append(path)
    with Store.open(tmp_path / "merged.db") as merged:
        events = list(merge_stores(merged, shard_files))
        assert sum(e.kind == "added" for e in events) == 4
        assert_same(snapshot(merged), single)
        assert all(e.kind == "skipped" for e in merge_stores(merged, shard_files))  # merging again adds nothing


def test_merge_refuses_mixed_stacks(tiny_stack, image_dir, tmp_path):
    paths = sorted(image_dir.iterdir())[:1]
    with Store.open(tmp_path / "a.db") as a:
        list(attribute_images(tiny_stack, a, paths, target="dog"))
        a.db.execute("PRAGMA foreign_keys = OFF")
        a.db.execute("UPDATE stacks SET id = 'other-stack'")
        a.db.execute("UPDATE runs SET stack_id = 'other-stack'")
        a.db.conn.commit()
    with Store.open(tmp_path / "b.db") as b:
        list(attribute_images(tiny_stack, b, paths, target="dog"))
    with Store.open(tmp_path / "m.db") as m, pytest.raises(MmtuiError, match="different stacks"):
        list(merge_stores(m, [tmp_path / "a.db", tmp_path / "b.db"]))


def test_merge_and_shard_commands(image_dir, tmp_path):
    runner = CliRunner()
    files = []
    for i in range(2):
        db = tmp_path / f"s{i}.db"
        result = runner.invoke(
            app,
            [
                "attribute",
                str(image_dir),
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--target",
                "dog",
                "--shard",
                f"{i}/2",
                "--db",
                str(db),
            ],
        )
        assert result.exit_code == 0, result.stderr
        files.append(str(db))
    result = runner.invoke(app, ["merge", *files, "--db", str(tmp_path / "all.db")])
    assert result.exit_code == 0, result.stderr
    assert "4 results added" in result.stderr
    bad = runner.invoke(app, ["attribute", str(image_dir), "--preset", "tiny", "--shard", "2/2"])
    assert bad.exit_code == 2 and "I must be in 0..N-1" in bad.stderr


def test_ray_engine_equals_a_single_run(image_dir, tmp_path, single):
    ray = pytest.importorskip("ray")
    from mmtui.run.distributed import attribute_images_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with Store.open(tmp_path / "ray.db") as store:
            load = {"preset": "tiny", "prompt": "A picture of"}
            events = list(
                attribute_images_ray(
                    load, store, sorted(image_dir.iterdir()), Settings(target="dog", batch_size=2), workers=2
                )
            )
            assert sum(isinstance(e, ImageDone) for e in events) == 4
            assert_same(snapshot(store), single)
    finally:
        ray.shutdown()
