"""The analysis queries (recurring circuits, attribute binding, error explanations), the networkx
builders and the label import, on an atlas written by hand whose answers are known by construction.

The atlas (4x4 patch grid, 32x32 px, patch 8 px; left half = columns 0-1):

- prompts 0/1: "a red circle and a blue square" (seeds 0 and 1), 2: "a green triangle and a red
  square", 3: "a blue square on the right of a red circle", 4: "a green bench and a blue bowl".
- graphs of target spec "spec1" (recurring circuits and error explanations), F1 = L0.img.10,
  F2 = L1.img.20, T = L2.img.30 (the target), X = L0.img.99:
    A (p0, step 0): F1@5 -0.5-> F2@5, F1@6 -0.25-> F2@5, F2@5 (z=2) -2-> T@5, X@5 -0.3-> T@5,
                    S1 = L1.txt.100@1: input.txt:red -1-> S1 -0.5-> T; S3 = L1.txt.102@5: input.txt:blue -1-> S3 --1-> T
    B (p1, step 0): F1@5 -1-> F2@5 (z=4) -1-> T@5;  S2 = L1.txt.101@1: input.txt:red -2-> S2 -1-> T
    C (p2, step 1): F1@1 --0.5-> F2@1 (z=1) -3-> T@1, F3 = L0.img.11@1 -0.1-> T@1
    G (p3, step 0): F2@5 -1-> T@5, X@5 -0.5-> T@5
- graphs of spec "spec2" (binding): D and D2 (p0, step 0; D2 = another target sharing one edge), D3 (p0,
  step 1), E (p4, step 0, objects found from noun features firing in the activations table).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from atlas.analysis import analyze
from atlas.analysis.binding import align_words, locate_pairs, parse_pairs, toy_regions, word_spans
from atlas.cli import main
from atlas.query import Atlas, QueryError, list_queries
from atlas.query.errors import LabelError, import_labels, read_labels
from atlas.query.graphs import aggregate_graph, graph_of, prompt_graph, supernode_groups
from atlas.store.catalog import connect, create_atlas, insert_rows, refresh_views, transaction
from atlas.store.facts import write_partition

RUN = "run-a"
F1, F2, T, X, F3 = "L0.img.10", "L1.img.20", "L2.img.30", "L0.img.99", "L0.img.11"
PROMPTS = {0: ("a red circle and a blue square", 0), 1: ("a red circle and a blue square", 1),
           2: ("a green triangle and a red square", 0), 3: ("a blue square on the right of a red circle", 0),
           4: ("a green bench and a blue bowl", 0)}
NEW_QUERIES = ("prompt_graph_nodes", "prompt_graph_edges", "recurring_edges", "recurring_circuits", "feature_neighbors",
               "supernode_candidates", "supernodes", "attribute_binding", "binding_features", "generation_errors",
               "error_explanations", "error_edges")


def _tokens(text: str) -> list[str]:
    return text.split() + ["</s>"]


class GraphWriter:
    """Builds one graph's node and edge rows; nodes are (type, layer, stream, position, feature)."""

    def __init__(self, graph_id: str, prompt_id: int, step: int, spec: str):
        self.graph_id, self.prompt_id, self.step, self.spec = graph_id, prompt_id, step, spec
        self.nodes: dict[tuple, dict] = {}
        self.edges: list[dict] = []

    def node(self, key: str, position: int, activation: float = 1.0, influence: float = 0.1, kind: str | None = None):
        if key.startswith("input."):
            ntype, layer, stream, feature = "input", None, key.split(".")[1].split(":")[0], None
        else:
            layer, stream, feature = key[1:].split(".")
            ntype, layer, feature = kind or "feature", int(layer), int(feature)
        ident = (ntype, layer, stream, position, feature)
        if ident not in self.nodes:
            self.nodes[ident] = {"node": len(self.nodes), "node_type": ntype, "layer": layer, "stream": stream,
                                 "position": position, "ctx_idx": position, "feature": feature,
                                 "activation": activation, "influence": influence, "cumulative_influence": 0.5}
        return self.nodes[ident]

    def edge(self, src: dict, dst: dict, weight: float):
        self.edges.append({"source": src["node"], "target": dst["node"], "weight": weight,
                           "source_type": src["node_type"], "target_type": dst["node_type"],
                           "source_stream": src["stream"], "target_stream": dst["stream"],
                           "cross_stream": src["stream"] != dst["stream"]})

    def write(self, atlas_dir: Path) -> dict:
        nodes = sorted(self.nodes.values(), key=lambda n: n["node"])
        cols = lambda rows, names: {n: [r[n] for r in rows] for n in names}  # noqa: E731
        name = f"graph-{self.graph_id}.parquet"
        write_partition(atlas_dir, "graph_nodes", {"run_id": RUN}, {"graph_id": [self.graph_id] * len(nodes), **cols(
            nodes, ["node", "node_type", "layer", "stream", "position", "ctx_idx", "feature", "activation", "influence",
                    "cumulative_influence"])}, name)
        write_partition(atlas_dir, "graph_edges", {"run_id": RUN}, {"graph_id": [self.graph_id] * len(self.edges), **cols(
            self.edges, ["source", "target", "weight", "source_type", "target_type", "source_stream", "target_stream",
                         "cross_stream"])}, name)
        target = next(n for n in nodes if n["node_type"] == "target")
        return {"graph_id": self.graph_id, "run_id": RUN, "prompt_id": self.prompt_id, "seed": PROMPTS[self.prompt_id][1],
                "step": self.step, "sigma": 1.0 - 0.25 * self.step, "target_spec": self.spec, "target_rank": 0,
                "target_key": f"L{target['layer']}.{target['stream']}.{target['feature']}@{target['position']}",
                "target_kind": "feature", "target_layer": target["layer"], "target_stream": target["stream"],
                "target_feature": target["feature"], "target_position": target["position"], "status": "ok",
                "n_nodes": len(nodes), "n_edges": len(self.edges), "created_at": _dt.datetime(2026, 1, 1)}


