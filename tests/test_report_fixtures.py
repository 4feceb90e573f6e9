"""Helpers shared by the report tests and benchmark: add a synthetic attribution graph and fidelity
metrics to a real atlas, so every section of the report has something to show without running
`atlas trace` / `atlas eval-transcoders` (which take minutes on a CPU)."""

from __future__ import annotations

import datetime as _dt
import random
from pathlib import Path

from atlas.query import Atlas
from atlas.store.catalog import connect, insert_rows, refresh_views, transaction
from atlas.store.facts import write_partition
from atlas.store.schema import TABLES


def add_synthetic_graph(atlas_dir: Path, prompt_id: int = 0, step: int = 0, seed: int = 0,
                        run_id: str | None = None) -> str:
    """Store a plausible pruned graph for one generation: input, feature and error nodes on every
    layer and both streams (features that really fired on that prompt and step, so their pages
    exist) feeding a feature target on the last layer. Returns its graph_id."""
    rng = random.Random(seed)
    atlas = Atlas(atlas_dir)
    run_id = run_id or atlas.sql("SELECT run_id FROM runs ORDER BY started_at LIMIT 1")["run_id"][0]
    fired = atlas.sql(
        "SELECT layer, stream, feature, position, max(value) AS v FROM activations WHERE run_id = ? AND prompt_id = ? "
        "AND step = ? GROUP BY layer, stream, feature, position QUALIFY row_number() OVER (PARTITION BY layer, stream ORDER BY v DESC) <= 3 "
        "ORDER BY layer, stream, v DESC", [run_id, prompt_id, step]).to_dicts()
    last = max(r["layer"] for r in fired)
    target = next(r for r in fired if r["layer"] == last and r["stream"] == "img")
    nodes, node_id = [], 0

    def add(kind, layer, stream, position, feature, activation):
        nonlocal node_id
        nodes.append({"node": node_id, "node_type": kind, "layer": layer, "stream": stream, "position": position,
                      "ctx_idx": position, "feature": feature, "activation": activation,
                      "influence": rng.random() / 5, "cumulative_influence": 0.5})
        node_id += 1
        return nodes[-1]

    for stream, positions in (("txt", [0, 1, 2]), ("img", [9, 27, 36])):
        for p in positions:
            add("input", None, stream, p, None, 5.0)
    for r in fired:
        if r is not target:
            add("feature", r["layer"], r["stream"], r["position"], r["feature"], r["v"])
    for layer in range(last):
        add("error", layer, "img", target["position"], None, 0.3)
    tnode = add("target", target["layer"], "img", target["position"], target["feature"], target["v"])
    tnode["influence"] = 1.0
    edges = []
    for t in nodes:
        lower = [s for s in nodes if s["node"] != t["node"] and t["node_type"] != "input"
                 and (s["layer"] if s["layer"] is not None else -1) < (t["layer"] if t["layer"] is not None else -1)]
        for s in rng.sample(lower, min(len(lower), 4)):
            edges.append({"source": s["node"], "target": t["node"], "weight": rng.uniform(-1, 1.5),
                          "source_type": s["node_type"], "target_type": t["node_type"], "source_stream": s["stream"],
                          "target_stream": t["stream"], "cross_stream": s["stream"] != t["stream"]})
    graph_id = f"synthetic-{run_id[-6:]}-{prompt_id}-{step}"
    cols = lambda rows, names: {n: [r[n] for r in rows] for n in names}  # noqa: E731
    write_partition(atlas_dir, "graph_nodes", {"run_id": run_id},
                    {"graph_id": [graph_id] * len(nodes), **cols(nodes, ["node", "node_type", "layer", "stream",
                     "position", "ctx_idx", "feature", "activation", "influence", "cumulative_influence"])},
                    f"graph-{graph_id}.parquet")
    write_partition(atlas_dir, "graph_edges", {"run_id": run_id},
                    {"graph_id": [graph_id] * len(edges), **cols(edges, ["source", "target", "weight", "source_type",
                     "target_type", "source_stream", "target_stream", "cross_stream"])},
                    f"graph-{graph_id}.parquet")
    row = {"graph_id": graph_id, "run_id": run_id, "prompt_id": prompt_id, "seed": 0, "step": step, "sigma": 1.0,
           "target_spec": f"L{last}.img.{target['feature']}", "target_rank": 0,
           "target_key": f"L{last}.img.{target['feature']}@{target['position']}", "target_kind": "feature",
           "target_layer": last, "target_stream": "img", "target_feature": target["feature"],
           "target_position": target["position"], "target_value": target["v"], "status": "ok",
           "n_nodes": len(nodes), "n_edges": len(edges), "n_nodes_unpruned": 3 * len(nodes),
           "n_edges_unpruned": 10 * len(edges), "conservation_error": 1e-12, "conservation_error_max": 3e-12,
           "replacement_score": 0.8, "completeness_score": 0.9, "pruned_replacement_score": 0.75,
           "pruned_completeness_score": 0.88, "node_threshold": 0.8, "edge_threshold": 0.98,
           "created_at": _dt.datetime(2026, 1, 1)}
    with connect(atlas_dir) as con, transaction(con):
        con.execute(TABLES["graphs"].ddl())  # atlases written before the graph tables existed
        insert_rows(con, "graphs", [row])
        refresh_views(con, atlas_dir)
    return graph_id


