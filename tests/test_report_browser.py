"""The report as a person sees it: pages opened in headless Chromium (Debian's chromium, over the
DevTools pipe) show no console errors, no failed loads, no broken images or links, make no network
request, and have the elements they promise; a prompt with ``<script>`` markup renders as text.

Skipped with an install hint where chromium is missing; in CI (``CI`` set) a missing chromium is
a failure, since .ci/run installs it."""

from __future__ import annotations

import os

import pytest
from test_report_fixtures import EVIL_PROMPT, build_report_atlas

from atlas.query import Atlas
from atlas.report import links
from atlas.report.browser import INSTALL_HINT, Browser, find_chromium

if not os.path.exists("/usr/bin/chromium") and not find_chromium():
    if os.environ.get("CI"):
        pytest.fail(f"chromium is missing in CI: {INSTALL_HINT}", pytrace=False)
    pytest.skip(INSTALL_HINT, allow_module_level=True)


@pytest.fixture(scope="module")
def built(small_atlas, tmp_path_factory):
    return build_report_atlas(small_atlas, tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def _open(browser, page, **evaluate):
    report = browser.open(page, evaluate=evaluate)
    assert report.problems() == [], f"{page}: {report.problems()}"
    return report


def test_index(built, browser):
    r = _open(browser, built["report"] / "index.html",
              runs="document.querySelectorAll('section.run').length",
              lists="document.querySelectorAll('a.listlink').length",
              charts="document.querySelectorAll('#fidelity svg.chart rect').length",
              notable="document.querySelectorAll('#notable a.fk').length",
              analyses="[...document.querySelectorAll('#browse a')].map(a => a.textContent)")
    assert r.title.startswith("circuit atlas report")
    assert r.values["runs"] == 2 and r.values["lists"] == 12 and r.values["charts"] > 16
    assert r.values["notable"] >= 12 * 2
    assert {"Recurring circuits", "Attribute binding", "Error explanations"} <= set(r.values["analyses"])
    assert "not computed yet" in r.text  # attribute_binding has no query in the test library


def test_image_feature_page(built, browser):
    run = built["runs"][0]
    layer, stream, feature = Atlas(built["atlas"]).sql(
        "SELECT target_layer, target_stream, target_feature FROM graphs WHERE run_id = ?", [run]).row(0)
    r = _open(browser, built["report"] / links.feature_page(run, layer, stream, feature),
              crops="document.querySelectorAll('svg.crop image').length",
              heat="document.querySelectorAll('svg.crop .heat rect:not(.dim)').length",
              crop_px="document.querySelector('svg.crop').getBoundingClientRect().width",
              colorbar="document.querySelectorAll('.colorbar .cbar-grad').length",
              hists="document.querySelectorAll('svg.hist').length",
              upstream="document.querySelectorAll('#circuit a.fk').length",
              prompts="document.querySelectorAll('#prompts td a').length")
    assert r.values["crops"] >= 4 and r.values["heat"] >= r.values["crops"]  # every crop shows its peak patch
    assert r.values["crop_px"] >= 100  # upscaled so the patches are visible
    assert r.values["colorbar"] == 1 and r.values["hists"] >= 1
    assert r.values["upstream"] >= 1 and r.values["prompts"] >= 1
    for url in [u for u in r.links if "/graphs/" in u][:1] + [u for u in r.links if "/features/" in u][:2]:
        _open(browser, url)  # linked graph and upstream feature pages load cleanly too


def test_text_feature_page(built, browser):
    run = built["runs"][1]
    layer, feature = Atlas(built["atlas"]).sql(
        "SELECT layer, feature FROM features WHERE run_id = ? AND stream = 'txt' ORDER BY density DESC, feature LIMIT 1",
        [run]).row(0)
    r = _open(browser, built["report"] / links.feature_page(run, layer, "txt", feature),
              shaded="[...document.querySelectorAll('.toks b')].filter(t => t.style.background).length",
              peaks="document.querySelectorAll('.toks b.p').length",
              crops="document.querySelectorAll('svg.crop').length")
    assert r.values["shaded"] >= 1 and r.values["peaks"] >= 1 and r.values["crops"] == 0


def test_prompt_with_script_markup_renders_as_text(built, browser):
    run = built["runs"][1]
    r = _open(browser, built["report"] / links.prompt_page(run, 1),
              prompt="document.querySelector('p.prompt').textContent",
              bold="document.querySelectorAll('main b').length",
              imgs="document.querySelectorAll('img').length",
              errors="document.querySelector('#errors').innerText",
              tokens="document.querySelectorAll('.toks .tok').length")
    assert r.values["prompt"] == EVIL_PROMPT
    assert r.scripts == 0 and r.dialogs == []
    assert "<b>bold</b>" in r.text and r.values["imgs"] == 1  # the generated image only; no injected <img>
    assert "<img src=x onerror=alert(1)>" in r.values["errors"]
    assert r.values["tokens"] == 32


def test_graph_page(built, browser):
    run = built["runs"][0]
    r = _open(browser, built["report"] / links.graph_page(run, f"synthetic-{run[-6:]}-0-0"),
              nodes="document.querySelectorAll('svg.graph a.node').length",
              edges="document.querySelectorAll('svg.graph path.edge').length",
              colours="[...new Set([...document.querySelectorAll('svg.graph path.edge')].map(e => e.getAttribute('stroke')))]",
              rows="[...document.querySelectorAll('svg.graph .rowlabel')].map(t => t.textContent)",
              rowy="[...document.querySelectorAll('svg.graph .rowlabel')].map(t => t.getBBox().y)",
              scores="document.querySelector('#scores').innerText")
    assert r.values["nodes"] >= 5 and r.values["edges"] >= 10 and len(r.values["colours"]) == 2
    assert r.values["rows"][0] == "inputs" and r.values["rowy"] == sorted(r.values["rowy"], reverse=True)
    assert "conservation error" in r.values["scores"]
    node_links = [u for u in r.links if "/features/" in u]
    assert node_links
    _open(browser, node_links[0])


def test_every_other_page_loads_cleanly(built, browser):
    report = built["report"]
    pages = [report / "index.html", report / links.PROMPT_LIST, report / links.GRAPH_LIST]
    pages += sorted(report.glob("analyses/*.html")) + sorted(report.glob("features/*/list-*.html"))[:3]
    pages += sorted(report.glob("prompts/*/*.html"))[:4] + sorted(report.glob("graphs/*/*.html"))
    for page in pages:
        _open(browser, page)