def build_atlas(atlas_dir: Path) -> Path:
    """Write the atlas described in the module docstring."""
    create_atlas(atlas_dir)
    graphs = []

    # --- spec1: recurring circuits and error explanations
    a = GraphWriter("A", 0, 0, "spec1")
    t = a.node(T, 5, activation=3.0, influence=1.0, kind="target")
    f2 = a.node(F2, 5, activation=2.0, influence=0.5)
    a.edge(a.node(F1, 5, influence=0.4), f2, 0.5)
    a.edge(a.node(F1, 6, influence=0.0), f2, 0.25)
    a.edge(f2, t, 2.0)
    a.edge(a.node(X, 5, influence=0.3), t, 0.3)
    s1 = a.node("L1.txt.100", 1, influence=0.05)
    a.edge(a.node("input.txt", 1), s1, 1.0)
    a.edge(s1, t, 0.5)
    s3 = a.node("L1.txt.102", 5, influence=0.05)
    a.edge(a.node("input.txt", 5), s3, 1.0)
    a.edge(s3, t, -1.0)
    graphs.append(a)

    b = GraphWriter("B", 1, 0, "spec1")
    t = b.node(T, 5, influence=1.0, kind="target")
    f2 = b.node(F2, 5, activation=4.0, influence=0.5)
    b.edge(b.node(F1, 5, influence=0.2), f2, 1.0)
    b.edge(f2, t, 1.0)
    s2 = b.node("L1.txt.101", 1, influence=0.05)
    b.edge(b.node("input.txt", 1), s2, 2.0)
    b.edge(s2, t, 1.0)
    graphs.append(b)

    c = GraphWriter("C", 2, 1, "spec1")
    t = c.node(T, 1, influence=1.0, kind="target")
    f2 = c.node(F2, 1, activation=1.0, influence=0.5)
    c.edge(c.node(F1, 1, influence=0.2), f2, -0.5)
    c.edge(f2, t, 3.0)
    c.edge(c.node(F3, 1, influence=0.1), t, 0.1)
    graphs.append(c)

    g = GraphWriter("G", 3, 0, "spec1")
    t = g.node(T, 5, influence=1.0, kind="target")
    g.edge(g.node(F2, 5, influence=0.5), t, 1.0)
    g.edge(g.node(X, 5, influence=0.5), t, 0.5)
    graphs.append(g)

    # --- spec2: binding. p0 tokens: a(0) red(1) circle(2) and(3) a(4) blue(5) square(6); red left, blue right
    for gid, step, extra in (("D", 0, True), ("D2", 0, False), ("D3", 1, False)):
        d = GraphWriter(gid, 0, step, "spec2")
        d.node("L3.img.90", 0 if gid != "D2" else 1, influence=1.0, kind="target")
        red, blue = d.node("input.txt", 1), d.node("input.txt", 5)
        d.edge(red, d.node("L1.img.40", 0), 0.6 if step == 0 else 0.4)   # own (left)
        if extra:
            d.edge(red, d.node("L1.img.41", 2), -0.2)                     # other (right)
            d.edge(d.node("L0.txt.7", 1), d.node("L1.img.42", 5), 0.2)    # text feature on "red" -> own
            d.edge(blue, d.node("L1.img.43", 3), 0.3)                     # own (right)
            d.edge(blue, d.node("L1.img.44", 4), 0.3)                     # other (left)
        graphs.append(d)
    # p4 (no ground truth): bench(2) -> L1.img.50/51, bowl(6) -> L1.img.60; green(1), blue(5)
    e = GraphWriter("E", 4, 0, "spec2")
    e.node("L3.img.90", 0, influence=1.0, kind="target")
    bench, bowl = e.node("input.txt", 2), e.node("input.txt", 6)
    e.edge(bench, e.node("L1.img.50", 9), 1.0)
    e.edge(bench, e.node("L1.img.51", 9), 0.1)
    e.edge(bowl, e.node("L1.img.60", 10), 1.0)
    green, blue = e.node("input.txt", 1), e.node("input.txt", 5)
    e.edge(green, e.node("L1.img.70", 12), 0.5)
    e.edge(green, e.node("L1.img.70", 15), 0.25)
    e.edge(blue, e.node("L1.img.70", 15), 0.4)
    graphs.append(e)

    rows = [gw.write(atlas_dir) for gw in graphs]
    # activations of the noun features in p4 step 0: where the object regions come from
    fires = {50: [8, 12], 51: [12, 13], 60: [15, 11]}
    pos = [p for f in fires for p in fires[f]]
    write_partition(atlas_dir, "activations", {"run_id": RUN, "layer": 1, "stream": "img"}, {
        "batch_id": [0] * len(pos), "prompt_id": [4] * len(pos), "step": [0] * len(pos), "sigma": [1.0] * len(pos),
        "position": pos, "feature": [f for f in fires for _ in fires[f]], "value": [1.0] * len(pos)},
        "batch-000000.parquet")
    with connect(atlas_dir) as con, transaction(con):
        insert_rows(con, "runs", [{"run_id": RUN, "model_id": "hand-written", "height": 32, "width": 32, "patch_px": 8,
                                   "n_steps": 4, "status": "complete", "n_prompts": len(PROMPTS),
                                   "started_at": _dt.datetime(2026, 1, 1)}])
        insert_rows(con, "batches", [{"run_id": RUN, "batch_id": 0, "n_prompts": len(PROMPTS),
                                      "committed_at": _dt.datetime(2026, 1, 1)}])
        insert_rows(con, "prompts", [{"run_id": RUN, "prompt_id": p, "text": t, "seed": s, "n_tokens": len(_tokens(t)),
                                      "batch_id": 0} for p, (t, s) in PROMPTS.items()])
        insert_rows(con, "prompt_tokens", [{"run_id": RUN, "prompt_id": p, "position": i, "token_id": i, "token": tok}
                                           for p, (t, _) in PROMPTS.items() for i, tok in enumerate(_tokens(t))])
        insert_rows(con, "features", [{"run_id": RUN, "layer": 0, "stream": "img", "feature": 99, "firing_count": 2,
                                       "label": "leak detector"}])
        insert_rows(con, "graphs", rows)
        refresh_views(con, atlas_dir)
    return atlas_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    atlas_dir = build_atlas(tmp_path_factory.mktemp("analyses") / "atlas")
    analyze(atlas_dir)
    return atlas_dir


