"""Latency of every named query on synthetic atlases of realistic shape, at several scales.

Writes atlases directly in the atlas layout (catalog from `atlas.store.catalog.create_atlas`,
commit-log rows in `batches` and `graphs`, hive-partitioned Parquet facts, one activations file
per batch and (layer, stream), one graph_nodes/graph_edges file per graph), then times each named
query (best of --repeat runs, after one warm-up run, each on a fresh read-only connection as
`Atlas.query` does), and prints latency per query and scale, the ratio of each latency to the
smallest scale's next to the ratio of the data sizes, and the atlas's size on disk.

Scale 1.0 is about 10^8 sparse activations and 10^7 graph edges (2000 generations x 4 steps x
8 layers x 2 streams; 1000 graphs of ~10^4 edges):

    generations     = 2000 * scale        (16 per batch; 512x512 px, 32x32 patches, 4 steps)
    activations     = ~781 per (generation, step, layer, stream)  -> 10^8 * scale
    graphs          = generations / 2 (one per other generation), ~10^4 edges, ~10^3 nodes each
                      (features from Zipf-distributed pools, plus planted recurring chains)

    python benchmarks/bench_queries.py --scales 0.03,0.1,0.3 [--out DIR] [--keep] [--repeat 3]
    python benchmarks/bench_queries.py --scales 0.01 --queries recurring_edges,attribute_binding

Run it under `nice` on a shared machine; DuckDB uses --threads threads (default 2).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUN = "bench-run"
LAYERS, STREAMS, STEPS = 8, ("img", "txt"), 4
GRID, PATCH, SIZE = 32, 16, 512
D_FEAT = 49152
BATCH = 16
ACTS_PER_CELL = 781          # activations per (generation, step, layer, stream)
EDGES_PER_GRAPH = 10_000
NODES_PER_GRAPH = 1_000
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
NOUNS = ["bench", "bowl", "car", "vase", "horse", "clock", "cake", "bird"]


def _prompts(n: int, rng: np.random.Generator) -> list[str]:
    """Half toy-grammar pairs (ground-truth regions), half T2I-CompBench-like pairs (noun features)."""
    out = []
    for i in range(n):
        c1, c2 = rng.choice(COLOURS, 2, replace=False)
        if i % 2 == 0:
            s1, s2 = rng.choice(SHAPES, 2)
            out.append(f"a {c1} {s1} and a {c2} {s2}")
        else:
            n1, n2 = rng.choice(NOUNS, 2, replace=False)
            out.append(f"a {c1} {n1} and a {c2} {n2}")
    return out


def _zipf_pick(rng, pool: int, size: int, a: float = 1.15) -> np.ndarray:
    """Indices in [0, pool) with Zipf-like frequencies (a few features fire very often)."""
    w = 1.0 / np.arange(1, pool + 1) ** a
    return rng.choice(pool, size=size, p=w / w.sum())


def write_synthetic_atlas(out: Path, scale: float, seed: int = 0) -> dict:
    """Write a synthetic atlas of the given scale into ``out`` (must not exist). Returns its counts."""
    from atlas.query.derived import prepare_atlas, replace_rows
    from atlas.store.catalog import connect, create_atlas, insert_rows, refresh_views, transaction
    from atlas.store.facts import batch_file_name, write_partition

    rng = np.random.default_rng(seed)
    n_gen = max(BATCH * 2, int(round(2000 * scale / BATCH)) * BATCH)
    create_atlas(out)
    texts = _prompts(n_gen, rng)
    n_img = GRID * GRID
    # feature pools per (layer, stream): a permutation so popular features have scattered ids
    pools = {(l, s): rng.permutation(D_FEAT)[:4000] for l in range(LAYERS) for s in STREAMS}
    counts = {"generations": n_gen, "activations": 0, "graphs": 0, "graph_nodes": 0, "graph_edges": 0}

    # --- activations: one file per batch and (layer, stream)
    sigma = np.array([1.0, 0.75, 0.5, 0.25], dtype=np.float32)
    for b in range(n_gen // BATCH):
        for layer in range(LAYERS):
            for stream in STREAMS:
                n = BATCH * STEPS * ACTS_PER_CELL
                gen = np.repeat(np.arange(b * BATCH, (b + 1) * BATCH), STEPS * ACTS_PER_CELL)
                step = np.tile(np.repeat(np.arange(STEPS), ACTS_PER_CELL), BATCH)
                n_pos = n_img if stream == "img" else 12
                pos = rng.integers(0, n_pos, n)
                feat = pools[(layer, stream)][_zipf_pick(rng, 4000, n, a=0.9)]
                order = np.lexsort((feat, pos, step, gen))
                write_partition(out, "activations", {"run_id": RUN, "layer": layer, "stream": stream}, {
                    "batch_id": np.full(n, b), "prompt_id": gen[order], "step": step[order], "sigma": sigma[step[order]],
                    "position": pos[order], "feature": feat[order],
                    "value": rng.exponential(1.0, n).astype(np.float32) + 0.05}, batch_file_name(b))
                counts["activations"] += n

    # --- graphs: one for every other generation, step cycling 0..3
    motifs = [(int(rng.integers(0, LAYERS - 2)), "img", int(_zipf_pick(rng, 4000, 1)[0])) for _ in range(300)]
    graph_rows = []
    for k, pid in enumerate(range(0, n_gen, 2)):
        gid = f"g{pid:06d}"
        step = k % STEPS
        toks = texts[pid].split() + ["</s>"]
        types, layers, streams, positions, features = [], [], [], [], []

        def add(t, l, s, p, f):
            types.append(t), layers.append(l), streams.append(s), positions.append(p), features.append(f)

        for p in range(len(toks)):
            add("input", -1, "txt", p, -1)
        for p in rng.choice(n_img, 64, replace=False):
            add("input", -1, "img", int(p), -1)
        for l in range(LAYERS - 1):
            for s in STREAMS:
                add("error", l, s, int(rng.integers(0, n_img if s == "img" else len(toks))), -1)
        for m in rng.choice(len(motifs), 40, replace=False):   # planted recurring chains
            l, s, f = motifs[m]
            add("feature", l, s, int(rng.integers(0, n_img)), int(pools[(l, s)][f]))
        n_feat = NODES_PER_GRAPH - len(types) - 1
        fl = rng.integers(0, LAYERS - 1, n_feat)
        fs = np.where(rng.random(n_feat) < 0.8, "img", "txt")
        for l, s in zip(fl, fs):
            pos = int(rng.integers(0, n_img)) if s == "img" else int(rng.integers(0, len(toks)))
            add("feature", int(l), str(s), pos, int(pools[(int(l), str(s))][_zipf_pick(rng, 4000, 1)[0]]))
        target_pos = int(rng.integers(0, n_img))
        target_feat = int(pools[(LAYERS - 1, "img")][_zipf_pick(rng, 4000, 1, a=1.5)[0]])
        add("target", LAYERS - 1, "img", target_pos, target_feat)
        types_a, layers_a = np.array(types), np.array(layers)
        # dedupe identical feature nodes
        key = [(t, l, s, p, f) for t, l, s, p, f in zip(types, layers, streams, positions, features)]
        _, first = np.unique(np.array([hash(x) for x in key]), return_index=True)
        keep = np.sort(first)
        types_a, layers_a = types_a[keep], layers_a[keep]
        streams_a, pos_a, feat_a = np.array(streams)[keep], np.array(positions)[keep], np.array(features)[keep]
        order = np.argsort(layers_a, kind="stable")   # inputs (-1) first, target (L-1) last
        types_a, layers_a, streams_a, pos_a, feat_a = (x[order] for x in (types_a, layers_a, streams_a, pos_a, feat_a))
        n_nodes = len(types_a)
        lower = np.searchsorted(layers_a, layers_a, side="left")   # nodes with a smaller layer come before
        # incoming edges: the target gets 300, every other feature node ~10 from lower layers
        dst_nodes = np.flatnonzero((types_a == "feature") & (lower > 0))
        per = max(1, (EDGES_PER_GRAPH - 300) // max(1, len(dst_nodes)))
        dst = np.repeat(dst_nodes, per)
        src = (rng.random(len(dst)) * lower[dst]).astype(np.int64)
        t_idx = n_nodes - 1
        dst = np.concatenate([dst, np.full(300, t_idx)])
        src = np.concatenate([src, rng.integers(0, lower[t_idx], 300)])
        # planted chains: the first motif features feed each other and the target
        motif_nodes = np.flatnonzero((types_a == "feature") & np.isin(feat_a, [pools[(l, s)][f] for l, s, f in motifs]))
        for a_, b_ in zip(motif_nodes[:-1], motif_nodes[1:]):
            if layers_a[a_] < layers_a[b_]:
                src, dst = np.append(src, a_), np.append(dst, b_)
        pair = np.unique(np.stack([src, dst], 1), axis=0)
        src, dst = pair[:, 0], pair[:, 1]
        w = rng.normal(0, 0.05, len(src)) * np.where(types_a[src] == "input", 20, 1)
        act = np.where(types_a == "input", 5.0, rng.exponential(1.0, n_nodes) + 0.1)
        infl = np.sort(rng.exponential(0.01, n_nodes))[::-1]
        nullable = lambda a: [None if v < 0 else int(v) for v in a]   # noqa: E731
        node_cols = {"graph_id": [gid] * n_nodes, "node": np.arange(n_nodes), "node_type": types_a,
                     "layer": nullable(layers_a), "stream": streams_a, "position": pos_a,
                     "ctx_idx": np.where(streams_a == "img", 256 + pos_a, pos_a), "feature": nullable(feat_a),
                     "activation": act, "influence": infl, "cumulative_influence": np.cumsum(infl) / infl.sum()}
        edge_cols = {"graph_id": [gid] * len(src), "source": src, "target": dst, "weight": w,
                     "source_type": types_a[src], "target_type": types_a[dst], "source_stream": streams_a[src],
                     "target_stream": streams_a[dst], "cross_stream": streams_a[src] != streams_a[dst]}
        write_partition(out, "graph_nodes", {"run_id": RUN}, node_cols, f"graph-{gid}.parquet")
        write_partition(out, "graph_edges", {"run_id": RUN}, edge_cols, f"graph-{gid}.parquet")
        counts["graphs"] += 1
        counts["graph_nodes"] += n_nodes
        counts["graph_edges"] += len(src)
        graph_rows.append({"graph_id": gid, "run_id": RUN, "prompt_id": pid, "seed": 0, "step": step,
                           "sigma": float(sigma[step]), "target_spec": "top1:L7", "target_rank": 0,
                           "target_key": f"L{LAYERS - 1}.img.{target_feat}@top", "target_kind": "feature",
                           "target_layer": LAYERS - 1, "target_stream": "img", "target_feature": target_feat,
                           "target_position": target_pos, "status": "ok", "n_nodes": n_nodes, "n_edges": len(src),
                           "created_at": _dt.datetime(2026, 1, 1)})

    # --- catalog rows
    now = _dt.datetime(2026, 1, 1)
    feat_rows = [{"run_id": RUN, "layer": l, "stream": s, "feature": int(f), "firing_count": int(1e6 / (i + 1)),
                  "density": 1e-3 / (i + 1), "mean_activation": 1.0, "max_activation": 5.0, "n_prompts": n_gen,
                  "label": None} for (l, s), pool in pools.items() for i, f in enumerate(pool)]
    import polars as pl

    with connect(out) as con, transaction(con):
        insert_rows(con, "runs", [{"run_id": RUN, "config_json": json.dumps({"synthetic": scale}), "model_id": "synthetic",
                                   "height": SIZE, "width": SIZE, "patch_px": PATCH, "n_steps": STEPS,
                                   "status": "complete", "n_prompts": n_gen, "started_at": now, "finished_at": now}])
        insert_rows(con, "batches", [{"run_id": RUN, "batch_id": b, "n_prompts": BATCH, "committed_at": now}
                                     for b in range(n_gen // BATCH)])
        insert_rows(con, "transcoders", [{"run_id": RUN, "layer": l, "stream": s, "role": "transcoder", "d_model": 3072,
                                          "d_feat": D_FEAT, "source": "synthetic"} for l in range(LAYERS) for s in STREAMS])
        for name, frame in (
            ("prompts", pl.DataFrame({"run_id": RUN, "prompt_id": np.arange(n_gen, dtype=np.int32), "text": texts,
                                      "seed": np.zeros(n_gen, dtype=np.int64), "batch_id": np.arange(n_gen) // BATCH})),
            ("prompt_tokens", pl.DataFrame([{"run_id": RUN, "prompt_id": p, "position": i, "token_id": i, "token": t}
                                            for p, text in enumerate(texts) for i, t in enumerate(text.split() + ["</s>"])])),
            ("features", pl.DataFrame(feat_rows)),
            ("graphs", pl.DataFrame(graph_rows)),
        ):
            con.register("_rows", frame.to_arrow())
            cols = ", ".join(frame.columns)
            con.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM _rows")
            con.unregister("_rows")
        refresh_views(con, out)
    prepare_atlas(out)
    # generation errors: a third of the traced generations erroneous, the rest checked correct
    kinds = np.array(["colour_leakage", "wrong_colour", "missing_object", "none", "none", "none"])
    labels = [{"run_id": RUN, "prompt_id": int(p), "error_type": str(kinds[rng.integers(0, len(kinds))]),
               "source": "synthetic", "created_at": now} for p in range(n_gen)]
    replace_rows(out, "generation_errors", "true", [], labels)
    return counts


def _pick_params(atlas) -> dict[str, dict]:
    """Parameters that hit data (chosen untimed): the busiest feature, a traced prompt, ..."""
    top = atlas.sql("SELECT layer, stream, feature FROM graph_nodes WHERE node_type = 'feature' "
                    "GROUP BY ALL ORDER BY count(*) DESC LIMIT 1").row(0, named=True)
    busiest = atlas.sql("SELECT layer, stream, feature FROM features ORDER BY firing_count DESC LIMIT 1").row(0, named=True)
    return {
        "feature_firing": {**busiest, "max_rows": 100},
        "cofiring_features": busiest,
        "feature_neighbors": top,
        "prompt_graph_nodes": {"prompt_id": 0},
        "prompt_graph_edges": {"prompt_id": 0},
    }


def time_queries(atlas_dir: Path, names: list[str], repeat: int, threads: int) -> dict[str, tuple[float, int, float]]:
    """Best-of-``repeat`` wall latency (s), row count and best-of-``repeat`` CPU time (s, this
    process: DuckDB's threads included) of each named query, after one untimed warm-up. CPU time
    is less sensitive than wall time to other jobs competing for the cores."""
    from atlas.query import Atlas, get_query
    from atlas.store.catalog import connect

    atlas = Atlas(atlas_dir)
    params = _pick_params(atlas)
    out = {}
    for name in names:
        q = get_query(name)
        values = q.bind(params.get(name, {}))
        best, best_cpu, rows = float("inf"), float("inf"), 0
        for i in range(repeat + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            with connect(atlas_dir, read_only=True) as con:
                con.execute(f"SET threads = {int(threads)}")
                for k, v in values.items():
                    con.execute(f"SET VARIABLE {k} = ?", [v])
                rows = len(con.sql(q.sql).pl())
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i:
                best, best_cpu = min(best, dt), min(best_cpu, dc)
        out[name] = (best, rows, best_cpu)
        print(f"    {name:<24} {best:8.3f} s  {rows:>8} rows  (cpu {best_cpu:.3f} s)", flush=True)
    return out


def du(path: Path) -> dict[str, int]:
    """Bytes on disk: catalog, each fact table, total."""
    sizes = {"catalog": (path / "atlas.duckdb").stat().st_size}
    for t in sorted((path / "facts").iterdir()):
        sizes[t.name] = sum(f.stat().st_size for f in t.rglob("*.parquet"))
    sizes["total"] = sum(sizes.values())
    return sizes


def main() -> None:
    from atlas.query import list_queries

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="0.03,0.1,0.3", help="comma-separated scales (1.0 = 1e8 activations, 1e7 edges)")
    ap.add_argument("--out", help="folder for the atlases (default: a temporary folder, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    ap.add_argument("--queries", help="comma-separated query names (default: all but the report's report_*)")
    ap.add_argument("--include-report", action="store_true", help="also time the report's report_* queries")
    args = ap.parse_args()

    scales = [float(s) for s in args.scales.split(",")]
    names = args.queries.split(",") if args.queries else [
        n for n in list_queries() if args.include_report or not n.startswith("report_")]
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="atlas-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for scale in scales:
            atlas_dir = base / f"scale-{scale:g}"
            if (atlas_dir / "atlas.duckdb").exists():
                counts = json.loads((atlas_dir / "bench_counts.json").read_text())
                gen_s = None
                print(f"scale {scale:g}: reusing {atlas_dir}")
            else:
                t0 = time.perf_counter()
                counts = write_synthetic_atlas(atlas_dir, scale)
                gen_s = time.perf_counter() - t0
                (atlas_dir / "bench_counts.json").write_text(json.dumps(counts))
                t0 = time.perf_counter()
                from atlas.analysis import analyze
                analyze(atlas_dir)
                counts["analyze_s"] = time.perf_counter() - t0
            sizes = du(atlas_dir)
            print(f"scale {scale:g}: {counts['activations']:,} activations, {counts['graph_edges']:,} graph edges, "
                  f"{counts['graphs']} graphs, {counts['generations']} generations; {sizes['total'] / 1e6:.1f} MB on disk"
                  + (f"; written in {gen_s:.0f} s" if gen_s else "")
                  + (f", atlas analyze {counts['analyze_s']:.1f} s" if "analyze_s" in counts else ""), flush=True)
            results[scale] = {"counts": counts, "sizes": sizes, "latency": time_queries(atlas_dir, names, args.repeat,
                                                                                        args.threads)}
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(base, ignore_errors=True)

    s0 = scales[0]
    ratios = ", ".join(f"{results[s]['counts']['graph_edges'] / results[s0]['counts']['graph_edges']:.1f}x" for s in scales)
    for col, what in ((0, "wall latency"), (2, "CPU time")):
        print(f"\n{what} (s, best of {args.repeat}, {args.threads} DuckDB thread(s)) per scale; ratio to scale "
              f"{s0:g} in brackets (data ratio: {ratios})")
        print(f"{'query':<24}" + "".join(f"{'scale ' + format(s, 'g'):>22}" for s in scales))
        for name in names:
            cells = []
            for s in scales:
                t = results[s]["latency"][name][col]
                r = t / max(results[s0]["latency"][name][col], 1e-9)
                cells.append(f"{t:10.3f} ({r:5.1f}x)")
            print(f"{name:<24}" + "".join(f"{c:>22}" for c in cells))
    print("\ndisk (MB)")
    parts = sorted({k for s in scales for k in results[s]["sizes"]})
    print(f"{'part':<24}" + "".join(f"{'scale ' + format(s, 'g'):>14}" for s in scales))
    for part in parts:
        print(f"{part:<24}" + "".join(f"{results[s]['sizes'].get(part, 0) / 1e6:14.1f}" for s in scales))


if __name__ == "__main__":
    main()
