"""`render_report`: the static HTML site of an atlas (``atlas report``).

Reads the atlas through the query layer (:mod:`atlas.report.data`), renders the Jinja templates
of ``reports/`` with the contexts of :mod:`atlas.report.pages`, and writes the site with
:class:`atlas.report.writer.SiteWriter`: a rerun on an unchanged atlas does nothing; otherwise
feature pages (the bulk) whose input rows did not change are not rendered again, only pages whose
content changed are written, and pages that no longer exist are removed.

Site layout (all links relative; opens from the file system, no server, no network)::

    index.html                                runs, fidelity, notable features, links
    features/<run>/L<layer>.<stream>.<feature>.html and list-L<layer>-<stream>.html
    prompts/index.html, prompts/<run>/<prompt_id>.html
    graphs/index.html, graphs/<run>/<graph_id>.html
    analyses/<name>.html
    img/<run>/<prompt_id>.png                 generated images (small ones upscaled, nearest)
    assets/style.css
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from tqdm.auto import tqdm

from atlas.query import Atlas
from atlas.query.library import QUERIES_DIR
from atlas.report import links, svg
from atlas.report.analyses import run_analyses
from atlas.report.data import load
from atlas.report.pages import PageBuilder
from atlas.report.writer import MANIFEST_VERSION, SiteWriter, WriteStats, fingerprint

TEMPLATES_DIR = Path(__file__).resolve().parent.parent.parent / "reports"
MIN_IMAGE_PX = 256  # images smaller than this are upscaled (nearest neighbour) to at least this size
THUMB_PX = 128  # images larger than MIN_IMAGE_PX also get a thumbnail of this size


@dataclass
class ReportResult:
    """What :func:`render_report` did."""

    out_dir: Path
    index: Path
    seconds: float
    up_to_date: bool
    stats: WriteStats = field(default_factory=WriteStats)
    pages: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the command line."""
        if self.up_to_date:
            return f"report up to date ({self.stats.unchanged} files), {self.seconds:.1f} s"
        kinds = ", ".join(f"{n} {k}" for k, n in self.pages.items())
        skipped = f" ({self.stats.not_rendered} not re-rendered)" if self.stats.not_rendered else ""
        return (f"report: {kinds}; {len(self.stats.written)} file(s) written, {self.stats.unchanged} unchanged"
                f"{skipped}, {len(self.stats.removed)} removed in {self.seconds:.1f} s")


