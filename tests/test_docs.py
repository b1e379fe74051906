"""The docs are self-contained: a user who clones the repository can follow every citation.

- No tracked file cites a path outside the repository: the team's notes beside the checkout
  (a parent-directory "shared" folder, its docs/ and device/ notes, its anchors file) and
  method-document section citations that do not go through docs/method.md.
- Every "docs/method.md section N" names a section that docs/method.md has, and every path of
  a repository file named in a tracked file (`pipelines/scan.py`, `train/configs/deit_tiny.yaml`,
  ...) exists.
- Every relative link of the hand-written markdown (README.md, docs/*.md and the package
  READMEs) resolves to a tracked file or folder inside the repository, and every #anchor to a
  heading of the target page.

The patterns are assembled from pieces so that this file does not match them itself.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"

SHARED = "sh" + "ared"
OUTSIDE = {
    "a parent-directory shared folder": re.compile(r"\.\./+" + SHARED + r"\b"),
    "the shared docs/device notes": re.compile(r"(?<![\w/])" + SHARED + r"/(?:docs|device)\b"),
    "the anchors file": re.compile(r"\banchors\." + "md" + r"\b"),
    "a section of a method document other than docs/method.md": re.compile(
        r"(?<!docs/)\bmethod\.md,?\s+sections?\b", re.IGNORECASE),
}
SECTION_CITE = re.compile(r"docs/method\.md,?\s+sections?\s+(\d+)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
REPO_PATH = re.compile(r"(?<![\w./-])((?:mixpro_dali|pipelines|train|tools|tests|docs|results|docker)/"
                       r"[\w/.-]*\w\.(?:py|md|yaml|sh|json|png|txt))\b")
HAND_WRITTEN_MD = ("README.md", "docs/*.md", "train/README.md", "docker/README.md",
                   "results/bench/README.md")


def tracked_files() -> list[str]:
    """Paths (relative, '/'-separated) of the tracked files; the working tree without dot-folders
    and caches when git or the .git folder is missing (an exported source tree)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True,
                             capture_output=True).stdout.decode()
        return sorted(p for p in out.split("\0") if p and (ROOT / p).is_file())

    def kept(p: Path) -> bool:
        folders = p.relative_to(ROOT).parts[:-1]
        return p.is_file() and p.name != ".git" and not any(
            f.startswith(".") or f in ("__pycache__", "node_modules") or f.endswith(".egg-info")
            for f in folders)

    return sorted(str(p.relative_to(ROOT)).replace("\\", "/") for p in ROOT.rglob("*") if kept(p))


def read_text(rel: str) -> str | None:
    data = (ROOT / rel).read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary (PNG, ...)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_citations(text: str) -> list[tuple[int, str, str]]:
    """(line, what, matched text) of every citation of a path outside the repository."""
    hits = []
    for what, pattern in OUTSIDE.items():
        for m in pattern.finditer(text):
            hits.append((text.count("\n", 0, m.start()) + 1, what, m.group(0)))
    return sorted(hits)


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    text = FENCE.sub("", markdown)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(markdown: str) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    return LINK.findall(text) + REF_LINK.findall(text)


def hand_written_markdown(files: list[str]) -> list[str]:
    return sorted({f for f in files for pat in HAND_WRITTEN_MD if Path(f).match(pat)
                   and f.count("/") == pat.count("/")})


def broken_links(rel: str, files: list[str]) -> list[str]:
    """Each relative link of markdown file `rel` that does not resolve, with the reason."""
    tracked = set(files)
    folders = {str(Path(f).parent).replace("\\", "/") for f in files} | {
        str(p).replace("\\", "/") for f in files for p in Path(f).parents}
    bad = []
    for target in links((ROOT / rel).read_text()):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if path.startswith("/"):
            bad.append(f"{target}: absolute path (write it relative to {rel})")
            continue
        dest = (ROOT / rel).parent / path if path else ROOT / rel
        try:
            dest_rel = str(dest.resolve().relative_to(ROOT.resolve())).replace("\\", "/")
        except ValueError:
            bad.append(f"{target}: outside the repository")
            continue
        dest_rel = "" if dest_rel == "." else dest_rel
        if dest_rel not in tracked and dest_rel not in folders:
            bad.append(f"{target}: {dest_rel} is not a tracked file or folder")
            continue
        if anchor and dest_rel.endswith(".md") and anchor not in anchors(
                (ROOT / dest_rel).read_text()):
            bad.append(f"{target}: {dest_rel} has no heading with anchor #{anchor}")
    return bad


# --- the detectors themselves -----------------------------------------------------------------

