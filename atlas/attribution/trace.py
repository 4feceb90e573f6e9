"""`atlas trace`: attribution graphs at corpus scale, written into an atlas.

For each selected prompt (a generation of an ingest run) and denoising step the runner rebuilds
the run's pipeline and transcoders (checksums checked against the ``transcoders`` table),
records the Local Replacement Model once, then builds one graph per target with budgeted
expansion, prunes it, scores it, optionally measures its faithfulness, and stores it.

Commit protocol (per graph): node and edge files are written atomically
(``facts/graph_{nodes,edges}/run_id=R/graph-<id>.parquet``), then the ``graphs`` row is
inserted in one transaction. A killed trace therefore never leaves a ``graphs`` row without its
facts; files without a row are removed when the next trace starts. Graph ids are derived from
(run, prompt, step, target spec, rank, result-determining settings), so rerunning the same
command resumes: finished graphs (ok or empty) are skipped without recomputation, failed ones
(status error) are tried again.

Bad input is refused before any work (unknown step, layer without a transcoder, zero budget,
malformed target) or recorded per graph (``status = 'empty'`` with the reason: a target feature
that does not fire on that prompt and step; ``status = 'error'`` for an unexpected failure, with
the exception) so one bad prompt never loses the finished graphs of a corpus.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from atlas.attribution.attribute import AttributionContext, AttributionGraph, build_graph
from atlas.attribution.faithfulness import faithfulness
from atlas.attribution.lrm import LocalReplacementModel, capture_step_inputs, reproduction_error
from atlas.attribution.prune import PruneResult, graph_scores, prune_graph
from atlas.attribution.targets import TargetError, TargetSpec, parse_target_spec
from atlas.store.catalog import AtlasError, connect, insert_rows, refresh_views, transaction
from atlas.store.facts import write_partition
from atlas.store.schema import TABLES

__all__ = ["TraceConfig", "TraceError", "TraceResult", "run_trace", "graph_id_for", "store_graph_rows"]

log = logging.getLogger("atlas.trace")

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_GRAPH_TABLES = ("graph_nodes", "graph_edges")


class TraceError(ValueError):
    """A trace request that cannot run (refused before any graph is computed)."""


@dataclass
class TraceConfig:
    """Settings of one ``atlas trace`` call.

    targets: target specs (see :mod:`atlas.attribution.targets`); steps: denoising step indices
    (default [0]); prompt_ids / where (SQL predicate over ``prompts`` columns) / limit select the
    generations; max_feature_nodes: expansion budget per graph; batch_size: adjacency rows per
    backward pass (default 256 on a GPU, 32 on a CPU, where large batches fall out of cache);
    node_threshold / edge_threshold: pruning; update_interval: batches between
    influence re-estimates; dtype: "float64", "float32" or "auto" (float64 on CPU, float32 on
    GPU); faithfulness_k: features ablated per graph (0 = skip); run_id: the ingest run (default:
    the latest).
    """

    targets: list[str] = field(default_factory=lambda: ["top3"])
    steps: list[int] | None = None
    prompt_ids: list[int] | None = None
    where: str | None = None
    limit: int | None = None
    max_feature_nodes: int = 1000
    batch_size: int | None = None
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    update_interval: int = 4
    dtype: str = "auto"
    device: str = "auto"
    faithfulness_k: int = 10
    run_id: str | None = None

    def validate(self) -> None:
        """Raise TraceError for values no trace could use."""
        if not self.targets:
            raise TraceError("give at least one target (--target)")
        if self.max_feature_nodes < 1:
            raise TraceError(f"max_feature_nodes must be at least 1 (a budget of zero expands nothing), got {self.max_feature_nodes}")
        if self.batch_size is not None and self.batch_size < 1:
            raise TraceError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.update_interval < 1:
            raise TraceError(f"update_interval must be at least 1, got {self.update_interval}")
        for name in ("node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise TraceError(f"{name} must be in [0, 1], got {v}")
        if self.faithfulness_k < 0:
            raise TraceError(f"faithfulness_k must be >= 0, got {self.faithfulness_k}")
        if self.dtype not in ("auto", *_DTYPES):
            raise TraceError(f"dtype must be auto, float64 or float32, not {self.dtype!r}")
        if self.limit is not None and self.limit < 1:
            raise TraceError(f"limit must be at least 1, got {self.limit}")

    def result_settings(self, dtype: str, batch_size: int) -> dict:
        """The settings that change a graph's content (they enter the graph id); the batch size
        does (expansion re-ranks features every ``update_interval * batch_size`` rows)."""
        return {"max_feature_nodes": self.max_feature_nodes, "batch_size": batch_size,
                "node_threshold": self.node_threshold, "edge_threshold": self.edge_threshold,
                "update_interval": self.update_interval, "dtype": dtype, "faithfulness_k": self.faithfulness_k}


@dataclass
class TraceResult:
    """What a call to :func:`run_trace` did."""

    atlas_dir: Path
    run_id: str
    graphs_total: int
    graphs_new: int
    graphs_skipped: int
    empty: int
    errors: int
    orphans_removed: int
    graph_ids: list[str]


def graph_id_for(run_id: str, prompt_id: int, step: int, spec: str, rank: int, settings: dict) -> str:
    """Deterministic graph id: sha256 of the inputs that determine the graph, 16 hex digits."""
    payload = json.dumps([run_id, int(prompt_id), int(step), spec, int(rank), settings], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def _finite(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _ensure_tables(atlas_dir: Path) -> None:
    """Create the graph tables in an atlas written before they existed (idempotent)."""
    with connect(atlas_dir) as con:
        con.execute(TABLES["graphs"].ddl())
        refresh_views(con, atlas_dir)


def remove_orphans(atlas_dir: Path, run_id: str, committed: set[str]) -> int:
    """Delete graph fact files (and .tmp files) of ``run_id`` whose graph has no ``graphs`` row."""
    removed = 0
    for name in _GRAPH_TABLES:
        root = Path(atlas_dir) / "facts" / name / f"run_id={run_id}"
        if not root.exists():
            continue
        for f in root.iterdir():
            gid = f.name.removeprefix("graph-").split(".")[0]
            if f.name.endswith(".tmp") or (f.name.startswith("graph-") and gid not in committed):
                f.unlink()
                removed += 1
    return removed


def _load_run(atlas_dir: Path, run_id: str | None):
    with connect(atlas_dir, read_only=True) as con:
        try:
            rows = con.execute("SELECT run_id, config_json, model_json, transcoder_source FROM runs "
                               "ORDER BY started_at").fetchall()
        except Exception as e:  # noqa: BLE001 - duckdb error types vary
            raise AtlasError(f"{atlas_dir}: cannot read runs ({e})") from e
        if not rows:
            raise TraceError(f"{atlas_dir} holds no ingest run; run `atlas ingest` first")
        if run_id is None:
            row = rows[-1]
        else:
            match = [r for r in rows if r[0] == run_id]
            if not match:
                raise TraceError(f"no run {run_id!r} in {atlas_dir}; runs: {[r[0] for r in rows]}")
            row = match[0]
        tc_rows = con.execute("SELECT layer, stream, checksum, d_feat FROM transcoders WHERE run_id = ?",
                              [row[0]]).fetchall()
    return row, tc_rows


def _select_prompts(atlas_dir: Path, run_id: str, cfg: TraceConfig) -> list[tuple[int, str, int]]:
    sql = "SELECT prompt_id, text, seed FROM prompts WHERE run_id = ?"
    params: list = [run_id]
    if cfg.prompt_ids:
        sql += f" AND prompt_id IN ({', '.join('?' for _ in cfg.prompt_ids)})"
        params += [int(p) for p in cfg.prompt_ids]
    if cfg.where:
        sql += f" AND ({cfg.where})"
    sql += " ORDER BY prompt_id"
    if cfg.limit:
        sql += f" LIMIT {int(cfg.limit)}"
    with connect(atlas_dir, read_only=True) as con:
        try:
            rows = con.execute(sql, params).fetchall()
        except Exception as e:  # noqa: BLE001
            raise TraceError(f"cannot select prompts ({type(e).__name__}: {e}); --where takes a SQL condition "
                             "over the prompts table's columns (prompt_id, text, seed, ...)") from e
    if not rows:
        raise TraceError("no prompt matches the selection")
    return [(int(p), t, int(s)) for p, t, s in rows]


def _check_specs(specs: list[TargetSpec], covered: dict[tuple[int, str], int]) -> None:
    have = ", ".join(f"L{l}.{s}" for l, s in sorted(covered))
    for spec in specs:
        for t in spec.targets:
            if hasattr(t, "layer"):
                if (t.layer, t.stream) not in covered:
                    raise TraceError(f"target {spec.text!r}: layer {t.layer} stream {t.stream} has no transcoder "
                                     f"in this run (covered: {have})")
                if not 0 <= t.feature < covered[(t.layer, t.stream)]:
                    raise TraceError(f"target {spec.text!r}: feature {t.feature} out of range "
                                     f"(d_feat {covered[(t.layer, t.stream)]})")
        if spec.kind == "top":
            pool = [(l, s) for l, s in covered if (spec.layers is None or l in spec.layers)
                    and (spec.streams is None or s in spec.streams)]
            if not pool:
                raise TraceError(f"target {spec.text!r} selects no layer with a transcoder (covered: {have})")


def run_trace(atlas_dir: str | Path, cfg: TraceConfig, progress: bool = True) -> TraceResult:
    """Compute and store attribution graphs; see the module docstring.

    Raises:
        TraceError: a request that cannot run (bad step, target, budget, selection); nothing is
            written. AtlasError: not an atlas, or another schema version. Transcoder checksums
            that differ from the run's ``transcoders`` table raise TraceError.
    """
    from atlas.ingest.config import config_from_json
    from atlas.ingest.transcoder_setup import setup_transcoders
    from atlas.model import load_pipeline
    from atlas.transcoders import transcoder_checksum

    cfg.validate()
    atlas_dir = Path(atlas_dir).resolve()
    (run_id, config_json, model_json, tc_source), tc_rows = _load_run(atlas_dir, cfg.run_id)
    run_cfg = config_from_json(config_json)
    resolved = json.loads(model_json).get("resolved", {})
    gen = resolved.get("resolved_generation")
    layers = resolved.get("layers")
    if not gen or layers is None:
        raise TraceError(f"run {run_id} stores no resolved generation settings; re-ingest with this atlas version")
    n_steps = gen["num_inference_steps"]
    steps = cfg.steps if cfg.steps is not None else [0]
    bad = [s for s in steps if not 0 <= s < n_steps]
    if bad or not steps:
        raise TraceError(f"step(s) {bad or steps} outside the schedule: run {run_id} has {n_steps} denoising steps "
                         f"(0 .. {n_steps - 1})")
    covered = {(int(l), s): int(d) for l, s, _, d in tc_rows}

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("float32" if device.startswith("cuda") else "float64")
    batch_size = cfg.batch_size or (256 if device.startswith("cuda") else 32)
    settings = cfg.result_settings(dtype_name, batch_size)
    patch_px = 2 * int(json.loads(model_json).get("vae_scale_factor", 8))
    grid = dict(grid_w=gen["width"] // patch_px, n_img=(gen["height"] // patch_px) * (gen["width"] // patch_px),
                height=gen["height"], width=gen["width"])
    try:  # checked before anything is loaded; colour directions are resolved with the VAE below
        specs = [parse_target_spec(t, **grid) for t in cfg.targets]
    except TargetError as e:
        raise TraceError(str(e)) from e
    _check_specs(specs, covered)
    prompts = _select_prompts(atlas_dir, run_id, cfg)

    _ensure_tables(atlas_dir)
    with connect(atlas_dir, read_only=True) as con:
        status = dict(con.execute("SELECT graph_id, status FROM graphs WHERE run_id = ?", [run_id]).fetchall())
    done = {g for g, st in status.items() if st != "error"}  # failed graphs are tried again
    orphans = remove_orphans(atlas_dir, run_id, set(status))
    if orphans:
        log.info("removed %d graph file(s) of an interrupted trace", orphans)
        with connect(atlas_dir) as con:
            refresh_views(con, atlas_dir)

    items = []  # (prompt, step, [(spec index, rank, gid)])
    for pid, text, seed in prompts:
        for step in steps:
            ids = [(i, r, graph_id_for(run_id, pid, step, spec.text, r, settings))
                   for i, spec in enumerate(specs) for r in range(spec.n_graphs)]
            items.append(((pid, text, seed), step, ids))
    total = sum(len(i[2]) for i in items)
    todo = sum(1 for i in items for _, _, g in i[2] if g not in done)
    result = TraceResult(atlas_dir, run_id, total, 0, total - todo, 0, 0, orphans, [])
    if todo == 0:
        return result

    pipe = load_pipeline(run_cfg.model, device=device, dtype=run_cfg.dtype, revision=run_cfg.revision)
    specs = [parse_target_spec(s.text, pipe=pipe, **grid) if ":rgb=" in s.text else s for s in specs]
    transcoders, _, _ = setup_transcoders(run_cfg, pipe, layers, gen, device)
    for key, tc in transcoders.items():
        stream, layer = key.split("_")
        want = {(l, s): c for l, s, c, _ in tc_rows}.get((int(layer), stream))
        got = transcoder_checksum(tc)
        if want is not None and want != got:
            raise TraceError(f"transcoder {key} differs from the one run {run_id} used (checksum {got[:12]} != "
                             f"{want[:12]}); the atlas's activations would not match these graphs")
    with connect(atlas_dir, read_only=True) as con:
        n_text = dict(con.execute("SELECT prompt_id, n_tokens FROM prompts WHERE run_id = ?", [run_id]).fetchall())

    trace_json = json.dumps({**dataclasses.asdict(cfg), "dtype_resolved": dtype_name, "device": device})
    bar = tqdm(total=total, initial=total - todo, unit="graph", desc=f"trace {run_id}", disable=not progress)
    for (pid, text, seed), step, ids in items:
        pending = [(specs[i], r, g) for i, r, g in ids if g not in done]
        if not pending:
            continue
        base = {"run_id": run_id, "prompt_id": pid, "seed": seed, "step": step, "height": gen["height"],
                "width": gen["width"], "trace_config_json": trace_json, "dtype": dtype_name, **{
                    k: settings[k] for k in ("max_feature_nodes", "batch_size", "node_threshold", "edge_threshold")}}
        try:
            t0 = time.perf_counter()
            inputs = capture_step_inputs(pipe, text, seed, step, **gen)
            lrm = LocalReplacementModel.record(pipe.transformer, transcoders, inputs, dtype=_DTYPES[dtype_name])
            repro = reproduction_error(lrm, pipe.transformer, inputs)["rel"]
            ctx = AttributionContext(lrm, batch_size=batch_size)
            ctx._ensure_forward()
            t_lrm = time.perf_counter() - t0
            base.update(sigma=lrm.sigma, s_txt=lrm.n_tokens["txt"], s_img=lrm.n_tokens["img"],
                        covered_layers=json.dumps([f"{s}_{l}" for l, s in lrm.covered]), reproduction_error=repro)
        except Exception as e:  # noqa: BLE001 - recorded, the corpus goes on
            log.warning("prompt %d step %d failed: %s", pid, step, e)
            for spec, rank, gid in pending:
                _commit(atlas_dir, {**base, "graph_id": gid, "target_spec": spec.text, "target_rank": rank,
                                    "status": "error", "reason": f"{type(e).__name__}: {e}"}, None, result)
                bar.update(1)
            continue
        for spec, rank, gid in pending:
            row = {**base, "graph_id": gid, "target_spec": spec.text, "target_rank": rank, "time_lrm_s": t_lrm}
            facts = None
            try:
                targets = spec.expand(lrm, n_text.get(pid))
                if rank >= len(targets):
                    raise TargetError(f"only {len(targets)} feature(s) fire in the selected layers/streams "
                                      f"({spec.text}) on this prompt at step {step}")
                facts = _one_graph(row, targets[rank], ctx, cfg, pipe, transcoders, inputs, n_text.get(pid))
                row["status"] = "ok"
            except TargetError as e:
                row.update(status="empty", reason=str(e))
            except Exception as e:  # noqa: BLE001
                log.warning("graph %s failed: %s\n%s", gid, e, traceback.format_exc())
                row.update(status="error", reason=f"{type(e).__name__}: {e}")
                facts = None
            _commit(atlas_dir, row, facts, result)
            bar.update(1)
    bar.close()
    return result


def _one_graph(row: dict, target, ctx: AttributionContext, cfg: TraceConfig, pipe, transcoders, inputs,
               n_text: int | None) -> dict:
    """Build, prune, score and (optionally) test one graph; fill ``row``; return its fact columns."""
    t0 = time.perf_counter()
    passes0 = ctx.n_passes
    readout = target.readout(ctx.lrm, n_text)
    row.update(target_key=target.key, target_kind=readout.kind, target_layer=readout.layer,
               target_stream=readout.stream, target_feature=readout.feature, target_position=readout.position,
               target_positions=json.dumps(readout.extra.get("positions")), target_value=readout.value)
    if readout.kind == "feature":
        tc = ctx.lrm.transcoders[f"{readout.stream}_{readout.layer}"]
        row["target_encoder_bias"] = float(tc.encoder.bias[readout.feature].detach())
    graph = build_graph(ctx, readout, cfg.max_feature_nodes, cfg.update_interval)
    t1 = time.perf_counter()
    pruned, scores = prune_and_score(graph, cfg.node_threshold, cfg.edge_threshold)
    t2 = time.perf_counter()
    faith = None
    if cfg.faithfulness_k > 0:
        faith = faithfulness(pipe.transformer, transcoders, inputs, graph, pruned, cfg.faithfulness_k)
    t3 = time.perf_counter()
    row.update(
        bias_total=graph.bias, n_active_features=graph.n_active_features, n_expanded=graph.n_expanded,
        n_nodes_unpruned=graph.n_nodes, n_edges_unpruned=int((graph.rows != 0).sum()),
        n_nodes=int(pruned.node_mask.sum()), n_edges=int(pruned.edge_mask.sum()),
        conservation_error=graph.conservation["target_rel"], conservation_error_max=graph.conservation["max_rel"],
        kept_node_influence=pruned.kept_node_fraction, kept_edge_influence=pruned.kept_edge_fraction,
        n_backward_passes=ctx.n_passes - passes0,
        time_attribution_s=t1 - t0, time_prune_s=t2 - t1, time_faithfulness_s=t3 - t2,
        time_total_s=row.get("time_lrm_s", 0.0) + t3 - t0, **scores)
    if faith is not None:
        row.update(faithfulness_k=faith["k"], faithfulness_spearman=_finite(faith["spearman"]),
                   faithfulness_pearson=_finite(faith["pearson"]),
                   faithfulness_json=json.dumps(_json_safe(faith), allow_nan=False))
    else:
        row["faithfulness_k"] = 0
    return store_graph_rows(graph, pruned, row["graph_id"], ctx.lrm.n_tokens["txt"])


def prune_and_score(graph: AttributionGraph, node_threshold: float, edge_threshold: float) -> tuple[PruneResult, dict]:
    """Prune ``graph`` (target weight 1, inputs and target always kept) and compute the
    replacement / completeness scores of the unpruned and the pruned graph."""
    types = graph.nodes["type"]
    w = torch.zeros(graph.n_nodes, dtype=graph.rows.dtype)
    w[graph.target_index] = 1.0
    is_err, is_in = torch.as_tensor(types == "error"), torch.as_tensor(types == "input")
    keep = is_in | torch.as_tensor(types == "target")
    rn = graph.row_nodes
    pruned = prune_graph(graph.rows, w, keep, node_threshold, edge_threshold,
                         has_inputs=torch.as_tensor(types == "feature"), row_nodes=rn)
    rep, comp = graph_scores(graph.rows, w, is_err, is_in, row_nodes=rn)
    prep, pcomp = graph_scores(graph.rows * pruned.edge_mask, w, is_err, is_in, row_nodes=rn)
    return pruned, {"replacement_score": _finite(rep), "completeness_score": _finite(comp),
                    "pruned_replacement_score": _finite(prep), "pruned_completeness_score": _finite(pcomp)}


def store_graph_rows(graph: AttributionGraph, pruned: PruneResult, graph_id: str, s_txt: int) -> dict:
    """Fact columns of a pruned graph: ``{"graph_nodes": {...}, "graph_edges": {...}}`` (numpy)."""
    nodes = graph.nodes
    keep = np.flatnonzero(pruned.node_mask.numpy())
    types = nodes["type"][keep].astype(str)
    stream = nodes["stream"][keep]
    layer = nodes["layer"][keep].astype(float)
    layer[(types == "input") | (layer < 0)] = np.nan
    pos = nodes["position"][keep].astype(float)
    pos[pos < 0] = np.nan
    ctx_idx = np.where(stream == "img", s_txt + np.nan_to_num(pos, nan=0), np.nan_to_num(pos, nan=0))
    ctx_idx = np.where(np.isnan(pos), np.nan, ctx_idx)
    if graph.readout.position is None and graph.readout.extra.get("positions"):
        first = graph.readout.extra["positions"][0]
        ctx_idx[types == "target"] = first + (s_txt if graph.readout.stream == "img" else 0)
    feat = nodes["feature"][keep].astype(float)
    feat[feat < 0] = np.nan
    node_cols = {
        "graph_id": [graph_id] * len(keep), "node": keep, "node_type": types,
        "layer": _nullable(layer), "stream": list(stream), "position": _nullable(pos),
        "ctx_idx": _nullable(ctx_idx), "feature": _nullable(feat), "activation": nodes["activation"][keep].astype(float),
        "influence": pruned.influence.numpy()[keep], "cumulative_influence": pruned.cumulative.numpy()[keep],
    }
    ri, src = np.nonzero(pruned.edge_mask.numpy())
    tgt = graph.row_nodes.numpy()[ri]
    s_stream, t_stream = nodes["stream"][src], nodes["stream"][tgt]
    edge_cols = {
        "graph_id": [graph_id] * len(src), "source": src, "target": tgt,
        "weight": graph.rows.numpy()[ri, src], "source_type": nodes["type"][src].astype(str),
        "target_type": nodes["type"][tgt].astype(str), "source_stream": list(s_stream),
        "target_stream": list(t_stream), "cross_stream": s_stream != t_stream,
    }
    return {"graph_nodes": node_cols, "graph_edges": edge_cols}


def _json_safe(v):
    """Replace non-finite floats (NaN correlations) by None, recursively, for strict JSON."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _nullable(a: np.ndarray) -> list:
    return [None if np.isnan(v) else int(v) for v in a]


def _commit(atlas_dir: Path, row: dict, facts: dict | None, result: TraceResult) -> None:
    """Write a graph's fact files, then commit its ``graphs`` row (see the module docstring)."""
    row = {**row, "created_at": _now()}
    row = {k: (_finite(v) if isinstance(v, float) else v) for k, v in row.items()}
    if facts is not None:
        for name in _GRAPH_TABLES:
            write_partition(atlas_dir, name, {"run_id": row["run_id"]}, facts[name], f"graph-{row['graph_id']}.parquet")
    with connect(atlas_dir) as con, transaction(con):
        con.execute("DELETE FROM graphs WHERE graph_id = ?", [row["graph_id"]])  # a failed earlier attempt
        insert_rows(con, "graphs", [row])
        if facts is not None:
            refresh_views(con, atlas_dir)
    result.graphs_new += 1
    result.graph_ids.append(row["graph_id"])
    if row.get("status") == "empty":
        result.empty += 1
    elif row.get("status") == "error":
        result.errors += 1
