"""`atlas demo`: the whole journey on the shipped toy world, offline, in a few minutes on a CPU.

Stages (each resumable, because each underlying command is):

1. ingest: the toy world's held-out prompts (`data/toy/prompts/held_out.txt`: held-out
   colour-shape combinations and held-out pairs, the prompts the model never saw) through the
   built-in toy pipeline with its shipped transcoders (`atlas ingest`);
2. label errors: the pixel oracle judges every stored image (`atlas label-errors --oracle`);
   fidelity: the shipped transcoders and the SAE baseline are evaluated on the first
   `FIDELITY_PROMPTS` held-out prompts into the atlas (`atlas eval-transcoders --atlas`), so the
   report's fidelity table compares them;
3. trace: attribution graphs for a sample of two-object prompts, half of them generations the
   oracle found wrong, with one output target per object region (`DEMO_TARGETS`: the left and the
   right half of the token grid, each on its own velocity direction) at the first denoising step
   (`atlas trace`);
4. analyze: binding pairs / object regions and supernodes (`atlas analyze`);
5. report: the static HTML site (`atlas report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = REPO_ROOT / "data" / "toy" / "prompts" / "held_out.txt"
DEMO_OUT = REPO_ROOT / "data" / "atlases" / "demo"

#: One graph per object of a two-object prompt: the left (token columns 0-3) and right (4-7)
#: half of the toy's 8x8 token grid, read out on the region's own predicted-velocity direction.
DEMO_TARGETS = ("output:rows=0-7,cols=0-3:self", "output:rows=0-7,cols=4-7:self")

#: Held-out prompts the fidelity of the shipped transcoders and SAEs is measured on.
FIDELITY_PROMPTS = 32

#: Trace settings: the toy's graphs are small, so thresholds keep more than the CLI defaults.
DEMO_TRACE = {"steps": [0], "node_threshold": 0.9, "edge_threshold": 0.98, "max_feature_nodes": 300,
              "faithfulness_k": 5}

__all__ = ["DEMO_PROMPTS", "DEMO_OUT", "DEMO_TARGETS", "DEMO_TRACE", "FIDELITY_PROMPTS", "DemoResult", "select_trace_prompts", "run_demo"]


@dataclass
class DemoResult:
    """What `run_demo` made: the atlas, its run, counts per stage, and the report's index page."""

    atlas_dir: Path
    run_id: str = ""
    generations: int = 0
    judged: int = 0
    with_errors: int = 0
    graphs: int = 0
    report_index: Path | None = None
    error_types: dict[str, int] = field(default_factory=dict)


def select_trace_prompts(atlas_dir: str | Path, run_id: str, n: int) -> list[int]:
    """Prompt ids of up to `n` two-object generations of `run_id` to trace: alternately one the
    oracle found wrong and one it found correct (ordered by prompt id), so the demo's graphs can be
    compared across outcomes. Needs the oracle's rows in `generation_errors`."""
    from atlas.query import Atlas
    from atlas.toy.world import parse_prompt

    frame = Atlas(atlas_dir).sql(
        "SELECT p.prompt_id, any_value(p.text) AS text, bool_or(e.error_type <> 'none') AS wrong FROM prompts p "
        "JOIN generation_errors e USING (run_id, prompt_id) WHERE p.run_id = ? GROUP BY p.prompt_id "
        "ORDER BY p.prompt_id", [run_id])
    rows = [r for r in frame.iter_rows(named=True) if len(parse_prompt(r["text"]) or ()) == 2]
    wrong = [int(r["prompt_id"]) for r in rows if r["wrong"]]
    right = [int(r["prompt_id"]) for r in rows if not r["wrong"]]
    picked: list[int] = []
    while len(picked) < n and (wrong or right):
        for pool in (wrong, right):
            if pool and len(picked) < n:
                picked.append(pool.pop(0))
    return sorted(picked)


def run_demo(out: str | Path = DEMO_OUT, limit: int | None = None, trace_prompts: int = 8,
             progress: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the demo's stages into atlas folder `out` (see the module docstring).

    limit: ingest only the first N held-out prompts; trace_prompts: two-object generations traced
    (two graphs each; 0 skips tracing). Returns a :class:`DemoResult`. Raises whatever a stage
    raises (ConfigError, AtlasError, TraceError, ...), with the atlas left resumable.
    """
    from atlas.analysis import analyze
    from atlas.attribution.trace import TraceConfig, run_trace
    from atlas.ingest.config import RunConfig
    from atlas.ingest.runner import run_ingest
    from atlas.query import Atlas
    from atlas.query.errors import check_with_oracle
    from atlas.report import render_report
    from atlas.transcoders.metrics import evaluate_folder

    echo(f"[1/5] ingest: {DEMO_PROMPTS.name} (held-out toy prompts) through the toy model and its transcoders")
    ingest = run_ingest(RunConfig(prompts=str(DEMO_PROMPTS), out=str(out), limit=limit, model="toy"),
                        progress=progress)
    result = DemoResult(atlas_dir=Path(ingest.atlas_dir), run_id=ingest.run_id, generations=ingest.generations_total)

    echo("[2/5] label errors with the pixel oracle")
    labels = check_with_oracle(result.atlas_dir, run_id=result.run_id)
    result.judged, result.with_errors = labels.generations, labels.errors
    counts = Atlas(result.atlas_dir).sql(
        "SELECT error_type, count(*) AS n FROM generation_errors WHERE run_id = ? AND error_type <> 'none' "
        "GROUP BY error_type ORDER BY n DESC, error_type", [result.run_id])
    result.error_types = {r["error_type"]: int(r["n"]) for r in counts.iter_rows(named=True)}
    echo(f"      {result.judged} generations judged, {result.with_errors} with errors {result.error_types}")
    echo(f"      fidelity of the toy transcoders and SAEs on {FIDELITY_PROMPTS} held-out prompts")
    for role, layers, streams in (("transcoder", None, ("img", "txt")), ("sae", [1, 2], ("img",))):
        evaluate_folder("toy", "toy", str(DEMO_PROMPTS), atlas=str(result.atlas_dir), role=role, layers=layers,
                        streams=streams, limit=FIDELITY_PROMPTS, progress=progress)

    if trace_prompts > 0:
        ids = select_trace_prompts(result.atlas_dir, result.run_id, trace_prompts)
        echo(f"[3/5] trace: {len(ids)} two-object prompts x {len(DEMO_TARGETS)} object regions")
        if ids:
            traced = run_trace(result.atlas_dir, TraceConfig(targets=list(DEMO_TARGETS), prompt_ids=ids,
                                                             run_id=result.run_id, **DEMO_TRACE), progress=progress)
            result.graphs = traced.graphs_total
    else:
        echo("[3/5] trace: skipped")

    echo("[4/5] analyze: binding pairs, object regions, supernodes")
    analyze(result.atlas_dir, run_id=result.run_id)

    echo("[5/5] report")
    report = render_report(result.atlas_dir, result.atlas_dir / "report", progress=progress)
    result.report_index = report.index
    echo(report.summary())
    return result
