"""Analysis pages: corpus-wide analyses that are named queries of the SQL library.

The report knows the analyses by name (:data:`ANALYSES`). An analysis whose query file
(``queries/<name>.sql``) exists is run with its default parameters and its rows are shown as a
table; one that does not exist yet gets a "not computed yet" page. Cells are linked where the
row says what they are:

- ``run_id`` + ``prompt_id`` (or list columns named ``prompt_ids`` / ``*_prompt_ids``): the
  evidence prompts, linked to their pages with a thumbnail of the generated image (grouped by
  column, e.g. error vs correct generations);
- ``layer`` + ``stream`` + ``feature``, or a string like ``L3.img.644``: a feature page link;
- ``graph_id``: the graph's page.

An analysis whose query needs a table the atlas does not have yet (e.g. ``generation_errors``
before errors are labelled) is "not computed yet" too, naming the table. The rows of the
``generation_errors`` query are shown on their prompts' pages as the generation's errors.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from atlas.query import Atlas, get_query
from atlas.query.library import QueryError
from atlas.report import links
from atlas.report.svg import fmt

MAX_ROWS = 500
MAX_EVIDENCE = 12
_FEATURE_KEY = re.compile(r"^L(\d+)\.(img|txt)\.(\d+)$")


@dataclass(frozen=True)
class AnalysisSpec:
    """A known analysis: its query name, title and what it answers."""

    name: str
    title: str
    about: str


ANALYSES = [
    AnalysisSpec("recurring_circuits", "Recurring circuits",
                 "Sub-circuits (feature-to-feature paths) that recur across the attribution graphs of many prompts."),
    AnalysisSpec("attribute_binding", "Attribute binding",
                 "How attributes such as colours and shapes are bound to their objects: the features and "
                 "edges that carry an attribute from its token to the object's patches."),
    AnalysisSpec("error_explanations", "Error explanations",
                 "Generations with errors (missing objects, colour leakage, swapped attributes) and the "
                 "circuits that explain them."),
]


@dataclass
class AnalysisResult:
    """An analysis as the page shows it: status, columns and linked cells."""

    spec: AnalysisSpec
    status: str  # "ok", "missing" (no query, or a table it reads is absent) or "failed"
    message: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[dict]] = field(default_factory=list)
    evidence: list[list[tuple[str, list[dict]]]] = field(default_factory=list)  # per row: (column, prompts)
    n_rows: int = 0
    answers: str = ""


class Linker:
    """Turns ids in result rows into links to the report's pages (only to pages that exist)."""

    def __init__(self, data, root: str):
        self.data, self.root = data, root
        self.graph_ids = {g["graph_id"]: g["run_id"] for g in data.graphs}
        self.only_run = data.runs[0]["run_id"] if len(data.runs) == 1 else None

    def feature(self, run_id, layer, stream, feature) -> str | None:
        """URL of a feature page, or None if the report has no page for it."""
        run_id = run_id or self.only_run
        try:
            key = (run_id, int(layer), str(stream), int(feature))
        except (TypeError, ValueError):
            return None
        return self.root + links.feature_page(*key) if key in self.data.feature_set else None

    def prompt(self, run_id, prompt_id) -> dict | None:
        """Link and thumbnail of a prompt page, or None if the report has no page for it."""
        run_id = run_id or self.only_run
        try:
            p = self.data.prompt_by_id.get((run_id, int(prompt_id)))
        except (TypeError, ValueError):
            return None
        if p is None:
            return None
        return {"href": self.root + links.prompt_page(run_id, p["prompt_id"]), "text": p["text"],
                "img": self.root + links.image_file(run_id, p["prompt_id"]) if p["image_path"] else None,
                "prompt_id": p["prompt_id"]}

    def graph(self, graph_id) -> str | None:
        """URL of a graph page, or None."""
        run = self.graph_ids.get(graph_id)
        return self.root + links.graph_page(run, graph_id) if run is not None else None


