"""The repository cites only documents it holds.

A Markdown file cited in the README, in docs/, in bench/README.md or in a comment or docstring of
any module under registry/, cli/, worker/, migrations/, tests/ and bench/ must be a file of this
repository, relative to its root or to docs/; a section cited right after it (`§3`, `§8-9`,
`§1, §2 and §4`, `section 6`, or a heading's title in double quotes) must be a heading of that
file (`## 3. Names and references`, `### Errors`). A reader who follows a citation finds it here,
and renumbering a document breaks the test instead of the citations (docs/architecture.md §16).

String literals in code are data (the file names of test adapters, a merged model's card), not
citations: only comments and docstrings count.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("registry", "cli", "worker", "migrations", "tests", "bench")
SEARCHED = (ROOT, ROOT / "docs")

# A file name ending in .md, not part of a longer path, a URL or a glob.
_NAME = re.compile(r"(?<![\w./:*-])(?P<name>[\w./-]*\w\.md)\b")
# What may close the name before its section: a closing backtick, a link's ) or ].
_CLOSERS = re.compile(r"[`)\]]*")
_NUMBER = r"\d+(?:\.\d+)*"
_SPAN = rf"(?P<first>{_NUMBER})(?:\s*[-\u2013]\s*§?\s*(?P<last>{_NUMBER}))?"
_FIRST = re.compile(rf"\s*(?:§\s*|[Ss]ections?\s+){_SPAN}")
_MORE = re.compile(rf"(?:\s*,\s*|\s+and\s+|\s+or\s+)§\s*{_SPAN}")
_TITLE = re.compile(r'\s*"(?P<title>[^"\n]{1,80})"')
_HEADING = re.compile(r"(?P<hashes>#{1,6})\s+(?P<text>.+?)\s*#*\s*$")
_HEADING_NUMBER = re.compile(rf"(?P<number>{_NUMBER})\.?(?:\s|$)")
_FENCE = re.compile(r"\s*(```|~~~)")


@dataclass(frozen=True)
class Citation:
    source: str  # where it is cited: path:line
    name: str  # the cited file, as written
    sections: tuple[str, ...] = ()  # heading numbers, e.g. ("8", "9")
    title: str | None = None  # a heading's title, e.g. "Errors"

    def __str__(self) -> str:
        cited = " ".join([self.name, *(f"§{s}" for s in self.sections)])
        return f"{self.source}: {cited}{f' {self.title!r}' if self.title else ''}"


def _span(match: re.Match[str]) -> list[str]:
    first, last = match.group("first"), match.group("last")
    if last is None:
        return [first]
    if first.isdigit() and last.isdigit() and int(first) < int(last):
        return [str(n) for n in range(int(first), int(last) + 1)]
    return [first, last]


def citations_in(text: str, source: str, first_line: int = 1) -> list[Citation]:
    """The documents `text` cites, with the sections cited right after each."""
    found = []
    for match in _NAME.finditer(text):
        position = _CLOSERS.match(text, match.end())
        assert position is not None  # `*` always matches
        at = position.end()
        sections: list[str] = []
        title = None
        if numbered := _FIRST.match(text, at):
            sections += _span(numbered)
            at = numbered.end()
            while more := _MORE.match(text, at):
                sections += _span(more)
                at = more.end()
        elif quoted := _TITLE.match(text, at):
            title = quoted.group("title")
        line = first_line + text.count("\n", 0, match.start())
        found.append(Citation(f"{source}:{line}", match.group("name"), tuple(sections), title))
    return found


def prose_of_python(source: str) -> list[tuple[int, str]]:
    """(first line, text) of every docstring and every block of consecutive comment lines."""
    pieces: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                pieces.append((first.lineno, first.value.value))
    block: list[str] = []
    start = last = 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        line = token.start[0]
        if block and line != last + 1:
            pieces.append((start, "\n".join(block)))
            block = []
        if not block:
            start = line
        block.append(token.string.lstrip("#").strip())
        last = line
    if block:
        pieces.append((start, "\n".join(block)))
    return pieces


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted(ROOT.glob("docs/*.md"))]


def python_files() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@cache
def all_citations() -> tuple[Citation, ...]:
    found = []
    for path in markdown_files():
        found += citations_in(path.read_text(encoding="utf-8"), relative(path))
    for path in python_files():
        source = path.read_text(encoding="utf-8")
        if ".md" not in source:
            continue  # nothing to cite; parsing every module would cost seconds
        for line, text in prose_of_python(source):
            found += citations_in(text, relative(path), line)
    return tuple(found)


def resolve(name: str) -> Path | None:
    """The repository file a citation names (relative to the root or to docs/), or None. A
    name that leads outside the repository (an absolute path, `..`) is never one."""
    for folder in SEARCHED:
        path = (folder / name).resolve()
        if path.is_relative_to(ROOT) and path.is_file():
            return path
    return None


def headings(path: Path) -> list[str]:
    """The text of every Markdown heading of `path`, outside fenced code blocks."""
    texts = []
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (heading := _HEADING.match(line)):
            texts.append(heading.group("text"))
    return texts


def heading_numbers(path: Path) -> set[str]:
    return {m.group("number") for text in headings(path) if (m := _HEADING_NUMBER.match(text))}


# --- the scanner itself ------------------------------------------------------------------------

SAMPLE = '''"""Module docs (guide.md §3), see also notes.md section
12 and other.md §8-9."""

FILES = ["data.md"]  # the layout of design.md "Errors", as in plan.md §1, §2 and §4


def f() -> None:
    """What spec.md says."""
    # cited across lines: format.md
    # §6
'''


def test_the_scanner_reads_docstrings_and_comments_not_string_literals() -> None:
    found = [
        str(citation)
        for line, text in prose_of_python(SAMPLE)
        for citation in citations_in(text, "sample.py", line)
    ]
    assert sorted(found) == sorted(
        [
            "sample.py:1: guide.md §3",
            "sample.py:1: notes.md §12",
            "sample.py:2: other.md §8 §9",
            "sample.py:4: design.md 'Errors'",
            "sample.py:4: plan.md §1 §2 §4",
            "sample.py:8: spec.md",
            "sample.py:9: format.md §6",
        ]
    )


def test_urls_globs_and_longer_names_are_not_citations() -> None:
    text = "https://example.com/a/guide.md, docs/*.md, a.mdx, `docs/architecture.md`) §2"
    assert [str(c) for c in citations_in(text, "x")] == ["x:1: docs/architecture.md §2"]


def test_names_outside_the_repository_never_resolve() -> None:
    outside = ROOT.parent / "outside-the-repository.md"
    assert resolve(str(outside)) is None
    assert resolve("../" + outside.name) is None
    assert resolve("README.md") == ROOT / "README.md"
    assert resolve("architecture.md") == ROOT / "docs" / "architecture.md"


def test_every_source_is_scanned() -> None:
    names = {relative(path) for path in markdown_files()}
    assert {"README.md", "bench/README.md", "docs/architecture.md", "docs/peft-format.md"} <= names
    assert len(python_files()) > 50
    assert any(c.name.endswith("architecture.md") for c in all_citations())


# --- the repository ----------------------------------------------------------------------------


def test_every_cited_document_is_in_the_repository() -> None:
    missing = [str(c) for c in all_citations() if resolve(c.name) is None]
    assert missing == [], "cited documents that are not in the repository:\n" + "\n".join(missing)


def test_every_cited_section_is_a_heading_of_its_document() -> None:
    wrong = []
    for citation in all_citations():
        path = resolve(citation.name)
        if path is None:
            continue  # reported by the test above
        numbers = heading_numbers(path)
        if any(section not in numbers for section in citation.sections):
            wrong.append(f"{citation} (its numbered sections: {sorted(numbers, key=_order)})")
        if citation.title and not any(
            citation.title.lower() in text.lower() for text in headings(path)
        ):
            wrong.append(f"{citation} (no heading has that title)")
    assert wrong == [], "cited sections that do not exist:\n" + "\n".join(wrong)


def _order(number: str) -> list[int]:
    return [int(part) for part in number.split(".")]


@pytest.mark.parametrize(
    ("document", "sections"),
    [("docs/architecture.md", range(1, 17)), ("docs/peft-format.md", range(1, 8))],
)
def test_the_cited_documents_keep_their_section_numbers(document: str, sections: range) -> None:
    assert {str(n) for n in sections} <= heading_numbers(ROOT / document)