@pytest.fixture(scope="module")
def atlas(built) -> Atlas:
    return Atlas(built)


def _row(frame: pl.DataFrame, **where) -> dict:
    for k, v in where.items():
        frame = frame.filter(pl.col(k) == v)
    assert len(frame) == 1, (where, frame)
    return frame.row(0, named=True)


# -- every query ---------------------------------------------------------------------------------

def test_every_new_query_runs_with_its_defaults_and_documented_columns(atlas, tmp_path):
    queries = list_queries()
    assert set(NEW_QUERIES) <= set(queries)
    empty = Atlas(create_atlas(tmp_path / "empty"))
    for name in NEW_QUERIES:
        q = queries[name]
        assert q.answers and q.columns
        for p in q.params.values():
            assert p.doc, (name, p.name)
        assert atlas.query(name).columns == q.columns, name
        assert empty.query(name).is_empty(), name  # a fresh atlas: the tables exist, nothing in them


def test_query_stage_and_analyses_import_no_torch():
    code = ("import sys, atlas.query, atlas.query.graphs, atlas.query.errors, atlas.analysis; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- a prompt's graph ----------------------------------------------------------------------------

def test_prompt_graph_queries_return_one_graph_or_a_generations_graphs(atlas):
    nodes = atlas.query("prompt_graph_nodes", graph_id="A")
    assert len(nodes) == 9 and set(nodes["graph_id"]) == {"A"}
    keys = dict(zip(nodes["node"], nodes["node_key"]))
    assert set(keys.values()) == {T, F2, F1, X, "L1.txt.100", "L1.txt.102", "input.txt:red", "input.txt:blue"}
    assert _row(nodes, node_key=X)["label"] == "leak detector"
    edges = atlas.query("prompt_graph_edges", graph_id="A")
    assert len(edges) == 8
    assert _row(edges, source_key=X, target_key=T)["weight"] == pytest.approx(0.3)
    # a generation's graphs: p0 has A, D, D2 (step 0) and D3 (step 1)
    assert set(atlas.query("prompt_graph_nodes", prompt_id=0)["graph_id"]) == {"A", "D", "D2", "D3"}
    assert set(atlas.query("prompt_graph_edges", prompt_id=0, step=0)["graph_id"]) == {"A", "D", "D2"}


def test_networkx_builders(built):
    G = graph_of(built, "A")
    assert G.number_of_nodes() == 9 and G.number_of_edges() == 8 and G.graph["prompt_id"] == 0
    f2 = next(n for n, d in G.nodes(data=True) if d["node_key"] == F2)
    assert sorted(w for _, _, w in G.in_edges(f2, data="weight")) == [0.25, 0.5]
    with pytest.raises(KeyError):
        graph_of(built, "nope")

    P = prompt_graph(built, 0, step=0)  # A + D + D2: the shared edge red@1 -> L1.img.40@0 is one edge of support 2
    e = P.edges["input.txt:red@1", "L1.img.40@0"]
    assert e["support"] == 2 and e["total_weight"] == pytest.approx(1.2) and e["mean_weight"] == pytest.approx(0.6)
    assert P.nodes["L1.img.40@0"]["support"] == 2 and P.graph["n_graphs"] == 3
    with pytest.raises(KeyError):
        prompt_graph(built, 4, step=3)

    agg = aggregate_graph(built, prompt_ids=[0, 1], node_types="feature,target")
    e = agg.edges[F1, F2]
    assert e["support"] == 2 and e["total_weight"] == pytest.approx(1.75) and e["mean_weight"] == pytest.approx(0.875)
    assert e["prompt_ids"] == [0, 1] and agg.nodes[F1]["layer"] == 0 and agg.nodes[F1]["feature"] == 10
    assert agg.edges[F2, T]["total_weight"] == pytest.approx(3.0)
    assert aggregate_graph(built, prompt_ids=[]).number_of_edges() == 0
    full = aggregate_graph(built, min_support=3)
    assert {(u, v) for u, v in full.edges} == {(F1, F2), (F2, T), ("input.txt:red", "L1.img.40")}


# -- recurring circuits --------------------------------------------------------------------------

def test_recurring_edges_support_and_attribution_are_exact(atlas):
    got = atlas.query("recurring_edges")
    assert {(r["source_key"], r["target_key"]) for r in got.iter_rows(named=True)} == {(F1, F2), (F2, T), (X, T)}
    r = _row(got, source_key=F1, target_key=F2)   # A: 0.5 + 0.25 (two position-level edges), B: 1, C: -0.5
    assert (r["n_graphs"], r["n_prompts"], r["n_texts"], r["n_seeds"], r["steps"]) == (3, 3, 2, 2, [0, 1])
    assert r["total_weight"] == pytest.approx(1.25) and r["mean_weight"] == pytest.approx(1.25 / 3)
    assert r["mean_abs_weight"] == pytest.approx(0.75) and r["prompt_ids"] == [0, 1, 2]
    r = _row(got, source_key=F2, target_key=T)
    assert (r["n_graphs"], r["total_weight"], r["prompt_ids"]) == (4, pytest.approx(7.0), [0, 1, 2, 3])
    assert got["n_graphs"].to_list() == sorted(got["n_graphs"].to_list(), reverse=True)
    # inputs included: the edge shared by D, D2, D3
    r = _row(atlas.query("recurring_edges", node_types="all", min_support=3), source_key="input.txt:red")
    assert (r["target_key"], r["n_graphs"], r["n_prompts"], r["total_weight"]) == ("L1.img.40", 3, 1, pytest.approx(1.6))
    assert atlas.query("recurring_edges", step=1, min_support=1, node_types="feature,target")["n_graphs"].max() == 1
    cross = atlas.query("recurring_edges", cross_stream=True, min_support=1)   # S1, S2, S3 -> T; L0.txt.7 -> L1.img.42
    assert sorted(cross["source_key"]) == ["L0.txt.7", "L1.txt.100", "L1.txt.101", "L1.txt.102"]
    assert len(atlas.query("recurring_edges", k=1)) == 1


def test_recurring_paths_are_exact(atlas):
    got = atlas.query("recurring_circuits")
    assert len(got) == 1
    r = got.row(0, named=True)
    assert (r["source_key"], r["via_key"], r["target_key"], r["streams"], r["cross_stream"]) == (F1, F2, T, "img>img>img", False)
    # per graph: sum w1 * w2 / z(via):  A (0.5 + 0.25) * 2 / 2 = 0.75,  B 1 * 1 / 4 = 0.25,  C -0.5 * 3 / 1 = -1.5
    assert r["n_graphs"] == 3 and r["total_attribution"] == pytest.approx(-0.5)
    assert r["mean_attribution"] == pytest.approx(-0.5 / 3) and r["steps"] == [0, 1]
    assert r["mean_source_edge"] == pytest.approx((0.75 + 1 - 0.5) / 3) and r["mean_target_edge"] == pytest.approx(2.0)
    # token inputs as sources: input.txt:red -> S1/S2 -> T occur once each, input.txt:red -> L1.txt.* never recurs
    with_inputs = atlas.query("recurring_circuits", source_types="feature,input", min_support=1)
    r = _row(with_inputs, source_key="input.txt:red", via_key="L1.txt.100")
    assert r["total_attribution"] == pytest.approx(1.0 * 0.5 / 1.0) and r["cross_stream"]


def test_feature_neighbours(atlas):
    got = atlas.query("feature_neighbors", layer=1, stream="img", feature=20)
    up = _row(got, direction="upstream")
    down = _row(got, direction="downstream")
    assert (up["neighbor_key"], up["n_graphs"], up["total_weight"], up["anchor_graphs"]) == (F1, 3, pytest.approx(1.25), 4)
    assert (down["neighbor_key"], down["n_graphs"], down["total_weight"]) == (T, 4, pytest.approx(7.0))
    assert (down["layer"], down["stream"], down["feature"]) == (2, "img", 30)
    only_up = atlas.query("feature_neighbors", layer=2, stream="img", feature=30, direction="upstream", k=0)
    assert set(only_up["direction"]) == {"upstream"} and set(only_up["neighbor_key"]) >= {F2, X, F3, "L1.txt.100"}


def test_supernodes_group_features_with_the_same_role(built, atlas):
    # S1 (graph A) and S2 (graph B): both take "red" and feed T with the same sign: role cosine 1, never co-occur.
    # S3 shares only the target with them (one neighbour): not linked.
    pairs = atlas.query("supernode_candidates", min_support=1, k=0)
    r = _row(pairs, feature_key="L1.txt.100", other_key="L1.txt.101")
    assert r["role_similarity"] == pytest.approx(1.0) and r["cooccurrence"] == 0 and r["shared_dims"] == 2
    assert not any("L1.txt.102" in (p["feature_key"], p["other_key"]) for p in pairs.iter_rows(named=True))
    groups = supernode_groups(built, min_support=1)
    txt = [g for g in groups if g["members"][0][1] == "txt"]
    assert [g["members"] for g in txt] == [[(1, "txt", 100), (1, "txt", 101)]]
    # the analyze step (defaults: features in >= 2 graphs) found no such group; with min_support 1 it does
    from atlas.analysis import write_supernodes
    n = write_supernodes(built, min_support=1)
    sn = atlas.query("supernodes")
    assert len(sn) == n and ["L1.txt.100", "L1.txt.101"] in sn["members"].to_list()
    write_supernodes(built)  # back to the fixture's state


# -- attribute binding ---------------------------------------------------------------------------

def test_binding_pairs_are_parsed_and_located():
    assert [(p.attribute, p.object) for p in parse_pairs("A green traffic light and a blue bowl.")] == \
        [("green", "light"), ("blue", "bowl")]
    assert parse_pairs("a cat on a mat") is None and parse_pairs("red and blue") is None
    spans = word_spans([(0, "▁a"), (1, "▁gre"), (2, "en"), (3, "▁ben"), (4, "ch"), (5, "▁and"), (6, "▁a"),
                        (7, "▁blue"), (8, "▁bowl"), (9, "</s>")])
    assert locate_pairs(parse_pairs("a green bench and a blue bowl"), spans) == [
        {"attribute_start": 1, "attribute_end": 2, "object_start": 3, "object_end": 4},
        {"attribute_start": 7, "attribute_end": 7, "object_start": 8, "object_end": 8}]
    assert locate_pairs(parse_pairs("a red cube and a blue cube"), spans) is None
    # any sub-word scheme: tokens aligned to the text's characters (WordPiece pieces here)
    wp = [(0, "a"), (1, "green"), (2, "b"), (3, "##en"), (4, "##ch"), (5, "and"), (6, "a"), (7, "blue"), (8, "bowl"),
          (9, "</s>")]
    assert align_words("A green bench and a blue bowl.", wp) == [
        ("a", 0, 0), ("green", 1, 1), ("bench", 2, 4), ("and", 5, 5), ("a", 6, 6), ("blue", 7, 7), ("bowl", 8, 8)]
    assert align_words("a green bench", [(0, "a"), (1, "<unk>")]) is None
    assert toy_regions("left", 32, 32, 8) == [0, 1, 4, 5, 8, 9, 12, 13]


def test_analyze_wrote_pairs_and_ground_truth_regions(atlas):
    pairs = atlas.sql("SELECT * FROM binding_pairs ORDER BY prompt_id, pair_index")
    assert len(pairs) == 10
    p3 = pairs.filter(pl.col("prompt_id") == 3)   # "a blue square on the right of a red circle"
    assert p3["attribute"].to_list() == ["blue", "red"] and p3["side"].to_list() == ["right", "left"]
    assert (p3["attribute_start"].to_list(), p3["object_start"].to_list()) == ([1, 8], [2, 9])
    assert _row(pairs, prompt_id=4, pair_index=0)["region_source"] == "noun_features"
    regions = atlas.sql("SELECT pair_index, list(position ORDER BY position) AS p FROM object_regions "
                        "WHERE prompt_id = 0 GROUP BY ALL ORDER BY pair_index")
    assert regions["p"].to_list() == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]


