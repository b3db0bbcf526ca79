"""The MLflow UI on a logged sweep, in a real headless Chromium (Debian's `chromium`, driven by
Playwright) against `mlflow server` on 127.0.0.1: the experiment page nests the child runs under
their parent, and the compare page loads for two runs. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import ROOT
from tests.servers import tracking_server
from tests.test_sweep import NAMES, basic_sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
# Root in a container needs --no-sandbox; the rest keeps Chromium off the network and quiet.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.ui, pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it: "
                                                "apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`mlflow server` on the basic sweep's store (as `make ui` serves the default store)."""
    sweep = basic_sweep(tmp_path_factory)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    server = tracking_server(sweep.cwd / "mlflow.db", sweep.cwd / "mlartifacts", sweep.cwd / "mlflow-server.log",
                             cwd=sweep.cwd)
    try:
        yield server.start().url, sweep
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 760})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def test_experiment_page_lists_child_runs_under_their_parent(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    page.goto(f"{url}/#/experiments/{parent.info.experiment_id}/runs")
    parent_row = page.get_by_role("row").filter(has_text=parent.info.run_name)
    parent_row.wait_for()
    assert page.get_by_role("row").filter(has_text="float8-h32").count() == 0  # folded into the parent
    parent_row.locator('button[data-component-id*="runnamecellrenderer"]').click()  # the expander
    for name in NAMES:
        page.get_by_role("row").filter(has_text=name).wait_for()
    rows = page.get_by_role("row").all_inner_texts()
    first = next(i for i, text in enumerate(rows) if parent.info.run_name in text)
    children = [i for i, text in enumerate(rows) if any(name in text for name in NAMES)]
    assert len(children) == len(NAMES) and min(children) > first

    close_assistant = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close_assistant.count():  # a cleaner screenshot
        close_assistant.click()
    page.screenshot(path=ARTIFACTS / "ui-sweep-runs.png")


def test_compare_page_loads_for_two_runs(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    runs = {c.info.run_name: c.info.run_id for c in sweep.children(parent.info.run_id)}
    pair = [runs["float8-h32"], runs["mixed_bfloat16-h32"]]
    page.goto(f"{url}/#/compare-runs?runs={json.dumps(pair)}&experiments={json.dumps([parent.info.experiment_id])}")
    page.get_by_text("Parallel Coordinates Plot").first.wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    text = page.inner_text("body")
    assert "Comparing 2 Runs" in text
    assert "float8-h32" in text and "mixed_bfloat16-h32" in text
    # The parameter that differs is one of the plot's axes, not only a row in the table.
    plot = page.locator(".js-plotly-plot").first.inner_text()
    assert "precision.name" in plot
    page.screenshot(path=ARTIFACTS / "ui-compare.png", full_page=True)
