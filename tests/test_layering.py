"""Arrows flow one way: mixpro_dali <- pipelines <- train <- tools, with the container launcher
(docker/) and CI (.ci/) on top; in mixpro_dali, DALI only in operator.py (the data path) and
smoke.py (the install check). An arrow from a file to a module of the project is

  * an import (`import x`, `from x import y`; relative imports stay inside their package);
  * a `-m MODULE` command: in a list or tuple literal, the string constant right after a "-m"
    constant (`[sys.executable, "-m", "train", ...]`, torchrun's `-m`);
  * a string constant that is exactly a dotted module of the project that exists as a file
    (`"tools.bench_train"`, handed to a helper that adds the "-m");
  * in a shell script or Dockerfile (tools/gpu_check.sh, docker/launch.sh, ...), a `-m MODULE`.

FORBIDDEN says which packages a layer may not point at. A `-m` naming a module of the project
that does not exist (a stale command after a move) fails too.

Scraped output. A file that runs another module of the project with `-m` (a dotted name of
the project, or a `-m` whose module the checker cannot name, like `"-m", *cmd`) reads that
command's results from the files the command writes (--out / --json, summary.csv), never from
its stdout/stderr. A module running itself is exempt: a worker speaking its own line protocol
on a pipe (pipelines.decode_worker) is one module's business. In such a file, file-wide (the
capture may sit in a helper away from the `-m`), the test flags
  * `capture_output=True`, and `stdout=` / `stderr=` set to `subprocess.PIPE`;
  * calls of `check_output`, `getoutput`, `getstatusoutput`, `communicate`;
  * a read of a log: `.read_text()`, `.read_bytes()`, `.readlines()`, `.open()` or
    `open(...)` (read mode) of a path naming a "*.log" constant or a variable called `log`,
    `log_*` or `*_log` (the file a command's output was redirected into).
What this flags but is not scraping is in SCRAPE_ALLOWED, by (file, function), with its reason.
Not seen: `python path/to/file.py` calls (tools.fingerprint and tools.bench_operator run their
own file as a worker and read its JSON) and commands assembled from strings at run time.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"mixpro_dali": {"pipelines", "train", "tools"}, "pipelines": {"train", "tools"},
             "train": {"tools"}, "tools": set()}
TOP = {"docker": set(), ".ci": set()}   # shell-only layers on top: they run train and tools
LAYERS = {**FORBIDDEN, **TOP}
SCRAPE_ALLOWED = {
    ("tools/gpu_check.py", "_versions"): "nvidia-smi's table (not a project command), kept as is",
    ("tools/gpu_check.py", "_pytest_cuda"): "pytest (not a project command): pass/fail from its "
        "exit status, the summary's tail kept for the reader",
    ("tools/gpu_check.py", "_spawn"): "its own --step child (results from the step's JSON): the "
        "log's tail kept only for a failed step, the log copied into gpu_check.log for the user",
}
# arrows of today, to prove the detector sees them (it must not pass by finding nothing)
KNOWN_ARROWS = {
    ("tools/study.py", "train", "-m"), ("tools/study.py", "train.evaluate", "-m"),
    ("tools/gpu_check.py", "tools.bench_train", "name"),
    ("tools/gpu_check.py", "tools.bench_pipeline", "name"),
    ("tools/gpu_check.py", "tools.gpu_check", "-m"),
    ("pipelines/crash_watch.py", "pipelines.crash_watch", "-m"),
    ("pipelines/decode_worker.py", "pipelines.decode_worker", "-m"),
    ("tools/gpu_check.sh", "tools.gpu_check", "-m"),
    *{("docker/launch.sh", m, "-m") for m in ("train", "tools.bench_train", "tools.bench_pipeline",
                                               "pipelines.scan", "mixpro_dali.smoke")},
    ("docker/Dockerfile", "mixpro_dali.smoke", "-m"),
}


def _module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file for every module of the layered packages (a package: its
    __init__.py, or its __main__.py for `-m`)."""
    mods: dict[str, Path] = {}
    for pkg in FORBIDDEN:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] in ("__init__", "__main__"):
                parts.pop()
            mods.setdefault(".".join(parts), f)
    return mods


