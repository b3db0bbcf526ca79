"""The MLflow UI on a logged sweep, in a real headless Chromium (Debian's `chromium`, driven by
Playwright) against `mlflow server` on 127.0.0.1: the experiment page nests the child runs under
their parent and opens in the Model training view from its URL; with the sweep folded, the
parent's row shows the verdict and the summary metrics (columns picked with the UI's own column
selector); the children show their datasets and models; the chart view has the train/ val/ perf/
fp8/ sections and the System metrics one; the parent run's page renders the report; the Models
tab lists the LoggedModels; the compare page plots the sweep. Screenshots go to test-artifacts/
(the README's docs/mlflow-ui-*.png are copies of some).

Each test gets a fresh browser context (empty localStorage: the UI keeps its experiment-page state
there, expanded rows and columns included), in one browser, against one server."""

from __future__ import annotations

import json
import re
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
VIEWPORT = {"width": 1400, "height": 800}
# The MLflow Assistant panel opens by itself on a first visit and takes a third of the page.
NO_ASSISTANT = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
# MLflow 3.17 opens an experiment in its GenAI view unless told otherwise (it ignores the
# experiment's mlflow.experimentKind tag): this URL parameter picks the Model training view.
MODEL_TRAINING = "workflowType=machine_learning"
VERDICT = "fp8exp.verdict"
EXPANDER = 'button[data-component-id*="runnamecellrenderer"]'
SECTION_HEADER = '[data-testid="experiment-view-compare-runs-section-header"]'

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
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(NO_ASSISTANT)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


# --- helpers -------------------------------------------------------------------------------------

def column(kind: str, name: str) -> str:
    """The runs table's column id (ag-grid col-id) of a metric, tag, param or attribute."""
    return f"{kind}.`{name}`"


RUN_NAME, CREATED, DATASET, DURATION, SOURCE, MODELS = (column("attributes", "Run Name"), "runDateAndNestInfo",
                                                         column("attributes", "Dataset"), "duration",
                                                         column("attributes", "Source"), column("attributes", "Models"))


def state_key(experiment_id: str) -> str:
    """Where the experiment page keeps its state in localStorage (MLflow 3.17)."""
    return f"MLflowLocalStorage-1.1-ExperimentPage-{json.dumps([experiment_id])}-ReactComponentState"


def ui_state(page, experiment_id: str) -> dict:
    return json.loads(page.evaluate("key => localStorage.getItem(key)", state_key(experiment_id)) or "{}")


def lay_out(page, experiment_id: str, **changes) -> None:
    """Change the experiment page's stored state (what dragging and resizing columns or chart
    cards would store) and reload the page to apply it."""
    state = {**ui_state(page, experiment_id), **changes}
    page.evaluate("([key, value]) => localStorage.setItem(key, value)", [state_key(experiment_id), json.dumps(state)])
    page.reload()


def cell(page, run_id: str, col_id: str):
    """One cell of the runs table (rendered only while its column is in view)."""
    return page.locator(f'[row-id="{run_id}"] [col-id="{col_id}"]')


def show_columns(page, experiment_id: str, *columns: tuple[str, str]) -> None:
    """Tick columns in the runs table's own column selector, as a user does: Columns, search, tick."""
    page.get_by_role("button", name="Columns").click()
    selector = page.locator('[data-component-id="mlflow.experiment_page.runs_table.column_selector"]')
    for _, name in columns:
        selector.get_by_placeholder("Search columns").fill(name)
        selector.locator(".du-bois-light-tree-title").filter(has_text=re.compile(f"^{re.escape(name)}$")).click()
    page.keyboard.press("Escape")
    wanted = {column(kind, name) for kind, name in columns}
    page.wait_for_function("([key, wanted]) => { const s = JSON.parse(localStorage.getItem(key) || '{}');"
                           " return wanted.every(c => (s.selectedColumns || []).includes(c)); }",
                           arg=[state_key(experiment_id), sorted(wanted)])  # stored (debounced) before lay_out


