"""networkx views of the stored attribution graphs, built from named queries (parameters bound).

- :func:`graph_of`: one stored graph, node for node (ids = ``graph_nodes.node``).
- :func:`prompt_graph`: the union of a generation's graphs (optionally one step), at position level:
  a node per (node_key, position), edges with their support among those graphs.
- :func:`aggregate_graph`: a graph aggregated over a set of generations (or all), position-free:
  a node per node_key (``L3.img.644``, ``input.txt:red``, ...), an edge per key pair with
  ``support`` (graphs containing it), ``n_prompts``, ``mean_weight`` and ``total_weight``.
- :func:`supernode_groups`: candidate supernodes as connected components of the
  ``supernode_candidates`` pairs.

Edge weights are attributions: the direct effect of the source on the target node in the Local
Replacement Model, in pre-activation units of the target (see ``graph_edges.weight``). No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import networkx as nx

from atlas.query.api import Atlas

__all__ = ["graph_of", "prompt_graph", "aggregate_graph", "supernode_groups"]


def _atlas(atlas: Atlas | str | Path) -> Atlas:
    return atlas if isinstance(atlas, Atlas) else Atlas(atlas)


def _ids(prompt_ids: Iterable[int] | None) -> str | None:
    if prompt_ids is None:
        return None
    ids = [int(p) for p in prompt_ids]  # ints only: the list travels as one bound string
    return ",".join(map(str, ids)) if ids else "-1"


def graph_of(atlas: Atlas | str | Path, graph_id: str) -> nx.DiGraph:
    """One stored (pruned) attribution graph as a DiGraph.

    Args:
        atlas: an :class:`Atlas` or an atlas folder. graph_id: ``graphs.graph_id``.
    Returns:
        nodes keyed by ``graph_nodes.node`` with attributes node_key, node_type, layer, stream,
        position, token, feature, activation, influence, label; edges with ``weight`` (attribution,
        pre-activation units of the target node) and cross_stream. Graph attributes: graph_id,
        run_id, prompt_id, step, target_key.
    Raises:
        KeyError: no committed graph with that id (or it is not ``ok``).
    """
    a = _atlas(atlas)
    nodes = a.query("prompt_graph_nodes", graph_id=graph_id)
    if nodes.is_empty():
        raise KeyError(f"no committed graph {graph_id!r} with status ok in {a.path}")
    edges = a.query("prompt_graph_edges", graph_id=graph_id)
    first = nodes.row(0, named=True)
    G = nx.DiGraph(graph_id=graph_id, run_id=first["run_id"], prompt_id=first["prompt_id"], step=first["step"],
                   target_key=first["target_key"])
    keep = ["node_key", "node_type", "layer", "stream", "position", "token", "feature", "activation", "influence", "label"]
    for row in nodes.iter_rows(named=True):
        G.add_node(row["node"], **{k: row[k] for k in keep})
    for row in edges.iter_rows(named=True):
        G.add_edge(row["source"], row["target"], weight=row["weight"], cross_stream=row["cross_stream"])
    return G


def prompt_graph(atlas: Atlas | str | Path, prompt_id: int, run_id: str | None = None,
                 step: int | None = None) -> nx.DiGraph:
    """The union of one generation's attribution graphs, at position level.

    Node ids are ``"<node_key>@<position>"`` (``@-`` for nodes without a position), so the same
    feature at the same patch in two graphs (e.g. two targets of one step) is one node. Nodes
    carry node_key, node_type, layer, stream, position, token, feature, label, ``support``
    (graphs containing it), ``mean_activation`` and ``max_influence``; edges carry ``support``,
    ``mean_weight``, ``total_weight`` (sum over graphs) and ``weight`` (= mean_weight).

    Args:
        prompt_id: ``prompts.prompt_id`` (a generation). run_id: its run (needed if several runs
            hold that id). step: one denoising step (None: all steps, so a feature at one patch in
            two steps is one node).
    Raises:
        KeyError: the generation has no committed graph (for that step).
    """
    a = _atlas(atlas)
    nodes = a.query("prompt_graph_nodes", prompt_id=prompt_id, run_id=run_id, step=step)
    if nodes.is_empty():
        raise KeyError(f"generation {prompt_id} (run {run_id or 'any'}, step {step if step is not None else 'any'}) "
                       f"has no committed attribution graph in {a.path}")
    runs = set(nodes["run_id"].to_list())
    if len(runs) > 1:
        raise KeyError(f"prompt_id {prompt_id} has graphs in several runs {sorted(runs)}; pass run_id")
    edges = a.query("prompt_graph_edges", prompt_id=prompt_id, run_id=run_id, step=step)
    n_graphs = nodes["graph_id"].n_unique()
    G = nx.DiGraph(run_id=next(iter(runs)), prompt_id=prompt_id, step=step, n_graphs=n_graphs)

    def nid(key, pos):
        return f"{key}@{'-' if pos is None else pos}"

    for row in nodes.iter_rows(named=True):
        i = nid(row["node_key"], row["position"])
        if i not in G:
            G.add_node(i, **{k: row[k] for k in ("node_key", "node_type", "layer", "stream", "position", "token",
                                                 "feature", "label")}, graphs=set(), activations=[], max_influence=None)
        d = G.nodes[i]
        d["graphs"].add(row["graph_id"])
        if row["activation"] is not None:
            d["activations"].append(row["activation"])
        if row["influence"] is not None:
            d["max_influence"] = row["influence"] if d["max_influence"] is None else max(d["max_influence"], row["influence"])
    for _, d in G.nodes(data=True):
        d["support"] = len(d.pop("graphs"))
        acts = d.pop("activations")
        d["mean_activation"] = sum(acts) / len(acts) if acts else None
    for row in edges.iter_rows(named=True):
        u, v = nid(row["source_key"], row["source_position"]), nid(row["target_key"], row["target_position"])
        if G.has_edge(u, v):
            e = G.edges[u, v]
            e["graphs"].add(row["graph_id"])
            e["total_weight"] += row["weight"]
        else:
            G.add_edge(u, v, graphs={row["graph_id"]}, total_weight=row["weight"], cross_stream=row["cross_stream"])
    for _, _, e in G.edges(data=True):
        e["support"] = len(e.pop("graphs"))
        e["mean_weight"] = e["weight"] = e["total_weight"] / e["support"]
    return G


def aggregate_graph(atlas: Atlas | str | Path, prompt_ids: Iterable[int] | None = None, run_id: str | None = None,
                    step: int | None = None, min_support: int = 1, node_types: str = "all",
                    cross_stream: bool | None = None) -> nx.DiGraph:
    """A graph aggregated over the attribution graphs of a set of generations, position-free.

    Built from the ``recurring_edges`` query (all rows). Nodes are node_keys (``L3.img.644``,
    ``input.txt:red``, ``error.L1.img``, ``output.img``) with node_type, stream, and for features
    layer and feature. Edges carry ``support`` (graphs containing the edge), ``n_prompts``,
    ``n_seeds``, ``steps``, ``mean_weight`` (mean over supporting graphs of the edge's per-graph
    attribution, itself the sum of its position-level edges), ``total_weight`` (sum over graphs),
    ``mean_abs_weight``, ``prompt_ids`` and ``weight`` (= mean_weight).

    Args:
        prompt_ids: generations to aggregate over (None: every generation with graphs).
        run_id / step: restrict to one run / denoising step. min_support: keep edges in at least
        this many graphs. node_types: "all" or a comma-separated subset of feature, target, input,
        error (nodes of other types and their edges are left out). cross_stream: True/False to
        keep only txt<->img or only same-stream edges.
    Returns:
        the DiGraph (empty if no graph matches); graph attributes run_id, step, prompt_ids.
    Raises:
        QueryError: a malformed parameter.
    """
    a = _atlas(atlas)
    rows = a.query("recurring_edges", prompt_ids=_ids(prompt_ids), run_id=run_id, step=step,
                   min_support=min_support, node_types=node_types, cross_stream=cross_stream, k=0)
    G = nx.DiGraph(run_id=run_id, step=step, prompt_ids=None if prompt_ids is None else list(prompt_ids))
    for r in rows.iter_rows(named=True):
        for end in ("source", "target"):
            key = r[f"{end}_key"]
            if key not in G:
                attrs = {"node_type": r[f"{end}_type"], "stream": r[f"{end}_stream"], "run_id": r["run_id"]}
                if key.startswith("L") and key.count(".") == 2:
                    layer, _, feature = key[1:].split(".")
                    attrs.update(layer=int(layer), feature=int(feature))
                G.add_node(key, **attrs)
        G.add_edge(r["source_key"], r["target_key"], support=r["n_graphs"], n_prompts=r["n_prompts"],
                   n_seeds=r["n_seeds"], steps=r["steps"], mean_weight=r["mean_weight"], weight=r["mean_weight"],
                   total_weight=r["total_weight"], mean_abs_weight=r["mean_abs_weight"], prompt_ids=r["prompt_ids"])
    return G


def supernode_groups(atlas: Atlas | str | Path, run_id: str | None = None, min_similarity: float = 0.8,
                     min_shared_dims: int = 2, min_support: int = 2, max_features: int = 500,
                     same_layer: bool = True, step: int | None = None) -> list[dict]:
    """Candidate supernodes: connected components of the feature pairs of ``supernode_candidates``.

    Two features are linked when their role vectors (attribution to and from each neighbour
    node_key over all graphs) have cosine >= ``min_similarity`` over >= ``min_shared_dims`` shared
    neighbours; a group is a connected component (single features are not groups). Co-occurrence
    (Jaccard of graph sets) is reported per pair by the query but not required: features that play
    the same role in different prompts need not co-occur. No decoder directions.

    Returns:
        groups sorted by total graphs (descending), each ``{"run_id", "members": [(layer, stream,
        feature), ...], "n_graphs": {member: graphs}, "mean_similarity": {member: mean similarity
        to its linked members}}``.
    """
    a = _atlas(atlas)
    pairs = a.query("supernode_candidates", run_id=run_id, step=step, min_similarity=min_similarity,
                    min_shared_dims=min_shared_dims, min_support=min_support, max_features=max_features,
                    same_layer=same_layer, k=0)
    groups = []
    for run in sorted(set(pairs["run_id"].to_list())):
        G = nx.Graph()
        for r in pairs.filter(pairs["run_id"] == run).iter_rows(named=True):
            u, v = (r["layer"], r["stream"], r["feature"]), (r["other_layer"], r["stream"], r["other_feature"])
            G.add_node(u, n_graphs=r["n_graphs"])
            G.add_node(v, n_graphs=r["other_graphs"])
            G.add_edge(u, v, similarity=r["role_similarity"])
        for comp in nx.connected_components(G):
            members = sorted(comp, key=lambda m: (-G.nodes[m]["n_graphs"], m))
            sim = {m: sum(G.edges[m, o]["similarity"] for o in G[m]) / len(G[m]) for m in members}
            groups.append({"run_id": run, "members": members, "n_graphs": {m: G.nodes[m]["n_graphs"] for m in members},
                           "mean_similarity": sim})
    groups.sort(key=lambda g: (g["run_id"], -sum(g["n_graphs"].values()), g["members"][0]))
    return groups