def test_binding_scores_are_exact(atlas):
    step0 = atlas.query("attribute_binding", step=0, target_spec="spec2")
    red = _row(step0, prompt_id=0, pair_index=0)
    # red: own 0.6 (input, D and D2 share the edge: counted once) + 0.2 (text feature at "red"); other |-0.2|
    assert (red["attribute"], red["object"], red["other_object"], red["region_source"]) == ("red", "circle", "square", "ground_truth")
    assert red["own_attribution"] == pytest.approx(0.8) and red["other_attribution"] == pytest.approx(0.2)
    assert red["own_signed"] == pytest.approx(0.8) and red["other_signed"] == pytest.approx(-0.2)
    assert red["binding_score"] == pytest.approx(0.6) and (red["own_patches"], red["other_patches"]) == (8, 8)
    blue = _row(step0, prompt_id=0, pair_index=1)
    assert blue["binding_score"] == pytest.approx(0.0)
    # all steps: D3 (step 1) adds 0.4 to red's own attribution
    red_all = _row(atlas.query("attribute_binding", target_spec="spec2"), prompt_id=0, pair_index=0)
    assert red_all["own_attribution"] == pytest.approx(1.2) and red_all["binding_score"] == pytest.approx(1.0 / 1.4)
    assert red_all["steps"] == [0, 1] and red_all["n_graphs"] == 3
    # every graph: A adds S1 (a text feature on "red") -> T at patch 5 (left: own, 0.5) and S3 (on "blue") -> T
    # at patch 5 (the other object's: |-1|); its other edges stay within a stream
    every = atlas.query("attribute_binding", step=0)
    assert _row(every, prompt_id=0, pair_index=0)["own_attribution"] == pytest.approx(1.3)
    assert _row(every, prompt_id=0, pair_index=1)["other_attribution"] == pytest.approx(1.3)
    assert _row(every, prompt_id=0, pair_index=0)["n_graphs"] == 3   # A, D, D2
    # p4, no ground truth: bench's strongest downstream feature L1.img.50 fires on 8, 12; bowl's L1.img.60 on 11, 15
    one = atlas.query("attribute_binding", step=0, target_spec="spec2", noun_features=1)
    green = _row(one, prompt_id=4, pair_index=0)
    assert green["region_source"] == "noun_features" and (green["own_patches"], green["other_patches"]) == (2, 2)
    assert green["own_attribution"] == pytest.approx(0.5) and green["other_attribution"] == pytest.approx(0.25)
    assert green["binding_score"] == pytest.approx(1 / 3)
    assert _row(one, prompt_id=4, pair_index=1)["binding_score"] == pytest.approx(1.0)
    # two noun features per object (default 3): bench also gets L1.img.51's patches (12, 13) -> 3 patches
    assert _row(atlas.query("attribute_binding", step=0, noun_features=2, target_spec="spec2"), prompt_id=4, pair_index=0)["own_patches"] == 3
    # ground truth ignored on request: p0's objects then come from noun features, which p0's graphs lack
    nf = _row(atlas.query("attribute_binding", step=0, region="noun_features", target_spec="spec2"), prompt_id=0,
              pair_index=0)
    assert nf["region_source"] is None and nf["binding_score"] is None


