"""The README's tour, run line by line from README.md itself, in an empty folder, offline.

What is run as written and what is changed, clearly:
- Every line of the tour's two blocks ("A short tour" and "The paper's experiments") is taken from README.md, its
  comment cut off, `mmtui` replaced by this checkout's CLI, and run with bash in a fresh folder (so `| jq` pipes
  too), with HF_HUB_OFFLINE=1 and MMTUI_DB pointing into the folder.
- ON THE TINY STACK, NOT THE DEFAULT ONE: lines whose command loads a stack by preset (attribute, caption,
  prompts) get `--preset tiny`, and the smol unit the README names (layer 7, unit 1234) becomes layer 1, unit 12
  of tiny's 2 x 64 units (`7 1234`, `L7.u1234`, `--layer 7`). The other commands take the stack of the run in the
  cache, which is then tiny's. The real lines on the default stack take minutes of model loads and CPU, more than
  a test should; set MMTUI_TOUR_REAL=1 to run them unchanged (test_tour_real).
- `mmtui browse` is interactive: it is not run here (tests/test_tui*.py drive the TUI); the test checks that the
  line is there and that its command exists.
- Lines marked `hub:` need the Hugging Face hub: run offline, as a process, they must fail at once (exit 2, one
  line, no retries; tests/test_stacks.py checks the same without HF_HUB_OFFLINE, the hub unreachable).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
ROOT = README.parent
CLI = f"{shlex.quote(sys.executable)} -c 'from commands import main; main()'"
BLOCKS = ("## A short tour", "The paper's experiments")
PRESET_COMMANDS = ("attribute", "caption", "prompts")
TINY_UNITS = [(r"\bL7\.u1234\b", "L1.u12"), (r"\b7 1234\b", "1 12"), (r"--layer 7\b", "--layer 1")]


def tour_lines() -> list[str]:
    """The commands of the tour's blocks, in order, comments cut off (a `#` inside quotes is none here)."""
    text = README.read_text()
    lines: list[str] = []
    for heading in BLOCKS:
        start = text.index(heading)
        block = text[text.index("```bash\n", start) + len("```bash\n") :]
        block = block[: block.index("```")]
        for raw in block.splitlines():
            command = raw.split(" # ", 1)[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def _hub_lines() -> set[str]:
    text = README.read_text()
    return {m.group(1).strip() for m in re.finditer(r"^(mmtui [^#\n]*?)\s+# hub:", text, re.M)}


def _on_tiny(line: str) -> str:
    words = line.split()
    if words[1] in PRESET_COMMANDS:
        pipe = line.find(" | ")
        line = f"{line} --preset tiny" if pipe < 0 else f"{line[:pipe]} --preset tiny{line[pipe:]}"
    for pattern, repl in TINY_UNITS:
        line = re.sub(pattern, repl, line)
    return line


def _run(line: str, folder: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    command = re.sub(r"^mmtui\b|(?<=\| )mmtui\b", CLI, line)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MMTUI_DB": str(folder / "cache" / "mmtui.db"),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "160",
    }
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_tour_names_only_what_the_samples_hold() -> None:
    lines = tour_lines()
    assert lines[0] == "mmtui samples", "the tour starts by copying the samples"
    names = {p.name for p in (ROOT / "mmtui" / "data" / "samples").glob("*.jpg")}
    for line in lines:
        for name in re.findall(r"\b[\w-]+\.jpg\b", line):
            assert name in names, f"{line!r} names {name}, which the samples do not hold"
        for option in ("--captions", "--instances"):
            if option in line:
                assert re.search(rf"{option} (captions|instances)\.json\b", line), line
    assert "mmtui verify" in _hub_lines()


def _in_process(line: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """Run one tour line with the CLI in this process (imports paid once: the lines are mostly start-up when run
    as processes); a `| jq ...` tail gets the command's stdout through the real jq when it is installed."""
    from typer.testing import CliRunner

    from commands import app

    command, _, pipe = line.partition(" | ")
    args: list[str] = []
    for word in shlex.split(command)[1:]:  # drop "mmtui"
        args += sorted(str(p.relative_to(folder)) for p in folder.glob(word)) if "*" in word else [word]
    monkeypatch.chdir(folder)
    done = CliRunner().invoke(app, args, env={"HF_HUB_OFFLINE": "1", "MMTUI_DB": str(folder / "cache" / "mmtui.db")})
    stdout = done.stdout
    if done.exception is not None and not isinstance(done.exception, SystemExit):
        import traceback

        return 1, stdout, "".join(traceback.format_exception(done.exception))
    if pipe and done.exit_code == 0:
        if shutil.which(pipe.split()[0]) is None:
            return done.exit_code, stdout, done.stderr
        piped = subprocess.run(shlex.split(pipe), input=stdout, capture_output=True, text=True, timeout=60)
        assert piped.returncode == 0 and piped.stdout.strip(), f"{line!r}: {piped.stderr}"
    return done.exit_code, stdout, done.stderr


def _walk(folder: Path, transform, monkeypatch: pytest.MonkeyPatch) -> list[str]:  # noqa: ANN001
    """Run every offline line of the tour; returns what was not run (interactive, hub)."""
    hub = _hub_lines()
    left: list[str] = []
    for line in tour_lines():
        if line == "mmtui browse" or line in hub:
            left.append(line)
            continue
        started = time.monotonic()
        code, _, stderr = _in_process(transform(line), folder, monkeypatch)
        assert code == 0, f"{line!r} exited {code}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, f"{line!r}:\n{stderr[-3000:]}"
        print(f"{time.monotonic() - started:6.1f} s  {line}")
    return left


def test_tour_offline_lines_run_on_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    left = _walk(tmp_path, _on_tiny, monkeypatch)
    assert left == ["mmtui browse", "mmtui verify"]
    assert (tmp_path / "dog.png").is_file() and (tmp_path / "report" / "index.html").is_file()
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == 8


def test_hub_lines_fail_fast_offline(tmp_path: Path) -> None:
    """Run as a user would (a process): exit 2 with one line that says why, and no retrying."""
    for line in _hub_lines():
        done = _run(line, tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr
        errors = [x for x in done.stderr.splitlines() if x.strip()]
        assert len(errors) == 1 and "HF_HUB_OFFLINE" in errors[0], done.stderr
        assert "Retrying" not in done.stderr


@pytest.mark.skipif(not os.environ.get("MMTUI_TOUR_REAL"), reason="minutes on the default stack: MMTUI_TOUR_REAL=1")
def test_tour_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tour exactly as written, on the default (smol) stack."""
    assert _walk(tmp_path, lambda line: line, monkeypatch) == ["mmtui browse", "mmtui verify"]
