"""Generation errors: what is wrong with a generated image, per generation (table
``generation_errors``), from a user's labels or from a checker where one exists.

Two sources fill the table (`atlas label-errors`):

- **Labels** (:func:`import_labels`): a CSV file (header row) or JSONL file (one object a line)
  with one row per error, or per generation checked and found correct (``error_type`` ``none``,
  ``correct``, ``ok`` or empty). Fields: ``prompt_id`` (required; the generation,
  ``prompts.prompt_id``), ``error_type`` (required), and optionally ``run_id`` (required when the
  atlas holds several runs and ``--run-id`` is not given), ``object_index``, ``object``,
  ``attribute``, ``expected``, ``observed``, ``note``, and ``text`` (checked against the
  generation's prompt, to catch labels meant for another atlas). Every line is validated first:
  malformed lines (bad JSON or CSV, missing or non-integer prompt_id, missing error_type, unknown
  fields) and unknown prompt ids are reported by line number and **nothing is changed**, unless
  ``skip_bad`` is set, in which case the good lines are imported and the bad ones listed. A file's
  labels replace the ones imported earlier from a file of the same name (``source`` =
  ``labels:<name>``), so re-importing a corrected file is safe.
- **The toy world's pixel oracle** (:func:`check_with_oracle`, optional: ``atlas.toy.oracle`` is
  imported only when asked for): judges every stored image whose prompt is in the toy grammar and
  writes its verdicts (``source`` = ``oracle``), replacing earlier oracle rows of the run.

No torch here (the oracle is numpy-only; images are read with Pillow).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from atlas.query.api import Atlas
from atlas.query.derived import prepare_atlas, replace_rows

__all__ = ["LabelError", "LabelProblem", "LabelImport", "OracleUnavailable", "read_labels", "import_labels",
           "check_with_oracle", "LABEL_FIELDS", "CORRECT_WORDS"]

#: Fields a labels file may carry.
LABEL_FIELDS = ("run_id", "prompt_id", "error_type", "object_index", "object", "attribute", "expected", "observed",
                "note", "text")
#: error_type values meaning "checked, no error" (stored as ``none``).
CORRECT_WORDS = ("none", "correct", "ok", "")
_TYPE = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")


class LabelError(ValueError):
    """A labels file with bad lines (and skip_bad not set): nothing was imported. ``problems`` lists them."""

    def __init__(self, path: str | Path, problems: list["LabelProblem"]):
        self.problems = problems
        shown = "\n".join(f"  line {p.line}: {p.message}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{path}: {len(problems)} bad line(s); nothing was imported "
                         f"(fix them, or pass --skip-bad to import the other lines):\n{shown}{more}")


class OracleUnavailable(RuntimeError):
    """The toy world's oracle (atlas.toy.oracle) or Pillow is not installed."""


@dataclass(frozen=True)
class LabelProblem:
    """A bad line of a labels file: 1-based line number and what is wrong."""

    line: int
    message: str


@dataclass
class LabelImport:
    """What :func:`import_labels` or :func:`check_with_oracle` did."""

    source: str
    rows_written: int = 0
    generations: int = 0
    errors: int = 0
    correct: int = 0
    skipped: list[LabelProblem] = field(default_factory=list)
    unjudged: int = 0


