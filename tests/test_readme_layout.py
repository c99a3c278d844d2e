"""The documentation stays navigable and cannot drift from the tree:
- docs/layout.md names every package folder and every module of dflash/ (the variants: in docs/variants.md's
  table);
- README.md is at most 250 lines and keeps the two set-up commands, `make report` and `make test`;
- every relative link in README.md and docs/*.md resolves to an existing file, and to an existing heading when it
  has a #anchor (GitHub's slug rules);
- every docs/*.md is reachable from the README's table of contents (its "Where to go next" section), directly or
  through the docs it links to."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250
TOC_HEADING = "## Where to go next"


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def layout_block() -> str:
    layout = read(DOCS / "layout.md")
    match = re.search(r"^```\n(.*?)^```", layout, re.S | re.M)
    assert match, "docs/layout.md has no code block with the layout map"
    return match.group(1)


def test_layout_names_every_folder_and_module():
    block = layout_block()
    package = ROOT / "dflash"
    folders = [p for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    missing = [f"dflash/{p.name}/" for p in folders if f"dflash/{p.name}/" not in block]
    variants = read(DOCS / "variants.md")
    missing += [f"variant {m.stem}" for m in (package / "variants").glob("*.py")
                if m.name != "__init__.py" and f"| `{m.stem}` |" not in variants]
    for folder in [package, *folders]:
        if folder.name in ("tinyworld", "variants"):  # tinyworld: described as a whole; variants: checked above
            continue
        missing += [f"{folder.name}/{m.name}" for m in folder.glob("*.py")
                    if m.name != "__init__.py" and not re.search(rf"\b{re.escape(m.name)}", block)]
    assert not missing, f"docs/layout.md (or the variant table of docs/variants.md) does not mention: {missing}"
    named = set(re.findall(r"^dflash/(\w+)/", block, re.M))
    assert named <= {p.name for p in package.iterdir() if p.is_dir()}, "docs/layout.md names a folder that is gone"


# --- markdown reading: headings, their GitHub anchors, links -----------------------------------------------------

def without_code(text: str) -> str:
    """The text with fenced code blocks blanked (lines kept, so line numbers stay) and inline code spans emptied of
    what could read as a link."""
    lines, fence = [], None
    for line in text.split("\n"):
        marker = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)[0] * len(marker.group(1))
            lines.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            lines.append("")
        else:
            lines.append(line)
    return "\n".join(lines)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: the rendered text (code spans and link texts kept, markup dropped),
    lower-cased, every character that is not a letter, digit, underscore, hyphen or space removed, spaces made
    hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def headings(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", without_code(text), re.M)]


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in headings(read(path)):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)


def links(text: str) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "``", without_code(text))
    return [m.group(1) for m in LINK.finditer(prose)] + [m.group(1) for m in REFERENCE.finditer(prose)]


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def resolve(source: Path, target: str) -> tuple[Path, str | None]:
    """The file a relative link points at, and its anchor (None without one)."""
    path, _, anchor = target.partition("#")
    file = (source.parent / unquote(path)).resolve() if path else source
    return file, (unquote(anchor) if anchor else None)


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def broken_links(source: Path) -> list[str]:
    broken = []
    for target in links(read(source)):
        if is_external(target):
            continue
        file, anchor = resolve(source, target)
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor is not None and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading with anchor #{anchor} in {shown(file)})")
        elif anchor is not None and file.suffix != ".md":
            broken.append(f"{target} (an anchor into a file that is not markdown)")
    return broken


# --- the README -------------------------------------------------------------------------------------------------

def test_readme_is_short():
    lines = read(README).splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail into docs/ by topic")


def test_readme_keeps_the_entry_points():
    readme = read(README)
    for command in ("make install", ". .venv/bin/activate", "make report", "make test"):
        assert re.search(rf"^{re.escape(command)}\b", readme, re.M), f"README has no `{command}` command line"
    assert "Set-up (two commands)" in headings(readme), "README has no set-up section"


@pytest.mark.parametrize("source", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(source):
    broken = broken_links(source)
    assert not broken, f"{source.relative_to(ROOT)}: links that do not resolve: {broken}"


def table_of_contents() -> str:
    readme = without_code(read(README))
    match = re.search(rf"^{re.escape(TOC_HEADING)}\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert match, f"README has no table of contents ({TOC_HEADING!r} section)"
    return match.group(1)


def test_every_doc_is_reachable_from_the_table_of_contents():
    docs = set(DOCS.glob("*.md"))
    assert docs, "docs/ holds no markdown file"
    queue = [resolve(README, t)[0] for t in links(table_of_contents()) if not is_external(t)]
    reached: set[Path] = set()
    while queue:
        page = queue.pop()
        if page in reached or page not in docs:
            continue
        reached.add(page)
        queue += [resolve(page, t)[0] for t in links(read(page)) if not is_external(t)]
    unreached = sorted(str(p.relative_to(ROOT)) for p in docs - reached)
    assert not unreached, f"not reachable from the README's table of contents ({TOC_HEADING}): {unreached}"


# --- the checker itself -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("heading, slug", [
    ("Set-up (two commands)", "set-up-two-commands"),
    ("The main job: `make report`", "the-main-job-make-report"),
    ("Portable gates: testbeds, per-testbed baselines and the A/B",
     "portable-gates-testbeds-per-testbed-baselines-and-the-ab"),
    ("The shipped SmolLM2 draft (`dflash/models/smol/draft`, 32 MB)",
     "the-shipped-smollm2-draft-dflashmodelssmoldraft-32-mb"),
    ("Peer benchmark (measured 2026-12-01, `pytest ablations/ --profile smol -k peers --report -p no:xdist`)",
     "peer-benchmark-measured-2026-12-01-pytest-ablations---profile-smol--k-peers---report--p-noxdist"),
    ("See [the docs](docs/x.md) *now*", "see-the-docs-now"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A heading\n\n## A heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md) [ok](other.md#a-heading) [ok](other.md#a-heading-1) [ok](#page)\n"
                    "[bad](missing.md) [bad](other.md#nowhere) [bad](#nowhere) [web](https://example.com/x.md)\n"
                    "`[not a link](missing.md)`\n\n```\n[not a link](missing.md)\n```\n", encoding="utf-8")
    assert broken_links(page) == ["missing.md (no such file)",
                                  "other.md#nowhere (no heading with anchor #nowhere in other.md)",
                                  "#nowhere (no heading with anchor #nowhere in page.md)"]