def add_fidelity_metrics(atlas_dir: Path) -> None:
    """Fidelity rows for every (layer, stream) of the atlas's transcoders, as transcoder and SAE."""
    atlas = Atlas(atlas_dir)
    tcs = atlas.sql("SELECT DISTINCT layer, stream, checksum, d_feat FROM transcoders ORDER BY layer, stream").to_dicts()
    rows = []
    for role, base in (("transcoder", 0.2), ("sae", 0.1)):
        for t in tcs:
            fvu = base + 0.05 * t["layer"] + (0.03 if t["stream"] == "txt" else 0)
            rows.append({"checksum": t["checksum"], "source": f"synthetic-{role}", "layer": t["layer"],
                         "stream": t["stream"], "role": role, "d_feat": t["d_feat"], "step": None, "sigma": None,
                         "fvu": fvu, "explained_variance": 1 - fvu, "l0": 20.0 + 5 * t["layer"] + (10 if role == "sae" else 0),
                         "dead_fraction": 0.01, "n_rows": 1000, "eval_prompts": "synthetic (8)", "model_id": "tiny",
                         "measured_at": _dt.datetime(2026, 1, 1)})
    with connect(atlas_dir) as con, transaction(con):
        insert_rows(con, "transcoder_metrics", rows)


EVIL_PROMPT = 'a <script>alert("x")</script> & <b>bold</b> green triangle'
EVIL_LABEL = '<i>red</i> patches & <script>alert(2)</script>'
PROMPTS = ["a red circle and a blue square", EVIL_PROMPT]

RECURRING_SQL = """-- answers: Test stand-in for the recurring-circuits analysis: one row per synthetic graph.
-- columns: run_id, prompt_id, graph_id, layer, stream, feature, prompt_ids, feature_key, note
SELECT g.run_id, g.prompt_id, g.graph_id, g.target_layer AS layer, g.target_stream AS stream,
       g.target_feature AS feature, [0, 1] AS prompt_ids, g.target_spec AS feature_key,
       '<b>not bold</b>' AS note
FROM graphs g ORDER BY g.graph_id
"""
LABELS_SQL = """-- answers: Test stand-in for generation_errors: the prompt with markup is labelled wrong.
-- columns: run_id, prompt_id, text, seed, error_type, detail
SELECT run_id, prompt_id, text, seed, 'colour_leakage' AS error_type, '<img src=x onerror=alert(1)>' AS detail
FROM prompts WHERE text LIKE '%<script>%'
"""
EXPLANATIONS_SQL = """-- answers: Test stand-in for error_explanations: reads a table this atlas does not have.
-- columns: run_id, error_type
SELECT run_id, error_type FROM generation_errors_table_not_written_yet
"""
ANALYSIS_QUERIES = {"recurring_circuits": RECURRING_SQL, "generation_errors": LABELS_SQL,
                    "error_explanations": EXPLANATIONS_SQL}  # attribute_binding: no query at all

MAX_FEATURE_PAGES = 6  # per layer and stream: keeps the test render small (the demo renders all)
_CACHE: dict[str, object] = {}


def build_report_atlas(small_atlas: Path, tmp_root: Path) -> dict:
    """Once per test process: a copy of the session's small atlas with a second run of
    :data:`PROMPTS` (one with HTML markup), two synthetic graphs, fidelity metrics, a queries folder
    with stand-ins for two of the three analyses, and the report rendered from it.

    Returns {"atlas", "report", "queries", "result", "runs"}."""
    if "built" in _CACHE:
        return _CACHE["built"]
    import shutil

    from atlas.ingest.config import RunConfig
    from atlas.ingest.runner import run_ingest
    from atlas.query.library import QUERIES_DIR
    from atlas.report import render_report

    atlas_dir = tmp_root / "atlas"
    shutil.copytree(small_atlas, atlas_dir)
    prompts = tmp_root / "evil.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    run_ingest(RunConfig(prompts=str(prompts), out=str(atlas_dir), top_k=5, batch_size=2, layers=[0, 1], model="tiny"),
               new_run=True, progress=False)
    runs = Atlas(atlas_dir).sql("SELECT run_id FROM runs ORDER BY started_at")["run_id"].to_list()
    add_synthetic_graph(atlas_dir, prompt_id=0, run_id=runs[0])
    add_synthetic_graph(atlas_dir, prompt_id=1, run_id=runs[1], seed=1)
    add_fidelity_metrics(atlas_dir)
    with connect(atlas_dir) as con:  # a label with markup on a feature every kind of page shows
        target = con.execute("SELECT target_layer, target_stream, target_feature FROM graphs WHERE run_id = ?",
                             [runs[0]]).fetchone()
        con.execute("UPDATE features SET label = ? WHERE run_id = ? AND layer = ? AND stream = ? AND feature = ?",
                    [EVIL_LABEL, runs[0], *target])
    queries = tmp_root / "queries"  # the report's own queries only, so the analyses are the stand-ins
    queries.mkdir()
    for q in QUERIES_DIR.glob("*.sql"):
        if q.name.startswith(("report_", "top_features", "transcoder_")):
            shutil.copy(q, queries / q.name)
    for name, sql in ANALYSIS_QUERIES.items():
        (queries / f"{name}.sql").write_text(sql, encoding="utf-8")
    report = tmp_root / "report"
    result = render_report(atlas_dir, report, queries_dir=queries, max_feature_pages=MAX_FEATURE_PAGES)
    _CACHE["built"] = {"atlas": atlas_dir, "report": report, "queries": queries, "result": result, "runs": runs}
    return _CACHE["built"]
