"""The static HTML report without a browser: which pages exist, that every link and image resolves
inside the folder (and nothing points to the network), escaping, incremental reruns, the analysis
and graph sections when their inputs are missing, the plots' geometry, and the CLI."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from click.testing import CliRunner
from test_report_fixtures import EVIL_PROMPT, add_synthetic_graph, build_report_atlas

from atlas.cli import main
from atlas.query import Atlas
from atlas.report import ReportDirError, links, render_report, svg
from atlas.report.analyses import run_analyses
from atlas.report.data import load
from atlas.report.writer import MANIFEST


@pytest.fixture(scope="module")
def built(small_atlas, tmp_path_factory):
    return build_report_atlas(small_atlas, tmp_path_factory.mktemp("report"))


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("href", "src", "xlink:href") and v is not None:
                self.refs.append(v)


def site_refs(report: Path) -> dict[Path, _Refs]:
    out = {}
    for page in report.rglob("*.html"):
        p = _Refs()
        p.feed(page.read_text(encoding="utf-8"))
        out[page] = p
    return out


def test_every_page_is_rendered(built):
    report, atlas = built["report"], Atlas(built["atlas"])
    res = built["result"]
    assert (report / "index.html").is_file() and (report / MANIFEST).is_file()
    prompts = atlas.sql("SELECT run_id, prompt_id FROM prompts").rows()
    assert len(prompts) == 14 and all((report / links.prompt_page(r, p)).is_file() for r, p in prompts)
    graphs = atlas.sql("SELECT run_id, graph_id FROM graphs").rows()
    assert len(graphs) == 2 and all((report / links.graph_page(r, g)).is_file() for r, g in graphs)
    # capped feature pages: the most frequent and strongest per (run, layer, stream), plus graph features
    feats = atlas.sql("SELECT DISTINCT run_id, layer, stream FROM features").rows()
    assert res.pages["feature lists"] == len(feats) == 12
    in_graphs = atlas.sql("SELECT DISTINCT g.run_id, n.layer, n.stream, n.feature FROM graph_nodes n "
                          "JOIN graphs g USING (graph_id) WHERE n.feature IS NOT NULL").rows()
    assert in_graphs and all((report / links.feature_page(*k)).is_file() for k in in_graphs)
    for name in ("recurring_circuits", "attribute_binding", "error_explanations"):
        assert (report / links.analysis_page(name)).is_file()
    for img in atlas.sql("SELECT run_id, prompt_id FROM images").rows():
        assert (report / links.image_file(*img)).is_file()


def test_links_and_images_resolve_inside_the_folder(built):
    report = built["report"]
    refs = site_refs(report)
    assert len(refs) == sum(built["result"].pages.values())
    for page, parsed in refs.items():
        assert "script" not in parsed.tags, page  # no JavaScript at all, nothing from a prompt became markup
        for ref in parsed.refs:
            parts = urlsplit(ref)
            assert not parts.scheme and not parts.netloc, f"{page}: external reference {ref}"
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.is_file(), f"{page}: broken link {ref}"
            assert report.resolve() in target.parents, f"{page}: link leaves the report folder: {ref}"


def test_prompt_text_and_labels_are_escaped(built):
    report, run = built["report"], built["runs"][1]
    html = (report / links.prompt_page(run, 1)).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    assert "<script" not in html and "<b>bold" not in html
    # error labels from the (stand-in) generation_errors query are shown, escaped
    assert "colour_leakage" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    for page in [report / links.analysis_page("recurring_circuits"), report / links.graph_page(run, f"synthetic-{run[-6:]}-1-0")]:
        text = page.read_text(encoding="utf-8")
        assert "<b>not bold" not in text and "<script" not in text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in (report / links.analysis_page("recurring_circuits")).read_text()
    # tooltips in SVG carry tokens like <unk> escaped
    graph = (report / links.graph_page(run, f"synthetic-{run[-6:]}-1-0")).read_text(encoding="utf-8")
    assert "&#39;&lt;unk&gt;&#39;" in graph or "'&lt;unk&gt;'" in graph
    assert EVIL_PROMPT not in graph


def test_labels_are_escaped_everywhere_they_show(built):
    report, run = built["report"], built["runs"][0]
    layer, stream, feature = Atlas(built["atlas"]).sql(
        "SELECT layer, stream, feature FROM features WHERE label IS NOT NULL").row(0)
    pages = [links.feature_page(run, layer, stream, feature), links.feature_list_page(run, layer, stream),
             links.graph_page(run, f"synthetic-{run[-6:]}-0-0")]
    for rel in pages:
        html = (report / rel).read_text(encoding="utf-8")
        assert "&lt;i&gt;red&lt;/i&gt; patches &amp; &lt;script&gt;alert(2)&lt;/script&gt;" in html, rel
        assert "<i>red" not in html and "<script" not in html, rel


def test_feature_page_content(built):
    report, atlas = built["report"], Atlas(built["atlas"])
    run = built["runs"][0]
    g = atlas.sql("SELECT target_layer, target_stream, target_feature FROM graphs WHERE run_id = ?", [run]).row(0)
    html = (report / links.feature_page(run, *g)).read_text(encoding="utf-8")
    n_steps = atlas.sql("SELECT n_steps FROM runs WHERE run_id = ?", [run]).item()
    assert html.count('<div class="step">') == n_steps
    assert html.count('<svg class="crop"') >= 1 and 'class="colorbar"' in html and 'class="hist"' in html
    assert "Upstream (feeds this feature)" in html and "In attribution graphs" in html
    # crops are clipped with viewBox to whole patches of the run's patch size
    patch = atlas.sql("SELECT patch_px FROM runs WHERE run_id = ?", [run]).item()
    for vb in re.findall(r'<svg class="crop" [^>]*viewBox="(\d+) (\d+) (\d+) (\d+)"', html):
        assert all(int(v) % patch == 0 for v in vb)
    txt = atlas.sql("SELECT layer, feature FROM features WHERE run_id = ? AND stream = 'txt' "
                    "ORDER BY density DESC, feature LIMIT 1", [run]).row(0)
    txt_html = (report / links.feature_page(run, txt[0], "txt", txt[1])).read_text(encoding="utf-8")
    assert '<b class="p" style="background:#' in txt_html


def test_rerun_is_incremental(built, tmp_path):
    atlas_dir = tmp_path / "atlas"
    shutil.copytree(built["atlas"], atlas_dir)
    report = tmp_path / "report"
    shutil.copytree(built["report"], report)
    kw = {"queries_dir": built["queries"], "max_feature_pages": 6}
    again = render_report(atlas_dir, report, **kw)  # moved atlas and report: still up to date
    assert again.up_to_date and again.stats.written == [] and again.stats.unchanged == again.stats.n_files > 100
    forced = render_report(atlas_dir, report, force=True, **kw)
    assert not forced.up_to_date and forced.stats.written == [] and forced.stats.unchanged == again.stats.n_files
    mtimes = {p: p.stat().st_mtime_ns for p in report.rglob("*.html")}
    run = built["runs"][0]
    gid = add_synthetic_graph(atlas_dir, prompt_id=3, run_id=run, seed=3)
    after = render_report(atlas_dir, report, **kw)
    written = set(after.stats.written)
    assert links.graph_page(run, gid) in written and "index.html" in written and links.GRAPH_LIST in written
    assert links.prompt_page(run, 3) in written
    assert not any(w.startswith(f"prompts/{built['runs'][1]}/") for w in written)  # the other run is untouched
    assert len(written) < after.stats.n_files / 4, sorted(written)
    unchanged = [p for p, t in mtimes.items() if str(p.relative_to(report)) not in written]
    assert unchanged and all(p.stat().st_mtime_ns == mtimes[p] for p in unchanged)
    n_features = after.pages["feature pages"]
    assert after.stats.not_rendered >= n_features - 40  # feature pages whose rows did not change are not rendered
    assert render_report(atlas_dir, report, force=True, **kw).stats.written == []  # ... and equal a full render
    # a graph that disappears takes its page with it
    for table in ("graph_nodes", "graph_edges"):
        (atlas_dir / "facts" / table / f"run_id={run}" / f"graph-{gid}.parquet").unlink()
    from atlas.store.catalog import connect, refresh_views

    with connect(atlas_dir) as con:
        con.execute("DELETE FROM graphs WHERE graph_id = ?", [gid])
        refresh_views(con, atlas_dir)
    gone = render_report(atlas_dir, report, **kw)
    assert links.graph_page(run, gid) in gone.stats.removed and not (report / links.graph_page(run, gid)).exists()
    assert render_report(atlas_dir, report, force=True, **kw).stats.written == []
    manifest = json.loads((report / MANIFEST).read_text())
    assert set(manifest["files"]) == {str(p.relative_to(report)) for p in report.rglob("*") if p.is_file()} - {MANIFEST}


def test_refuses_a_folder_that_is_not_a_report(built, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ReportDirError, match="not an atlas report"):
        render_report(built["atlas"], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_analyses_missing_failed_and_present(built, tmp_path):
    queries = tmp_path / "queries"
    shutil.copytree(built["queries"], queries)
    (queries / "attribute_binding.sql").write_text("-- answers: broken on purpose\n-- columns: x\nSELECT 1 + 'x'\n")
    (queries / "generation_errors.sql").unlink()
    atlas = Atlas(built["atlas"], queries)
    results, errors = run_analyses(atlas, load(atlas, max_feature_pages=2))
    status = {r.spec.name: r.status for r in results}
    assert status == {"recurring_circuits": "ok", "attribute_binding": "failed", "error_explanations": "missing"}
    assert errors is None  # no generation_errors query: nothing is labelled
    expl = next(r for r in results if r.spec.name == "error_explanations")
    assert "generation_errors_table_not_written_yet" in expl.message
    rec = next(r for r in results if r.spec.name == "recurring_circuits")
    assert rec.n_rows == 2 and all([label for label, _ in ev] == ["prompt_id", "prompts"] for ev in rec.evidence)
    feature_cells = [row[rec.columns.index("feature_key")] for row in rec.rows]
    assert all(c["href"] and c["href"].startswith("../features/") for c in feature_cells)
    assert "BinderException" in next(r for r in results if r.spec.name == "attribute_binding").message


def test_atlas_without_graph_tables(built, tmp_path):
    atlas_dir = tmp_path / "atlas"
    shutil.copytree(built["atlas"], atlas_dir)
    shutil.rmtree(atlas_dir / "facts" / "graph_nodes")
    shutil.rmtree(atlas_dir / "facts" / "graph_edges")
    from atlas.store.catalog import connect

    with connect(atlas_dir) as con:
        con.execute("DROP TABLE graphs")
        con.execute("DROP VIEW graph_nodes")
        con.execute("DROP VIEW graph_edges")
    queries = tmp_path / "queries"  # the library without any analysis query
    shutil.copytree(built["queries"], queries, ignore=lambda d, names: [n for n in names if not n.startswith(
        ("report_", "top_features", "transcoder_"))])
    assert not (queries / "recurring_circuits.sql").exists()
    res = render_report(atlas_dir, tmp_path / "report", max_feature_pages=1, queries_dir=queries)
    assert res.pages.get("graph pages", 0) == 0
    text = (tmp_path / "report" / links.GRAPH_LIST).read_text()
    assert "this atlas has no graph tables" in text
    for name in ("recurring_circuits", "attribute_binding", "error_explanations"):
        assert "Not computed yet" in (tmp_path / "report" / links.analysis_page(name)).read_text()
    prompt = (tmp_path / "report" / links.prompt_page(built["runs"][0], 0)).read_text()
    assert "Generation errors are not labelled yet" in prompt and "the atlas has no graph tables" in prompt


def test_svg_helpers():
    assert svg.crop_window(0, 8, 8, 12) == (0, 0, 8, 8)
    assert svg.crop_window(35, 32, 32, 12) == (0, 0, 12, 12)
    assert svg.crop_window(32 * 20 + 31, 32, 32, 12) == (20, 14, 32, 26)
    assert svg.colormap(0) == "#000004" and svg.colormap(1) == "#fcffa4" and svg.colormap(2) == svg.colormap(1)
    assert svg.fmt(None) == "—" and svg.fmt(0.000123) == "1.23e-04" and svg.fmt(1.23456) == "1.23" and svg.fmt(7) == "7"
    crop = svg.crop_heatmap("a.png", 32, 32, 4, [(9, 1.0), (63, 0.5)], 9, 1.0, title="<b>&")
    assert crop.count('width="4" height="4" fill=') == 2 and crop.count('class="peak"') == 1
    assert "<title>&lt;b&gt;&amp;</title>" in crop
    assert 'fill="#fcffa4"' in crop  # peak value is the top of the colour map
    hist = svg.histogram([1, 0, 3], 2.5, title='"x"')
    assert hist.count("M") == 2 and "2.5" in hist and "&#34;x&#34;" in hist
    assert links.slug("a/b\\..") == "a_b_.." and links.slug("..") == "_.."


def test_report_command(built, tmp_path):
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["report", str(built["atlas"]), "--out", str(out), "--max-feature-pages", "1",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"open {out / 'index.html'}" in result.output and (out / "index.html").is_file()
    bad = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "not an atlas" in bad.output


def test_demo_ends_by_writing_the_report(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--limit", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    index = out / "report" / "index.html"
    assert result.output.rstrip().splitlines()[-1] == f"Open the report in a browser: {index}"
    run = Atlas(out).sql("SELECT run_id FROM runs")["run_id"][0]
    page = out / "report" / links.prompt_page(run, 0)
    assert index.is_file() and page.is_file()
    # the oracle judged the generation; its page says what it found
    found = Atlas(out).sql("SELECT error_type FROM generation_errors WHERE prompt_id = 0")["error_type"].to_list()
    html = page.read_text(encoding="utf-8")
    if found == ["none"]:
        assert "Checked: no error found" in html
    else:
        assert found and all(e in html for e in found) and "Checked: no error found" not in html


def test_writer_only_touches_its_own_files(tmp_path):
    from atlas.report.writer import SiteWriter

    out = tmp_path / "site"
    w = SiteWriter(out)
    w.write_text("a.html", "one")  # a render that dies here, before finish()
    w = SiteWriter(out)  # ... can be rerun: the folder was claimed first
    w.write_text("a.html", "one")
    w.write_text("b/c.html", "two")
    assert w.finish("fp1").written == ["a.html", "b/c.html"]
    (out / "b" / "mine.txt").write_text("not the report's")
    w = SiteWriter(out)
    assert w.up_to_date("fp1") and not w.up_to_date("fp2")
    w.write_text("a.html", "one")
    stats = w.finish("fp2")
    assert stats.written == [] and stats.unchanged == 1 and stats.removed == ["b/c.html"]
    assert (out / "b" / "mine.txt").read_text() == "not the report's"
