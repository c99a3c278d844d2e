"""docs/layout.md names every package folder and every module of dflash/ (the variants: in the variant table of
docs/variants.md), so it cannot drift from the tree."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_block() -> str:
    layout = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    match = re.search(r"^```\n(.*?)^```", layout, re.S | re.M)
    assert match, "docs/layout.md has no code block with the layout map"
    return match.group(1)


def test_layout_names_every_folder_and_module():
    block = layout_block()
    package = ROOT / "dflash"
    folders = [p for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    missing = [f"dflash/{p.name}/" for p in folders if f"dflash/{p.name}/" not in block]
    variants = (ROOT / "docs" / "variants.md").read_text(encoding="utf-8")
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