def open_runs(page, url: str, experiment_id: str, query: str = "") -> None:
    page.goto(f"{url}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}{query}")


def expand(page, parent_name: str, child_name: str) -> None:
    page.locator("[role=row][row-id]").filter(has_text=parent_name).locator(EXPANDER).click()
    page.locator("[role=row][row-id]").filter(has_text=child_name).first.wait_for()


def section_names(page) -> list[str]:
    return [text.split("\n")[0].strip() for text in page.locator(SECTION_HEADER).all_inner_texts()]


def chart_titles(page) -> set[str]:
    return set(page.locator("h4[title]").evaluate_all("hs => hs.map(h => h.getAttribute('title'))"))


def filter_charts(page, pattern: str, title: str) -> None:
    """The chart view's search box (a case-insensitive regular expression over metric keys)."""
    page.get_by_placeholder("Search metric charts").fill(pattern)
    page.locator(f'h4[title="{title}"]').first.wait_for()


def unfocus(page) -> None:
    """No hover highlight, nor the focus ring the grid leaves on the last clicked cell, in a screenshot."""
    page.mouse.move(0, VIEWPORT["height"] - 1)
    page.add_style_tag(content=".ag-cell-focus { border-color: transparent !important; outline: none !important; }")


def children_by_name(sweep, parent) -> dict:
    return {c.info.run_name: c for c in sweep.children(parent.info.run_id)}


# --- tests ---------------------------------------------------------------------------------------

