"""Heavy imports stay off the browse and query paths; every command is documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "timm", "torchvision")


@pytest.mark.parametrize(
    "statement",
    [
        "import mmtui",
        "import mmtui.store, mmtui.store.queries, mmtui.words, mmtui.errors, mmtui.defaults",
        "from commands import app",
        "from commands import main",
    ],
)
def test_light_modules_do_not_import_torch(statement):
    code = f"{statement}; import sys; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_query_command_does_not_import_torch(tmp_path):
    code = (
        "import sys; sys.argv = ['mmtui', 'runs', '--db', sys.argv[1]];\n"
        "from commands import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.db")], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY=\n" in out.stdout or out.stdout.strip().endswith("HEAVY=")


# what a query command must not import: the model path, statistics, pictures, the terminal UI, and pydantic
# (typer 0.29 builds a pydantic TypeAdapter per option, half a second of every command: pyproject keeps typer<0.29)
QUERY_HEAVY = (*HEAVY, "scipy", "PIL", "textual", "matplotlib", "sklearn", "captum", "safetensors", "pydantic")
QUERIES = [
    ["runs", "--json"],
    ["neurons", "--json"],
    ["neurons", "--specific", "--json"],
    ["neurons", "--specific", "--image", "0-3.jpg", "--json"],
    ["neuron", "0", "0", "--json"],
    ["neurons", "--label", "dog", "--json"],
    ["explain", "--json"],
    ["layers", "--json"],
]
_QUERY_SCRIPT = f"""
import sys
db = sys.argv[1]
from commands import main
for line in sys.stdin.read().splitlines():
    args = line.split()
    sys.argv = ["mmtui", *args, "--db", db]
    try:
        main()
    except SystemExit as stop:
        if stop.code not in (0, None):
            sys.stderr.write(f"FAILED {{line}}: exit {{stop.code}}\\n")
    sys.stderr.write(f"IMPORTED {{line}}: " + ",".join(m for m in {QUERY_HEAVY!r} if m in sys.modules) + "\\n")
"""


def test_query_commands_import_nothing_heavy(tmp_path):
    """The query commands, one after another in one process as `mmtui` runs them, on a synthetic store whose
    data labels are stored (the listing, not the computation, of `explain`): after each, none of torch,
    transformers, timm, scipy, PIL, textual, ... is imported (a fresh process each would only be slower)."""
    from test_prevalence import _fill, _records

    from mmtui.experiments.explain import explain_run
    from mmtui.store import Store

    captions = ["a dog on the grass", "a red car in a street", "a cat on a sofa"]
    records = [replace(r, caption=captions[i % 3]) for i, r in enumerate(_records(12))]
    path = tmp_path / "q.db"
    run_id = _fill(path, records, every=5)
    with Store.open(path) as store:
        summary = explain_run(store, store.run(run_id))
    assert summary.kinds and summary.kinds[0].n_terms  # stored now: `explain` below only lists them
    done = subprocess.run(
        [sys.executable, "-c", _QUERY_SCRIPT, str(path)],
        input="\n".join(" ".join(q) for q in QUERIES),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FAILED" not in done.stderr, done.stderr[-2000:]
    imported = dict(
        line[len("IMPORTED ") :].split(": ") for line in done.stderr.splitlines() if line.startswith("IMPORTED ")
    )
    assert list(imported) == [" ".join(q) for q in QUERIES]
    assert imported == {" ".join(q): "" for q in QUERIES}
    assert len(done.stdout.splitlines()) > len(QUERIES)  # each answered with rows


def test_main_registers_the_command_asked_for_and_only_it():
    """`mmtui NAME` imports NAME's module only (its commands registered, no other command's module), for every
    command `commands.app` has; `mmtui --help` registers them all."""
    code = (
        "import sys\n"
        "import commands\n"
        "commands.register(sys.argv[1:])\n"
        "from typer.main import get_command\n"
        "from commands._app import app\n"
        "print(','.join(sorted(get_command(app).commands)))\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('commands.') and m != 'commands._app')))\n"
    )
    everything = _commands()
    for name in [*everything, "--help"]:
        out = subprocess.run(
            [sys.executable, "-c", code, name], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.splitlines()
        registered = set(out[0].split(","))
        if name == "--help":
            assert sorted(registered) == everything
        else:
            assert name in registered and len({m for m in out[1].split(",") if not m.startswith("commands._")}) == 1


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter not installed")
    out = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def _commands() -> list[str]:
    from typer.main import get_command

    from commands import app

    return sorted(get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", _commands())
def test_every_command_has_help_and_is_in_the_readme(name):
    from typer.main import get_command

    from commands import app

    command = get_command(app).commands[name]  # type: ignore[attr-defined]
    assert command.help and len(command.help.strip()) > 20
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"mmtui {re.escape(name)}\b", readme), f"`mmtui {name}` is not in README.md"


def test_only_the_store_runs_sql():
    """No module of mmtui outside mmtui/store imports sqlite3 or sqlite_utils, or reaches for a store's
    connection (`.db`): the store's functions are the only way to its tables (lint-imports checks the imports too)."""
    import ast

    found = []
    for path in sorted((ROOT / "mmtui").rglob("*.py")):
        if (ROOT / "mmtui" / "store") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("sqlite3", "sqlite_utils") or n == "mmtui.store._sqlite_utils" for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {names}")
            if isinstance(node, ast.Attribute) and node.attr == "db":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads .db")
    assert not found, found