def _cells(row: dict, columns: list[str], linker: Linker) -> tuple[list[dict], list[tuple[str, list[dict]]]]:
    run = row.get("run_id")
    cells, evidence = [], []
    feature_href = None
    if {"layer", "stream", "feature"} <= row.keys():
        feature_href = linker.feature(run, row["layer"], row["stream"], row["feature"])
    for col in columns:
        v = row[col]
        href = None
        if col == "feature" and feature_href:
            href = feature_href
        elif col == "graph_id" and v is not None:
            href = linker.graph(v)
        elif col == "prompt_id" and v is not None:
            p = linker.prompt(run, v)
            if p:
                href = p["href"]
                evidence.append((col, [p]))
        elif (col == "prompt_ids" or col.endswith("_prompt_ids")) and isinstance(v, list):
            prompts = [p for p in (linker.prompt(run, x) for x in v[:MAX_EVIDENCE]) if p]
            if prompts:
                evidence.append((col.removesuffix("prompt_ids").rstrip("_") or "prompts", prompts))
            v = f"{len(v)} generation{'s' if len(v) != 1 else ''}"
        elif isinstance(v, str) and (m := _FEATURE_KEY.match(v)):
            href = linker.feature(run, m.group(1), m.group(2), m.group(3))
        text = fmt(v) if isinstance(v, float) else ("—" if v is None else str(v))
        cells.append({"text": text, "href": href})
    return cells, evidence


_MISSING_TABLE = re.compile(r"Table with name (\w+) does not exist")


def run_analyses(atlas: Atlas, data, root: str = "../") -> tuple[list[AnalysisResult], dict[tuple, list[list]] | None]:
    """Run every known analysis whose query exists; returns the results and the generation errors
    by (run_id, prompt_id) from the ``generation_errors`` query (each a list of (column, value); an
    empty list for a generation checked and found correct), or None where the atlas has no error labels."""
    results = []
    linker = Linker(data, root)
    for spec in ANALYSES:
        frame, res = _run(atlas, spec)
        if frame is None:
            results.append(res)
            continue
        for row in frame.head(MAX_ROWS).iter_rows(named=True):
            cells, evidence = _cells(row, res.columns, linker)
            res.rows.append(cells)
            res.evidence.append(evidence)
        results.append(res)
    errors: dict[tuple, list[list]] = defaultdict(list)
    frame, _ = _run(atlas, AnalysisSpec("generation_errors", "Generation errors", ""))
    if frame is None or not {"run_id", "prompt_id"} <= set(frame.columns):
        return results, None
    for row in frame.iter_rows(named=True):
        errors[(row["run_id"], row["prompt_id"])].append(
            [(k, fmt(v) if isinstance(v, float) else str(v)) for k, v in row.items()
             if k not in ("run_id", "prompt_id", "text", "seed") and v is not None])
    try:                                  # generations checked and found correct: an empty list
        checked = atlas.query("generation_errors", error_type="none")
    except QueryError:                    # a user's generation_errors.sql without that parameter
        checked = frame.clear()
    for row in checked.iter_rows(named=True):
        errors.setdefault((row["run_id"], row["prompt_id"]), [])
    return results, dict(errors)


def _run(atlas: Atlas, spec: AnalysisSpec):
    """(frame, result): the query's rows, or None and why not (missing query or table, failure)."""
    if not (Path(atlas.queries_dir) / f"{spec.name}.sql").is_file():
        return None, AnalysisResult(spec, "missing")
    try:
        answers = get_query(spec.name, Path(atlas.queries_dir)).answers
        frame = atlas.query(spec.name)
    except Exception as e:  # noqa: BLE001 - any failure is shown on the page, not fatal
        m = _MISSING_TABLE.search(str(e))
        if m:
            return None, AnalysisResult(spec, "missing", f"the atlas has no table {m.group(1)} yet")
        return None, AnalysisResult(spec, "failed", f"{type(e).__name__}: {e}")
    return frame, AnalysisResult(spec, "ok", columns=list(frame.columns), n_rows=len(frame), answers=answers)