def test_experiment_page_lists_child_runs_under_their_parent(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    page.goto(f"{url}/#/experiments/{parent.info.experiment_id}/runs")
    parent_row = page.get_by_role("row").filter(has_text=parent.info.run_name)
    parent_row.wait_for()
    assert page.get_by_role("row").filter(has_text="float8-h32").count() == 0  # folded into the parent
    parent_row.locator(EXPANDER).click()  # the expander
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


def test_experiment_url_opens_the_model_training_view(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    experiment_id = parent.info.experiment_id
    page.goto(f"{url}/#/experiments/{experiment_id}?{MODEL_TRAINING}")
    # The UI redirects to the experiment's Runs tab, keeping the parameter (GenAI would land on
    # its Overview or Traces tab instead).
    page.wait_for_url(re.compile(rf"#/experiments/{experiment_id}/runs\?.*{MODEL_TRAINING}"))
    page.locator("[role=row][row-id]").filter(has_text=parent.info.run_name).wait_for()
    page.get_by_role("link", name="Models", exact=True).first.wait_for()  # the Model training side nav: Runs, Models, Traces


def test_folded_sweep_row_shows_the_verdict_and_summary_metrics(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    experiment_id, parent_id = parent.info.experiment_id, parent.info.run_id
    verdict = parent.data.tags[VERDICT]
    deltas = sorted(key for key in parent.data.metrics if key.startswith("summary/") and key.endswith("/delta_pts"))
    assert deltas, parent.data.metrics.keys()

    open_runs(page, url, experiment_id)
    page.locator("[role=row][row-id]").filter(has_text=parent.info.run_name).wait_for()
    show_columns(page, experiment_id, ("tags", VERDICT), *(("metrics", key) for key in deltas))
    # Wide enough to read, next to the run name (a user would drag and resize the columns).
    metric_columns = [column("metrics", key) for key in deltas]
    lay_out(page, experiment_id,
            columnOrder=[RUN_NAME, CREATED, *metric_columns, column("tags", VERDICT), DATASET, DURATION, SOURCE, MODELS],
            columnWidths={RUN_NAME: 230, **{c: 195 for c in metric_columns}, column("tags", VERDICT): 900})
    page.get_by_role("button", name="Toggle sidebar").click()

    verdict_cell = cell(page, parent_id, column("tags", VERDICT))
    verdict_cell.wait_for()
    assert verdict_cell.inner_text().strip() == verdict
    assert verdict.startswith("float8 h32: accuracy ")
    for key in deltas:
        shown = cell(page, parent_id, column("metrics", key)).inner_text().strip()
        assert float(shown) == pytest.approx(parent.data.metrics[key], abs=0.01), key
    # Still folded: no child row.
    for child in sweep.children(parent_id):
        assert page.locator(f'[row-id="{child.info.run_id}"]').count() == 0
    unfocus(page)
    page.screenshot(path=ARTIFACTS / "ui-sweep-verdict.png")


def test_child_rows_show_their_datasets_and_model(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    experiment_id = parent.info.experiment_id
    children = children_by_name(sweep, parent)
    models = {m.source_run_id: m for m in sweep.client.search_logged_models([experiment_id])}

    open_runs(page, url, experiment_id)
    page.locator("[role=row][row-id]").filter(has_text=parent.info.run_name).wait_for()
    page.wait_for_function("key => localStorage.getItem(key) !== null", arg=state_key(experiment_id))
    # Dataset and Models are default columns; wider so that a dataset's name and digest fit.
    lay_out(page, experiment_id, columnOrder=[RUN_NAME, CREATED, DATASET, DURATION, SOURCE, MODELS],
            columnWidths={RUN_NAME: 230, DATASET: 430})
    page.get_by_role("button", name="Toggle sidebar").click()
    # Every dataset of a run, not the first only (before expanding: rows expanded first keep a
    # stale "+2" beside their three datasets).
    page.get_by_role("button", name="Expand rows").click()
    expand(page, parent.info.run_name, "float8-h32")

    for name, child in children.items():
        run_id = child.info.run_id
        datasets = cell(page, run_id, DATASET)
        datasets.wait_for()
        text = datasets.inner_text()
        logged = {(d.dataset.name, d.dataset.digest) for d in child.inputs.dataset_inputs}
        assert {n for n, _ in logged} == {"synthetic:train", "synthetic:validation", "synthetic:test"}, name
        for dataset, digest in logged:
            assert f"{dataset} ({digest})" in text, (name, text)
        model = models[run_id]
        assert model.name == "model"
        link = cell(page, run_id, MODELS).get_by_role("link", name=model.name)
        assert model.model_id in link.get_attribute("href"), name
    assert cell(page, parent.info.run_id, MODELS).inner_text().strip() == "-"  # the parent trains nothing
    unfocus(page)
    page.screenshot(path=ARTIFACTS / "ui-sweep-children.png")


def test_chart_view_has_the_metric_sections_and_system_metrics(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    experiment_id = parent.info.experiment_id
    open_runs(page, url, experiment_id, "&compareRunsMode=CHART")
    expand(page, parent.info.run_name, "float8-h32")  # charts show the runs the list shows
    page.locator(SECTION_HEADER).filter(has_text="System metrics").wait_for()
    page.locator(SECTION_HEADER).filter(has_text=re.compile(r"^fp8/")).first.wait_for()
    sections = section_names(page)
    assert {"train", "val", "test", "perf", "System metrics"} <= set(sections), sections
    assert any(name.startswith("fp8/") for name in sections), sections

    filter_charts(page, "system/cpu_utilization", "system/cpu_utilization_percentage")
    assert section_names(page) == ["System metrics"]
    assert "system/cpu_utilization_percentage" in chart_titles(page)

    filter_charts(page, "val/accuracy|fp8/head/.*_scale", "val/accuracy")
    assert {"val/accuracy", "fp8/head/kernel_scale", "fp8/head/inputs_scale"} <= chart_titles(page)

    # For the screenshot: the val section first, lower cards (what dragging the section and
    # resizing a card would store), so that both sections fit in the view.
    state = ui_state(page, experiment_id)
    sections = sorted(state["compareRunSections"], key=lambda section: section["name"] != "val")
    lay_out(page, experiment_id, compareRunSections=[{**section, "cardHeight": 220} for section in sections],
            isAccordionReordered=True)
    page.locator("[role=row][row-id]").filter(has_text="float8-h32").first.wait_for()  # still expanded
    filter_charts(page, "val/accuracy|fp8/head/.*_scale", "fp8/head/kernel_scale")
    assert section_names(page)[0] == "val"
    page.locator(".js-plotly-plot").first.wait_for()
    page.wait_for_timeout(1000)  # the plots draw after their cards
    page.screenshot(path=ARTIFACTS / "ui-sweep-charts.png")


def test_parent_run_page_renders_the_report(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    experiment_id, parent_id = parent.info.experiment_id, parent.info.run_id
    page.goto(f"{url}/#/experiments/{experiment_id}/runs/{parent_id}?{MODEL_TRAINING}")
    heading = page.get_by_role("heading", name=f"FP8 report: sweep {parent.info.run_name}")
    heading.wait_for()
    table = page.locator("table").filter(has_text="Δ accuracy vs mixed_bfloat16")
    table.wait_for()
    header = table.locator("th").all_inner_texts()
    assert header[:2] == ["precision", "size"] and "speedup" in header, header
    rows = table.locator("tbody tr").all_inner_texts()
    assert sorted(" ".join(r.split()[:2]) for r in rows) == sorted(n.replace("-", " ") for n in NAMES), rows
    for line in parent.data.tags[VERDICT].split(" | "):
        page.get_by_text(line, exact=True).first.wait_for()  # the headline, one item per line
    # The plots come from the run's report/ artifacts, through the server's get-artifact route.
    page.get_by_text("Show more").click()
    plots = page.locator('img[src*="get-artifact?path=report/"]')
    plots.first.wait_for()
    page.wait_for_function("() => { const ps = [...document.querySelectorAll('img[src*=\"path=report/\"]')];"
                           " return ps.length >= 2 && ps.every(p => p.complete && p.naturalWidth > 0); }")
    sources = plots.evaluate_all("ps => ps.map(p => p.getAttribute('src'))")
    assert any("report/accuracy.png" in s for s in sources) and all(parent_id in s for s in sources), sources
    heading.evaluate("h => h.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    page.screenshot(path=ARTIFACTS / "ui-sweep-parent.png")


def test_models_tab_lists_each_runs_logged_model(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    experiment_id = parent.info.experiment_id
    page.goto(f"{url}/#/experiments/{experiment_id}/models?{MODEL_TRAINING}")
    for name in NAMES:
        page.get_by_role("link", name=name, exact=True).wait_for()  # the Source run column
    assert page.get_by_role("link", name="model", exact=True).count() == len(NAMES)
    page.screenshot(path=ARTIFACTS / "ui-sweep-models.png")


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


def test_compare_page_plots_the_sweep(ui, page):
    url, sweep = ui
    [parent] = sweep.parents()
    children = children_by_name(sweep, parent)
    ids = [children[name].info.run_id for name in sorted(NAMES)]
    page.goto(f"{url}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([parent.info.experiment_id])}"
              f"&{MODEL_TRAINING}")
    page.get_by_text(f"Comparing {len(ids)} Runs").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    params, metrics = page.locator(".du-bois-light-select-multiple").all()[:2]
    for select, names in ((params, ["precision.name", "model.hidden_dim"]),
                          (metrics, ["test/accuracy", "perf/step_time_ms"])):
        while select.locator(".du-bois-light-select-selection-item-remove").count():
            select.locator(".du-bois-light-select-selection-item-remove").first.click()
        for name in names:
            select.click()
            page.keyboard.type(name)
            page.locator(".du-bois-light-select-item-option").filter(has_text=re.compile(f"^{re.escape(name)}$")).click()
        page.keyboard.press("Escape")
    page.get_by_text(f"Comparing {len(ids)} Runs").click()  # closes the last dropdown
    axes = page.locator(".js-plotly-plot").first.inner_text()
    for name in ("precision.name", "model.hidden_dim", "test/accuracy", "perf/step_time_ms"):
        assert name in axes, axes
    accuracy = [children[n].data.metrics["test/accuracy"] for n in NAMES]
    assert f"{max(accuracy):.5f}" in axes and f"{min(accuracy):.5f}" in axes  # the axis spans the runs' values
    page.wait_for_timeout(500)
    page.screenshot(path=ARTIFACTS / "ui-sweep-compare.png")
