"""Batched attribution on the Local Replacement Model: adjacency rows, budgeted expansion, graphs.

Nodes of one (prompt, seed, step) context, in column order:

    [active features | error nodes | input nodes]        (+ the target, a row only)

- feature (layer, stream, position, feature): every active transcoder feature (z > 0), sorted by
  covered (layer, stream) (layer ascending, text before image), then position, then feature;
- error (layer, stream, position): the transcoder's reconstruction error at one MLP output;
- input (stream, position): the residual stream entering the first covered block (text-token
  and image-patch embeddings).

Edge weights (facts §3; circuit-tracer's direct effects): with g the gradient of the target's
read-out w.r.t. the output of source MLP (layer, stream) at position p (it already contains the
gate, since the block adds ``gate_mlp * y``),

    feature s:  a_s * (g[p] . W_dec[:, s])      error:  error[p] . g[p]      input:  h0[p] . g[p]

Because the LRM is affine, ``sum(row) + bias = value`` exactly, where ``bias`` is the read-out of
the LRM with every source set to zero (decoder biases, uncovered MLP outputs, attention and
projection biases, AdaLN shifts, the target's own encoder bias and FiLM shift). The bias is
computed by its own forward pass, so conservation is a real check (:attr:`AttributionGraph.conservation`).

Batching (as circuit-tracer does): the LRM forward is run once per context with the prompt
replicated B = ``batch_size`` times; each backward pass injects a different target read-out into
each batch element and so fills B adjacency rows. The graph is retained between passes (the
backward of an affine map does not depend on the forward values).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from atlas.attribution.lrm import STREAM_ORDER, LocalReplacementModel
from atlas.attribution.targets import Readout

__all__ = ["AttributionContext", "AttributionGraph", "NODE_TYPES", "build_graph", "conservation_error"]

#: The node types of an attribution graph (values of ``AttributionGraph.nodes["type"]``).
NODE_TYPES = ("feature", "error", "input", "target")


def conservation_error(rows: Tensor, bias: Tensor, value: Tensor) -> Tensor:
    """Relative conservation error ``|sum(row) + bias - value| / max(|value|, 1e-12)`` per row [n]."""
    return (rows.sum(-1) + bias - value).abs() / value.abs().clamp_min(1e-12)


class AttributionContext:
    """Row computer for one LRM: node index, retained batched forward, bias terms, row cache.

    Args:
        lrm: a recorded :class:`LocalReplacementModel`.
        batch_size: B, adjacency rows filled per backward pass (circuit-tracer uses 256-512).

    Attributes:
        n_features, n_errors, n_inputs, n_cols; feature_layer / feature_stream (0 txt, 1 img) /
        feature_position / feature_id / feature_activation: [n_features] tensors; error_* and
        input_* likewise; n_passes, n_rows_computed, time_rows_s: counters.
    """

    #: Largest padded decoder (elements) the fast feature-edge path may allocate per (layer, stream).
    padded_limit = 2 ** 26

    def __init__(self, lrm: LocalReplacementModel, batch_size: int = 256):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lrm, self.batch_size = lrm, int(batch_size)
        dev = lrm.output.device
        layers, streams, pos, feat, act, self.f_slices = [], [], [], [], [], {}
        start = 0
        for layer, stream in lrm.covered:
            c = lrm.codes[(layer, stream)]
            n = len(c.values)
            self.f_slices[(layer, stream)] = (start, start + n)
            start += n
            layers.append(torch.full((n,), layer, dtype=torch.long, device=dev))
            streams.append(torch.full((n,), STREAM_ORDER.index(stream), dtype=torch.long, device=dev))
            pos.append(c.positions), feat.append(c.features), act.append(c.values)
        self.feature_layer, self.feature_stream = torch.cat(layers), torch.cat(streams)
        self.feature_position, self.feature_id, self.feature_activation = torch.cat(pos), torch.cat(feat), torch.cat(act)
        self.n_features = start
        self.e_slices, e_layer, e_stream, e_pos = {}, [], [], []
        off = self.n_features
        for layer, stream in lrm.covered:
            n = lrm.n_tokens[stream]
            self.e_slices[(layer, stream)] = (off, off + n)
            off += n
            e_layer.append(torch.full((n,), layer)), e_stream.append(torch.full((n,), STREAM_ORDER.index(stream)))
            e_pos.append(torch.arange(n))
        self.error_layer, self.error_stream, self.error_position = torch.cat(e_layer), torch.cat(e_stream), torch.cat(e_pos)
        self.n_errors = off - self.n_features
        self.i_slices, i_stream, i_pos = {}, [], []
        for stream in STREAM_ORDER:
            n = lrm.n_tokens[stream]
            self.i_slices[stream] = (off, off + n)
            off += n
            i_stream.append(torch.full((n,), STREAM_ORDER.index(stream))), i_pos.append(torch.arange(n))
        self.input_stream, self.input_position = torch.cat(i_stream), torch.cat(i_pos)
        self.n_inputs = off - self.n_features - self.n_errors
        self.n_cols = off
        self._cache: dict[int, int] = {}          # feature index -> row in self._rows
        self._rows: list[Tensor] = []
        self._bias: list[float] = []
        self._value: list[float] = []
        self.n_passes = self.n_rows_computed = 0
        self.time_rows_s = 0.0
        self._forward = None
        self._films: dict = {}
        self._decoders: dict = {}
        with torch.no_grad():
            zeros = {s: torch.zeros_like(lrm.h0[s])[None] for s in lrm.h0}
            self._zero_sites = lrm.run(zeros["img"], zeros["txt"], lrm.mlp_fn("zero"))

    # ------------------------------------------------------------------- read-outs --
    @torch.no_grad()
    def feature_readouts(self, idx: Tensor) -> list[Readout]:
        """Read-outs (pre-activations) of active features ``idx`` [n] (indices into the feature table)."""
        lrm = self.lrm
        out = []
        for i in idx.tolist():
            layer, stream = int(self.feature_layer[i]), STREAM_ORDER[int(self.feature_stream[i])]
            p, f = int(self.feature_position[i]), int(self.feature_id[i])
            tc = lrm.transcoders[f"{stream}_{layer}"]
            scale, shift = self._film(layer, stream)
            w_enc = tc.encoder.weight[f]
            value = lrm.preactivation(layer, stream, torch.tensor([p]), torch.tensor([f]))
            out.append(Readout(site=(layer, stream), positions=torch.tensor([p]), weights=(w_enc * (1 + scale))[None],
                               const=float(w_enc @ shift + tc.encoder.bias[f]), value=float(value[0]),
                               layer_limit=layer, kind="feature", label=f"L{layer}.{stream}.f{f}@{p}",
                               layer=layer, stream=stream, feature=f, position=p))
        return out

    @torch.no_grad()
    def _film(self, layer: int, stream: str) -> tuple[Tensor, Tensor]:
        """FiLM (scale, shift) [d] of transcoder (layer, stream) at this step's sigma (cached)."""
        if (layer, stream) not in self._films:
            scale, shift = self.lrm.transcoders[f"{stream}_{layer}"].modulation(self.lrm.sigma)
            self._films[(layer, stream)] = (scale[0].detach(), shift[0].detach())
        return self._films[(layer, stream)]

    @torch.no_grad()
    def bias(self, readout: Readout) -> float:
        """The read-out of the LRM with every source zeroed (see the module docstring)."""
        site = self._zero_sites[readout.site if readout.site != ("out",) else "out"][0]
        return float(readout.const + (site[readout.positions] * readout.weights).sum())

    # ------------------------------------------------------------------- rows --
    def _ensure_forward(self):
        if self._forward is not None:
            return self._forward
        lrm, B = self.lrm, self.batch_size
        leaves = {s: lrm.h0[s][None].expand(B, -1, -1).detach().requires_grad_(True) for s in STREAM_ORDER}
        taps = {c: torch.zeros((1,) + lrm.blocks[c[0]].y[c[1]].shape, dtype=lrm.dtype, device=lrm.output.device)
                .expand(B, -1, -1).requires_grad_(True) for c in lrm.covered}
        with torch.enable_grad(), lrm.frozen_parameters():
            sites = lrm.run(leaves["img"], leaves["txt"], lrm.mlp_fn("frozen", taps))
        self._forward = (leaves, taps, sites)
        return self._forward

    def compute_rows(self, readouts: list[Readout]) -> Tensor:
        """Adjacency rows [len(readouts), n_cols] (attribution dtype), B read-outs per backward pass.

        Sources at layers >= a read-out's ``layer_limit`` get exactly 0 (they cannot reach it).
        """
        t0 = time.perf_counter()
        leaves, taps, sites = self._ensure_forward()
        lrm, B = self.lrm, self.batch_size
        out = torch.zeros(len(readouts), self.n_cols, dtype=lrm.dtype, device=lrm.output.device)
        for start in range(0, len(readouts), B):
            chunk = readouts[start:start + B]
            outputs, grads_out = [], []
            for site in dict.fromkeys(r.site for r in chunk):
                t = sites[site if site != ("out",) else "out"]
                g = torch.zeros_like(t)
                for b, r in enumerate(chunk):
                    if r.site == site:
                        g[b].index_put_((r.positions.to(g.device),), r.weights.to(g.dtype), accumulate=True)
                outputs.append(t)
                grads_out.append(g)
            inputs = [leaves[s] for s in STREAM_ORDER] + [taps[c] for c in lrm.covered]
            grads = torch.autograd.grad(outputs, inputs, grads_out, retain_graph=True, allow_unused=True)
            rows = out[start:start + len(chunk)]
            n = len(chunk)
            for s, g in zip(STREAM_ORDER, grads[:2]):
                if g is not None:
                    a, b = self.i_slices[s]
                    rows[:, a:b] = (g[:n] * lrm.h0[s]).sum(-1)
            for c, g in zip(lrm.covered, grads[2:]):
                if g is None:
                    continue
                g = g[:n]
                a, b = self.e_slices[c]
                rows[:, a:b] = (g * lrm.error[c]).sum(-1)
                self._feature_edges(c, g, rows)
            self.n_passes += 1
        self.n_rows_computed += len(readouts)
        self.time_rows_s += time.perf_counter() - t0
        return out

    def _feature_edges(self, c: tuple[int, str], g: Tensor, rows: Tensor) -> None:
        """rows[:, features of c] = a_s * (g[:, p_s] . W_dec[:, f_s]) for the active features of c.

        Fast path: the decoder columns of each position's active features are packed once per
        context into ``W_pad [S, d, F_max]`` (zero padded), so one ``bmm`` of the gradient
        ``[S, b, d]`` gives every needed dot product (b x n x d multiply-adds, n active features).
        When W_pad would exceed ``padded_limit`` elements (large models), the gradient is multiplied with
        the decoder columns of all features active anywhere and the (position, feature) pairs
        are gathered, in batch chunks.
        """
        a, b = self.f_slices[c]
        if a == b:
            return
        if c not in self._decoders:
            pos, feat = self.feature_position[a:b], self.feature_id[a:b]
            w_dec = self.lrm.transcoders[f"{c[1]}_{c[0]}"].decoder.weight.detach()       # [d, d_feat]
            n_pos, d = self.lrm.n_tokens[c[1]], w_dec.shape[0]
            counts = torch.bincount(pos, minlength=n_pos)
            f_max = int(counts.max())
            if n_pos * d * f_max <= self.padded_limit and bool((pos[1:] >= pos[:-1]).all()):
                slot = torch.arange(len(pos), device=pos.device) - (torch.cumsum(counts, 0) - counts)[pos]
                w_pad = torch.zeros(n_pos, d, f_max, dtype=w_dec.dtype, device=w_dec.device)
                w_pad[pos, :, slot] = w_dec[:, feat].T
                self._decoders[c] = ("padded", w_pad, slot)
            else:
                uniq, inv = torch.unique(feat, return_inverse=True)
                self._decoders[c] = ("gather", w_dec[:, uniq], inv)
        kind, w, idx = self._decoders[c]
        pos, act = self.feature_position[a:b], self.feature_activation[a:b]
        if kind == "padded":
            m = torch.bmm(g.transpose(0, 1), w)                                  # [S, b, F_max]
            rows[:, a:b] = m[pos, :, idx].T * act
            return
        step = max(1, int(2 ** 24 // max(1, g.shape[1] * w.shape[1])))
        for i in range(0, g.shape[0], step):
            m = g[i:i + step] @ w                                                # [b, S, U]
            rows[i:i + step, a:b] = m[:, pos, idx] * act

    def feature_rows(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows [n, n_cols], bias [n] and pre-activation [n] of active features ``idx``; rows
        already computed for this context (e.g. by another graph of the same prompt and step)
        come from the cache."""
        idx = idx.tolist()
        todo = [i for i in dict.fromkeys(idx) if i not in self._cache]
        if todo:
            readouts = self.feature_readouts(torch.tensor(todo))
            rows = self.compute_rows(readouts)
            for i, r, ro in zip(todo, rows, readouts):
                self._cache[i] = len(self._rows)
                self._rows.append(r)
                self._bias.append(self.bias(ro))
                self._value.append(ro.value)
        k = [self._cache[i] for i in idx]
        dev, dt = self.lrm.output.device, self.lrm.dtype
        if not k:
            return torch.zeros(0, self.n_cols, dtype=dt, device=dev), torch.zeros(0, dtype=dt), torch.zeros(0, dtype=dt)
        return (torch.stack([self._rows[j] for j in k]), torch.tensor([self._bias[j] for j in k], dtype=dt),
                torch.tensor([self._value[j] for j in k], dtype=dt))

    # ------------------------------------------------------------------- describe nodes --
    def node_columns(self, cols: Tensor) -> dict[str, np.ndarray]:
        """Describe columns ``cols`` [n]: type, layer (-1 for inputs), stream, position, feature
        (-1 for errors/inputs), activation (z for features, |error| / |h0| L2 norms otherwise)."""
        cols = cols.cpu()
        n = len(cols)
        out = {"type": np.empty(n, dtype=object), "layer": np.full(n, -1), "stream": np.empty(n, dtype=object),
               "position": np.zeros(n, dtype=np.int64), "feature": np.full(n, -1), "activation": np.zeros(n)}
        for j, c in enumerate(cols.tolist()):
            if c < self.n_features:
                s = STREAM_ORDER[int(self.feature_stream[c])]
                out["type"][j], out["layer"][j], out["stream"][j] = "feature", int(self.feature_layer[c]), s
                out["position"][j], out["feature"][j] = int(self.feature_position[c]), int(self.feature_id[c])
                out["activation"][j] = float(self.feature_activation[c])
            elif c < self.n_features + self.n_errors:
                e = c - self.n_features
                layer, s, p = int(self.error_layer[e]), STREAM_ORDER[int(self.error_stream[e])], int(self.error_position[e])
                out["type"][j], out["layer"][j], out["stream"][j], out["position"][j] = "error", layer, s, p
                out["activation"][j] = float(self.lrm.error[(layer, s)][p].norm())
            else:
                i = c - self.n_features - self.n_errors
                s, p = STREAM_ORDER[int(self.input_stream[i])], int(self.input_position[i])
                out["type"][j], out["stream"][j], out["position"][j] = "input", s, p
                out["activation"][j] = float(self.lrm.h0[s][p].norm())
        return out


@dataclass
class AttributionGraph:
    """An (unpruned) attribution graph for one target.

    nodes: column descriptions (see :meth:`AttributionContext.node_columns`) of the graph's nodes,
    in order [selected features, error nodes, input nodes, target]; ``nodes["type"][-1] ==
    "target"``. rows: [r, n] signed direct effects received by node ``row_nodes[i]`` from every
    node (circuit-tracer's ``adjacency[target, source]``, restricted to the nodes that receive
    edges: the selected features, then the target); error and input nodes have no row.
    readout: the target's Readout. conservation: {"target_rel", "max_rel", "target_abs",
    "n_rows", "rows_rel"} computed over *all* active features (before restricting columns to the
    selected features). bias: target's bias term; value: its pre-activation/projection.
    n_active_features: candidates (active features upstream of the target); n_expanded: rows
    computed. timings: seconds.
    """

    readout: Readout
    nodes: dict[str, np.ndarray]
    rows: Tensor
    row_nodes: Tensor
    bias: float
    value: float
    conservation: dict
    n_active_features: int
    n_expanded: int
    timings: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes["type"])

    @property
    def target_index(self) -> int:
        return self.n_nodes - 1

    @property
    def adjacency(self) -> Tensor:
        """The dense square adjacency ``A[target, source]`` [n, n] (for small graphs)."""
        a = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.rows.dtype)
        a[self.row_nodes] = self.rows
        return a


def _partial_influence(rows: Tensor, row_col: Tensor, n_cols: int, max_iter: int = 256) -> Tensor:
    """Influence on the target (row 0) of every column, from the rows computed so far.

    circuit-tracer's ``compute_partial_influences``: A = |rows| row-normalised; power iteration of
    ``prod <- prod[row_col] @ A`` summed (i.e. ``w^T (A + A^2 + ...)``, the node influence of
    ``B = (I - A)^-1 - I`` restricted to the expanded rows). ``row_col`` [r]: the column of each
    row's node (-1 for the target).
    """
    a = rows.abs()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    infl = torch.zeros(n_cols, dtype=a.dtype, device=a.device)
    w = torch.zeros(len(rows), dtype=a.dtype, device=a.device)
    w[0] = 1.0
    valid = row_col >= 0
    for _ in range(max_iter):
        prod = w @ a
        if not bool(prod.any()):
            break
        infl += prod
        w = torch.zeros_like(w)
        w[valid] = prod[row_col[valid]]
    else:
        raise RuntimeError("influence power series did not converge (the graph has a cycle?)")
    return infl


def build_graph(ctx: AttributionContext, readout: Readout, max_feature_nodes: int,
                update_interval: int = 4) -> AttributionGraph:
    """Attribution graph of one target with budgeted expansion (circuit-tracer's algorithm).

    1. Target row (one backward pass).
    2. Feature rows: candidates are active features at layers < the target's layer (all for
       output targets). If they fit in ``max_feature_nodes`` all are expanded; otherwise features
       are expanded in order of estimated influence (partial influence from the rows computed
       so far, re-estimated every ``update_interval`` batches), up to ``max_feature_nodes``.
       Expansion stops early when no unexpanded candidate has positive estimated influence.
    3. Rows over the nodes [selected features, error nodes upstream of the target, input nodes,
       target] (one row per selected feature, then the target's). Columns of features that were
       not selected are dropped (their effect is then missing from the stored rows, exactly as
       in circuit-tracer); conservation is measured on the full rows before that.

    Raises:
        ValueError: ``max_feature_nodes < 1``.
    """
    if max_feature_nodes < 1:
        raise ValueError(f"max_feature_nodes must be >= 1, got {max_feature_nodes}")
    t0 = time.perf_counter()
    dt, dev = ctx.lrm.dtype, ctx.lrm.output.device
    target_row = ctx.compute_rows([readout])[0]
    target_bias = ctx.bias(readout)
    cand = (ctx.feature_layer < readout.layer_limit).nonzero().flatten()
    budget = min(max_feature_nodes, len(cand))
    if budget == len(cand):
        selected = cand
        f_rows, f_bias, f_val = ctx.feature_rows(selected)
    else:
        selected = torch.zeros(0, dtype=torch.long)
        f_rows = torch.zeros(0, ctx.n_cols, dtype=dt, device=dev)
        f_bias, f_val = torch.zeros(0, dtype=dt), torch.zeros(0, dtype=dt)
        visited = torch.zeros(ctx.n_features, dtype=torch.bool)
        is_cand = torch.zeros(ctx.n_features, dtype=torch.bool)
        is_cand[cand] = True
        while len(selected) < budget:
            rows = torch.cat([target_row[None], f_rows])
            row_col = torch.cat([torch.tensor([-1]), selected])
            infl = _partial_influence(rows, row_col.to(dev), ctx.n_cols)[: ctx.n_features].cpu()
            order = torch.argsort(infl, descending=True, stable=True)
            order = order[is_cand[order] & ~visited[order] & (infl[order] > 0)]
            pending = order[: min(update_interval * ctx.batch_size, budget - len(selected))]
            if len(pending) == 0:
                break  # nothing left that can reach the target through the expanded rows
            r, b, v = ctx.feature_rows(pending)
            visited[pending] = True
            selected = torch.cat([selected, pending])
            f_rows, f_bias, f_val = torch.cat([f_rows, r]), torch.cat([f_bias, b]), torch.cat([f_val, v])
        order = torch.argsort(selected)
        selected, f_rows, f_bias, f_val = selected[order], f_rows[order], f_bias[order], f_val[order]
    t1 = time.perf_counter()

    all_rows = torch.cat([target_row[None], f_rows])
    all_bias = torch.cat([torch.tensor([target_bias], dtype=dt), f_bias.to(dt)])
    all_val = torch.cat([torch.tensor([readout.value], dtype=dt), f_val.to(dt)])
    rel = conservation_error(all_rows.cpu(), all_bias, all_val)
    conservation = {
        "target_rel": float(rel[0]), "max_rel": float(rel.max()), "n_rows": len(rel),
        "target_abs": float((all_rows[0].sum().cpu() + target_bias - readout.value).abs()),
        "rows_rel": rel.numpy(),
    }

    err_cols = torch.arange(ctx.n_features, ctx.n_features + ctx.n_errors)
    err_cols = err_cols[ctx.error_layer < readout.layer_limit]
    in_cols = torch.arange(ctx.n_features + ctx.n_errors, ctx.n_cols)
    cols = torch.cat([selected.cpu(), err_cols, in_cols])
    n = len(cols) + 1
    rows = torch.zeros(len(selected) + 1, n, dtype=dt)
    rows[: len(selected), :-1] = f_rows[:, cols.to(dev)].cpu()
    rows[-1, :-1] = target_row[cols.to(dev)].cpu()
    row_nodes = torch.cat([torch.arange(len(selected)), torch.tensor([n - 1])])
    nodes = ctx.node_columns(cols)
    t = readout
    for key, val in (("type", "target"), ("layer", -1 if t.layer is None else t.layer), ("stream", t.stream),
                     ("position", -1 if t.position is None else t.position),
                     ("feature", -1 if t.feature is None else t.feature), ("activation", t.value)):
        nodes[key] = np.append(nodes[key], np.array([val], dtype=nodes[key].dtype))
    return AttributionGraph(readout=readout, nodes=nodes, rows=rows, row_nodes=row_nodes, bias=target_bias, value=readout.value,
                            conservation=conservation, n_active_features=len(cand), n_expanded=len(selected),
                            timings={"attribution_s": t1 - t0, "assemble_s": time.perf_counter() - t1})
