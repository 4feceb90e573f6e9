"""Cost of `atlas report`: time and disk size of the static site, and what a rerun costs.

For two atlases, the demo atlas (T2I-CompBench color_val through the built-in tiny pipeline,
every layer and stream) and a small one restricted to one layer and stream (about a thousand
features with examples), prints: the cold render (seconds, pages, bytes on disk by part), a
rerun on the unchanged atlas (skipped by the input fingerprint), a forced rerun (every page
rendered, none rewritten since none changed) and a rerun after one attribution graph was added
(only the pages that changed are written). The site's size is also given zipped (deflate), as
one would share it.

    python benchmarks/bench_report.py [--atlas DIR] [--demo-limit 300] [--small-limit 24]

Atlases are ingested into a temporary folder unless ``--atlas`` names an existing demo atlas
(it is copied, never modified).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
DEMO_PROMPTS = ROOT / "data" / "prompts" / "t2i-compbench" / "color_val.txt"


def _zipped(path: Path) -> int:
    """Bytes of the folder as a deflate zip (what one would share)."""
    import zipfile

    out = path.with_suffix(".zip")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for f in sorted(path.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(path))
    size = out.stat().st_size
    out.unlink()
    return size


def _du(path: Path) -> tuple[int, int]:
    files = [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def _ingest(out: Path, limit: int, **kw) -> Path:
    from atlas.ingest.config import RunConfig
    from atlas.ingest.runner import run_ingest

    t0 = time.perf_counter()
    run_ingest(RunConfig(prompts=str(DEMO_PROMPTS), out=str(out), limit=limit, **kw), progress=False)
    print(f"  (ingested {limit} prompts into {out} in {time.perf_counter() - t0:.0f} s)")
    return out


def _bench(name: str, atlas_dir: Path, report: Path) -> None:
    from test_report_fixtures import add_synthetic_graph

    from atlas.query import Atlas
    from atlas.report import render_report

    a = Atlas(atlas_dir)
    n_feat = a.sql("SELECT count(*) AS n FROM features")["n"][0]
    n_ex = a.sql("SELECT count(*) AS n FROM top_examples")["n"][0]
    n_prompts = a.sql("SELECT count(*) AS n FROM prompts")["n"][0]
    atlas_bytes, _ = _du(atlas_dir)
    print(f"\n{name}: {n_prompts} generations, {n_feat} features that fired, {n_ex} top examples, "
          f"atlas {atlas_bytes / 1e6:.1f} MB")
    cold = render_report(atlas_dir, report)
    total, n_files = _du(report)
    parts = {sub: _du(report / sub)[0] for sub in ("features", "prompts", "graphs", "img")}
    per_feature = parts["features"] / max(cold.pages.get("feature pages", 1), 1)
    print(f"  cold render        : {cold.seconds:6.1f} s  {n_files} files, {total / 1e6:.1f} MB "
          f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in parts.items())}); "
          f"{per_feature / 1024:.1f} KiB per feature page, {1000 * cold.seconds / n_files:.2f} ms per file; "
          f"zipped {_zipped(report) / 1e6:.1f} MB")
    same = render_report(atlas_dir, report)
    print(f"  rerun, unchanged   : {same.seconds:6.2f} s  (up to date: {same.up_to_date}, "
          f"{len(same.stats.written)} files written)")
    forced = render_report(atlas_dir, report, force=True)
    print(f"  rerun, --force     : {forced.seconds:6.1f} s  ({len(forced.stats.written)} files written, "
          f"{forced.stats.unchanged} unchanged)")
    gid = add_synthetic_graph(atlas_dir, prompt_id=0, step=0, seed=7)
    inc = render_report(atlas_dir, report)
    kinds: dict[str, int] = {}
    for rel in inc.stats.written:
        kinds[rel.split("/")[0]] = kinds.get(rel.split("/")[0], 0) + 1
    print(f"  rerun, +1 graph    : {inc.seconds:6.1f} s  ({len(inc.stats.written)} files written: "
          f"{', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}; {inc.stats.not_rendered} feature pages "
          f"not re-rendered; graph {gid})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atlas", type=Path, help="An existing demo atlas to copy instead of ingesting one.")
    parser.add_argument("--demo-limit", type=int, default=300, help="Prompts of the demo atlas (the demo uses 300).")
    parser.add_argument("--small-limit", type=int, default=24,
                        help="Prompts of the one-layer, image-stream atlas (about 1000 features).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        tmp = Path(tmp)
        if args.atlas:
            demo = tmp / "demo"
            shutil.copytree(args.atlas, demo, ignore=shutil.ignore_patterns("report"))
        else:
            demo = _ingest(tmp / "demo", args.demo_limit)
        _bench("demo atlas", demo, tmp / "demo-report")
        small = _ingest(tmp / "small", args.small_limit, layers=[0], streams=["img"])
        _bench("one layer, image stream", small, tmp / "small-report")
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
