"""Benchmark of transcoder / SAE training on the tiny pipeline (issue 3).

Measures, each configuration in a fresh subprocess (so peak memory is its own):
  * throughput: trained rows per second (all keys; with and without harvesting time);
  * memory: the buffer's bytes against --buffer-gb, and the process's peak RSS (ru_maxrss)
    against (RSS before the buffer was allocated + the budget);
  * fidelity at a fixed step budget: FVU and L0 of transcoders vs SAEs on the same layers
    (held-out prompts, pooled over denoising steps), and end-to-end latent MSE / cosine / PSNR.

Usage:
    python benchmarks/bench_training.py                  # full: 4 layers x 2 streams
    python benchmarks/bench_training.py --quick          # a smoke run (seconds)
    python benchmarks/bench_training.py --out bench.json --steps 600 --threads 2

Numbers depend on the machine and its load; the report prints the settings next to them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "data" / "prompts" / "t2i-compbench" / "color_train.txt"
EVAL = ROOT / "data" / "prompts" / "t2i-compbench" / "color_val.txt"


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kB


def worker(spec: dict) -> dict:
    """One training run in this process; returns its measurements."""
    import torch

    torch.set_num_threads(spec.pop("threads"))
    from atlas.model import load_pipeline
    from atlas.transcoders.training import TrainConfig, train_transcoders

    pipe = load_pipeline("tiny")
    rss_before = _rss_gb()
    cfg = TrainConfig(model="tiny", device="cpu", prompts=str(TRAIN), eval_prompts=str(EVAL), **spec)
    t0 = time.perf_counter()
    result = train_transcoders(cfg, pipe=pipe, progress=False)
    wall = time.perf_counter() - t0
    pooled = [r for r in result.evaluation.rows if r["step"] is None] if result.evaluation else []
    return {
        "config": {k: spec[k] for k in sorted(spec) if k not in ("out",)},
        "wall_seconds": wall, "throughput": result.throughput,
        "rss_before_buffer_gb": rss_before, "peak_rss_gb": _rss_gb(),
        "final_train": result.final,
        "eval": {f"{r['stream']}_{r['layer']}": {"fvu": r["fvu"], "l0": r["l0"], "dead": r["dead_fraction"]}
                 for r in pooled},
        "end_to_end": {k: result.evaluation.set_row[k] for k in ("latent_mse", "latent_cosine", "image_psnr")}
        if result.evaluation and result.evaluation.set_row else None,
    }


def run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    ap.add_argument("--steps", type=int, default=600, help="fixed step budget of the fidelity comparison")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker)), default=str))
        return

    layers, steps, eval_limit = ([0, 1, 2, 3], args.steps, 64) if not args.quick else ([0], 20, 4)
    base = dict(layers=layers, streams=["img", "txt"], expansion_factor=16, time_embed_dim=256, batch_size=1024,
                lr=3e-3, reuse=4, seed=0, gen_batch_size=64, checkpoint_every=100, eval_limit=eval_limit,
                threads=args.threads)
    if args.quick:
        base.update(batch_size=64, expansion_factor=2, time_embed_dim=8, gen_batch_size=8)
    results = {"machine": {"threads": args.threads}, "memory": [], "fidelity": []}
    with tempfile.TemporaryDirectory() as tmp:
        # memory bound and throughput: two budgets, same work
        for gb in ((0.1, 0.4) if not args.quick else (0.01,)):
            spec = dict(base, role="transcoder", steps=min(steps, 150), buffer_gb=gb, evaluate=False,
                        out=f"{tmp}/mem-{gb}")
            r = run(spec)
            results["memory"].append(r)
            tp = r["throughput"]
            rest = r["peak_rss_gb"] - r["rss_before_buffer_gb"] - tp["buffer_bytes"] / 1e9
            print(f"budget {gb:.2f} GB: buffer {tp['buffer_bytes'] / 1e9:.4f} GB; peak RSS {r['peak_rss_gb']:.3f} GB = "
                  f"{r['rss_before_buffer_gb']:.3f} (pipeline loaded) + buffer + {rest:.3f} (harvest and training "
                  "working set, independent of the budget), "
                  f"{tp['rows_per_second']:.0f} rows/s overall, {tp['train_rows_per_second']:.0f} rows/s training only, "
                  f"harvest {tp['harvest_seconds']:.1f} of {tp['seconds']:.1f} s", flush=True)
        # fidelity at a fixed step budget: transcoder vs SAE, same layers, data and settings
        for role in ("transcoder", "sae"):
            spec = dict(base, role=role, steps=steps, buffer_gb=0.4 if not args.quick else 0.01, out=f"{tmp}/{role}")
            r = run(spec)
            results["fidelity"].append(r)
            fvu = {k: round(v["fvu"], 4) for k, v in r["eval"].items()}
            l0 = {k: round(v["l0"], 1) for k, v in r["eval"].items()}
            e2e = r["end_to_end"]
            print(f"{role:>10} {steps} steps in {r['wall_seconds']:.0f} s: FVU {fvu}\n{'':>10} L0 {l0}\n"
                  f"{'':>10} end to end: latent MSE {e2e['latent_mse']:.4g}, cosine {e2e['latent_cosine']:.4f}, "
                  f"PSNR {e2e['image_psnr']:.2f} dB", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