def make_env(templates_dir: Path = TEMPLATES_DIR) -> Environment:
    """The Jinja environment: autoescaping for .html, undefined names are errors."""
    env = Environment(loader=FileSystemLoader(str(templates_dir)), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = svg.fmt
    env.filters["pct"] = lambda v, d=2: "—" if v is None else f"{100 * v:.{d}f}%"
    env.filters["clip"] = lambda text, n: text if len(text) <= n else text[: n - 1].rstrip() + "…"
    return env


def _code_files(templates_dir: Path, queries_dir: Path) -> list[Path]:
    code = sorted(Path(__file__).parent.glob("*.py")) + sorted(templates_dir.glob("*")) + sorted(queries_dir.glob("*.sql"))
    return [p for p in code if p.is_file()]


def _input_fingerprint(atlas_dir: Path, templates_dir: Path, queries_dir: Path, options: dict) -> str:
    atlas_files = [atlas_dir / "atlas.duckdb", atlas_dir / "atlas.duckdb.wal"]
    for sub in ("facts", "images"):
        if (atlas_dir / sub).is_dir():
            atlas_files += [p for p in (atlas_dir / sub).rglob("*") if p.is_file()]
    return fingerprint(atlas_dir, atlas_files, _code_files(templates_dir, queries_dir), {"v": MANIFEST_VERSION, **options})


def _shared_inputs(data, templates_dir: Path, queries_dir: Path, options: dict) -> str:
    """Digest of what every feature page depends on besides its own rows (and which of the features
    it links to have pages): renderer code, templates, SQL, options, runs, prompts (text, image),
    tokens and feature labels."""
    h = hashlib.sha256(fingerprint(templates_dir, [], _code_files(templates_dir, queries_dir), options).encode())
    labels = [(f["run_id"], f["layer"], f["stream"], f["feature"], f["label"]) for f in data.features if f["label"]]
    for part in (data.runs, data.prompts, sorted(data.tokens.items()), labels):
        h.update(repr(part).encode())
    return h.hexdigest()


def _image_bytes(src: Path, scale: int) -> bytes:
    if scale == 1:
        return src.read_bytes()
    from PIL import Image

    with Image.open(src) as im:
        big = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        buf = io.BytesIO()
        big.save(buf, format="PNG", optimize=False)
        return buf.getvalue()


def _thumb_bytes(src: Path) -> bytes:
    from PIL import Image

    with Image.open(src) as im:
        im.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


def _write_images(writer: SiteWriter, atlas_dir: Path, prompts: list[dict]) -> None:
    """Copy each generation's image into the report (upscaled if small); a prompt whose image file
    is missing is shown without one."""
    for p in prompts:
        if not p["image_path"]:
            continue
        src = atlas_dir / p["image_path"]
        if not src.is_file():
            p["image_path"] = None
            continue
        size = max(p["image_height"] or 0, p["image_width"] or 0) or MIN_IMAGE_PX
        scale = max(1, math.ceil(MIN_IMAGE_PX / size))
        key = f"{p['image_sha256'] or src.stat().st_mtime_ns}:{scale}"
        writer.write_derived(links.image_file(p["run_id"], p["prompt_id"]), key,
                             lambda src=src, scale=scale: _image_bytes(src, scale))
        if size > MIN_IMAGE_PX:
            writer.write_derived(links.thumb_file(p["run_id"], p["prompt_id"]), key + f":thumb{THUMB_PX}",
                                 lambda src=src: _thumb_bytes(src))


def render_report(atlas_dir: str | Path, out_dir: str | Path | None = None, *, force: bool = False,
                  examples_per_step: int = 5, max_feature_pages: int | None = None, progress: bool = False,
                  templates_dir: str | Path = TEMPLATES_DIR, queries_dir: str | Path = QUERIES_DIR) -> ReportResult:
    """Render (or update) the static report of an atlas.

    Args:
        atlas_dir: the atlas folder.
        out_dir: the report folder (default ``<atlas_dir>/report``); created if missing.
        force: render every page even if nothing the report depends on changed (files whose
            content is unchanged are still not rewritten).
        examples_per_step: top examples shown per feature and denoising step.
        max_feature_pages: at most this many feature pages per (run, layer, stream): the most
            frequent and the strongest, plus every feature in a graph (default: all features).
        progress: show a progress bar while rendering pages.
        templates_dir, queries_dir: where the templates and the SQL library are (tests point these
            elsewhere).

    Raises:
        atlas.store.catalog.AtlasError: not an atlas (or another schema version).
        atlas.report.writer.ReportDirError: ``out_dir`` is a non-empty folder that is not a report.
    """
    t0 = time.perf_counter()
    atlas_dir, templates_dir, queries_dir = Path(atlas_dir), Path(templates_dir), Path(queries_dir)
    atlas = Atlas(atlas_dir, queries_dir)
    out = Path(out_dir) if out_dir is not None else atlas_dir / "report"
    writer = SiteWriter(out)
    options = {"examples_per_step": examples_per_step, "max_feature_pages": max_feature_pages}
    fp = _input_fingerprint(atlas_dir.resolve(), templates_dir, queries_dir, options)
    if not force and writer.up_to_date(fp):
        return ReportResult(out, out / "index.html", time.perf_counter() - t0, True,
                            WriteStats(unchanged=len(writer.old)))
    data = load(atlas, examples_per_step=examples_per_step, max_feature_pages=max_feature_pages)
    analyses, errors = run_analyses(atlas, data)
    builder = PageBuilder(data, errors, analyses)
    env = make_env(templates_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer.write_text(links.STYLE, (templates_dir / "style.css").read_text(encoding="utf-8") + svg.colorbar_css())
    _write_images(writer, atlas_dir, data.prompts)

    counts: dict[str, int] = {}

    def emit(template: str, ctx: dict, kind: str) -> None:
        writer.write_text(ctx["path"], env.get_template(template).render(**ctx))
        counts[kind] = counts.get(kind, 0) + 1

    emit("index.html", builder.index(), "index")
    for run_id, layer, stream in sorted({(f["run_id"], f["layer"], f["stream"]) for f in data.features}):
        emit("feature_list.html", builder.feature_list(run_id, layer, stream), "feature lists")
    emit("prompt_list.html", builder.prompt_list(), "prompt list")
    emit("graph_list.html", builder.graph_list(), "graph list")
    for res in analyses:
        emit("analysis.html", builder.analysis(res), "analyses")
    for i, p in enumerate(data.prompts):
        same = [q for q in data.prompts[max(i - 1, 0): i + 2] if q["run_id"] == p["run_id"] and q is not p]
        prev = same[0] if same and same[0]["prompt_id"] < p["prompt_id"] else None
        nxt = same[-1] if same and same[-1]["prompt_id"] > p["prompt_id"] else None
        emit("prompt.html", builder.prompt(p, prev, nxt), "prompt pages")
    for g in data.graphs:
        emit("graph.html", builder.graph(g), "graph pages")
    feature_tpl = env.get_template("feature.html")
    shared = _shared_inputs(data, templates_dir, queries_dir, options)
    paged = [f for f in data.features if (f["run_id"], f["layer"], f["stream"], f["feature"]) in data.feature_set]
    for f in tqdm(paged, desc="feature pages", unit="page", disable=not progress, mininterval=1.0):
        key = (f["run_id"], f["layer"], f["stream"], f["feature"])
        own = f"{data.feature_inputs.get(key, '')}\0{builder.feature_link_state(key)}"
        digest = hashlib.sha256(f"{shared}\0{own}".encode()).hexdigest()[:32]
        rel = links.feature_page(*key)
        if force or not writer.unchanged_input(rel, digest):  # unchanged rows: the page is not rendered
            ctx = builder.feature(f)
            writer.write_text(rel, feature_tpl.render(**ctx), input_key=digest)
    counts["feature pages"] = len(paged)
    stats = writer.finish(fp)
    return ReportResult(out, out / "index.html", time.perf_counter() - t0, False, stats, counts)
