"""`atlas trace` and `atlas export-graph` on a small tiny-model atlas: storage, SQL, resume,
bad input, a killed trace, and the circuit-tracer / DifFRACT exports."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import atlas.attribution.trace as trace_mod
from atlas.attribution.export import (
    CIRCUIT_TRACER_NODE_FIELDS,
    CIRCUIT_TRACER_TOP_FIELDS,
    ExportError,
    export_graph,
)
from atlas.attribution.trace import TraceConfig, TraceError, run_trace
from atlas.cli import main
from atlas.ingest.config import RunConfig
from atlas.ingest.runner import run_ingest
from atlas.store.catalog import connect

PROMPTS = ["a red car on a green field", "a blue circle and a yellow square"]
FAST = dict(max_feature_nodes=40, batch_size=64, node_threshold=0.95, edge_threshold=0.99, faithfulness_k=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads oversubscribe a busy 2-core machine (10x slower); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("trace")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = RunConfig(prompts=str(prompts), out=str(root / "atlas"), model="tiny", layers=[0, 1, 2], expansion_factor=4,
                    random_init_density=0.02, batch_size=2, device="cpu")
    run_ingest(cfg, progress=False)
    return root / "atlas"


def _silent_feature(atlas_dir) -> int:
    """A layer-2 image feature that never fires in the atlas (d_feat = 96 * 4)."""
    with connect(atlas_dir, read_only=True) as con:
        fired = {f for (f,) in con.execute("SELECT DISTINCT feature FROM activations WHERE layer = 2 AND stream = 'img'").fetchall()}
    return min(set(range(384)) - fired)


@pytest.fixture(scope="module")
def traced(atlas_dir):
    targets = ["top1:L2", "output:rows=0-1,cols=0-2:rgb=1,0,0", f"L2.img.{_silent_feature(atlas_dir)}", "L1.txt.0@sum"]
    result = run_trace(atlas_dir, TraceConfig(targets=targets, steps=[0, 2], **FAST), progress=False)
    return result, targets


def _sql(atlas_dir, sql, params=()):
    with connect(atlas_dir, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_trace_writes_graphs_whose_rows_answer_sql(atlas_dir, traced):
    result, targets = traced
    assert result.graphs_total == len(PROMPTS) * 2 * len(targets) == result.graphs_new
    assert result.errors == 0
    rows = _sql(atlas_dir, "SELECT status, count(*) FROM graphs GROUP BY status ORDER BY status")
    statuses = dict(rows)
    assert statuses.get("ok", 0) >= len(PROMPTS) * 2 * 2  # top1 and the output target always work
    # the silent feature is recorded as empty, with its reason
    empty = _sql(atlas_dir, "SELECT reason FROM graphs WHERE target_spec LIKE 'L2.img.%'")
    assert len(empty) == 4 and all("never fires" in r for (r,) in empty)
    # facts agree with the graphs rows, and conservation is exact
    check = _sql(atlas_dir, """
        SELECT g.graph_id, g.n_nodes, g.n_edges, g.conservation_error, g.conservation_error_max,
               (SELECT count(*) FROM graph_nodes n WHERE n.graph_id = g.graph_id),
               (SELECT count(*) FROM graph_edges e WHERE e.graph_id = g.graph_id),
               (SELECT count(*) FROM graph_nodes n WHERE n.graph_id = g.graph_id AND n.node_type = 'target'),
               g.reproduction_error, g.replacement_score, g.time_total_s
        FROM graphs g WHERE g.status = 'ok'""")
    for gid, n_nodes, n_edges, ce, cem, nn, ne, nt, repro, rep, t in check:
        assert (n_nodes, n_edges, nt) == (nn, ne, 1), gid
        assert ce <= 1e-4 and cem <= 1e-4, (gid, ce, cem)
        assert repro <= 1e-5 and 0 <= rep <= 1 and t > 0
    # every edge joins stored nodes of its graph
    dangling = _sql(atlas_dir, """
        SELECT count(*) FROM graph_edges e JOIN graphs g USING (graph_id)
        WHERE NOT EXISTS (SELECT 1 FROM graph_nodes n WHERE n.graph_id = e.graph_id AND n.node = e.source)
           OR NOT EXISTS (SELECT 1 FROM graph_nodes n WHERE n.graph_id = e.graph_id AND n.node = e.target)""")
    assert dangling == [(0,)]
    # cross-stream edges are flagged and queryable (text -> image flows exist in every image graph)
    cross = _sql(atlas_dir, """SELECT source_stream, target_stream, count(*) FROM graph_edges
                               WHERE cross_stream GROUP BY ALL ORDER BY 1""")
    assert ("txt", "img") in {(a, b) for a, b, _ in cross}
    assert all(a != b for a, b, _ in cross)
    # a summed text-feature target and faithfulness results land in the table
    summed = _sql(atlas_dir, "SELECT status, target_position, target_positions FROM graphs WHERE target_spec = 'L1.txt.0@sum'")
    for status, pos, positions in summed:
        assert pos is None
        if status == "ok":
            assert len(json.loads(positions)) >= 1
    faith = _sql(atlas_dir, "SELECT faithfulness_k, faithfulness_json FROM graphs WHERE status = 'ok' AND faithfulness_k > 0")
    assert faith and all(len(json.loads(j)["features"]) == k for k, j in faith)


def test_rerun_resumes_without_recomputing(atlas_dir, traced):
    _, targets = traced
    again = run_trace(atlas_dir, TraceConfig(targets=targets, steps=[0, 2], **FAST), progress=False)
    assert again.graphs_new == 0 and again.graphs_skipped == again.graphs_total


def test_a_failing_graph_is_recorded_and_retried(atlas_dir, traced, monkeypatch):
    cfg = TraceConfig(targets=["top2:L1"], steps=[3], prompt_ids=[1], **{**FAST, "faithfulness_k": 0})
    real = trace_mod.build_graph
    calls = []

    def flaky(ctx, readout, *a, **k):
        calls.append(readout.label)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(ctx, readout, *a, **k)

    monkeypatch.setattr(trace_mod, "build_graph", flaky)
    first = run_trace(atlas_dir, cfg, progress=False)
    assert (first.graphs_new, first.errors) == (2, 1)  # the corpus went on after the failure
    rows = _sql(atlas_dir, "SELECT status, reason FROM graphs WHERE target_spec = 'top2:L1' AND step = 3 ORDER BY target_rank")
    assert rows[0] == ("error", "RuntimeError: CUDA out of memory (simulated)") and rows[1][0] == "ok"
    second = run_trace(atlas_dir, cfg, progress=False)
    assert (second.graphs_new, second.graphs_skipped, second.errors) == (1, 1, 0)
    assert _sql(atlas_dir, "SELECT status FROM graphs WHERE target_spec = 'top2:L1' AND step = 3 ORDER BY target_rank") == [("ok",), ("ok",)]


@pytest.mark.parametrize("cfg, match", [
    (dict(targets=["top1"], steps=[4]), "outside the schedule"),
    (dict(targets=["L3.img.1"]), "has no transcoder"),
    (dict(targets=["top2:L3"]), "selects no layer"),
    (dict(targets=["L2.img.100000"]), "out of range"),
    (dict(targets=["top1"], max_feature_nodes=0), "budget of zero"),
    (dict(targets=["top1"], where="prompt_id > 99"), "no prompt matches"),
    (dict(targets=["top1"], where="no_such_column = 1"), "cannot select prompts"),
    (dict(targets=["L2.img"]), "not a feature target"),
    (dict(targets=["top1"], run_id="nope"), "no run"),
])
def test_bad_requests_are_refused_before_any_work(atlas_dir, traced, cfg, match):
    before = _sql(atlas_dir, "SELECT count(*) FROM graphs")
    with pytest.raises(TraceError, match=match):
        run_trace(atlas_dir, TraceConfig(**cfg), progress=False)
    assert _sql(atlas_dir, "SELECT count(*) FROM graphs") == before


def test_killed_trace_keeps_finished_graphs_and_resumes(atlas_dir, traced, monkeypatch):
    cfg = TraceConfig(targets=["top2:L2"], steps=[1], prompt_ids=[0], **{**FAST, "faithfulness_k": 0})
    real_insert = trace_mod.insert_rows
    calls = []

    def dying_insert(con, table, rows):
        calls.append(rows[0]["graph_id"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the 2nd graph's files, before its commit
        real_insert(con, table, rows)

    monkeypatch.setattr(trace_mod, "insert_rows", dying_insert)
    with pytest.raises(KeyboardInterrupt):
        run_trace(atlas_dir, cfg, progress=False)
    monkeypatch.setattr(trace_mod, "insert_rows", real_insert)
    first, second = calls
    assert _sql(atlas_dir, "SELECT count(*) FROM graphs WHERE graph_id IN (?, ?)", [first, second]) == [(1,)]
    # the killed graph's files exist but no committed query sees them
    files = list(atlas_dir.glob(f"facts/graph_*/run_id=*/graph-{second}.parquet"))
    assert len(files) == 2
    assert _sql(atlas_dir, "SELECT count(*) FROM graph_nodes JOIN graphs USING (graph_id) WHERE graph_id = ?", [second]) == [(0,)]
    resumed = run_trace(atlas_dir, cfg, progress=False)
    assert resumed.orphans_removed == 2 and resumed.graphs_new == 1 and resumed.graphs_skipped == 1
    n = _sql(atlas_dir, "SELECT n_nodes FROM graphs WHERE graph_id = ?", [second])[0][0]
    assert _sql(atlas_dir, "SELECT count(*) FROM graph_nodes WHERE graph_id = ?", [second]) == [(n,)]


def _ok_graph(atlas_dir, kind="feature"):
    return _sql(atlas_dir, "SELECT graph_id FROM graphs WHERE status = 'ok' AND target_kind = ? ORDER BY graph_id LIMIT 1",
                [kind])[0][0]


@pytest.mark.parametrize("kind", ["feature", "output"])
def test_circuit_tracer_export_has_every_field(atlas_dir, traced, tmp_path, kind):
    gid = _ok_graph(atlas_dir, kind)
    doc = json.loads(export_graph(atlas_dir, gid, "circuit-tracer", tmp_path / "g.json").read_text())
    assert tuple(doc) == CIRCUIT_TRACER_TOP_FIELDS[""]
    assert set(doc["metadata"]) == set(CIRCUIT_TRACER_TOP_FIELDS["metadata"])
    assert set(doc["qParams"]) == set(CIRCUIT_TRACER_TOP_FIELDS["qParams"])
    meta = doc["metadata"]
    assert meta["slug"] == gid and meta["prompt"] in PROMPTS and meta["schema_version"] == 1
    s_txt, s_img = _sql(atlas_dir, "SELECT s_txt, s_img FROM graphs WHERE graph_id = ?", [gid])[0]
    assert len(meta["prompt_tokens"]) == s_txt + s_img and meta["prompt_tokens"][s_txt] == "patch(0,0)"
    types = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
             "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str, "clerp": str}
    ids = set()
    for node in doc["nodes"]:
        assert tuple(node) == CIRCUIT_TRACER_NODE_FIELDS
        for key, typ in types.items():
            assert isinstance(node[key], typ), (key, node)
        assert node["influence"] is None or isinstance(node["influence"], float)
        assert node["activation"] is None or isinstance(node["activation"], float)
        assert node["feature_type"] in ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")
        assert 0 <= node["ctx_idx"] < len(meta["prompt_tokens"])
        ids.add(node["node_id"])
        if node["feature_type"] == "cross layer transcoder":
            layer, feat, ctx = node["node_id"].split("_")
            assert (layer, int(ctx)) == (node["layer"], node["ctx_idx"])
        elif node["feature_type"] == "embedding":
            assert node["node_id"].startswith("E_") and node["layer"] == "E"
    assert len(ids) == len(doc["nodes"])
    assert sum(n["is_target_logit"] for n in doc["nodes"]) == 1
    assert doc["links"] and all(set(l) == {"source", "target", "weight"} for l in doc["links"])
    assert all(l["source"] in ids and l["target"] in ids and math.isfinite(l["weight"]) for l in doc["links"])
    n_edges = _sql(atlas_dir, "SELECT n_edges FROM graphs WHERE graph_id = ?", [gid])[0][0]
    assert len(doc["links"]) == n_edges


def test_difract_export(atlas_dir, traced, tmp_path):
    gid = _ok_graph(atlas_dir, "feature")
    doc = json.loads(export_graph(atlas_dir, gid, "difract", tmp_path / "d.json").read_text())
    assert {"target", "config", "stats", "nodes", "edges", "metadata"} <= set(doc)
    assert {"id", "layer", "stream", "feat_idx", "position", "preactivation", "encoder_bias"} <= set(doc["target"])
    assert {"prompt", "seed", "step", "timestep", "model_id", "target_layers", "height", "width", "S_img", "S_txt",
            "thresholds"} <= set(doc["config"])
    t = doc["target"]
    assert t["id"] == f"feature_L{t['layer']}_{t['stream']}_f{t['feat_idx']}"
    ids = {n["id"] for n in doc["nodes"]}
    assert t["id"] in ids and any(i.startswith("input_") for i in ids)
    for n in doc["nodes"]:
        assert {"id", "type", "layer", "stream", "feat_idx", "activation_map"} <= set(n)
    total = _sql(atlas_dir, "SELECT sum(weight) FROM graph_edges WHERE graph_id = ?", [gid])[0][0]
    assert sum(e["attribution"] for e in doc["edges"]) == pytest.approx(total)
    assert all(e["src"] in ids and e["tgt"] in ids for e in doc["edges"])


def test_exporting_an_empty_graph_is_a_clear_error(atlas_dir, traced, tmp_path):
    gid = _sql(atlas_dir, "SELECT graph_id FROM graphs WHERE status = 'empty' LIMIT 1")[0][0]
    with pytest.raises(ExportError, match="never fires"):
        export_graph(atlas_dir, gid, "difract", tmp_path / "x.json")
    with pytest.raises(ExportError, match="no graph"):
        export_graph(atlas_dir, "0000", "difract", tmp_path / "x.json")


def test_cli_trace_and_export(atlas_dir, traced, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["trace", str(atlas_dir), "--target", "top1:L1", "--prompt-ids", "1", "--steps", "3",
                               "--max-feature-nodes", "20", "--faithfulness-k", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "1 new graph(s)" in res.output
    gid = _sql(atlas_dir, "SELECT graph_id FROM graphs WHERE target_spec = 'top1:L1' AND step = 3")[0][0]
    out = tmp_path / "g.json"
    res = runner.invoke(main, ["export-graph", str(atlas_dir), gid, "--format", "circuit-tracer", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["metadata"]["slug"] == gid
    res = runner.invoke(main, ["trace", str(atlas_dir), "--target", "top1", "--steps", "7", "--no-progress"])
    assert res.exit_code == 2 and "outside the schedule" in res.output