def test_binding_features_layers_and_steps(atlas):
    by_feat = atlas.query("binding_features", k=0, target_spec="spec2")
    r = _row(by_feat, feature_key="L1.img.70")   # p4: green -> 12 (own 0.5), -> 15 (other 0.25); blue -> 15 (own 0.4)
    assert (r["own_attribution"], r["other_attribution"], r["n_pairs"]) == (pytest.approx(0.9), pytest.approx(0.25), 2)
    assert r["own_prompt_ids"] == [4] and r["other_prompt_ids"] == [4]
    r = _row(by_feat, feature_key="L1.img.40")   # red -> patch 0: 0.6 at step 0 (once), 0.4 at step 1
    assert r["own_attribution"] == pytest.approx(1.0) and r["other_attribution"] == 0 and r["binding_score"] == 1.0
    assert by_feat["own_attribution"].to_list() == sorted(by_feat["own_attribution"].to_list(), reverse=True)
    steps = atlas.query("binding_features", group_by="step", target_spec="spec2")
    s0 = _row(steps, step=0)
    assert s0["own_attribution"] == pytest.approx(0.6 + 0.2 + 0.3 + 0.5 + 0.4)
    assert s0["other_attribution"] == pytest.approx(0.2 + 0.3 + 0.25) and _row(steps, step=1)["own_attribution"] == pytest.approx(0.4)
    layers = atlas.query("binding_features", group_by="layer", target_spec="spec2")
    assert len(layers) == 1 and layers["layer"][0] == 1 and layers["own_attribution"][0] == pytest.approx(2.4)
    senders = atlas.query("binding_features", side="sender", target_spec="spec2")
    assert senders["feature_key"].to_list() == ["L0.txt.7"] and senders["own_attribution"][0] == pytest.approx(0.2)
    leak = atlas.query("binding_features", order_by="other", k=1, target_spec="spec2")
    assert leak["other_attribution"][0] == pytest.approx(0.3)   # blue -> L1.img.44 on the left object


