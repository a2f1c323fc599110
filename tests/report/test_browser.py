"""The report in a real browser: headless Chromium (Debian's `chromium` package, which .ci/run installs; never
downloaded here) opens the tiny preset's page from a file URL over the DevTools protocol. No console errors, no
request beyond the file itself, the pass list and the per-layer sections are there, and clicking a pass shows its
diff and drawings. Without Chromium this fails (it does not skip): CI installs it."""
from __future__ import annotations

import pytest

from caramba.report.browser import Browser, find_chromium


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        pytest.fail("no Chromium on PATH: install Debian's package (apt-get install -y chromium), as .ci/run does, "
                    "or set CHROMIUM to a Chrome/Chromium binary")
    with Browser() as b:
        yield b


def test_the_page_opens_offline_without_errors_and_a_click_shows_a_pass(browser, tiny_report):
    cm, path = tiny_report
    page = browser.open(path)
    assert page.errors == []
    assert [(level, text) for level, text in page.console if level in ("error", "warning", "assert")] == []
    assert page.requests == [path.resolve().as_uri()]  # nothing else: no CDN, no network
    js = browser.evaluate
    rows = js("[...document.querySelectorAll('table.passes tr[data-pass^=\"0-\"]')].map(r => r.cells[1].innerText)")
    assert rows == [r.name for r in cm.stats.passes]
    layers = js("[...document.querySelectorAll('details.layer')].map(d => d.dataset.layer)")
    assert {"layers.0", "layers.1"} <= set(layers)
    assert js("document.querySelector('details.layer[data-layer=\"layers.0\"] svg.graph') !== null")
    assert js("[...document.querySelectorAll('.pass-detail')].every(d => d.hidden)")

    changed = next(r for r in cm.stats.passes if r.changed and r.index > 0)
    detail = f"document.getElementById('pass-0-{changed.index}')"
    js(f"document.querySelector('tr[data-pass=\"0-{changed.index}\"]').click()")
    assert js(f"!{detail}.hidden && {detail}.getBoundingClientRect().height > 0")
    diff = js(f"{detail}.querySelector('pre.diff').innerText")
    assert diff.startswith("--- before") and "\n+" in diff and "\n-" in diff
    assert js(f"{detail}.querySelectorAll('svg.graph').length") == 2
    assert js(f"{detail}.querySelectorAll('g.n.add').length") > 0  # the new nodes are marked
    assert js(f"document.querySelector('tr[data-pass=\"0-{changed.index}\"]').classList.contains('sel')")

    js("document.querySelector('button.seg[data-pass=\"0-1\"]').click()")  # a bar of the timeline
    assert js(f"{detail}.hidden") and not js("document.getElementById('pass-0-1').hidden")
    js("document.querySelector('button[data-open=\"0\"][data-scope=\"graph\"]').click()")
    assert js("[...document.querySelectorAll('details.layer')].every(d => !d.open)")
    assert page.errors == []  # (how long it takes to open: benchmarks/report_size.py, not a test)
