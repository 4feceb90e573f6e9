"""Node influence, pruning and graph scores (circuit-tracer's ``graph.py``, facts sheet §3).

An attribution graph's adjacency is given by its *rows*: ``rows [r, n]`` with
``rows[i, s]`` = signed direct effect of node s on node ``row_nodes[i]`` (rows receive). Nodes
without a row (error and input nodes) receive nothing. ``row_nodes=None`` means ``rows`` is the
full square matrix ``A[target, source]`` [n, n]. Only the rows are ever stored, so a graph with
many error nodes (FLUX: one per covered layer, stream and position) stays r x n instead of n x n.
Target weights ``w`` [n] are 1 at the graph's target node, 0 elsewhere.

- ``A_norm = |A|`` with each row divided by its L1 norm;
- node influence ``w^T B`` with ``B = (I - A_norm)^-1 - I = A_norm + A_norm^2 + ...`` (a power
  series that terminates: the graph is acyclic, so A_norm is nilpotent);
- node pruning keeps the smallest set of nodes whose influence reaches ``node_threshold`` of the
  total (inputs and targets always kept); edge pruning scores edges by
  ``A_norm'[t, s] * (influence'[t] + w[t])`` on the node-pruned graph and keeps the smallest set
  reaching ``edge_threshold`` of the total; then nodes left without an outgoing edge (or feature
  nodes without an incoming one) are removed until nothing changes.
- replacement score: fraction of end-to-end influence from inputs that flows through features,
  ``infl(inputs) / (infl(inputs) + infl(errors))``; completeness score: influence-weighted mean,
  over nodes, of the fraction of incoming (normalised) edge weight that does not come from
  error nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["normalize_matrix", "compute_influence", "node_influence", "edge_influence", "find_threshold",
           "PruneResult", "prune_graph", "graph_scores"]


def _row_nodes(rows: Tensor, row_nodes: Tensor | None) -> Tensor:
    if row_nodes is None:
        if rows.shape[0] != rows.shape[1]:
            raise ValueError(f"a {tuple(rows.shape)} matrix needs row_nodes (which node each row belongs to)")
        return torch.arange(rows.shape[0], device=rows.device)
    return row_nodes.to(rows.device)


def normalize_matrix(a: Tensor) -> Tensor:
    """``|A|`` with rows divided by their L1 norm (rows of zeros stay zero); same shape as ``a``."""
    a = a.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-30)


def compute_influence(a_norm: Tensor, w: Tensor, row_nodes: Tensor | None = None, max_iter: int = 10_000) -> Tensor:
    """``w^T (A + A^2 + ...)`` = ``w^T ((I - A)^-1 - I)`` [n] by power iteration.

    Args:
        a_norm: normalised rows [r, n] (or the square matrix with ``row_nodes=None``).
        w: [n] weights of the target nodes.

    Raises:
        RuntimeError: no convergence within ``max_iter`` terms (a cyclic graph).
    """
    rn = _row_nodes(a_norm, row_nodes)
    cur = w[rn] @ a_norm
    total = cur.clone()
    for _ in range(max_iter):
        if not bool(cur.any()):
            return total
        cur = cur[rn] @ a_norm
        total += cur
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def node_influence(rows: Tensor, w: Tensor, row_nodes: Tensor | None = None) -> Tensor:
    """Node influence on the weighted targets, ``w^T B`` with ``B = (I - A_norm)^-1 - I`` [n]."""
    return compute_influence(normalize_matrix(rows), w, row_nodes)


def edge_influence(rows: Tensor, w: Tensor, row_nodes: Tensor | None = None) -> Tensor:
    """Edge scores ``A_norm[t, s] * (influence[t] + w[t])``, shaped like ``rows`` (circuit-tracer)."""
    rn = _row_nodes(rows, row_nodes)
    a_norm = normalize_matrix(rows)
    infl = compute_influence(a_norm, w, rn) + w
    return a_norm * infl[rn][:, None]


def find_threshold(scores: Tensor, threshold: float) -> float:
    """The score s* such that the scores >= s* are the fewest (largest first) whose sum reaches
    ``threshold`` of the total. Returns +inf for an all-zero score vector."""
    s = torch.sort(scores.flatten(), descending=True).values
    total = s.sum()
    if not total > 0:
        return float("inf")
    cum = torch.cumsum(s, 0) / total
    i = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype)).item())
    return float(s[min(i, len(s) - 1)])


@dataclass
class PruneResult:
    """node_mask [n] bool; edge_mask bool shaped like the rows ([r, n], ``[row, source]``);
    influence [n] (node influence on the unpruned graph); cumulative [n] (circuit-tracer's
    cumulative influence score: the share of total influence covered by nodes at least as
    influential); kept_node_fraction / kept_edge_fraction: influence share kept by the node /
    edge threshold (before the clean-up of dangling nodes)."""

    node_mask: Tensor
    edge_mask: Tensor
    influence: Tensor
    cumulative: Tensor
    kept_node_fraction: float
    kept_edge_fraction: float


def prune_graph(rows: Tensor, w: Tensor, always_keep: Tensor, node_threshold: float = 0.8,
                edge_threshold: float = 0.98, has_inputs: Tensor | None = None,
                row_nodes: Tensor | None = None) -> PruneResult:
    """Prune an attribution graph (circuit-tracer ``prune_graph``).

    Args:
        rows: [r, n] signed rows (``row_nodes`` their nodes), or the square ``A[target, source]``.
        w: [n] target weights. always_keep: [n] bool, nodes never pruned (inputs and targets).
        node_threshold, edge_threshold: influence fractions to keep, in [0, 1] (defaults 0.8 / 0.98).
        has_inputs: [n] bool, nodes that must keep an incoming edge (feature nodes); default none.

    Raises:
        ValueError: a threshold outside [0, 1].
    """
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {t}")
    rn = _row_nodes(rows, row_nodes)
    infl = node_influence(rows, w, rn)
    node_mask = infl >= find_threshold(infl, node_threshold)
    total = float(infl.sum())
    kept_nodes = float(infl[node_mask].sum()) / total if total > 0 else 1.0
    node_mask |= always_keep
    pruned = rows * node_mask[rn][:, None] * node_mask[None, :]
    scores = edge_influence(pruned, w, rn)
    edge_mask = (scores >= find_threshold(scores, edge_threshold)) & (pruned != 0)
    etotal = float(scores.sum())
    kept_edges = float(scores[edge_mask].sum()) / etotal if etotal > 0 else 1.0
    has_inputs = torch.zeros_like(node_mask) if has_inputs is None else has_inputs
    while True:
        old = node_mask.clone()
        edge_mask &= node_mask[rn][:, None] & node_mask[None, :]
        prunable = ~always_keep
        node_mask[prunable] &= edge_mask.any(0)[prunable]                   # needs an outgoing edge
        incoming = torch.zeros_like(node_mask)
        incoming[rn] = edge_mask.any(1)
        node_mask[has_inputs] &= incoming[has_inputs]                         # features need an incoming edge
        if torch.equal(node_mask, old):
            break
    order = torch.argsort(infl, descending=True)
    cum = torch.zeros_like(infl)
    cum[order] = torch.cumsum(infl[order], 0) / max(total, 1e-30)
    return PruneResult(node_mask, edge_mask, infl, cum, kept_nodes, kept_edges)


def graph_scores(rows: Tensor, w: Tensor, is_error: Tensor, is_input: Tensor,
                 row_nodes: Tensor | None = None) -> tuple[float, float]:
    """(replacement score, completeness score) of a graph (circuit-tracer ``compute_graph_scores``).

    replacement = infl(inputs) / (infl(inputs) + infl(errors)); completeness =
    sum_n (1 - error share of n's normalised incoming weight) * (infl[n] + w[n]) / sum(infl + w)
    (nodes without incoming edges count as fully explained). Both in [0, 1]; NaN when undefined.
    """
    rn = _row_nodes(rows, row_nodes)
    a_norm = normalize_matrix(rows)
    infl = compute_influence(a_norm, w, rn)
    inp, err = float(infl[is_input].sum()), float(infl[is_error].sum())
    replacement = inp / (inp + err) if inp + err > 0 else float("nan")
    non_error = torch.ones_like(infl)
    non_error[rn] = 1 - a_norm[:, is_error].sum(1)
    out_infl = infl + w
    completeness = float((non_error * out_infl).sum() / out_infl.sum()) if float(out_infl.sum()) > 0 else float("nan")
    return replacement, completeness
