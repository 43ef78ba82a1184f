"""The docs name what exists: every repository path that README.md and docs/*.md name (in backticks or links)
is in the tree, every relative link between pages resolves, and the README stays a page read in minutes."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("evolver_kernels/", "csrc/", "scripts/", "python/", "benchmarks/", "tests/", "docs/", ".ci/")
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOP) + r")[\w./-]*[\w/])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _named_paths(text: str) -> set[str]:
    return {m.group(1).rstrip("/.") for m in PATH.finditer(text)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_a_page_names_exists(page):
    text = page.read_text()
    missing = sorted(p for p in _named_paths(text) if "*" not in p and not (ROOT / p).exists())
    assert missing == [], f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    links = [m.group(1) for m in LINK.finditer(page.read_text()) if "://" not in m.group(1)]
    broken = sorted(link for link in links if not (page.parent / link).exists())
    assert broken == [], f"{page.relative_to(ROOT)}: broken links {broken}"


def test_readme_is_short():
    assert (ROOT / "README.md").stat().st_size < 20_000, "README.md: keep it under 20 KB; move detail into docs/"


def test_the_checker_sees_paths():
    assert _named_paths("see `evolver_kernels/evolve/run.py` and csrc/philox.h.") == {
        "evolver_kernels/evolve/run.py",
        "csrc/philox.h",
    }
