"""The interactive map: one offline HTML file; in headless Chromium a hover shows the cell's
class, a click lists its neighbours, the legend hides a class, nothing is fetched."""

import json
import os
import re

import numpy as np
import pytest

from ssl_blood.cli import main
from ssl_blood.features.embeddings import Embeddings
from ssl_blood.errors import UserError
from ssl_blood.analysis.explore import explore_page
from selenium.webdriver.common.actions.action_builder import ActionBuilder

from tests.helpers import (CHROMEDRIVER, CHROMIUM, DEEP_QUERY, chrome, console_errors,
                           requested_urls, wait_for)


@pytest.fixture(scope="module")
def page(tiny_embeddings, tmp_path_factory):
    out = tmp_path_factory.mktemp("map") / "map.html"
    probe = tmp_path_factory.mktemp("probe")
    assert main(["linear-probe", "--embeddings", str(tiny_embeddings), "--out", str(probe)]) == 0
    info = explore_page(Embeddings.load(tiny_embeddings), out, "test",
                        json.loads((probe / "linear_probe.json").read_text()), k=6)
    return out, info


def test_page_is_self_contained(page):
    path, info = page
    html = path.read_text()
    assert info == {"cells": 40, "thumbnails": 40, "neighbours": 6, "gallery_split": "test",
                    "umap": "computed", "split": "test", "bytes": len(html.encode())}
    assert not re.search(r"""<(script|link|img)[^>]*(src|href)=["']https?://|url\(["']?https?://""", html)
    assert "--ssl-blood-sprite:url(data:image/jpeg;base64," in html
    assert "Highlight immature granulocytes" in html and "Download selected cells (CSV)" in html


def test_bad_input(tiny_embeddings, tmp_path, capsys):
    emb = Embeddings.load(tiny_embeddings)
    with pytest.raises(UserError, match="comes from other embeddings"):
        explore_page(emb, tmp_path / "m.html", "test", {"identity": "sha256:other", "test_predictions": [0] * 40})
    with pytest.raises(UserError, match="predictions are for the test split"):
        explore_page(emb, tmp_path / "m.html", "val", {"identity": emb.identity, "test_predictions": []})
    assert main(["embed", "--baseline", "random-init", "--backbone", "cnn6", "--npz",
                 emb.embedder.source["path"], "--out", str(tmp_path / "px.npz")]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "px.npz"), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["explore", "--embeddings", str(tiny_embeddings), "--index", str(tmp_path / "idx"),
                 "--out", str(tmp_path / "m.html")]) == 2
    assert "was built from random-init:cnn6" in capsys.readouterr().err
    small = Embeddings.load(tiny_embeddings)
    keep = ~((small.split == "test") & (small.ids >= 4))
    from dataclasses import replace

    tiny = replace(small, features=small.features[keep], labels=small.labels[keep], split=small.split[keep],
                   ids=small.ids[keep])
    with pytest.raises(UserError, match="'test' split has 4 cells; a map needs at least 5"):
        explore_page(tiny, tmp_path / "m.html", "test")
    assert not (tmp_path / "m.html").exists()


POINT = """
function walk(v, acc){ acc.push(v); for (const c of (v.child_views || [])) walk(c, acc); return acc; }
const views = [...Bokeh.index.roots].flatMap(r => walk(r, []));
const plot = views.find(v => v.model.name === 'map');
const src = [...Bokeh.documents[0].all_models].find(m => m.name === arguments[0]);
const i = arguments[1];
const box = plot.canvas_view.el.getBoundingClientRect();
return [box.left + plot.frame.x_scale.compute(src.data.x[i]),
        box.top + plot.frame.y_scale.compute(src.data.y[i]), src.data.cls[i], src.data.id[i]];
"""


@pytest.mark.browser
def test_map_in_headless_chromium(page, artifacts):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("chromium / chromedriver not installed (Debian packages chromium, chromium-driver)")
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    path, _ = page
    driver = chrome()
    try:
        driver.get(path.as_uri())
        assert wait_for(lambda: driver.execute_script(
            "return window.Bokeh && Bokeh.index.roots && [...Bokeh.index.roots].length > 0"), 10)
        x, y, cls, cell_id = driver.execute_script(POINT, "cells:monocyte", 0)

        def pointer(click=False):
            actions = ActionBuilder(driver)
            actions.pointer_action.move_to_location(int(x), int(y))
            if click:
                actions.pointer_action.click()
            actions.perform()

        pointer()
        tooltip = wait_for(lambda: driver.execute_script(DEEP_QUERY, ".tip-class"))
        assert tooltip == [cls] == ["monocyte"]
        pointer(click=True)
        panel = wait_for(lambda: driver.execute_script(DEEP_QUERY, ".nb"))
        assert len(panel) == 6 and all(re.match(r"#\d+", t) for t in panel)
        title = driver.execute_script(DEEP_QUERY, ".nb-title")
        assert title == [f"#{cell_id} (monocyte): 6 nearest test cells"]
        legend_hidden = driver.execute_script("""
            const r = [...Bokeh.documents[0].all_models].find(m => m.name === 'basophil' && 'visible' in m && m.glyph);
            return r.visible;""")
        assert legend_hidden is True
        # click the legend entry of basophil: the plot's legend hides the class
        hidden = driver.execute_script("""
            function walk(v, acc){ acc.push(v); for (const c of (v.child_views || [])) walk(c, acc); return acc; }
            const views = [...Bokeh.index.roots].flatMap(r => walk(r, []));
            const plot = views.find(v => v.model.name === 'map');
            const legend = plot.model.legend ? plot.model.legend : null;
            const lv = [...plot.renderer_views.values()].find(v => v.model.type === 'Legend');
            const box = plot.canvas_view.el.getBoundingClientRect();
            const bbox = lv.bbox;
            return [box.left + bbox.left + 20, box.top + bbox.top + 12];""")
        actions = ActionBuilder(driver)
        actions.pointer_action.move_to_location(int(hidden[0]), int(hidden[1]))
        actions.pointer_action.click()
        actions.perform()
        assert wait_for(lambda: driver.execute_script("""
            const r = [...Bokeh.documents[0].all_models].find(m => m.name === 'basophil' && m.glyph);
            return r.visible === false;"""))
        assert console_errors(driver) == []
        assert all(u.startswith(("file:", "data:", "about:", "blob:")) for u in requested_urls(driver))
        driver.save_screenshot(str(artifacts / "explore.png"))
    finally:
        driver.quit()
    # time to interactive is measured by experiments/bench_post.py (docs/benchmarks.md), not here


