"""Ingest cost on the built-in tiny pipeline, measured side by side in one run.

Prints, over the same prompts and seeds: wall time of bare pipeline calls vs `run_ingest`
(capture + transcoder encoding + Parquet/DuckDB writes + final statistics), their ratio, bytes on
disk per generation (by part of the atlas), and peak resident memory of each (each mode runs in
its own subprocess so the peaks do not mix).

    python benchmarks/bench_ingest.py [--prompts FILE] [--n 96] [--batch-size 8]
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
DEFAULT_PROMPTS = ROOT / "data" / "prompts" / "t2i-compbench" / "color_val.txt"


def _bare(prompts: str, n: int, batch_size: int) -> dict:
    import torch

    from atlas.ingest.prompts import read_prompts
    from atlas.model import load_pipeline, recommended_settings

    texts = [p.text for p in read_prompts(prompts, limit=n).prompts]
    t0 = time.perf_counter()
    pipe = load_pipeline("tiny")
    load_s = time.perf_counter() - t0
    gen = recommended_settings("tiny")
    gen = {k: gen[k] for k in ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length")}
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        pipe(prompt=chunk, generator=[torch.Generator().manual_seed(0) for _ in chunk], output_type="pil", **gen)
    return {"load_s": load_s, "generate_s": time.perf_counter() - t0}


def _ingest(prompts: str, n: int, batch_size: int) -> dict:
    from atlas.ingest.config import RunConfig
    from atlas.ingest.runner import run_ingest

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "atlas"
        t0 = time.perf_counter()
        run_ingest(RunConfig(prompts=prompts, out=str(out), limit=n, batch_size=batch_size), progress=False)
        total = time.perf_counter() - t0
        sizes = {
            "activations": _du(out / "facts" / "activations"),
            "top_examples": _du(out / "facts" / "top_examples"),
            "images": _du(out / "images"),
            "catalog": (out / "atlas.duckdb").stat().st_size,
        }
    return {"ingest_s": total, "bytes": sizes}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mode", choices=["bare", "ingest"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        result = (_bare if args.mode == "bare" else _ingest)(args.prompts, args.n, args.batch_size)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    runs = {}
    for mode in ("bare", "ingest"):
        cmd = [sys.executable, __file__, "--mode", mode, "--prompts", args.prompts, "--n", str(args.n),
               "--batch-size", str(args.batch_size)]
        runs[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    bare, ing = runs["bare"], runs["ingest"]
    n = args.n
    print(f"tiny pipeline, {n} generations, batch {args.batch_size}, 4 layers x 2 streams, random-init transcoders")
    print(f"bare pipeline calls   : {bare['generate_s']:.2f} s  ({1000 * bare['generate_s'] / n:.1f} ms/generation)")
    print(f"atlas ingest (total)  : {ing['ingest_s']:.2f} s  ({1000 * ing['ingest_s'] / n:.1f} ms/generation; "
          f"includes model load {bare['load_s']:.2f} s, transcoder calibration and final statistics)")
    print(f"ratio ingest / bare   : {ing['ingest_s'] / bare['generate_s']:.1f}x")
    total = sum(ing["bytes"].values())
    parts = ", ".join(f"{k} {v / n / 1024:.1f} KiB" for k, v in ing["bytes"].items())
    print(f"bytes on disk         : {total / n / 1024:.1f} KiB per generation ({parts})")
    print(f"peak RSS              : bare {bare['peak_rss_mb']:.0f} MB, ingest {ing['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
