"""Docstrings cite docs/design.md by section title: every cited section exists, and no file cites a design
document outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("spikelm", "kernels", "tests", "tools") for p in (ROOT / folder).rglob("*.py")
           if p != Path(__file__).resolve()]  # this file's own examples are not citations
# ``docs/design.md, "Title"`` or ``docs/design.md, "One", "Two"``, possibly across a line break.
CITATION = re.compile(r'docs/design\.md,\s*((?:"[^"\n]+"[ \t]*,?\s*)+)')


def cited_sections() -> dict[str, set[str]]:
    cited: dict[str, set[str]] = {}
    for path in SOURCES:
        for group in CITATION.findall(path.read_text(encoding="utf-8")):
            for title in re.findall(r'"([^"\n]+)"', group):
                cited.setdefault(title, set()).add(str(path.relative_to(ROOT)))
    return cited


def test_every_cited_section_of_the_design_doc_exists():
    headings = set(re.findall(r"^#+ (.+?)\s*$", (ROOT / "docs" / "design.md").read_text(), flags=re.MULTILINE))
    cited = cited_sections()
    assert {"The model", "Neurons", "Kernels", "Sparsity and energy"} <= set(cited)  # the regex finds citations
    missing = {title: sorted(files) for title, files in cited.items() if title not in headings}
    assert not missing, f"sections cited but not in docs/design.md: {missing}"


def test_nothing_cites_a_design_document_outside_the_repository():
    outside = "DESIGN" + ".md"  # the upper-case name of the pre-repository design notes
    texts = SOURCES + [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    offenders = [str(p.relative_to(ROOT)) for p in texts if outside in p.read_text(encoding="utf-8")]
    assert not offenders, f"{outside} is not in the repository; cite docs/design.md instead: {offenders}"
