"""Faithfulness of an attribution graph: ablate its most influential features in the original model.

For the k feature nodes of highest node influence kept in the pruned graph, each feature s is
ablated on its own in the *original* transformer (real MLPs, live attention and LayerNorm): at
the MLP output of (layer_s, stream_s) the feature's decoded contribution ``a_s * W_dec[:, f_s]``
is subtracted at position p_s (the paper's "zero" intervention with the error term kept). The
measured change of the target (its transcoder pre-activation, or the output projection) is then
correlated with the graph's prediction, as the attribution-graph papers do (Spearman and
Pearson over the k features).

Prediction (the linearised graph): removing s changes every node's pre-activation by
``u = -A[:, s]``; an active downstream feature d passes its change on with ``J[t, d] = A[t, d] /
a_d`` (edges carry activations), so ``delta = (I - J)^-1 u`` and the predicted change of the
target is ``delta[target]`` (total effect; ``u[target]`` alone is the direct effect). Computed
on the pruned graph's kept edges.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from atlas.attribution.attribute import AttributionGraph
from atlas.attribution.lrm import _MODULES, StepInputs
from atlas.attribution.prune import PruneResult

__all__ = ["predicted_ablation_effects", "measure_ablations", "faithfulness", "spearman", "pearson"]


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length sequences; NaN if either is constant or n < 2."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # average ranks of ties
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if undefined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 2 else float("nan")


def predicted_ablation_effects(graph: AttributionGraph, pruned: PruneResult, sources: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(total, direct) predicted change of the target when each feature node in ``sources``
    (node indices) is removed, on the pruned graph (see the module docstring) [len(sources)] each."""
    rn = graph.row_nodes
    keep = pruned.node_mask
    a = graph.rows * pruned.edge_mask * keep[rn][:, None] * keep[None, :]       # [r, n] kept edges
    is_feat = torch.as_tensor(graph.nodes["type"] == "feature")
    act = torch.as_tensor(graph.nodes["activation"], dtype=a.dtype)
    j = torch.zeros_like(a)
    j[:, is_feat] = a[:, is_feat] / act[is_feat].clamp_min(1e-30)            # d(pre-activation) / d(a_d)
    t = graph.target_index
    total, direct = [], []
    for s in sources:
        u = torch.zeros(graph.n_nodes, dtype=a.dtype)
        u[rn] = -a[:, s]
        delta, cur = u.clone(), u
        for _ in range(graph.n_nodes + 1):
            nxt = torch.zeros_like(cur)
            nxt[rn] = j @ cur
            cur = nxt
            if not bool(cur.any()):
                break
            delta += cur
        total.append(float(delta[t]))
        direct.append(float(u[t]))
    return np.array(total), np.array(direct)


@torch.no_grad()
def measure_ablations(transformer, transcoders: dict, inputs: StepInputs, graph: AttributionGraph,
                      sources: list[int], chunk: int = 8) -> tuple[float, np.ndarray]:
    """Run the original transformer with each source feature ablated; return (baseline target
    value, measured changes [len(sources)]), in the transformer's dtype (reported as float).

    Feature targets are read from the live MLP input of the target layer with the run's
    transcoder (``transcoders["{stream}_{layer}"]``); output targets from the output velocity.
    """
    ro = graph.readout
    dev = next(transformer.parameters()).device
    dt = next(transformer.parameters()).dtype
    nodes = graph.nodes
    positions = torch.as_tensor(ro.positions).to(dev)
    weights = ro.weights.to(dev, dt)
    values: list[float] = []
    specs = [None] + [(int(nodes["layer"][s]), nodes["stream"][s], int(nodes["position"][s]),
                       int(nodes["feature"][s]), float(nodes["activation"][s])) for s in sources]
    for start in range(0, len(specs), chunk):
        batch = specs[start:start + chunk]
        b = len(batch)
        handles, captured = [], {}
        try:
            for i, spec in enumerate(batch):
                if spec is None:
                    continue
                layer, stream, p, f, act = spec
                mlp = getattr(transformer.transformer_blocks[layer], _MODULES[stream][2])
                w = transcoders[f"{stream}_{layer}"].decoder.weight[:, f].to(dev, dt)

                def ablate(module, args, out, i=i, p=p, w=w, act=act):
                    out = out.clone()
                    out[i, p] -= act * w
                    return out
                handles.append(mlp.register_forward_hook(ablate))
            if ro.kind == "feature":
                mlp = getattr(transformer.transformer_blocks[ro.layer], _MODULES[ro.stream][2])

                def grab(module, args):
                    captured["x"] = args[0]
                handles.append(mlp.register_forward_pre_hook(grab))
            out = transformer(**inputs.kwargs(dt, batch=b))[0]
        finally:
            for h in handles:
                h.remove()
        if ro.kind == "feature":
            tc = transcoders[f"{ro.stream}_{ro.layer}"]
            x = captured["x"][:, positions].to(next(tc.parameters()).dtype)
            h = tc.preactivations(x, inputs.sigma)[..., ro.feature]        # [b, k]
            values.extend(h.sum(-1).double().tolist())
        else:
            values.extend((out[:, positions] * weights).sum((-1, -2)).double().tolist())
    base = values[0]
    return base, np.array(values[1:]) - base


def faithfulness(transformer, transcoders: dict, inputs: StepInputs, graph: AttributionGraph,
                 pruned: PruneResult, k: int = 10) -> dict:
    """Ablate the ``k`` most influential kept feature nodes in the original model and correlate.

    Returns ``{"k", "spearman", "pearson", "spearman_direct", "pearson_direct", "baseline",
    "features": [{"node", "layer", "stream", "position", "feature", "influence", "measured",
    "predicted", "predicted_direct"}]}``; correlations are NaN with fewer than 2 features.
    """
    is_feat = (graph.nodes["type"] == "feature") & pruned.node_mask.numpy()
    cand = np.flatnonzero(is_feat)
    infl = pruned.influence.numpy()
    sources = [int(i) for i in cand[np.argsort(-infl[cand], kind="stable")][:k]]
    if not sources:
        return {"k": 0, "spearman": float("nan"), "pearson": float("nan"), "spearman_direct": float("nan"),
                "pearson_direct": float("nan"), "baseline": float("nan"), "features": []}
    total, direct = predicted_ablation_effects(graph, pruned, sources)
    base, measured = measure_ablations(transformer, transcoders, inputs, graph, sources)
    feats = [{"node": s, "layer": int(graph.nodes["layer"][s]), "stream": str(graph.nodes["stream"][s]),
              "position": int(graph.nodes["position"][s]), "feature": int(graph.nodes["feature"][s]),
              "influence": float(infl[s]), "measured": float(m), "predicted": float(p), "predicted_direct": float(d)}
             for s, m, p, d in zip(sources, measured, total, direct)]
    clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
    return {"k": len(sources), "spearman": spearman(measured, total), "pearson": pearson(measured, total),
            "spearman_direct": spearman(measured, direct), "pearson_direct": pearson(measured, direct),
            "baseline": clean(base), "features": feats}
