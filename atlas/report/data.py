"""Everything the report shows, read from the atlas through the query layer only.

Each named query (``queries/report_*.sql`` and the library's ``top_features``,
``transcoder_fidelity``, ``transcoder_set_fidelity``) runs once for the whole atlas; the rows are
then grouped in memory by feature, prompt or graph so each page is built without further SQL.
Tables an atlas may not have yet (graphs, written by ``atlas trace``; fidelity metrics, written
by ``atlas eval-transcoders``) are detected first and their sections left empty.

For incremental rendering, every feature also gets a digest of the rows its page is built from
(``ReportData.feature_inputs``), hashed in bulk by polars, so a rerun can skip the pages whose
rows did not change.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import polars as pl

from atlas.query import Atlas

FKey = tuple[str, int, str, int]  # (run_id, layer, stream, feature)


def group_digest(df: pl.DataFrame, keys: list[str], into: dict[tuple, list], tag: str) -> None:
    """Append to ``into[key]`` a digest of the rows of each group of ``df``: ``(tag, sum of row
    hashes, row count)`` (row order does not matter: every row carries its rank or step)."""
    if df.is_empty():
        return
    h = (df.with_columns((pl.struct(pl.all()).hash(7) % (1 << 40)).cast(pl.Int64).alias("_h"))
         .group_by(keys).agg(pl.col("_h").sum(), pl.len()))
    for row in h.iter_rows():
        into[tuple(row[: len(keys)])].append((tag, row[-2], row[-1]))


def group_rows(df: pl.DataFrame, keys: list[str]) -> dict[tuple, list[dict]]:
    """Rows of ``df`` as dicts, grouped by the tuple of ``keys`` (row order kept)."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for row in df.iter_rows(named=True):
        out[tuple(row[k] for k in keys)].append(row)
    return dict(out)


@dataclass
class ReportData:
    """The atlas's content as the pages need it (see :func:`load`)."""

    runs: list[dict]
    features: list[dict]
    steps: dict[tuple, list[dict]]
    examples: dict[tuple, list[dict]]
    example_cells: dict[tuple, list[tuple[int, float]]]
    feature_prompts: dict[tuple, list[dict]]
    prompts: list[dict]
    tokens: dict[tuple, list[str]]
    prompt_features: dict[tuple, list[dict]]
    graphs: list[dict] = field(default_factory=list)
    graph_nodes: dict[tuple, list[dict]] = field(default_factory=dict)
    graph_edges: dict[tuple, list[dict]] = field(default_factory=dict)
    upstream: dict[tuple, list[dict]] = field(default_factory=dict)
    downstream: dict[tuple, list[dict]] = field(default_factory=dict)
    feature_graphs: dict[tuple, list[dict]] = field(default_factory=dict)
    fidelity: list[dict] = field(default_factory=list)
    set_fidelity: list[dict] = field(default_factory=list)
    strongest: list[dict] = field(default_factory=list)
    most_frequent: list[dict] = field(default_factory=list)
    has_graph_tables: bool = False
    has_fidelity_tables: bool = False

    feature_set: set[tuple] | None = None  # features that get a page (default: all of ``features``)
    feature_inputs: dict[tuple, str] = field(default_factory=dict)  # digest of each feature page's rows

    def __post_init__(self) -> None:
        self.run_by_id = {r["run_id"]: r for r in self.runs}
        if self.feature_set is None:
            self.feature_set = {(f["run_id"], f["layer"], f["stream"], f["feature"]) for f in self.features}
        self.prompt_by_id = {(p["run_id"], p["prompt_id"]): p for p in self.prompts}


def existing_tables(atlas: Atlas) -> set[str]:
    """Names of the tables and views of the atlas's catalog."""
    return set(atlas.sql("SELECT table_name FROM information_schema.tables")["table_name"].to_list())


def select_features(features: pl.DataFrame, k: int, always: set[tuple]) -> set[tuple]:
    """Features that get a page when pages are capped at ``k`` per (run, layer, stream): the ``k``
    most frequent, the ``k`` strongest (max activation), and the ``always`` set (graph nodes)."""
    g = ["run_id", "layer", "stream"]
    ranked = features.with_columns(
        pl.col("density").rank("ordinal", descending=True).over(g).alias("r_density"),
        pl.col("max_activation").rank("ordinal", descending=True).over(g).alias("r_max"))
    keep = ranked.filter((pl.col("r_density") <= k) | (pl.col("r_max") <= k))
    return {tuple(r) for r in keep.select("run_id", "layer", "stream", "feature").iter_rows()} | (
        always & {tuple(r) for r in features.select("run_id", "layer", "stream", "feature").iter_rows()})