def read_labels(path: str | Path) -> tuple[list[tuple[int, dict]], list[LabelProblem]]:
    """Parse a labels file (``.csv`` or ``.jsonl``/``.json``/``.ndjson``) without touching an atlas.

    Returns ``(records, problems)``: records are ``(line number, normalised dict)`` for well-formed
    lines (prompt_id and object_index as int, error_type lower-case with correct words mapped to
    ``none``); problems are the malformed lines. Blank lines are skipped. Raises ValueError for
    another file extension and OSError if the file cannot be read.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson", ".json"):
        raise ValueError(f"{path}: labels must be .csv or .jsonl, not {suffix or 'no extension'!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        return [], [LabelProblem(1, f"not UTF-8 text ({e})")]
    raw: list[tuple[int, object]] = []
    problems: list[LabelProblem] = []
    if suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as e:
            return [], [LabelProblem(reader.line_num or 1, f"malformed CSV: {e}")]
        if not rows:
            return [], [LabelProblem(1, "empty file: expected a header row with prompt_id and error_type")]
        header = [h.strip() for h in rows[0]]
        unknown = [h for h in header if h not in LABEL_FIELDS]
        missing = [h for h in ("prompt_id", "error_type") if h not in header]
        if unknown or missing:
            msg = []
            if missing:
                msg.append(f"header lacks {', '.join(missing)}")
            if unknown:
                msg.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
            return [], [LabelProblem(1, "; ".join(msg) + f" (columns: {', '.join(LABEL_FIELDS)})")]
        for i, row in enumerate(rows[1:], start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                problems.append(LabelProblem(i, f"{len(row)} field(s), the header has {len(header)}"))
                continue
            raw.append((i, dict(zip(header, row))))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(LabelProblem(i, f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(obj, dict):
                problems.append(LabelProblem(i, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            raw.append((i, obj))
    records = []
    for i, obj in raw:
        rec, msg = _normalise(obj)
        if msg:
            problems.append(LabelProblem(i, msg))
        else:
            records.append((i, rec))
    problems.sort(key=lambda p: p.line)
    return records, problems


def _normalise(obj: dict) -> tuple[dict | None, str | None]:
    unknown = [k for k in obj if k not in LABEL_FIELDS]
    if unknown:
        return None, f"unknown field(s) {', '.join(map(repr, unknown))} (fields: {', '.join(LABEL_FIELDS)})"
    rec = {k: (v.strip() if isinstance(v, str) else v) for k, v in obj.items()}
    for k in ("object", "attribute", "expected", "observed", "note", "text", "run_id"):
        if rec.get(k) == "":
            rec[k] = None
        elif rec.get(k) is not None and not isinstance(rec[k], str):
            rec[k] = str(rec[k])
    for k in ("prompt_id", "object_index"):
        v = rec.get(k)
        if v is None or v == "":
            rec[k] = None
            continue
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            return None, f"{k} must be an integer, got {v!r}"
        try:
            rec[k] = int(v)
        except (TypeError, ValueError):
            return None, f"{k} must be an integer, got {v!r}"
    if rec.get("prompt_id") is None:
        return None, "missing prompt_id"
    if "error_type" not in rec or rec["error_type"] is None:
        return None, "missing error_type (use 'none' for a generation checked and found correct)"
    et = str(rec["error_type"]).strip().lower().replace(" ", "_")
    et = "none" if et in CORRECT_WORDS else et
    if not _TYPE.match(et):
        return None, f"error_type {rec['error_type']!r} is not a label (letters, digits, _ or -, at most 64)"
    rec["error_type"] = et
    return rec, None


def import_labels(atlas_dir: str | Path, path: str | Path, run_id: str | None = None,
                  skip_bad: bool = False) -> LabelImport:
    """Validate a labels file against an atlas and write it into ``generation_errors``.

    Args:
        atlas_dir: the atlas. path: CSV or JSONL labels (see the module docstring).
        run_id: the run the prompt ids refer to, for lines without a run_id (default: the atlas's
            only run). skip_bad: import the good lines even if some are bad (the bad ones are
            returned in ``skipped``).
    Returns:
        a :class:`LabelImport` (rows written, generations, errors vs correct, skipped lines).
    Raises:
        LabelError: bad lines (malformed, unknown prompt id or run, text that does not match the
            prompt) and skip_bad not set; nothing was changed. A file with no good line at all
            raises even with skip_bad. ValueError: unknown file type, or a run_id the atlas lacks.
        AtlasError: not an atlas.
    """
    path = Path(path)
    records, problems = read_labels(path)
    atlas = Atlas(atlas_dir)
    runs = atlas.sql("SELECT run_id FROM runs ORDER BY started_at")["run_id"].to_list()
    if run_id is not None and run_id not in runs:
        raise ValueError(f"no run {run_id!r} in {atlas_dir}; runs: {runs}")
    prompts = {(r, p): t for r, p, t in atlas.sql("SELECT run_id, prompt_id, text FROM prompts").iter_rows()}
    good = []
    for line, rec in records:
        run = rec.get("run_id") or run_id or (runs[0] if len(runs) == 1 else None)
        if run is None:
            problems.append(LabelProblem(line, f"no run_id: the atlas holds {len(runs)} runs ({', '.join(runs)}); "
                                               "add a run_id column or pass --run-id"))
            continue
        if run not in runs:
            problems.append(LabelProblem(line, f"unknown run_id {run!r} (runs: {', '.join(runs)})"))
            continue
        text = prompts.get((run, rec["prompt_id"]))
        if text is None:
            problems.append(LabelProblem(line, f"unknown prompt_id {rec['prompt_id']} in run {run}"))
            continue
        if rec.get("text") is not None and " ".join(rec["text"].split()) != " ".join(text.split()):
            problems.append(LabelProblem(line, f"text {rec['text']!r} is not prompt {rec['prompt_id']}'s "
                                               f"({text!r})"))
            continue
        good.append((run, rec))
    problems.sort(key=lambda p: p.line)
    if (problems and not skip_bad) or (problems and not good):
        raise LabelError(path, problems)
    source = f"labels:{path.name}"
    now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    rows = [{"run_id": run, "prompt_id": rec["prompt_id"], "error_type": rec["error_type"],
             "object_index": rec.get("object_index"), "object": rec.get("object"), "attribute": rec.get("attribute"),
             "expected": rec.get("expected"), "observed": rec.get("observed"), "source": source,
             "detail": rec.get("note"), "created_at": now} for run, rec in good]
    result = LabelImport(source, skipped=problems)
    result.rows_written = replace_rows(atlas_dir, "generation_errors", "source = ?", [source], rows)
    _summarise(result, rows)
    return result


def _summarise(result: LabelImport, rows: list[dict]) -> None:
    gens = {(r["run_id"], r["prompt_id"]) for r in rows}
    bad = {(r["run_id"], r["prompt_id"]) for r in rows if r["error_type"] != "none"}
    result.generations, result.errors, result.correct = len(gens), len(bad), len(gens - bad)


def _naming_order(text: str, n: int) -> list[int]:
    """Object indices in naming order for the oracle's objects (left first for pairs)."""
    if n == 2 and " on the right of " in " ".join(text.lower().split()):
        return [1, 0]  # the first-named object is on the right
    return list(range(n))


