"""The README's Tour as data: its commands, the output it shows for them, and the placeholders
(`4f0c...`, `sha256:9a7e...`) that stand for values an earlier command printed.

Only the `## Tour` section is read (up to the next `## ` heading, its `###` subsections
included), and in it only the ```sh blocks. A command is a `lora-reg ...` or `export ...` line,
`\\` continuations joined, its trailing `# comment` kept apart. A `# ...` line at column 0 right
under a `lora-reg` command (or under such a line) is the output the README shows for it; any
other comment line is prose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOUR_HEADING = "## Tour"
COMMAND_PREFIXES = ("lora-reg ", "export ")

# A value the README abbreviates: four hex digits and an ellipsis (`4f0c...`, `sha256:9a7e...`).
PLACEHOLDER = re.compile(r"(?<![0-9a-zA-Z])[0-9a-f]{4}\.\.\.")
# A size as `lora-reg` prints it (`0 B`, `25.3 MiB`): the README's numbers are examples.
SIZE = re.compile(r"\d+(?:\.\d+)? (?:B|KiB|MiB|GiB)\b")
# `$(...)`: a shell command substitution (no nesting in the tour).
COMMAND_SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
# `[--flag]`: an optional part of a command, as the README writes it.
OPTIONAL_PART = re.compile(r" \[(--[^\]]+)\]")


@dataclass(frozen=True)
class TourCommand:
    line: int  # README line number (1-based) where the command starts
    text: str  # the command: continuations joined, trailing comment dropped
    comment: str = ""  # its trailing comment, without the `#`
    output: tuple[str, ...] = ()  # the output the README shows under it

    @property
    def is_cli(self) -> bool:
        return self.text.startswith("lora-reg ")


def tour_lines(readme: str) -> list[tuple[int, str]]:
    """(line number, line) of the Tour section: from its heading to the next `## ` heading."""
    lines = readme.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == TOUR_HEADING]
    assert len(starts) == 1, f"README needs exactly one {TOUR_HEADING!r} heading"
    section: list[tuple[int, str]] = []
    for number, line in enumerate(lines[starts[0] + 1 :], start=starts[0] + 2):
        if line.startswith("## "):
            break
        section.append((number, line))
    return section


def sh_blocks(section: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The lines of every ```sh block of a section."""
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] | None = None
    for number, line in section:
        fence = line.strip()
        if current is None:
            if fence == "```sh":
                current = []
        elif fence == "```":
            blocks.append(current)
            current = None
        else:
            current.append((number, line))
    assert current is None, "an unclosed ```sh block in the Tour"
    return blocks


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: `#` starts a comment outside quotes, at the start of a
    word (`$(...)` may hold neither)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def parse_tour(readme: str) -> list[TourCommand]:
    """Every command of the Tour's ```sh blocks, in order, with the output shown under it."""
    commands: list[TourCommand] = []
    for block in sh_blocks(tour_lines(readme)):
        pending: list[str] = []  # continuation lines of a command being joined
        start = 0
        after_cli = False  # the previous line was a lora-reg command or its output
        for number, raw in block:
            if not pending and raw.lstrip().startswith("#"):
                if raw.startswith("#") and after_cli:
                    last = commands[-1]
                    output = (*last.output, raw[1:].strip())
                    commands[-1] = TourCommand(last.line, last.text, last.comment, output)
                else:
                    after_cli = False
                continue
            code, comment = split_comment(raw)
            if not pending:
                start = number
            if code.endswith("\\"):
                pending.append(code[:-1].strip())
                continue
            text = " ".join([*pending, code.strip()])
            pending = []
            after_cli = False
            if text.startswith(COMMAND_PREFIXES):
                commands.append(TourCommand(start, text, comment))
                after_cli = text.startswith("lora-reg ")
        assert not pending, f"a `\\` continuation runs off the end of a block (line {start})"
    return commands


def output_pattern(documented: str) -> re.Pattern[str]:
    """A pattern for one line of output the README shows: placeholders become capture groups of
    hex digits, sizes match any size, whitespace any whitespace, and a run of two or more spaces
    (the README's way to shorten a multi-line output onto one line) anything."""
    pieces: list[str] = []
    for segment in re.split(r" {2,}", documented.strip()):
        if pieces:
            pieces.append(r".*?")
        position = 0
        for found in re.finditer(rf"{PLACEHOLDER.pattern}|{SIZE.pattern}|\s+", segment):
            pieces.append(re.escape(segment[position : found.start()]))
            token = found.group()
            if PLACEHOLDER.fullmatch(token):
                pieces.append(r"([0-9a-f]{8,})")
            elif token.isspace():
                pieces.append(r"\s+")
            else:
                pieces.append(SIZE.pattern)
            position = found.end()
        pieces.append(re.escape(segment[position:]))
    return re.compile("".join(pieces), re.S)


def match_output(documented: tuple[str, ...], actual: str) -> dict[str, str]:
    """Check that `actual` shows every documented line, in order; return the placeholders they
    hold (`4f0c...` -> the full hex value printed in its place)."""
    bindings: dict[str, str] = {}
    position = 0
    for line in documented:
        found = output_pattern(line).search(actual, position)
        assert found is not None, (
            f"the README shows this output line:\n    # {line}\nbut the command printed:\n{actual}"
        )
        bindings.update(zip(PLACEHOLDER.findall(line), found.groups(), strict=True))
        position = found.end()
    return bindings


def fill_placeholders(text: str, bindings: dict[str, str]) -> str:
    """Replace every placeholder by the value an earlier command printed in its place."""

    def value(found: re.Match[str]) -> str:
        placeholder = found.group()
        assert placeholder in bindings, (
            f"{placeholder} in `{text}` stands for a value no earlier command of the tour showed "
            f"(known: {sorted(bindings)})"
        )
        return bindings[placeholder]

    return PLACEHOLDER.sub(value, text)
