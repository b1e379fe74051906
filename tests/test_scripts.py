"""The console scripts of pyproject.toml: each names a `main` that exists, answers --help with
exit 0, and is the same program `python -m MODULE` runs."""
from __future__ import annotations

import importlib
import importlib.metadata
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
EXPECTED = {"mixpro-train", "mixpro-eval", "mixpro-scan", "mixpro-bench-pipeline",
            "mixpro-bench-train", "mixpro-inspect"}


def resolve(spec: str):
    module, _, attr = spec.partition(":")
    return importlib.import_module(module), getattr(importlib.import_module(module), attr)


def test_every_tool_has_a_script():
    assert EXPECTED <= set(SCRIPTS), sorted(EXPECTED - set(SCRIPTS))
    assert all(name.startswith("mixpro-") for name in SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_help_exits_0(name, capsys):
    _, main = resolve(SCRIPTS[name])
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--help" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_python_dash_m_runs_the_same_main(name):
    module, main = resolve(SCRIPTS[name])
    source = Path(module.__file__).read_text()
    assert 'if __name__ == "__main__":' in source and f"{main.__name__}()" in source
    result = subprocess.run([sys.executable, "-m", module.__name__.removesuffix(".__main__"),
                             "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")


def test_bad_arguments_exit_2(capsys):
    _, main = resolve(SCRIPTS["mixpro-scan"])
    with pytest.raises(SystemExit) as exit_:
        main(["ROOT", "--no-such-option"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_installed_scripts_match_pyproject():
    """An install (pip install -e .) made before a script was added does not have it."""
    # site-packages only: a source tree on sys.path may hold a stale build's *.egg-info
    found = list(importlib.metadata.distributions(name="mixpro-dali",
                                                  path=site.getsitepackages()))
    if not found:
        pytest.skip("mixpro-dali is not installed (tests run from the source tree)")
    dist = found[0]
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert installed == SCRIPTS, "stale install: run `pip install -e .` again"
