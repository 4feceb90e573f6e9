"""Prompt files: plain text (one prompt a line), TSV with a ``Prompt`` column, JSONL with ``prompt``.

Line endings may be LF or CRLF; text must be UTF-8 (a BOM is allowed). Blank lines (and rows
whose prompt is blank) are skipped and counted, never silently dropped.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class Prompt:
    """One prompt as read: its text and where it came from (1-based line number)."""

    text: str
    source_file: str
    source_line: int


@dataclass
class PromptSet:
    """The prompts of one file, in file order, and how many blank lines were skipped."""

    path: Path
    format: str
    prompts: list[Prompt] = field(default_factory=list)
    blank_lines: int = 0


def _decoded_lines(path: Path) -> list[str]:
    """Lines of the file without their line endings; raises PromptFileError on bad UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PromptFileError(f"cannot read prompt file {path}: {e.strerror}") from e
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptFileError(
                f"{path}: line {number} is not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                "re-encode the file as UTF-8"
            ) from e
        lines.append(text.rstrip("\r"))
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return lines


def detect_format(path: Path) -> str:
    """``tsv``, ``jsonl`` or ``txt``, from the file name's suffix."""
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "tsv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    return "txt"


def read_prompts(path: str | Path, limit: int | None = None) -> PromptSet:
    """Read a prompt file.

    Args:
        path: ``.tsv`` (header row with a ``Prompt`` column, e.g. PartiPrompts; fields are
            tab-separated and not quoted), ``.jsonl`` (one object per line with a ``prompt``
            string), anything else: one prompt per line.
        limit: keep at most this many prompts (blank lines do not count).

    Raises:
        PromptFileError: unreadable file, invalid UTF-8 (with the line number), a TSV without a
            ``Prompt`` column, a JSONL line that is not an object with a string ``prompt``, or a
            file with no prompt at all.
    """
    path = Path(path)
    fmt = detect_format(path)
    lines = _decoded_lines(path)
    out = PromptSet(path=path, format=fmt)
    start = 1
    column = None
    if fmt == "tsv":
        if not lines:
            raise PromptFileError(f"{path}: empty TSV file (a header row with a 'Prompt' column is required)")
        header = lines[0].split("\t")
        if "Prompt" not in header:
            raise PromptFileError(f"{path}: line 1: TSV header has no 'Prompt' column (found {header})")
        column = header.index("Prompt")
        start = 2
    for number, line in enumerate(lines[start - 1 :], start=start):
        if limit is not None and len(out.prompts) >= limit:
            break
        if fmt == "tsv":
            fields = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE)) if line else []
            text = fields[column] if column < len(fields) else ""
        elif fmt == "jsonl":
            if not line.strip():
                text = ""
            else:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{path}: line {number}: not valid JSON ({e.msg})") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise PromptFileError(f"{path}: line {number}: expected an object with a string 'prompt' field")
                text = obj["prompt"]
        else:
            text = line
        text = text.strip()
        if not text:
            out.blank_lines += 1
            continue
        out.prompts.append(Prompt(text=text, source_file=str(path), source_line=number))
    if not out.prompts:
        raise PromptFileError(f"{path}: no prompts found ({out.blank_lines} blank lines)")
    return out