def load(atlas: Atlas, examples_per_step: int = 5, prompts_per_feature: int = 20,
         features_per_prompt: int = 8, notable_k: int = 5, max_feature_pages: int | None = None) -> ReportData:
    """Run the report's queries and group their rows (see the module docstring).

    ``max_feature_pages`` caps feature pages per (run, layer, stream) (:func:`select_features`);
    features without a page are still listed, unlinked. Default: a page for every feature.
    """
    tables = existing_tables(atlas)
    q = atlas.query
    graph_frames: list[tuple[pl.DataFrame, list[str]]] = []
    fkeys = ["run_id", "layer", "stream", "feature"]
    features = q("report_features")
    data = ReportData(runs=q("report_runs").to_dicts(), features=features.to_dicts(), steps={}, examples={},
                      example_cells={}, feature_prompts={}, prompts=q("report_prompts").to_dicts(), tokens={},
                      prompt_features={},
                      strongest=q("top_features", order_by="max_activation", k=notable_k).to_dicts(),
                      most_frequent=q("top_features", order_by="density", k=notable_k).to_dicts())
    if {"transcoder_metrics", "transcoder_set_metrics"} <= tables:
        data.has_fidelity_tables = True
        data.fidelity = q("transcoder_fidelity").to_dicts()
        data.set_fidelity = q("transcoder_set_fidelity").to_dicts()
    if {"graphs", "graph_nodes", "graph_edges"} <= tables:
        data.has_graph_tables = True
        data.graphs = q("report_graphs").to_dicts()
        if data.graphs:
            data.graph_nodes = group_rows(q("report_graph_nodes"), ["graph_id"])
            data.graph_edges = group_rows(q("report_graph_edges"), ["graph_id"])
            links = q("report_feature_links")
            src, dst = ["run_id", "src_layer", "src_stream", "src_feature"], ["run_id", "dst_layer", "dst_stream", "dst_feature"]
            data.downstream = group_rows(links, src)
            data.upstream = group_rows(links.sort(dst + ["max_abs_weight"], descending=[False] * 4 + [True]), dst)
            feature_graphs = q("report_feature_graphs")
            data.feature_graphs = group_rows(feature_graphs, fkeys)
            graph_frames = [(links, src), (links, dst), (feature_graphs, fkeys)]

    def paged(frame: pl.DataFrame) -> pl.DataFrame:  # rows of features that get a page
        return frame if selected is None else frame.join(selected, on=fkeys, how="semi")

    selected = None
    if max_feature_pages is not None:
        data.feature_set = select_features(features, max_feature_pages, set(data.feature_graphs))
        selected = pl.DataFrame(list(data.feature_set), schema=features.select(fkeys).schema, orient="row")
    digests: dict[tuple, list] = defaultdict(list)
    frames = {name: paged(frame) for name, frame in (
        ("steps", q("report_feature_steps")),
        ("examples", q("report_top_examples", max_rank=examples_per_step)),
        ("prompts", q("report_feature_prompts", k=prompts_per_feature)),
        ("cells", q("report_example_activations", max_rank=examples_per_step)))}
    for tag, frame in frames.items():
        group_digest(frame, fkeys, digests, tag)
    data.steps = group_rows(frames["steps"], fkeys)
    data.examples = group_rows(frames["examples"], fkeys)
    data.feature_prompts = group_rows(frames["prompts"], fkeys)
    cells: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for run, layer, stream, feat, pid, step, pos, value in frames["cells"].iter_rows():
        cells[(run, layer, stream, feat, pid, step)].append((pos, value))
    data.example_cells = dict(cells)
    for i, (frame, keys) in enumerate(graph_frames):
        group_digest(frame, keys, digests, f"graph{i}")
    group_digest(features, fkeys, digests, "feature")
    data.feature_inputs = {k: repr(sorted(v)) for k, v in digests.items()}
    tokens: dict[tuple, list[str]] = defaultdict(list)
    for run, pid, _pos, tok in q("report_prompt_tokens").iter_rows():
        tokens[(run, pid)].append(tok)
    data.tokens = dict(tokens)
    data.prompt_features = group_rows(q("report_prompt_features", k=features_per_prompt), ["run_id", "prompt_id"])
    return data