def test_the_detectors_catch_outside_citations_and_spare_repository_ones():
    dotdot = ".." + "/"
    flagged = [
        f"see {dotdot}{SHARED}/device/README.md",
        f"as in {SHARED}/docs/method.md",
        "numbers of anchors." + "md",
        "method." + "md section 5",
        "(method." + "md, section 2-5)",
    ]
    for text in flagged:
        assert outside_citations(text), text
    spared = [
        "docs/method.md section 9", "(../docs/method.md section 3)",
        f"--output /{SHARED}/runs/deit_s", f"{SHARED}_id=rank", "the anchors of a heading",
        "[docs/method.md](docs/method.md#9-training-recipes)",
    ]
    for text in spared:
        assert not outside_citations(text), text


def test_the_path_pattern():
    cfg = "train/configs/" + "x.yaml"  # (split: this file names only files that exist)
    found = REPO_PATH.findall(f"see pipelines/scan.py, `{cfg}` and docs/method.md; not "
                              f"../{cfg} nor my{cfg} nor docs/")
    assert found == ["pipelines/scan.py", cfg, "docs/method.md"], found


def test_slug_and_links_follow_github():
    assert slug("10. Where we differ from the reference code") == \
        "10-where-we-differ-from-the-reference-code"
    assert slug("GPU check (`tools/gpu_check.sh` -> x)") == "gpu-check-toolsgpu_checksh---x"
    md = "# A b\n## A b\n[x](y.md#a-b) ![p](img.png) `[no](code.md)`\n```\n[no](fence.md)\n```\n"
    assert anchors(md) == {"a-b", "a-b-1"}
    assert links(md) == ["y.md#a-b", "img.png"]


# --- the repository ---------------------------------------------------------------------------

def test_no_tracked_file_cites_a_path_outside_the_repository():
    files = tracked_files()
    assert "README.md" in files and "docs/method.md" in files, files[:20]
    bad = {}
    for rel in files:
        text = read_text(rel)
        if text is not None and outside_citations(text):
            bad[rel] = outside_citations(text)
    assert not bad, ("cite docs/method.md, the paper or a file in the repository instead:\n"
                     + "\n".join(f"{f}:{ln}: {what}: {m!r}" for f, hits in bad.items()
                                 for ln, what, m in hits))


def test_method_md_sections_cited_exist():
    numbers = set(re.findall(r"^## (\d+)\. ", METHOD.read_text(), re.MULTILINE))
    assert numbers, "docs/method.md has no numbered '## N. ' sections"
    cited = {}
    for rel in tracked_files():
        text = read_text(rel)
        for m in SECTION_CITE.finditer(text or ""):
            cited.setdefault(m.group(1), []).append(rel)
    assert cited, "nothing cites a section of docs/method.md (the packaged recipes should)"
    missing = {n: where for n, where in cited.items() if n not in numbers}
    assert not missing, f"docs/method.md has sections {sorted(numbers, key=int)}; cited: {missing}"


def test_repository_paths_named_in_files_exist():
    files = tracked_files()
    tracked, named, missing = set(files), 0, []
    for rel in files:
        text = read_text(rel) or ""
        for m in REPO_PATH.finditer(text):
            named += 1
            if m.group(1) not in tracked:
                missing.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(1)}")
    assert named > 20, f"only {named} repository paths found: the pattern no longer matches"
    assert not missing, "named but not in the repository (moved or renamed?):\n" + "\n".join(
        missing)


@pytest.mark.parametrize("rel", hand_written_markdown(tracked_files()))
def test_relative_markdown_links_resolve(rel):
    bad = broken_links(rel, tracked_files())
    assert not bad, f"{rel}:\n" + "\n".join(bad)


def test_the_link_check_sees_the_docs():
    md = hand_written_markdown(tracked_files())
    assert {"README.md", "docs/method.md", "docs/interfaces.md"} <= set(md), md
    assert "results/study_fmnist/summary.md" not in md  # generated outputs are not checked


def test_broken_links_are_reported(tmp_path, monkeypatch):
    page = tmp_path / "notes" / "page.md"
    page.parent.mkdir()
    (tmp_path / "README.md").write_text("# Top\n")
    page.write_text("# Page\n[ok](../README.md#top) [gone](missing.md) [up](../../x.md) "
                    "[anchor](../README.md#nowhere) [abs](/README.md) [web](https://x.org/a)\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path.resolve())
    bad = broken_links("notes/page.md", ["README.md", "notes/page.md"])
    assert [b.split(":")[0] for b in bad] == ["missing.md", "../../x.md", "../README.md#nowhere",
                                              "/README.md"], bad
