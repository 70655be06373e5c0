"""The documentation agrees with the code and with itself.

The field table of docs/usage.md lists every LevyArguments field with its declared default and nothing
else, every relative link in the README and docs/ reaches a file (and a heading, when it names one), and
the quickstart's example is the README's, which tests/test_readme.py runs.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from hf_levy.config import LevyArguments

ROOT = pathlib.Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def _prose(path: pathlib.Path) -> str:
    """The file without its fenced code blocks (their `#` lines are comments, not headings)."""
    return FENCE.sub("", path.read_text())


def _field_table() -> dict[str, str]:
    """The rows of the table under '## Fields' in docs/usage.md: field name -> default cell."""
    section = _prose(ROOT / "docs" / "usage.md").split("\n## Fields\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0].startswith("`"):
            assert cells[0] not in rows, f"docs/usage.md lists {cells[0]} twice"
            rows[cells[0].strip("`")] = cells[1]
    assert rows, "docs/usage.md has no field table under '## Fields'"
    return rows


def _default_matches(cell: str, default: object) -> bool:
    """Whether a table cell writes ``default``: strings, None and booleans in backticks, numbers bare."""
    if isinstance(default, bool) or default is None or isinstance(default, str):
        return cell == f"`{default}`"
    try:
        return float(cell) == default
    except ValueError:
        return False


def test_usage_field_table_lists_every_levy_field_with_its_default():
    rows = _field_table()
    fields = {f.name: f for f in dataclasses.fields(LevyArguments)}
    missing = sorted(set(fields) - set(rows))
    unknown = sorted(set(rows) - set(fields))
    assert not missing, f"LevyArguments fields missing from the table in docs/usage.md: {missing}"
    assert not unknown, f"docs/usage.md's table names fields LevyArguments does not have: {unknown}"
    wrong = {
        name: (rows[name], f.default)
        for name, f in fields.items()
        if f.default is dataclasses.MISSING or not _default_matches(rows[name], f.default)
    }
    assert not wrong, f"docs/usage.md defaults (table cell, declared default) that disagree: {wrong}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_reach_a_file_and_a_heading():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
            if re.match(r"[a-z]+:", target):  # http(s), mailto
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no file)")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", _prose(dest), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_quickstart_example_is_the_readme_example():
    def first_python_block(path: pathlib.Path) -> str:
        return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)[0]

    assert first_python_block(ROOT / "docs" / "quickstart.md") == first_python_block(ROOT / "README.md"), (
        "docs/quickstart.md's example differs from the README's (tests/test_readme.py runs the README's): "
        "copy the README's block into the quickstart"
    )


def test_no_reference_to_the_old_homes_of_the_research_records():
    old = re.compile(r"docs/(results|benchmarks|test_strength)\.md")
    folders = ("hf_levy", "tests", "benchmarks", "examples", "docs", ".ci")
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Makefile"]
    files += [p for folder in folders for p in (ROOT / folder).rglob("*") if p.is_file()]
    stale = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        if path.suffix in {"", ".md", ".py", ".yaml", ".json"} and path != pathlib.Path(__file__)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if old.search(line)
    ]
    assert not stale, f"references to docs/<record>.md, now docs/research/<record>.md: {stale}"
