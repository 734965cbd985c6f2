"""The command line through Typer's CliRunner: results on stdout, one-line errors, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from commands import app
from commands._app import ExitCode

runner = CliRunner()


def _attribute(*args: str):
    return runner.invoke(app, ["attribute", *args, "--preset", "tiny", "--device", "cpu"])


@pytest.fixture
def filled_db(image_dir, isolated_db):
    result = _attribute(str(image_dir), "--target", "dog", "--json")
    assert result.exit_code == 0, result.output
    return isolated_db


def test_attribute_json_lines(image_dir):
    result = _attribute(str(image_dir), "--json", "--top", "3")
    assert result.exit_code == ExitCode.OK, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4
    for row in lines:
        assert {"image", "sha256", "target", "target_token_id", "p_target", "top"} <= row.keys()
        assert len(row["top"]) == 3
        assert {"layer", "unit", "score", "tokens"} <= row["top"][0].keys()
        assert len(row["top"][0]["tokens"]) == 10
    assert "Attributing" in result.stderr  # progress goes to stderr, never stdout


def test_attribute_rerun_skips_cached(filled_db, image_dir):
    result = _attribute(str(image_dir), "--target", "dog", "--json", "--new-only")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "0 attributed, 4 skipped" in result.stderr


def test_attribute_json_rerun_emits_cached_results(filled_db, image_dir):
    """A pipe user gets one object per image on a rerun too: the cached ones, marked."""
    first = {
        r["sha256"]: r
        for r in map(json.loads, _attribute(str(image_dir), "--target", "cat", "--json").stdout.splitlines())
    }
    result = _attribute(str(image_dir), "--target", "cat", "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4 and {r["cached"] for r in rows} == {True}
    assert {r["target"] for r in rows} == {"cat"}  # the result of this target, not the image's "dog" one
    for row in rows:
        assert row["top"] == first[row["sha256"]]["top"] and row["p_target"] == first[row["sha256"]]["p_target"]
    assert {r["cached"] for r in first.values()} == {False}


def test_attribute_table_for_people(image_dir):
    result = _attribute(str(image_dir), "--target", "dog")
    assert result.exit_code == 0
    assert "Top neurons per image" in result.stdout and "P(target)" in result.stdout


def test_attribute_bad_file_is_named_and_run_goes_on(image_dir):
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg")
    result = _attribute(str(image_dir), "--target", "dog", "--json")
    assert result.exit_code == ExitCode.PARTIAL
    assert len(result.stdout.splitlines()) == 4
    failed = [line for line in result.stderr.splitlines() if "broken.jpg" in line]
    assert len(failed) == 1 and "not an image PIL can read" in failed[0]


def test_attribute_missing_folder(tmp_path):
    result = _attribute(str(tmp_path / "nowhere"))
    assert result.exit_code == ExitCode.FAILED
    assert result.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'nowhere'}: no such file or folder; pass a folder of images"
    ]


def test_attribute_empty_folder(tmp_path):
    result = _attribute(str(tmp_path))
    assert result.exit_code == ExitCode.FAILED
    assert "no image files found" in result.stderr


def test_attribute_all_bad_exits_2(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    result = _attribute(str(tmp_path))
    assert result.exit_code == ExitCode.FAILED
    assert "empty file" in result.stderr


def test_attribute_split_target_warns_once(image_dir):
    result = _attribute(str(image_dir), "--target", "xylophonist", "--json")
    assert result.exit_code == 0
    assert result.stderr.count("several tokens") == 1


def test_attribute_with_captions_file(image_dir, tmp_path):
    names = sorted(p.name for p in image_dir.iterdir())
    captions = tmp_path / "caps.jsonl"
    captions.write_text(
        "\n".join(json.dumps({"image": n, "caption": "A horse standing in a field."}) for n in names[:3])
    )
    result = _attribute(str(image_dir), "--captions", str(captions), "--json")
    assert result.exit_code == ExitCode.PARTIAL  # the 4th image has no caption
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["target"] for r in rows} == {"horse"}
    assert {r["target_source"] for r in rows} == {"human-caption"}
    assert "no caption with a noun" in result.stderr


def test_attribute_wrong_projection(image_dir, tmp_path):
    bad = tmp_path / "proj.ckpt"
    bad.write_text("nope")
    result = runner.invoke(
        app,
        [
            "attribute",
            str(image_dir),
            "--preset",
            "limber-beit-gptj",
            "--projection",
            str(bad),
            "--lm",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == ExitCode.FAILED
    assert result.stderr.startswith("Error: ")


def test_usage_error_is_one_clear_message():
    result = runner.invoke(app, ["attribute", "--target", "dog", "--captions", "x.json", "--samples"])
    assert result.exit_code == ExitCode.FAILED
    assert "pass one of them" in result.stderr


@pytest.mark.parametrize(
    ("args", "flag", "bad", "choices"),
    [
        (["attribute", "--samples"], "--site", "mid", "'post', 'pre'"),
        (["attribute", "--samples"], "--y", "odds", "'prob', 'logit', 'logprob'"),
        (["attribute", "--samples"], "--decode", "lnf", "'raw', 'ln_f'"),
        (["attribute", "--samples"], "--engine", "dask", "'local', 'ray'"),
        (["ablate", "--from-store"], "--mode", "half", "'zero', 'mean'"),
        (["ablate", "--from-store"], "--unit-mode", "layers", "'triples', 'units'"),
        (["ablate", "--from-store"], "--baseline", "shuffle", "'random', 'none'"),
        (["heatmap", "0", "0", "x.jpg"], "--site", "mid", "'post', 'pre'"),
        (["neurons"], "--decode", "lnf", "'raw', 'ln_f'"),
        (["verify"], "--decode", "lnf", "'raw', 'ln_f'"),
        (["browse"], "--graphics", "sixels", "'auto', 'pixels', 'halfblock'"),
    ],
)
def test_a_bad_choice_is_refused_before_any_work(args, flag, bad, choices, isolated_db):
    """Typer checks every choice option against its Enum: exit 2, the option and its values named, no cache made."""
    result = runner.invoke(app, [*args, flag, bad])
    assert result.exit_code == ExitCode.FAILED
    text = " ".join(result.output.replace("\u2502", " ").split())
    assert f"Invalid value for '{flag}'" in text
    assert f"'{bad}' is not one of {choices}" in text
    assert not isolated_db.exists()


@pytest.mark.parametrize(
    ("command", "metavar"),
    [
        ("attribute", "<post|pre>"),
        ("attribute", "<prob|logit|logprob>"),
        ("ablate", "<zero|mean>"),
        ("browse", "<auto|pixels|halfblock>"),
    ],
)
def test_help_lists_the_choices(command, metavar):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert metavar in result.output


def test_neurons_and_neuron_and_runs(filled_db):
    result = runner.invoke(app, ["neurons", "--json", "--limit", "5"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 5
    assert [r["max_score"] for r in rows] == sorted((r["max_score"] for r in rows), reverse=True)
    first = rows[0]
    result = runner.invoke(app, ["neuron", str(first["layer"]), str(first["unit"]), "--json"])
    detail = json.loads(result.stdout)
    assert detail["stats"]["max_score"] == pytest.approx(first["max_score"])
    assert detail["images"] and detail["decoded"]["raw"]["tokens"] == first["tokens"]
    result = runner.invoke(app, ["neurons", "--sort", "count", "--layer", "1", "--json"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and all(r["layer"] == 1 for r in rows)
    assert [r["n_top"] for r in rows] == sorted((r["n_top"] for r in rows), reverse=True)
    result = runner.invoke(app, ["runs", "--json"])
    run = json.loads(result.stdout)
    assert run["n_images"] == 4 and run["stack"] == "tiny"
    assert runner.invoke(app, ["runs"]).exit_code == 0
    assert runner.invoke(app, ["neurons"]).exit_code == 0


def test_neurons_filters(filled_db, image_dir):
    name = sorted(image_dir.iterdir())[0].name
    result = runner.invoke(app, ["neurons", "--image", name, "--json", "--limit", "100"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and [r["image_score"] for r in rows] == sorted((r["image_score"] for r in rows), reverse=True)
    token = rows[0]["tokens"][0].strip()
    result = runner.invoke(app, ["neurons", "--token", token.upper(), "--json", "--limit", "1000"])
    whole = [json.loads(line) for line in result.stdout.splitlines()]
    assert whole and all(any(token.lower() == t.strip().lower() for t in r["tokens"]) for r in whole)
    result = runner.invoke(app, ["neurons", "--token-contains", token[1:], "--json", "--limit", "1000"])
    part = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(any(token[1:].lower() in t.lower() for t in r["tokens"]) for r in part)
    assert {(r["layer"], r["unit"]) for r in whole} <= {(r["layer"], r["unit"]) for r in part}
    result = runner.invoke(app, ["neurons", "--token", "a", "--token-contains", "a"])
    assert result.exit_code == 2 and "not both" in result.stderr


def test_neuron_out_of_range(filled_db):
    result = runner.invoke(app, ["neuron", "99", "0"])
    assert result.exit_code == ExitCode.FAILED
    assert "no neuron L99.u0" in result.stderr


def test_query_commands_without_cache(tmp_path):
    for cmd in (["neurons"], ["neuron", "0", "0"], ["runs"]):
        result = runner.invoke(app, [*cmd, "--db", str(tmp_path / "none.db")])
        assert result.exit_code == ExitCode.FAILED
        assert "no cache at" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_query_commands_on_newer_schema(filled_db):
    from sqlite_utils import Database

    db = Database(filled_db)
    db["_sqlite_migrations"].insert({"migration_set": "mmtui", "name": "m999_future", "applied_at": "x"})
    db.close()
    result = runner.invoke(app, ["neurons"])
    assert result.exit_code == ExitCode.FAILED
    assert "newer mmtui" in result.stderr


def test_closed_pipe_ends_quietly(filled_db):
    import subprocess
    import sys

    code = "import sys; sys.argv=['mmtui','neurons','--json','--limit','500'];from commands import main; main()"
    proc = subprocess.run(  # pipefail: the status is mmtui's, not head's
        ["bash", "-c", f'set -o pipefail; {sys.executable} -c "{code}" | head -1'],
        capture_output=True,
        text=True,
        env=_env(filled_db),
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def _env(db):
    import os

    return {**os.environ, "MMTUI_DB": str(db)}


def test_ctrl_c_keeps_finished_images_and_rerun_resumes(tmp_path):
    """A real SIGINT to a running `mmtui attribute`: exit 130 with a message, finished images kept, rerun resumes."""
    import contextlib
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    from conftest import coco_files

    folder = tmp_path / "many"
    folder.mkdir()
    for i, f in enumerate(coco_files(8)):
        shutil.copy(f, folder / f"{i:02d}-{f.name}")
    db = tmp_path / "c.db"
    cmd = [
        sys.executable,
        "-c",
        "from commands import main; main()",
        "attribute",
        str(folder),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batch-size",
        "1",
        "--target",
        "dog",
        "--db",
        str(db),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())

    def stored() -> int:
        if not db.exists():
            return 0
        try:  # read only: opening with Store.open would race the run to apply the migrations
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
                return conn.execute("SELECT count(*) FROM results").fetchone()[0]
        except sqlite3.Error:
            return 0

    deadline = time.time() + 120
    while stored() < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    kept = stored()
    assert proc.returncode == 130, stderr
    assert "Interrupted; finished items are kept" in stderr
    assert 2 <= kept < 8
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - kept} attributed, {kept} skipped" in rerun.stderr


def test_attribute_captions_null_or_number_fail_only_their_image(image_dir, tmp_path):
    names = sorted(p.name for p in image_dir.iterdir())
    coco = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [
            {"image_id": 0, "caption": None},
            {"image_id": 1, "caption": 7},
            {"image_id": 2, "caption": "A horse in a field."},
            {"image_id": 3, "caption": "A horse in a field."},
        ],
    }
    captions = tmp_path / "caps.json"
    captions.write_text(json.dumps(coco))
    result = _attribute(str(image_dir), "--captions", str(captions), "--json")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == ExitCode.PARTIAL, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert result.stderr.count("no caption with a noun") == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize("layer", ["999", "-1"])
def test_neurons_layer_out_of_range_is_a_usage_error(filled_db, layer):
    result = runner.invoke(app, ["neurons", "--layer", layer])
    assert result.exit_code == ExitCode.FAILED and result.stdout == ""
    assert f"--layer {layer}: run " in result.stderr and "has layers 0.." in result.stderr


def test_neuron_negative_index_is_a_usage_error(filled_db):
    result = runner.invoke(app, ["neuron", "--", "0", "-1"])
    assert result.exit_code == ExitCode.FAILED
    assert "no neuron L0.u-1" in result.stderr and "units 0.." in result.stderr


def test_ablate_k_beyond_stored_triples_is_a_usage_error(filled_db):
    result = runner.invoke(app, ["ablate", "--from-store", "--k", "99999999", "--device", "cpu"])
    assert result.exit_code == ExitCode.FAILED and result.stdout == ""
    assert "--k 99999999: the run stores" in result.stderr and "use k in 0.." in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--target", " "], "--target is empty"),
        (["--projection", "/nowhere/proj.safetensors"], "--projection /nowhere/proj.safetensors: no such file"),
    ],
)
def test_attribute_bad_arguments_refused_before_loading(image_dir, tmp_path, monkeypatch, args, message):
    import mmtui.stacks.presets

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the stack was loaded before the arguments were checked")

    monkeypatch.setattr(mmtui.stacks.presets, "load_stack", no_loading)
    monkeypatch.setattr("mmtui.stacks.load_stack", no_loading)
    db = tmp_path / "fresh.db"
    result = runner.invoke(app, ["attribute", str(image_dir), *args, "--db", str(db), "--device", "cpu"])
    assert result.exit_code == ExitCode.FAILED
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {message}")
    assert not db.exists()  # nothing made in the cache either


def test_attribute_non_image_file_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("mmtui.stacks.load_stack", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    notes = tmp_path / "captions.json"
    notes.write_text("{}")
    result = runner.invoke(app, ["attribute", str(notes), "--preset", "tiny", "--db", str(tmp_path / "c.db")])
    assert result.exit_code == ExitCode.FAILED
    assert "captions.json" in result.stderr and "Attributing" not in result.stderr


def test_attribute_table_shows_top_rows_asked_for(image_dir):
    import re

    result = _attribute(str(image_dir), "--target", "dog", "--top", "7")
    assert result.exit_code == 0, result.stderr
    assert len(re.findall(r"L\d+\.u\d+ @\d+:", result.stdout)) == 4 * 7  # 5 per image before


def test_attribute_shard_names_images_of_other_shards(image_dir):
    result = _attribute(str(image_dir), "--target", "dog", "--shard", "0/2", "--json")
    assert result.exit_code == 0, result.stderr
    done = len(result.stdout.splitlines())
    assert f"{done} attributed, 0 skipped (cached or duplicate), {4 - done} in another shard" in result.stderr


def test_space_token_is_visible():
    from commands.attribute import _shown

    assert _shown(" ") == "␣" and _shown(" dog") == "dog" and _shown("\n") == "'\\n'"


def test_attribute_samples_warns_about_nothing_of_its_own(tmp_path):
    result = _attribute("--samples", "--target", "dog", "--json", "--db", str(tmp_path / "s.db"))
    assert result.exit_code == 0, result.stderr
    assert "Warning" not in result.stderr and len(result.stdout.splitlines()) == 8


@pytest.mark.parametrize("args", ["'neurons'", "'neuron','0','0'"])
def test_closed_pipe_on_a_table_ends_with_0(filled_db, args):
    import subprocess
    import sys

    code = f"import sys; sys.argv=['mmtui',{args}];from commands import main; main()"
    proc = subprocess.run(  # pipefail: the status is mmtui's, not head's
        ["bash", "-c", f'set -o pipefail; {sys.executable} -c "{code}" | head -1'],
        capture_output=True,
        text=True,
        env=_env(filled_db),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


# -- issue 19 item 6: arguments checked before any model load -------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["caption", "IMG", "--projection", "no-such.safetensors"], "--projection no-such.safetensors: no such file"),
        (["caption", "IMG", "--preset", "nope"], "unknown preset 'nope'"),
        (["prompts", "IMG", "--projection", "no-such.safetensors"], "--projection no-such.safetensors: no such file"),
        (["heatmap", "0", "1", "IMG", "--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_model_commands_check_arguments_before_loading(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import coco_files

    import mmtui.stacks.presets as presets

    def loaded(*a: object, **k: object) -> None:
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(presets, "load_stack", loaded)
    monkeypatch.setattr(presets, "load_lm", loaded)
    image = str(coco_files(1)[0])
    done = CliRunner().invoke(app, [image if a == "IMG" else a for a in args])
    assert done.exit_code == 2, done.output
    assert message in " ".join(done.stderr.split())


def test_heatmap_unit_out_of_range_before_loading(attributed_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import coco_files

    import commands.heatmap as heatmap

    def loaded(*a: object, **k: object) -> None:
        raise AssertionError("the run's stack was loaded before the unit was checked")

    monkeypatch.setattr(heatmap, "run_stack", loaded)
    image = str(coco_files(1)[0])
    done = CliRunner().invoke(app, ["heatmap", "99", "5", image, "--db", str(attributed_db)])
    assert done.exit_code == 2, done.output
    assert "L99.u5 is not in this stack: layers 0..1" in " ".join(done.stderr.split())
