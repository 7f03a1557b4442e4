"""The MLflow UI shows the pipeline's runs: a real `mlflow server` and headless Chromium (Selenium).

Opens the demo's pipeline run (its headline metrics), the fine-tune run's metric charts and the
evaluation's confusion-matrix plot, waiting for each to render, and keeps a screenshot of each
page in $VITPIPE_TEST_ARTIFACTS (default: test-artifacts/ under the pytest base temp dir).
Skips with the reason when Chromium, its driver or Selenium is missing (tests/system-deps.sh
installs the Debian packages).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from flows import tracking
from flows.demo import EXPERIMENT
from local_server import local_server, venv_command

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def artifacts_dir(tmp_path_factory) -> Path:
    path = Path(os.environ.get("VITPIPE_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def mlflow_ui(small_demo, tmp_path_factory):
    """`mlflow server` on the demo's SQLite store, on a free 127.0.0.1 port; stopped at the end."""
    from vit.train.distributed import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("mlflow_ui") / "server.log"
    url = f"http://127.0.0.1:{port}"
    with local_server([venv_command("mlflow"), "server", "--backend-store-uri", small_demo["tracking_uri"],
                       "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], f"{url}/health", log):
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven through the system chromedriver (nothing downloaded)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            pytest.skip(f"{path} is missing: apt-get install {package} (tests/system-deps.sh)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def demo_runs(small_demo) -> dict:
    """{stage: run} of the demo's pipeline, and the experiment id."""
    from mlflow import MlflowClient

    client = MlflowClient(small_demo["tracking_uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.data.tags.get(tracking.STAGE_TAG): r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(tracking.STAGE_TAG) != "shard"}
    return {"experiment": exp.experiment_id, **runs}


def _open(driver, url: str, ready_js: str, what: str, timeout: float = 90) -> None:
    """Load `url` and wait until the JS expression `ready_js` is true (the SPA renders after fetches)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: d.execute_script(f"return {ready_js}"))
    except TimeoutException:
        text = driver.execute_script("return document.body.innerText")[:1500]
        pytest.fail(f"{what} not shown at {url} within {timeout}s; the page says:\n{text}")


def _page_text(driver) -> str:
    return driver.execute_script("return document.body.innerText")


def _training(url: str) -> str:
    """`url` in the UI's model-training view, as the links vitpipe prints are (flows.tracking.run_url)."""
    return f"{url}?{tracking.UI_TRAINING_VIEW}"


# The navigation of each view: GenAI's has these entries, model training's has none of them.
GENAI_ONLY = ("Evaluation runs", "Observability", "Prompts & versions")


def test_experiment_opens_in_the_model_training_view(browser, mlflow_ui, demo_runs, small_demo, artifacts_dir):
    """A person following the link the demo prints lands in model training (runs, metrics, the
    model registry), not the GenAI view MLflow 3 opens by default, and stays there in the
    experiment's run list; the experiment records its kind for the UI."""
    from mlflow import MlflowClient

    exp = MlflowClient(small_demo["tracking_uri"]).get_experiment(demo_runs["experiment"])
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    parent = demo_runs["pipeline"]
    printed = tracking.run_url("http://127.0.0.1:5000", small_demo["tracking_uri"], parent.info.run_id)
    assert printed in small_demo["stdout"] and tracking.UI_TRAINING_VIEW in printed, "the link the demo prints"
    url = tracking.run_url(mlflow_ui, small_demo["tracking_uri"], parent.info.run_id)  # the same, on this server
    _open(browser, url, "document.body.innerText.includes('Model registry')", "the model-training view")
    text = _page_text(browser)
    assert not [w for w in GENAI_ONLY if w in text], text[:1500]
    _open(browser, _training(f"{mlflow_ui}/#/experiments/{demo_runs['experiment']}"),
          f"document.body.innerText.includes({parent.info.run_name!r})", "the experiment's runs")
    text = _page_text(browser)
    assert "Model registry" in text and not [w for w in GENAI_ONLY if w in text], text[:1500]
    browser.save_screenshot(str(artifacts_dir / "mlflow-experiment-runs.png"))


def test_pipeline_run_page_shows_its_metrics(browser, mlflow_ui, demo_runs, artifacts_dir):
    parent = demo_runs["pipeline"]
    url = _training(f"{mlflow_ui}/#/experiments/{demo_runs['experiment']}/runs/{parent.info.run_id}")
    _open(browser, url, "document.body.innerText.includes('evaluate_top1')", "the pipeline run's metrics")
    text = _page_text(browser)
    assert "demo-small" in text
    value = parent.data.metrics["evaluate_top1"]
    assert f"{value:.4f}"[:5] in text or f"{value}"[:5] in text, "the metric's value is not on the page"
    browser.save_screenshot(str(artifacts_dir / "mlflow-pipeline-run.png"))


def test_finetune_metric_charts_are_plotted(browser, mlflow_ui, demo_runs, artifacts_dir):
    run = demo_runs["finetune"]
    url = _training(f"{mlflow_ui}/#/experiments/{demo_runs['experiment']}/runs/{run.info.run_id}/model-metrics")
    # plotly draws one path per series; a chart still loading has none
    _open(browser, url, "document.querySelectorAll('.js-plotly-plot .js-line').length > 0",
          "the fine-tune metric charts")
    assert "train/loss" in _page_text(browser)
    time.sleep(1)  # let the remaining charts finish their transition before the screenshot
    path = artifacts_dir / "mlflow-finetune-charts.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


def test_confusion_matrix_plot_is_shown(browser, mlflow_ui, demo_runs, artifacts_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    run = demo_runs["evaluate"]
    url = _training(f"{mlflow_ui}/#/experiments/{demo_runs['experiment']}/runs/{run.info.run_id}/artifacts")
    _open(browser, url, "document.body.innerText.includes('evaluation')", "the evaluation's artifact tree")
    # open evaluation/ -> val/ -> confusion_matrix.png in the artifact tree, as a person would
    for name in ("evaluation", "val", "confusion_matrix.png"):
        node = WebDriverWait(browser, 60).until(EC.element_to_be_clickable(
            (By.XPATH, f"//*[normalize-space(text())='{name}']")))
        node.click()
    # the preview is the PNG fetched from the server, decoded (a blob: image wider than an icon)
    _open_ready = ("Array.from(document.images).some(i => i.src.startsWith('blob:') && i.complete "
                   "&& i.naturalWidth > 200)")
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(f"return {_open_ready}"))
    assert "evaluation/val/confusion_matrix.png" in _page_text(browser)
    browser.save_screenshot(str(artifacts_dir / "mlflow-confusion-matrix.png"))