# -- generation errors and their explanations ------------------------------------------------------

LABELS = [
    {"prompt_id": 0, "error_type": "colour_leakage", "object_index": 1, "object": "square", "attribute": "colour",
     "expected": "blue", "observed": "red"},
    {"prompt_id": 3, "error_type": "colour_leakage", "object_index": 0, "attribute": "colour"},
    {"prompt_id": 1, "error_type": "none"},
    {"prompt_id": 2, "error_type": "correct", "note": "checked by hand"},
    {"prompt_id": 4, "error_type": ""},
]


@pytest.fixture(scope="module")
def labelled(built, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in LABELS) + "\n")
    res = import_labels(built, path)
    assert (res.rows_written, res.generations, res.errors, res.correct) == (5, 5, 2, 3)
    return built


def test_generation_errors_query(labelled, atlas):
    errs = atlas.query("generation_errors")
    assert errs["prompt_id"].to_list() == [0, 3] and set(errs["source"]) == {"labels:labels.jsonl"}
    assert _row(errs, prompt_id=0)["observed"] == "red"
    ok = atlas.query("generation_errors", error_type="none")
    assert ok["prompt_id"].to_list() == [1, 2, 4] and _row(ok, prompt_id=2)["detail"] == "checked by hand"
    assert _row(atlas.query("attribute_binding", step=0), prompt_id=0, pair_index=0)["errors"] == ["colour_leakage"]
    only = atlas.query("attribute_binding", error_type="colour_leakage", target_spec="spec2")
    assert set(only["prompt_id"]) == {0}   # p3 has no binding graph
    leak_feats = atlas.query("binding_features", error_type="colour_leakage", k=0)
    assert "L1.img.70" not in leak_feats["feature_key"].to_list()   # p4 is correct