HOSTILE = '"><img src=x onerror="window.__xss=1">'


@pytest.mark.browser
def test_hostile_class_names_stay_text_in_the_map_and_the_report(tiny_embeddings, tmp_path):
    """Class names come from folder names and manifest cells: in the tooltip, the neighbour panel,
    the selection summary, the CSV and the report's iframe they are text, never markup."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("chromium / chromedriver not installed (Debian packages chromium, chromium-driver)")
    from dataclasses import replace

    from ssl_blood.analysis.report import render

    emb = Embeddings.load(tiny_embeddings)
    names = tuple(f"{HOSTILE}{i}" if n == "monocyte" else n for i, n in enumerate(emb.class_names))
    hostile_name = next(n for n in names if n.startswith(HOSTILE))
    quote_meta = {"path": np.array([f'a "quoted" <b>{i}</b>' for i in range(len(emb.ids))])}
    emb = replace(emb, class_names=names, metadata=quote_meta)
    map_path = tmp_path / "map.html"
    explore_page(emb, map_path, "test", k=6)
    report_path = tmp_path / "report.html"
    report_path.write_text(render(tmp_path, {}, [{"epoch": 1, "loss": 1.0}],
                                  {"curves": None, "map": str(map_path)}))
    assert 'sandbox="allow-scripts allow-downloads"' in report_path.read_text()
    driver = chrome()
    try:
        driver.get(map_path.as_uri())
        assert wait_for(lambda: driver.execute_script(
            "return window.Bokeh && Bokeh.index.roots && [...Bokeh.index.roots].length > 0"), 10)
        x, y, cls, _ = driver.execute_script(POINT, f"cells:{hostile_name}", 0)
        assert cls == hostile_name
        actions = ActionBuilder(driver)
        actions.pointer_action.move_to_location(int(x), int(y))
        actions.perform()
        assert wait_for(lambda: driver.execute_script(DEEP_QUERY, ".tip-class")) == [hostile_name]
        tip = driver.execute_script("""
            function all(root, acc) { for (const e of root.querySelectorAll('*')) {
              acc.push(e); if (e.shadowRoot) all(e.shadowRoot, acc); } return acc; }
            return all(document, []).filter(e => e.classList.contains('cell-tip')).map(e => e.textContent);""")
        assert any('a "quoted" <b>' in t for t in tip) and not any("&quot;" in t for t in tip)
        actions = ActionBuilder(driver)
        actions.pointer_action.move_to_location(int(x), int(y))
        actions.pointer_action.click()
        actions.perform()
        title = wait_for(lambda: driver.execute_script(DEEP_QUERY, ".nb-title"))
        assert hostile_name in title[0]
        driver.execute_script("""
            const src = [...Bokeh.documents[0].all_models].find(m => m.name === arguments[0]);
            src.selected.indices = [0, 1];""", f"cells:{hostile_name}")
        summary = wait_for(lambda: driver.execute_script("""
            const div = [...Bokeh.documents[0].all_models].find(m => m.name === 'selection');
            return div.text.includes('selected') ? div.text : null;"""))
        assert "&lt;img" in summary and "<img" not in summary
        csv_text = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            URL.createObjectURL = (blob) => { blob.text().then(done); return 'about:blank'; };
            HTMLAnchorElement.prototype.click = () => {};  // no navigation, no file saved
            const button = [...Bokeh.documents[0].all_models].find(m => m.name === 'download');
            Promise.resolve(button.js_event_callbacks['button_click'][0].execute(button, {}));""")
        import csv as csv_module
        import io

        rows = list(csv_module.reader(io.StringIO(csv_text)))
        assert rows[0] == ["split", "id", "path", "class"] and len(rows) == 3
        # the path comes back exactly (quotes and markup included); the class name as text
        assert all(re.fullmatch(r'a "quoted" <b>\d+</b>', r[2]) and r[3] == hostile_name for r in rows[1:])
        driver.get(report_path.as_uri())
        frame = wait_for(lambda: driver.find_elements("css selector", "iframe"))[0]
        driver.switch_to.frame(frame)
        assert wait_for(lambda: driver.execute_script(
            "return window.Bokeh && [...Bokeh.index.roots].length > 0"), 10)
        assert driver.execute_script("return window.__xss") is None
        driver.switch_to.default_content()
        assert driver.execute_script("return window.__xss") is None
        assert console_errors(driver) == []
    finally:
        driver.quit()
