"""Heavy imports stay off the browse and query paths; every command is documented."""

from __future__ import annotations

import re
import subprocess
import sys
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