def test_error_explanations_effect_sizes_are_exact(labelled, atlas):
    got = atlas.query("error_explanations", target_spec="spec1", k=0)
    x = _row(got, feature_key=X)   # in both erroneous generations (influence .3, .5), in no correct one
    assert (x["n_error"], x["n_correct"], x["error_with"], x["correct_with"]) == (2, 2, 2, 0)
    assert x["presence_diff"] == 1.0 and x["log_odds_ratio"] == pytest.approx(2 * math.log(5))
    assert (x["mean_error"], x["mean_correct"]) == (pytest.approx(0.4), 0.0)
    assert x["effect_size"] == pytest.approx(4.0)   # pooled sd 0.1
    assert x["rank"] == 1 and x["error_prompt_ids"] == [3, 0] and x["correct_prompt_ids"] is None
    assert x["label"] == "leak detector"
    f1 = _row(got, feature_key=F1)   # errors: .4 (p0), 0 (p3); correct: .2, .2 -> no difference
    assert f1["effect_size"] == pytest.approx(0.0) and f1["presence_diff"] == pytest.approx(-0.5)
    assert _row(got, feature_key=T)["effect_size"] is None   # the same in every generation: no variance
    assert F3 not in got["feature_key"].to_list()           # in one generation only (< min_generations)
    same = atlas.query("error_explanations", target_spec="spec1", match="same_text", k=0)
    assert _row(same, feature_key=X)["n_correct"] == 1       # only p1 shares p0's text
    edges = atlas.query("error_edges", target_spec="spec1", k=1)
    assert (edges["source_key"][0], edges["target_key"][0]) == (X, T)
    assert edges["mean_error"][0] == pytest.approx(0.4) and edges["effect_size"][0] == pytest.approx(4.0)
    assert atlas.query("error_explanations", error_type="missing_object").is_empty()


# -- the labels file: bad input --------------------------------------------------------------------

def _count(atlas_dir) -> int:
    return Atlas(atlas_dir).sql("SELECT count(*) AS n FROM generation_errors")["n"][0]


def test_bad_label_lines_are_reported_by_line_and_change_nothing(labelled, tmp_path):
    before = _count(labelled)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt_id,error_type,object\n0,colour_leakage,square\n99,none,\nx,none,\n1,none\n\n2,wrong colour!,\n"
                   "3,Missing_Object,circle\n")
    with pytest.raises(LabelError) as e:
        import_labels(labelled, bad)
    assert [(p.line, p.message.split(" ")[0]) for p in e.value.problems] == [
        (3, "unknown"), (4, "prompt_id"), (5, "2"), (7, "error_type")]
    assert "line 3: unknown prompt_id 99" in str(e.value) and _count(labelled) == before
    res = import_labels(labelled, bad, skip_bad=True)
    assert res.rows_written == 2 and [p.line for p in res.skipped] == [3, 4, 5, 7]
    rows = Atlas(labelled).query("generation_errors", source="labels:bad.csv")
    assert rows["error_type"].to_list() == ["colour_leakage", "missing_object"]
    # re-importing a file of the same name replaces its rows
    bad.write_text("prompt_id,error_type\n0,none\n")
    assert import_labels(labelled, bad).rows_written == 1 and _count(labelled) == before + 1
    with connect(labelled) as con:
        con.execute("DELETE FROM generation_errors WHERE source = 'labels:bad.csv'")