MODULES = _module_files()


def module_of(rel: str) -> str:
    parts = list(Path(rel).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] in ("__init__", "__main__") else parts)


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every absolute import of the file (third-party ones included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _m_targets(tree: ast.AST) -> list[tuple[str | None, int]]:
    """(module, line) after each "-m" constant of a list/tuple literal; None: not a constant."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            for a, b in zip(node.elts, node.elts[1:] + [None]):
                if isinstance(a, ast.Constant) and a.value == "-m":
                    name = b.value if isinstance(b, ast.Constant) and isinstance(b.value, str) \
                        else None
                    out.append((name, a.lineno))
    return out


def arrows_py(source: str, rel: str) -> list[tuple[str, str, str]]:
    """(file, module, kind) for every import, `-m` and named module of the project; kind is
    'import', '-m' or 'name'. Modules outside the project (pytest, venv) are left out."""
    tree = ast.parse(source, filename=rel)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(rel, a.name, "import") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((rel, node.module, "import"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and "." in node.value and node.value in MODULES:
            found.append((rel, node.value, "name"))
    commands = {m for m, _ in _m_targets(tree) if m is not None}
    found = [a for a in found if not (a[2] == "name" and a[1] in commands)]  # one arrow: the -m
    found += [(rel, m, "-m") for m in commands]
    return sorted({a for a in found if a[1].split(".")[0] in LAYERS})


SH_M = re.compile(r"""(?<![\w-])-m["']?(?:\s+|["']?\s*,\s*)["']?([A-Za-z_][\w.]*)""")


def arrows_sh(text: str, rel: str) -> list[tuple[str, str, str]]:
    """(file, module, '-m') for each `-m MODULE` of a shell script or Dockerfile, comments and
    help text included (a wrong arrow there misleads as much)."""
    mods = {m.rstrip(".") for m in SH_M.findall(text)}          # a sentence's full stop
    return sorted({(rel, m, "-m") for m in mods if m.split(".")[0] in LAYERS})


def against_layering(arrows) -> list[str]:
    bad = []
    for rel, mod, kind in arrows:
        layer, target = Path(rel).parts[0], mod.split(".")[0]
        if target in LAYERS[layer]:
            bad.append(f"{rel}: {kind} {mod} ({layer} must not point at {target})")
        if kind == "-m" and mod not in MODULES:
            bad.append(f"{rel}: -m {mod}: no such module in the project (moved or renamed?)")
    return bad


def _shell_scripts() -> list[Path]:
    files = []
    for layer in LAYERS:
        for f in sorted((ROOT / layer).rglob("*")):
            first = f.read_bytes()[:64].split(b"\n")[0] if f.is_file() else b""
            if f.suffix == ".sh" or f.name == "Dockerfile" or (first.startswith(b"#!")
                                                                and first.endswith(b"sh")):
                files.append(f)
    return files


def project_arrows() -> list[tuple[str, str, str]]:
    arrows = []
    for pkg in FORBIDDEN:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            arrows += arrows_py(f.read_text(), str(f.relative_to(ROOT)))
    for f in _shell_scripts():
        arrows += arrows_sh(f.read_text(), str(f.relative_to(ROOT)))
    return arrows


_LOGNAME = re.compile(r"^log$|^log_|_log$")
_CAPTURE_CALLS = {"check_output", "getoutput", "getstatusoutput", "communicate"}


def _names_a_log(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.endswith(".log"):
            return True
        name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else ""
        if _LOGNAME.search(name):
            return True
    return False


def _reads_a_log(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr in ("read_text", "read_bytes", "readlines", "open"):
        mode = call.args[0] if f.attr == "open" and call.args else None
        return _names_a_log(f.value) and not _writes(mode)
    if isinstance(f, ast.Name) and f.id == "open" and call.args:
        mode = call.args[1] if len(call.args) > 1 else next(
            (k.value for k in call.keywords if k.arg == "mode"), None)
        return _names_a_log(call.args[0]) and not _writes(mode)
    return False


def _writes(mode: ast.AST | None) -> bool:
    return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax")


def _captures(call: ast.Call) -> str | None:
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    if name in _CAPTURE_CALLS:
        return name
    for k in call.keywords:
        v = k.value
        if k.arg == "capture_output" and not (isinstance(v, ast.Constant) and not v.value):
            return "capture_output=True"
        if k.arg in ("stdout", "stderr") and (getattr(v, "attr", None) == "PIPE"
                                              or getattr(v, "id", None) == "PIPE"):
            return f"{k.arg}=PIPE"
    return "reads a log" if _reads_a_log(call) else None


def runs_other_modules(source: str, rel: str) -> list[str]:
    """The other project modules (or '?' for an unnamed `-m`) that the file runs or names."""
    tree = ast.parse(source, filename=rel)
    own = module_of(rel)
    named = {m for _, m, kind in arrows_py(source, rel) if kind in ("-m", "name")}
    unnamed = {"?" for m, _ in _m_targets(tree) if m is None}
    return sorted({m for m in named if m != own and m in MODULES} | unnamed)


def scraped(source: str, rel: str) -> list[tuple[str, str, int, str]]:
    """(file, function, line, what) for each capture of a command's output in a file that runs
    another module of the project (see the module's docstring); [] for any other file."""
    if not runs_other_modules(source, rel):
        return []
    hits = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Call) and (what := _captures(child)):
                hits.append((rel, func, child.lineno, what))
            visit(child, func)

    visit(ast.parse(source, filename=rel), "<module>")
    return hits


# ---- the project ----
@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_or_command_against_the_layering(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no python files"
    bad = [b for f in files for b in against_layering(arrows_py(f.read_text(),
                                                                str(f.relative_to(ROOT))))]
    assert not bad


def test_shell_scripts_follow_the_layering():
    scripts = {str(f.relative_to(ROOT)) for f in _shell_scripts()}
    assert {"tools/gpu_check.sh", "docker/launch.sh", "docker/Dockerfile", ".ci/run"} <= scripts
    stray = [str(f.relative_to(ROOT)) for f in ROOT.glob("*.sh")]
    assert not stray, f"shell scripts in no layer (move them under one of {sorted(LAYERS)})"
    bad = [b for f in _shell_scripts()
           for b in against_layering(arrows_sh(f.read_text(), str(f.relative_to(ROOT))))]
    assert not bad


def test_the_detector_finds_todays_arrows():
    found = set(project_arrows())
    assert KNOWN_ARROWS <= found, sorted(KNOWN_ARROWS - found)
    assert ("tools/study.py", "train.config", "import") in found


def test_no_command_output_is_scraped():
    hits = [h for pkg in FORBIDDEN for f in sorted((ROOT / pkg).rglob("*.py"))
            for h in scraped(f.read_text(), str(f.relative_to(ROOT)))]
    assert [h for h in hits if h[:2] not in SCRAPE_ALLOWED] == []
    used = {h[:2] for h in hits}
    assert set(SCRAPE_ALLOWED) <= used, f"stale SCRAPE_ALLOWED: {set(SCRAPE_ALLOWED) - used}"
    assert runs_other_modules((ROOT / "tools/study.py").read_text(), "tools/study.py") \
        == ["train", "train.evaluate"]                   # it runs the trainer; nothing flagged
    assert runs_other_modules((ROOT / "pipelines/decode_worker.py").read_text(),
                              "pipelines/decode_worker.py") == []   # itself only: exempt


def test_nothing_imports_train_and_dali_only_in_the_operator():
    for package in ("mixpro_dali", "pipelines"):
        for f in sorted((ROOT / package).rglob("*.py")):
            roots = {m.split(".")[0] for _, m, _ in arrows_py(f.read_text(), str(f))}
            assert not roots & {"train", "tools"}, f
    lib = [f for f in (ROOT / "mixpro_dali").rglob("*.py") if "nvidia" in imported_roots(f)]
    allowed = {"operator.py", "smoke.py"}
    assert {f.name for f in lib} <= allowed, lib


# ---- the checker on sources written to break it ----
WRONG_WAY = '''
import subprocess, sys
def run(cfg):
    subprocess.run([sys.executable, "-m", "train", "--config", cfg], check=True)
    launch = ("torchrun", "--nproc-per-node", "2", "-m", "tools.bench_train")
    helper(["tools.bench_pipeline", "--out", "x"])
'''


def fake(layer: str, name: str) -> str:
    """A file name in `layer` for a synthetic source (joined here: test_docs checks that paths
    written out in files exist)."""
    return str(Path(layer, name))


def test_checker_flags_a_wrong_way_command():
    bad = fake("pipelines", "bad.py")
    arrows = arrows_py(WRONG_WAY, bad)
    assert arrows == [(bad, "tools.bench_pipeline", "name"), (bad, "tools.bench_train", "-m"),
                      (bad, "train", "-m")]
    assert against_layering(arrows) == [
        f"{bad}: name tools.bench_pipeline (pipelines must not point at tools)",
        f"{bad}: -m tools.bench_train (pipelines must not point at tools)",
        f"{bad}: -m train (pipelines must not point at train)"]
    assert against_layering(arrows_py(WRONG_WAY, fake("tools", "ok.py"))) == []
    old = fake("tools", "old.py")
    stale = arrows_py('cmd = [sys.executable, "-m", "train.bench"]', old)
    assert against_layering(stale) == [
        f"{old}: -m train.bench: no such module in the project (moved or renamed?)"]
    assert arrows_py('x = ["-m", "pytest", "-q"]; y = "train"', fake("train", "t.py")) == []


def test_checker_flags_a_wrong_way_shell_command():
    script = '#!/bin/bash\n# runs the trainer\nexec python3 -m train "$@"\n' \
             'CMD ["python", "-m", "tools.gpu_check"]\nprog=("${tr[@]}" -m tools.bench_train)\n'
    arrows = arrows_sh(script, fake("pipelines", "run.sh"))
    assert [m for _, m, _ in arrows] == ["tools.bench_train", "tools.gpu_check", "train"]
    assert len(against_layering(arrows)) == 3
    assert against_layering(arrows_sh(script, fake("docker", "run.sh"))) == []
    assert arrows_sh("python3 -m venv .venv && python -m pytest -q", fake(".ci", "run")) == []


SCRAPER = '''
import subprocess, sys
def run_train(run_dir):
    cmd = [sys.executable, "-m", "train", "--output", str(run_dir)]
    _logged(cmd, run_dir / "train.log")
    for line in (run_dir / "train.log").read_text().splitlines():
        pass
def _logged(cmd, log_file):
    with open(log_file, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
def evaluate(ckpt):
    p = subprocess.run([sys.executable, "-m", "train.evaluate", ckpt], capture_output=True)
    q = subprocess.Popen(["x"], stdout=subprocess.PIPE).communicate()
    return subprocess.check_output(["y"]), open(log_file).read()
'''


S_PY = fake("tools", "s.py")


def test_checker_flags_scraped_output():
    assert runs_other_modules(SCRAPER, S_PY) == ["train", "train.evaluate"]
    assert [(f, w) for _, f, _, w in scraped(SCRAPER, S_PY)] == [
        ("run_train", "reads a log"), ("evaluate", "capture_output=True"),
        ("evaluate", "communicate"), ("evaluate", "stdout=PIPE"), ("evaluate", "check_output"),
        ("evaluate", "reads a log")]
    # the same captures in a file that runs only itself, or only outside programs: not flagged
    own = SCRAPER.replace('"train.evaluate"', '"tools.s"').replace('"train"', '"tools.s"')
    assert scraped(own, S_PY) == []
    assert scraped(SCRAPER.replace('"-m", "train', '"-m", "pytest'), S_PY) == []
    # a module the checker cannot name counts as another one
    assert runs_other_modules('c = [sys.executable, "-m", *cmd]', S_PY) == ["?"]
    # results from the command's own files: nothing to flag
    clean = ('def f(d):\n    subprocess.run([sys.executable, "-m", "train.evaluate", "--json", '
             'str(d / "e.json")], stdout=subprocess.DEVNULL)\n'
             '    return (d / "e.json").read_text()\n')
    assert scraped(clean, S_PY) == []
