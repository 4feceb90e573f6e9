"""Export a stored attribution graph as circuit-tracer/Neuronpedia JSON or DifFRACT v2 JSON.

Reads only the atlas (``graphs``, ``graph_nodes``, ``graph_edges``, ``prompts``,
``prompt_tokens``, ``runs``); imports no torch.

circuit-tracer (facts §4; ``circuit_tracer/frontend/graph_models.py``): the two FLUX streams
form one context, text positions first then image patches (the order FLUX concatenates them),
so ``ctx_idx`` = text position, or S_txt + image position; ``metadata.prompt_tokens`` lists the
T5 tokens (padding as "<pad>") then "patch(r,c)" labels. Node ids:

- feature: ``"{layer}_{feature}_{ctx_idx}"``, feature_type "cross layer transcoder"; because
  both streams of a block have a transcoder, ``feature`` (Cantor pairing, as circuit-tracer) and
  ``jsNodeId`` use the feature index in the concatenation [img features, txt features] of the
  layer (txt feature f -> d_feat + f), so the same index of the two streams never aliases;
- error: ``"{layer}_-1_{ctx_idx}"`` (current circuit-tracer; the legacy ``"0_{layer}_{ctx}"``
  collides with feature ids), feature_type "mlp reconstruction error";
- input: ``"E_{token_id}_{ctx_idx}"`` (token id -1 for image patches), feature_type "embedding";
- target: feature_type "logit", layer = number of double-stream blocks + 1,
  ``is_target_logit`` true, ``token_prob`` 1.

DifFRACT v2 (facts §4) aggregates over positions: one node per (layer, stream, feature) with an
``activation_map {position: z}``, one error node per (layer, stream), one input node per stream;
edge attributions are summed over positions.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from atlas.store.catalog import connect

__all__ = ["ExportError", "CIRCUIT_TRACER_NODE_FIELDS", "CIRCUIT_TRACER_TOP_FIELDS", "load_graph",
           "to_circuit_tracer", "to_difract", "export_graph"]

#: Node fields of circuit-tracer's ``Node`` model (all are written for every node).
CIRCUIT_TRACER_NODE_FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
                              "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp",
                              "influence", "activation")
#: Top-level, metadata and qParams fields of circuit-tracer's ``Model``.
CIRCUIT_TRACER_TOP_FIELDS = {
    "": ("metadata", "qParams", "nodes", "links"),
    "metadata": ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version"),
    "qParams": ("pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"),
    "links": ("source", "target", "weight"),
}


class ExportError(ValueError):
    """A graph that cannot be exported (unknown id, or recorded empty/failed)."""


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _num(v):
    if v is None:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def load_graph(atlas_dir: str | Path, graph_id: str) -> dict:
    """Everything the exporters need about one graph: ``{"graph": row dict, "nodes": [dict],
    "edges": [dict], "prompt": text, "tokens": {position: (token_id, token)}, "run": row dict,
    "d_feat": {(layer, stream): d_feat}}``.

    Raises:
        ExportError: no such graph, or its status is not "ok" (the reason is quoted).
    """
    with connect(atlas_dir, read_only=True) as con:
        cur = con.execute("SELECT * FROM graphs WHERE graph_id = ?", [graph_id])
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
        if not rows:
            raise ExportError(f"no graph {graph_id!r} in {atlas_dir}")
        g = dict(zip(names, rows[0]))
        if g["status"] != "ok":
            raise ExportError(f"graph {graph_id} is recorded as {g['status']}: {g['reason']}")

        def fetch(sql, params):
            c = con.execute(sql, params)
            cols = [d[0] for d in c.description]
            return [dict(zip(cols, r)) for r in c.fetchall()]

        nodes = fetch("SELECT * FROM graph_nodes WHERE graph_id = ? ORDER BY node", [graph_id])
        edges = fetch("SELECT * FROM graph_edges WHERE graph_id = ? ORDER BY target, source", [graph_id])
        prompt = con.execute("SELECT text FROM prompts WHERE run_id = ? AND prompt_id = ?",
                             [g["run_id"], g["prompt_id"]]).fetchone()[0]
        tokens = {int(p): (int(i), t) for p, i, t in con.execute(
            "SELECT position, token_id, token FROM prompt_tokens WHERE run_id = ? AND prompt_id = ?",
            [g["run_id"], g["prompt_id"]]).fetchall()}
        run = fetch("SELECT run_id, model_id, model_json, transcoder_source FROM runs WHERE run_id = ?", [g["run_id"]])[0]
        d_feat = {(int(l), s): int(d) for l, s, d in con.execute(
            "SELECT layer, stream, d_feat FROM transcoders WHERE run_id = ?", [g["run_id"]]).fetchall()}
    return {"graph": g, "nodes": nodes, "edges": edges, "prompt": prompt, "tokens": tokens, "run": run, "d_feat": d_feat}


def _grid_w(g: dict) -> int:
    s_img, h, w = g["s_img"], g["height"], g["width"]
    return max(1, int(round(math.sqrt(s_img * w / h))))


def _token_label(data: dict, stream: str, pos: int) -> str:
    g = data["graph"]
    if stream == "txt":
        return data["tokens"].get(pos, (0, "<pad>"))[1]
    gw = _grid_w(g)
    return f"patch({pos // gw},{pos % gw})"


def _n_layers(data: dict) -> int:
    try:
        return int(json.loads(data["run"]["model_json"])["n_double_blocks"])
    except (KeyError, TypeError, ValueError):
        return 1 + max([n["layer"] for n in data["nodes"] if n["layer"] is not None] or [0])


def to_circuit_tracer(data: dict) -> dict:
    """circuit-tracer / Neuronpedia graph JSON of a loaded graph (see the module docstring)."""
    g = data["graph"]
    s_txt, s_img = g["s_txt"], g["s_img"]
    prompt_tokens = [data["tokens"].get(p, (0, "<pad>"))[1] for p in range(s_txt)]
    gw = _grid_w(g)
    prompt_tokens += [f"patch({p // gw},{p % gw})" for p in range(s_img)]
    n_layers = _n_layers(data)
    ids: dict[int, str] = {}
    nodes = []
    for n in data["nodes"]:
        ctx = int(n["ctx_idx"]) if n["ctx_idx"] is not None else 0
        stream, layer, typ = n["stream"], n["layer"], n["node_type"]
        label = _token_label(data, stream, int(n["position"])) if n["position"] is not None else "region"
        base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                "influence": _num(n["influence"]), "activation": _num(n["activation"])}
        if typ == "feature":
            combined = int(n["feature"]) + (data["d_feat"].get((layer, "img"), 0) if stream == "txt" else 0)
            node = {"node_id": f"{layer}_{n['feature']}_{ctx}", "feature": _cantor(layer, combined),
                    "layer": str(layer), "ctx_idx": ctx, "feature_type": "cross layer transcoder",
                    "jsNodeId": f"{layer}_{combined}-0", "clerp": f"L{layer} {stream} f{n['feature']} @ {label}"}
        elif typ == "error":
            node = {"node_id": f"{layer}_-1_{ctx}", "feature": -1, "layer": str(layer), "ctx_idx": ctx,
                    "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_-1-{ctx}",
                    "clerp": f"L{layer} {stream} error @ {label}"}
        elif typ == "input":
            tok_id = data["tokens"].get(int(n["position"]), (0, ""))[0] if stream == "txt" else -1
            node = {"node_id": f"E_{tok_id}_{ctx}", "feature": ctx, "layer": "E", "ctx_idx": ctx,
                    "feature_type": "embedding", "jsNodeId": f"E_{tok_id}-{ctx}", "clerp": f"{stream} input @ {label}"}
        else:
            top = n_layers + 1
            if g["target_kind"] == "feature":
                combined = int(g["target_feature"]) + (data["d_feat"].get((g["target_layer"], "img"), 0)
                                                       if g["target_stream"] == "txt" else 0)
                clerp = f"Target {g['target_key']} (pre-activation {g['target_value']:.4g})"
            else:
                combined, clerp = 0, f"Target {g['target_key']} (value {g['target_value']:.4g})"
            node = {"node_id": f"{top}_{combined}_{ctx}", "feature": combined, "layer": str(top), "ctx_idx": ctx,
                    "feature_type": "logit", "jsNodeId": f"L_{combined}-{ctx}", "clerp": clerp}
            base.update(token_prob=1.0, is_target_logit=True)
        node = {**base, **node}
        ids[n["node"]] = node["node_id"]
        nodes.append({k: node[k] for k in CIRCUIT_TRACER_NODE_FIELDS})
    links = [{"source": ids[e["source"]], "target": ids[e["target"]], "weight": float(e["weight"])}
             for e in data["edges"] if e["source"] in ids and e["target"] in ids]
    keys = sorted(json.loads(g["covered_layers"] or "[]"))
    return {
        "metadata": {"slug": g["graph_id"], "scan": data["run"]["transcoder_source"] or "", "transcoder_list": keys,
                     "prompt_tokens": prompt_tokens, "prompt": data["prompt"], "node_threshold": g["node_threshold"],
                     "schema_version": 1},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


def _difract_id(n: dict, g: dict) -> str:
    typ = n["node_type"]
    if typ == "feature":
        return f"feature_L{n['layer']}_{n['stream']}_f{n['feature']}"
    if typ == "error":
        return f"error_L{n['layer']}_{n['stream']}"
    if typ == "input":
        return f"input_{n['stream']}"
    if g["target_kind"] == "feature":
        return f"feature_L{g['target_layer']}_{g['target_stream']}_f{g['target_feature']}"
    return "output_img"


def to_difract(data: dict) -> dict:
    """DifFRACT version-2 graph JSON of a loaded graph (position-aggregated; module docstring)."""
    g = data["graph"]
    agg: dict[str, dict] = {}
    node_id = {}
    for n in data["nodes"]:
        nid = _difract_id(n, g)
        node_id[n["node"]] = nid
        typ = "target" if n["node_type"] == "target" else n["node_type"]
        entry = agg.setdefault(nid, {"id": nid, "type": typ, "layer": n["layer"], "stream": n["stream"],
                                     "feat_idx": n["feature"], "activation_map": {}, "influence": 0.0})
        if n["position"] is not None:
            entry["activation_map"][str(int(n["position"]))] = _num(n["activation"])
        entry["influence"] += n["influence"] or 0.0
    edges: dict[tuple[str, str], float] = defaultdict(float)
    for e in data["edges"]:
        edges[(node_id[e["source"]], node_id[e["target"]])] += float(e["weight"])
    faith = json.loads(g["faithfulness_json"]) if g.get("faithfulness_json") else None
    sigma = float(g["sigma"]) if g["sigma"] is not None else None
    return {
        "version": 2,
        "target": {"id": _difract_id({"node_type": "target"}, g), "kind": g["target_kind"], "layer": g["target_layer"],
                   "stream": g["target_stream"], "feat_idx": g["target_feature"], "position": g["target_position"],
                   "positions": json.loads(g["target_positions"] or "null"), "preactivation": g["target_value"],
                   "encoder_bias": g["target_encoder_bias"]},
        "config": {"prompt": data["prompt"], "seed": g["seed"], "step": g["step"], "sigma": sigma,
                   "timestep": None if sigma is None else sigma * 1000.0, "model_id": data["run"]["model_id"],
                   "target_layers": json.loads(g["covered_layers"] or "[]"), "height": g["height"], "width": g["width"],
                   "S_img": g["s_img"], "S_txt": g["s_txt"],
                   "thresholds": {"node": g["node_threshold"], "edge": g["edge_threshold"]},
                   "max_feature_nodes": g["max_feature_nodes"], "batch_size": g["batch_size"], "dtype": g["dtype"]},
        "stats": {k: _num(g[k]) for k in (
            "n_active_features", "n_expanded", "n_nodes_unpruned", "n_edges_unpruned", "n_nodes", "n_edges",
            "bias_total", "conservation_error", "conservation_error_max", "reproduction_error", "replacement_score",
            "completeness_score", "pruned_replacement_score", "pruned_completeness_score", "faithfulness_spearman",
            "faithfulness_pearson", "time_total_s")} | {"n_nodes_aggregated": len(agg), "n_edges_aggregated": len(edges)},
        "nodes": list(agg.values()),
        "edges": [{"src": s, "tgt": t, "attribution": w} for (s, t), w in edges.items()],
        "metadata": {"graph_id": g["graph_id"], "run_id": g["run_id"], "prompt_id": g["prompt_id"],
                     "target_spec": g["target_spec"], "transcoders": data["run"]["transcoder_source"],
                     "faithfulness": faith, "exported_by": "circuit-atlas"},
    }


def export_graph(atlas_dir: str | Path, graph_id: str, fmt: str, out: str | Path) -> Path:
    """Write graph ``graph_id`` as ``fmt`` ("circuit-tracer" or "difract") JSON to ``out``.

    Raises:
        ExportError: unknown graph, a graph recorded empty/failed, or an unknown format.
    """
    if fmt not in ("circuit-tracer", "difract"):
        raise ExportError(f"unknown format {fmt!r}: use circuit-tracer or difract")
    data = load_graph(atlas_dir, graph_id)
    doc = to_circuit_tracer(data) if fmt == "circuit-tracer" else to_difract(data)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
    tmp.replace(out)
    return out