def oracle_rows(verdict, run_id: str, prompt_id: int, now) -> list[dict]:
    """``generation_errors`` rows for one oracle verdict (``atlas.toy.oracle.Verdict``): one row per
    (object, error type), or a single ``none`` row when the image is correct."""
    order = _naming_order(verdict.prompt, len(verdict.objects))
    rows = []
    for k, obj in enumerate(verdict.objects):
        for err in obj.errors:
            if err in ("wrong_colour", "colour_swap", "colour_leakage"):
                attribute, expected, observed = "colour", obj.expected_colour, obj.colour
            elif err in ("wrong_shape", "shape_swap"):
                attribute, expected, observed = "shape", obj.expected_shape, obj.shape
            elif err == "position_swap":
                attribute, expected, observed = "position", obj.side, None
            else:  # missing_object, extra_object
                attribute, expected, observed = "object", f"{obj.expected_colour} {obj.expected_shape}", (
                    None if not obj.found else f"{obj.colour} {obj.shape}")
            detail = json.dumps({"side": obj.side, "found": obj.found, "bbox": obj.bbox,
                                 "colour_fractions": {c: round(f, 3) for c, f in obj.colour_fractions.items()},
                                 "shape_iou": round(obj.shape_iou, 3)})
            rows.append({"run_id": run_id, "prompt_id": prompt_id, "error_type": err, "object_index": order[k],
                         "object": obj.expected_shape, "attribute": attribute, "expected": expected,
                         "observed": observed, "source": "oracle", "detail": detail, "created_at": now})
    if not rows:
        rows.append({"run_id": run_id, "prompt_id": prompt_id, "error_type": "none", "object_index": None,
                     "object": None, "attribute": None, "expected": None, "observed": None, "source": "oracle",
                     "detail": None, "created_at": now})
    return rows


def check_with_oracle(atlas_dir: str | Path, run_id: str | None = None) -> LabelImport:
    """Judge the stored images of a run with the toy world's pixel oracle and write the verdicts.

    Every generation with an image (``images``) whose prompt is in the toy grammar is judged
    (``atlas.toy.oracle.judge``); others are counted in ``unjudged``. The run's earlier oracle rows
    are replaced. Returns a :class:`LabelImport` (source ``oracle``).

    Raises:
        OracleUnavailable: atlas.toy.oracle or Pillow cannot be imported. ValueError: unknown run.
        AtlasError: not an atlas.
    """
    try:
        from PIL import Image

        from atlas.toy.oracle import judge
        from atlas.toy.world import parse_prompt
    except ImportError as e:
        raise OracleUnavailable(f"the toy world's oracle is not available ({e}); import labels from a file "
                                "instead (atlas label-errors ATLAS FILE)") from e
    atlas = Atlas(atlas_dir)
    runs = atlas.sql("SELECT run_id FROM runs ORDER BY started_at")["run_id"].to_list()
    if run_id is not None and run_id not in runs:
        raise ValueError(f"no run {run_id!r} in {atlas_dir}; runs: {runs}")
    selected = [run_id] if run_id else runs
    todo = atlas.sql("SELECT p.run_id, p.prompt_id, p.text, i.path FROM prompts p JOIN images i USING (run_id, prompt_id) "
                     "WHERE list_contains(?, p.run_id) ORDER BY p.run_id, p.prompt_id", [selected])
    now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    rows, result = [], LabelImport("oracle")
    for run, pid, text, rel in todo.iter_rows():
        if parse_prompt(text) is None:
            result.unjudged += 1
            continue
        with Image.open(Path(atlas_dir) / rel) as im:
            verdict = judge(im.convert("RGB"), text)
        rows += oracle_rows(verdict, run, pid, now)
    prepare_atlas(atlas_dir)
    result.rows_written = replace_rows(atlas_dir, "generation_errors", "source = 'oracle' AND list_contains(?, run_id)",
                                       [selected], rows)
    _summarise(result, rows)
    return result
