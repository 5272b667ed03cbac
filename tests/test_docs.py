"""The README and docs/ point only at what exists: every relative link (and its #anchor), every
path and module they name, a layout table that matches the tree, a README short enough to
read, and an annotated spec that validates.

    .venv/bin/python -m pytest tests/test_docs.py -q
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from builder.spec.schema import FamilySpec

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A path into the code, as the docs write it: `builder/spec/schema.py`, tests/test_docs.py.
# (Not families/: the guide's examples name a user's own specs there.)
CODE_PATH = re.compile(r"(?<![\w./-])((?:builder|evaluators|publish|tests)/[\w./-]*)")
# A module (and maybe one name in it), as the docs write it: builder.spec.schema.resolve_paths.
# (Not publish.: `publish.org` is a spec field.)
MODULE = re.compile(r"(?<![\w./-])((?:builder|evaluators)(?:\.\w+)+)")
# Folders a build or an install makes, not part of the source tree.
GENERATED = {"runs", "build", "dist", "__pycache__"}


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lowercase, punctuation dropped, spaces as '-'."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page_id(page)} has broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_code_path_it_names_exists(page):
    named = {path.rstrip(".,") for path in CODE_PATH.findall(page.read_text())}
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"{page_id(page)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_module_it_names_exists_with_the_name_it_cites(page):
    named = {module.rstrip(".") for module in MODULE.findall(page.read_text())}
    missing = sorted(module for module in named if not module_exists(module))
    assert not missing, f"{page_id(page)} names modules or names that do not exist: {missing}"


def module_exists(dotted: str) -> bool:
    """`a.b.c` is a module or package, or `a.b` is one and defines `c` (its source mentions it)."""
    parts = dotted.split(".")
    for cut in range(len(parts), len(parts) - 2, -1):
        base = ROOT.joinpath(*parts[:cut])
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if source.exists():
            rest = parts[cut:]
            return not rest or re.search(rf"\b{rest[0]}\b", source.read_text()) is not None
    return False


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


def layout_rows() -> set[str]:
    section = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)/` \|", section, flags=re.MULTILINE))


def test_the_layout_table_lists_every_top_level_folder_and_builder_subpackage():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name not in GENERATED and not p.name.endswith(".egg-info")}
    subpackages = {f"builder/{p.parent.name}" for p in (ROOT / "builder").glob("*/__init__.py")}
    rows = layout_rows()
    assert subpackages, "builder/ has no subpackages: the glob is wrong"
    assert not (folders | subpackages) - rows, f"the README's layout table lacks {sorted((folders | subpackages) - rows)}"
    assert not rows - folders - subpackages, f"the layout table lists folders that do not exist: {sorted(rows - folders - subpackages)}"


def test_the_annotated_spec_in_the_readme_is_a_valid_family():
    section = README.read_text().split("## A spec, annotated", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.DOTALL).group(1)
    FamilySpec.model_validate(yaml.safe_load(block))


def test_the_quick_start_commands_are_make_targets():
    section = README.read_text().split("## Quick start", 1)[1]
    commands = re.findall(r"^make (\w+)", re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1),
                          flags=re.MULTILINE)
    targets = set(re.findall(r"^(\w+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    assert commands == ["demo", "test"] and set(commands) <= targets
