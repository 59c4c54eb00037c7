"""docs/README.md is the index of docs/: every page listed exactly once, with who it is for and a line
about it, and every link in it leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
INDEX = DOCS / "README.md"
AUDIENCES = {"student", "admin", "maintainer"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
ROW = re.compile(r"^\|\s*\[[^\]]*\]\(([^)\s#]+)\)\s*\|([^|]*)\|([^|]*)\|\s*$")


def links(text: str) -> list[str]:
    """Relative link targets without their #anchor."""
    return [t.split("#", 1)[0] for t in LINK.findall(text) if "://" not in t and not t.startswith("#")]


def test_every_page_under_docs_is_listed_once() -> None:
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")} - {"README.md"}
    rows = [m.group(1) for line in INDEX.read_text().splitlines() if (m := ROW.match(line))]
    assert sorted(set(rows)) == sorted(rows), (
        f"listed twice: {sorted({r for r in rows if rows.count(r) > 1})}"
    )
    assert set(rows) >= pages, f"not in docs/README.md: {sorted(pages - set(rows))}"


def test_every_listed_page_says_who_it_is_for_and_what_it_is() -> None:
    for line in INDEX.read_text().splitlines():
        if m := ROW.match(line):
            who = {w.strip() for w in m.group(2).split(",")}
            assert who and who <= AUDIENCES, f"{m.group(1)}: audience {m.group(2).strip()!r}"
            assert len(m.group(3).strip()) >= 20, f"{m.group(1)}: say in a line what the page is"


def test_every_link_in_the_index_resolves() -> None:
    targets = links(INDEX.read_text())
    assert targets
    for target in targets:
        assert (DOCS / target).resolve().exists(), f"docs/README.md: broken link {target}"


def slug(heading: str) -> str:
    """The anchor a Markdown heading gets (GitHub/GitLab style)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_anchors_of_links_between_pages_exist() -> None:
    """A link `page.md#section` (README and every page under docs/) names a heading of that page."""
    for page in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            path, _, anchor = target.partition("#")
            if "://" in target or not anchor or not (path.endswith(".md") or not path):
                continue
            linked = (page.parent / path).resolve() if path else page
            headings = re.findall(r"^#+ +(.+?)\s*$", linked.read_text(), flags=re.MULTILINE)
            assert anchor in {slug(h) for h in headings}, (
                f"{page.relative_to(REPO)}: no section #{anchor} in {path}"
            )
