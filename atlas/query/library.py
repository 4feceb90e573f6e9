"""The SQL library: named, documented ``queries/*.sql`` files and how to run them with bound parameters.

Each file starts with a header of ``--`` comment lines::

    -- answers: The most frequently firing features per layer and stream.
    -- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
    -- param: k INTEGER = 10 | features per (layer, stream)
    -- columns: layer, stream, feature, firing_count, density

and reads its parameters with ``getvariable('name')``. Through the atlas, each parameter is set
with ``SET VARIABLE name = ?`` and the value bound (never pasted into SQL); from the duckdb CLI
the same file runs as ``SET VARIABLE k = 5; .read queries/top_features.sql`` (unset variables
are NULL, and every file falls back to its documented default with ``coalesce``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

QUERIES_DIR = Path(__file__).resolve().parent.parent.parent / "queries"

_TYPES = {"VARCHAR": str, "INTEGER": int, "BIGINT": int, "DOUBLE": float, "BOOLEAN": bool}
_PARAM = re.compile(r"^(\w+)\s+(\w+)\s*=\s*(.*?)\s*\|\s*(.*)$")


class QueryError(ValueError):
    """Unknown query, unknown or malformed parameter, or a malformed query file."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: object
    doc: str

    def convert(self, value: object) -> object:
        """Convert a command-line string (or Python value) to the declared type; 'NULL' -> None."""
        if value is None or (isinstance(value, str) and value.upper() == "NULL"):
            return None
        py = _TYPES[self.type]
        if py is bool and isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise QueryError(f"parameter {self.name} is BOOLEAN; got {value!r}")
        try:
            return py(value)
        except (TypeError, ValueError):
            raise QueryError(f"parameter {self.name} is {self.type}; got {value!r}") from None


@dataclass(frozen=True)
class NamedQuery:
    """One ``queries/NAME.sql`` file: its documentation header and its SQL."""

    name: str
    path: Path
    answers: str
    params: dict[str, Param] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    sql: str = ""

    def bind(self, given: dict[str, object]) -> dict[str, object]:
        """Full parameter values: declared defaults overridden by ``given`` (converted).

        Raises:
            QueryError: a given parameter the query does not declare (the message lists them).
        """
        unknown = set(given) - set(self.params)
        if unknown:
            raise QueryError(
                f"query {self.name} has no parameter(s) {sorted(unknown)}; parameters: {sorted(self.params) or 'none'}"
            )
        return {n: p.convert(given[n]) if n in given else p.default for n, p in self.params.items()}


def parse_query_file(path: Path) -> NamedQuery:
    """Read a query file's header. Raises QueryError if ``answers`` or ``columns`` is missing."""
    text = path.read_text(encoding="utf-8")
    answers, columns, params = [], [], {}
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        body = line[2:].strip()
        key, _, value = body.partition(":")
        if key == "answers":
            answers.append(value.strip())
        elif key == "columns":
            columns = [c.strip() for c in value.split(",") if c.strip()]
        elif key == "param":
            m = _PARAM.match(value.strip())
            if not m or m.group(2) not in _TYPES:
                raise QueryError(f"{path}: malformed param line {line!r} (expected 'name TYPE = default | doc')")
            name, typ, default, doc = m.groups()
            p = Param(name, typ, None, doc)
            params[name] = Param(name, typ, p.convert(default.strip("'")), doc)
        elif answers and key not in ("param", "columns") and body:
            answers.append(body)  # continuation of the answers paragraph
    if not answers or not columns:
        raise QueryError(f"{path}: header needs '-- answers:' and '-- columns:' lines")
    return NamedQuery(path.stem, path, " ".join(answers), params, columns, text)


def list_queries(directory: Path = QUERIES_DIR) -> dict[str, NamedQuery]:
    """All named queries of the library, by name."""
    return {p.stem: parse_query_file(p) for p in sorted(directory.glob("*.sql"))}


def get_query(name: str, directory: Path = QUERIES_DIR) -> NamedQuery:
    """One named query. Raises QueryError listing the available names if it does not exist."""
    path = directory / f"{name}.sql"
    if not re.fullmatch(r"[A-Za-z0-9_]+", name) or not path.exists():
        raise QueryError(f"no query named {name!r}; available: {', '.join(list_queries(directory))}")
    return parse_query_file(path)