def test_label_files_other_problems(labelled, tmp_path):
    j = tmp_path / "l.jsonl"
    j.write_text('{"prompt_id": 0, "error_type": "x"}\nnot json\n[1]\n{"prompt_id": 1}\n{"prompt": 1, "error_type": "x"}\n'
                 '{"prompt_id": 2.5, "error_type": "x"}\n{"prompt_id": 1, "error_type": "x", "text": "another prompt"}\n')
    recs, probs = read_labels(j)
    assert [r[0] for r in recs] == [1, 7] and [p.line for p in probs] == [2, 3, 4, 5, 6]
    with pytest.raises(LabelError) as e:
        import_labels(labelled, j)
    assert [p.line for p in e.value.problems] == [2, 3, 4, 5, 6, 7]
    assert "not prompt 1's" in e.value.problems[-1].message
    header = tmp_path / "h.csv"
    header.write_text("prompt,error\n1,x\n")
    with pytest.raises(LabelError, match="line 1: header lacks prompt_id, error_type"):
        import_labels(labelled, header)
    with pytest.raises(ValueError, match="csv or .jsonl"):
        import_labels(labelled, tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no run 'zzz'"):
        import_labels(labelled, j, run_id="zzz")
    only_bad = tmp_path / "only_bad.csv"
    only_bad.write_text("prompt_id,error_type\n42,none\n")
    with pytest.raises(LabelError):
        import_labels(labelled, only_bad, skip_bad=True)   # nothing good to import


def test_cli_label_errors_and_analyze(labelled, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "cli.csv"
    bad.write_text("prompt_id,error_type\n0,none\n77,none\n")
    res = runner.invoke(main, ["label-errors", str(labelled), str(bad)])
    assert res.exit_code == 2 and "line 3: unknown prompt_id 77" in res.output and "nothing was imported" in res.output
    res = runner.invoke(main, ["label-errors", str(labelled), str(bad), "--skip-bad"])
    assert res.exit_code == 0 and "skipped line 3" in res.output and "1 row(s) for 1 generation(s)" in res.output
    with connect(labelled) as con:
        con.execute("DELETE FROM generation_errors WHERE source = 'labels:cli.csv'")
    assert runner.invoke(main, ["label-errors", str(labelled)]).exit_code == 2   # neither file nor --oracle
    res = runner.invoke(main, ["analyze", str(labelled), "--no-supernodes"])
    assert res.exit_code == 0 and "10 attribute-object pair(s) in 5 of 5 prompt(s) (4 with ground-truth" in res.output
    res = runner.invoke(main, ["query", str(labelled), "recurring_edges", "-p", "min_support=4", "--format", "csv"])
    assert res.exit_code == 0 and f"{F2},{T}" in res.output
    res = runner.invoke(main, ["query", str(labelled), "binding_features", "-p", "group_by=nope2", "-p", "k=x"])
    assert res.exit_code == 2 and "parameter k is INTEGER" in res.output


def test_oracle_fills_generation_errors(tmp_path):
    pytest.importorskip("atlas.toy.oracle")
    from PIL import Image

    from atlas.query.errors import check_with_oracle
    from atlas.toy import ToyObject, render

    atlas_dir = build_atlas(tmp_path / "oracle")
    images = {0: [ToyObject("red", "circle", 2, 8, 10), ToyObject("blue", "square", 19, 8, 10)],        # correct
              2: [ToyObject("green", "triangle", 2, 8, 10), ToyObject("green", "square", 19, 8, 10)],    # leakage
              4: [ToyObject("green", "square", 2, 8, 10)]}                                             # not toy grammar
    rows = []
    for pid, objs in images.items():
        (atlas_dir / "images").mkdir(exist_ok=True)
        Image.fromarray(render(objs)).save(atlas_dir / "images" / f"{pid}.png")
        rows.append({"run_id": RUN, "prompt_id": pid, "path": f"images/{pid}.png", "height": 32, "width": 32})
    with connect(atlas_dir) as con:
        insert_rows(con, "images", rows)
    res = check_with_oracle(atlas_dir)
    assert (res.generations, res.errors, res.correct, res.unjudged) == (2, 1, 1, 1)
    errs = Atlas(atlas_dir).query("generation_errors", source="oracle")
    r = _row(errs, prompt_id=2)
    assert (r["error_type"], r["object_index"], r["object"], r["expected"], r["observed"]) == \
        ("colour_leakage", 1, "square", "red", "green")
    assert Atlas(atlas_dir).query("generation_errors", error_type="none")["prompt_id"].to_list() == [0]


def test_queries_bind_parameters(atlas):
    evil = "A' OR 1=1 --"
    assert atlas.query("prompt_graph_nodes", graph_id=evil).is_empty()
    assert atlas.query("recurring_edges", prompt_ids=evil).is_empty()
    assert atlas.query("error_explanations", error_type=evil).is_empty()
    with pytest.raises(QueryError, match="no parameter"):
        atlas.query("attribute_binding", steps=1)
    with pytest.raises(QueryError, match="BOOLEAN"):
        atlas.query("recurring_edges", cross_stream="maybe")


def test_analysis_queries_run_in_a_plain_duckdb_client(built, monkeypatch):
    """`cd ATLAS && duckdb atlas.duckdb`, then `SET VARIABLE min_support = 4; .read queries/recurring_edges.sql`."""
    import duckdb

    from atlas.query import get_query

    monkeypatch.chdir(built)
    con = duckdb.connect("atlas.duckdb", read_only=True)
    try:
        con.execute("SET VARIABLE min_support = 4")
        assert con.execute(get_query("recurring_edges").sql).fetchall()[0][1:3] == (F2, T)
        con.execute("SET VARIABLE step = 0")
        con.execute("SET VARIABLE target_spec = 'spec2'")
        rows = con.execute(get_query("attribute_binding").sql).fetchall()
        assert rows[0][3] == 0 and rows[0][-2] == pytest.approx(0.6)   # p0, red: binding score
    finally:
        con.close()
