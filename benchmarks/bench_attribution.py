"""Benchmark of batched attribution on the tiny pipeline (random-init transcoders, ingest defaults).

Measures, for one prompt and step:
- time per graph and per adjacency row for batched attribution (B rows per backward pass, one
  retained forward per prompt and step, as circuit-tracer does), for several B;
- the published way as a reference: one forward + one backward pass per adjacency row (DifFRACT's
  code expands one node per pass), building the same graph;
- peak resident memory of each mode (a fresh subprocess per mode; Linux VmHWM after resetting it);
- the conservation error distribution (|sum(edges) + bias - value| / |value| over every row of a
  fully expanded graph) in float64 and float32.

Usage: python benchmarks/bench_attribution.py [--threads 1] [--budget 1000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a red car on a green field"


def _rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    _BASE[0] = _status_mb("VmRSS")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """Peak RSS since the last reset, minus the RSS at that reset (the mode's own memory), MB."""
    return _status_mb("VmHWM") - _BASE[0]


_BASE = [0.0]


def _setup(threads: int, dtype: str, step: int = 1):
    import torch

    from atlas.attribution.lrm import LocalReplacementModel, capture_step_inputs
    from atlas.ingest.config import RunConfig
    from atlas.ingest.transcoder_setup import setup_transcoders
    from atlas.model import load_pipeline, recommended_settings

    torch.set_num_threads(threads)
    pipe = load_pipeline("tiny")
    gen = recommended_settings("tiny")
    tcs, _, _ = setup_transcoders(RunConfig(prompts="x", out="y"), pipe, [0, 1, 2, 3], gen, "cpu")
    inputs = capture_step_inputs(pipe, PROMPT, 0, step, **gen)
    t0 = time.perf_counter()
    lrm = LocalReplacementModel.record(pipe.transformer, tcs, inputs, dtype=getattr(torch, dtype))
    return pipe, tcs, inputs, lrm, time.perf_counter() - t0


def run_mode(mode: str, batch: int, budget: int, threads: int, dtype: str) -> dict:
    """One measurement in this process (called in a subprocess by main)."""
    import torch

    from atlas.attribution.attribute import AttributionContext, build_graph, conservation_error
    from atlas.attribution.targets import FeatureTarget

    pipe, tcs, inputs, lrm, t_record = _setup(threads, dtype)
    c = lrm.codes[(3, "img")]
    target = FeatureTarget(3, "img", int(c.features[c.values.argmax()]), "top").readout(lrm)
    _rss_reset()
    every = 128  # every mode re-estimates influences after 128 new rows (circuit-tracer: update_interval batches)
    if mode == "batched":
        t0 = time.perf_counter()
        ctx = AttributionContext(lrm, batch_size=batch)
        ctx._ensure_forward()
        t_forward = time.perf_counter() - t0
        graph = build_graph(ctx, target, budget, update_interval=max(1, every // batch))
        t_graph = time.perf_counter() - t0
        return {"mode": mode, "batch": batch, "dtype": dtype, "rows": ctx.n_rows_computed, "passes": ctx.n_passes,
                "t_record_s": t_record, "t_forward_s": t_forward, "t_graph_s": t_graph,
                "t_per_row_ms": 1e3 * ctx.time_rows_s / ctx.n_rows_computed, "peak_rss_mb": _peak_mb(),
                "n_expanded": graph.n_expanded, "n_active": graph.n_active_features,
                "target_conservation": graph.conservation["target_rel"]}
    if mode == "reference":  # the published way: one forward + one backward pass per adjacency row

        class OnePerPass(AttributionContext):
            def compute_rows(self, readouts):
                out = []
                for r in readouts:
                    self._forward = None  # no retained graph: a fresh forward for every row
                    out.append(super().compute_rows([r]))
                return torch.cat(out)

        t0 = time.perf_counter()
        ctx = OnePerPass(lrm, batch_size=1)
        graph = build_graph(ctx, target, budget, update_interval=every)
        t_graph = time.perf_counter() - t0
        return {"mode": mode, "batch": 1, "dtype": dtype, "rows": ctx.n_rows_computed, "passes": ctx.n_passes,
                "t_record_s": t_record, "t_graph_s": t_graph, "peak_rss_mb": _peak_mb(),
                "t_per_row_ms": 1e3 * ctx.time_rows_s / ctx.n_rows_computed, "n_expanded": graph.n_expanded}
    if mode == "conservation":
        ctx = AttributionContext(lrm, batch_size=batch)
        idx = torch.arange(ctx.n_features)[ctx.feature_layer > 0]
        rows, bias, value = ctx.feature_rows(idx)
        err = conservation_error(rows, bias, value).double()
        q = torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
        qs = torch.quantile(err, q).tolist()
        return {"mode": mode, "dtype": dtype, "rows": len(err), "median": qs[0], "p90": qs[1], "p99": qs[2],
                "max": qs[3], "frac_below_1e-4": float((err <= 1e-4).double().mean())}
    raise ValueError(mode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: best on a shared 2-core box)")
    ap.add_argument("--budget", type=int, default=1000, help="max_feature_nodes of the timed graph")
    ap.add_argument("--batches", default="1,8,32,256")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--_mode", help=argparse.SUPPRESS)
    ap.add_argument("--_batch", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._mode:
        res = run_mode(args._mode, args._batch, args.budget, args.threads, args.dtype)
        print("RESULT " + json.dumps(res))
        return

    def sub(mode, batch=64, dtype=args.dtype):
        cmd = [sys.executable, __file__, "--_mode", mode, "--_batch", str(batch), "--budget", str(args.budget),
               "--threads", str(args.threads), "--dtype", dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])

    results = {"reference": sub("reference"), "batched": [sub("batched", int(b)) for b in args.batches.split(",")],
               "conservation": [sub("conservation", 256, "float64"), sub("conservation", 256, "float32")]}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    ref = results["reference"]
    print(f"tiny pipeline, prompt {PROMPT!r}, step 1, dtype {args.dtype}, {args.threads} thread(s), budget {args.budget}")
    print(f"reference (1 forward + 1 backward per row): {ref['t_per_row_ms']:.2f} ms/row, "
          f"{ref['t_graph_s']:.2f} s/graph ({ref['n_expanded']} features, {ref['passes']} passes), "
          f"peak extra RSS {ref['peak_rss_mb']:.0f} MB")
    for b in results["batched"]:
        speed = ref["t_per_row_ms"] / b["t_per_row_ms"]
        print(f"batched B={b['batch']:4d}: {b['t_per_row_ms']:.3f} ms/row ({speed:.1f}x faster per row), "
              f"{b['t_graph_s']:.2f} s/graph ({ref['t_graph_s'] / b['t_graph_s']:.1f}x) ({b['n_expanded']} of {b['n_active']} features expanded, "
              f"{b['passes']} passes, forward {b['t_forward_s']:.2f} s), peak extra RSS {b['peak_rss_mb']:.0f} MB")
    for c in results["conservation"]:
        print(f"conservation {c['dtype']}: {c['rows']} rows, median {c['median']:.2e}, p90 {c['p90']:.2e}, "
              f"p99 {c['p99']:.2e}, max {c['max']:.2e}, share <= 1e-4: {c['frac_below_1e-4']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
