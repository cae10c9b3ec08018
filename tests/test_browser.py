"""The three UIs and the service's API docs in a real browser (Debian's Chromium, driven by Playwright).

On a platform `medops up` starts on a temporary MEDOPS_HOME with free ports and no alert channel
(so the drift alert waits in the outbox): log in to Airflow, trigger each DAG from its form with
its defaults, see a refused challenger's run note, follow its link to the MLflow model version,
follow the drift alert's link to the Evidently report and on to the project's dashboard (signals
beside their thresholds, per site), open the service's API docs, authorize
and call /metadata from them. Each step leaves a screenshot in ``tests/artifacts/browser/``.

``MEDOPS_BROWSER_PLATFORM=<file of export lines>`` points the suite at a platform already up
(its env file as written by hand, ``export MEDOPS_HOME=... MEDOPS_AIRFLOW_PORT=...``), for
working on the suite without starting a platform each time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from medops.core.processes import wait_until
from medops.core.settings import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.timeout(1800)]
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts" / "browser"
LOOP_DAGS = ("ingest_data", "train_model", "deploy_model", "monitor_drift")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _medops(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "medops"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"medops {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _env_from_file(path: Path) -> dict[str, str]:
    pairs = [word.split("=", 1) for word in shlex.split(path.read_text()) if "=" in word]
    return dict(pairs)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from medops.app.airflow_api import AirflowClient, admin_password
    from medops.core.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDOPS_", "AIRFLOW"))}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    existing = os.environ.get("MEDOPS_BROWSER_PLATFORM")
    if existing:
        env.update(_env_from_file(Path(existing)))
    else:
        env["MEDOPS_HOME"] = str(tmp_path_factory.mktemp("browser") / "medops-home")
        env["MEDOPS_API_KEYS"] = "browser-key"
        for name in ("AIRFLOW", "MLFLOW", "SERVING", "EVIDENTLY"):
            env[f"MEDOPS_{name}_PORT"] = str(_free_port())
    home = Path(env["MEDOPS_HOME"])
    try:
        if not existing:
            up = _medops(env, "up")
            assert "No alert channel is set" in up.stdout, up.stdout[-2000:]
        url = {name: f"http://127.0.0.1:{env[f'MEDOPS_{name.upper()}_PORT']}" for name in ("airflow", "mlflow")}
        url["serving"] = f"http://127.0.0.1:{env['MEDOPS_SERVING_PORT']}"
        settings = Settings(home=home)
        password = admin_password(settings)
        login = settings.mlflow_credentials()
        mlflow_login = (login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"])
        with AirflowClient(url["airflow"], password=password) as airflow:
            yield SimpleNamespace(
                env=env,
                home=home,
                url=url,
                password=password,
                airflow=airflow,
                key="browser-key",
                mlflow_login=mlflow_login,
            )
    finally:
        if not existing:
            subprocess.run([str(BIN / "medops"), "down"], env=env, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def browser(platform: SimpleNamespace) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's Chromium is missing: `make chromium` (apt-get install -y chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        # MLflow's pages ask for basic auth: the browser answers MLflow's challenge (and no other origin's)
        username, password = platform.mlflow_login
        login = {"username": username, "password": password, "origin": platform.url["mlflow"]}
        context = chromium.new_context(viewport={"width": 1440, "height": 1000}, http_credentials=login)
        context.set_default_timeout(30_000)
        yield context
        context.close()
        chromium.close()
    print(f"\nbrowser screenshots in {ARTIFACTS}:\n" + "\n".join(sorted(p.name for p in ARTIFACTS.glob("*.png"))))


@pytest.fixture(scope="module")
def page(browser: Any) -> Any:
    return browser.new_page()


def shot(page: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _new_run(airflow: Any, dag_id: str, before: set[str], timeout: float = 60) -> str:
    def created() -> str | None:
        fresh = [run.dag_run_id for run in airflow.runs(dag_id) if run.dag_run_id not in before]
        return fresh[0] if fresh else None

    return wait_until(created, timeout, f"a new {dag_id} run", poll=1.0)


def test_01_log_in_to_airflow(page: Any, platform: SimpleNamespace):
    page.goto(platform.url["airflow"])
    page.wait_for_selector("input[name=username]")
    shot(page, "01-airflow-login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", platform.password)
    page.keyboard.press("Enter")
    page.get_by_text("train_model").first.wait_for()
    shot(page, "02-airflow-dags")


@pytest.mark.parametrize("dag_id", LOOP_DAGS)
def test_02_each_dag_triggers_from_its_form_with_defaults(page: Any, platform: SimpleNamespace, dag_id: str):
    before = {run.dag_run_id for run in platform.airflow.runs(dag_id)}
    page.goto(f"{platform.url['airflow']}/dags/{dag_id}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    shot(page, f"03-trigger-form-{dag_id}")
    dialog.get_by_role("button", name="Trigger").last.click()
    run_id = _new_run(platform.airflow, dag_id, before)
    assert platform.airflow.run(dag_id, run_id).conf is not None
    if dag_id != "monitor_drift":  # the next steps want the loop quiet; monitor's run is quick anyway
        platform.airflow.wait_for_run(dag_id, run_id, timeout=900)


def test_03_a_refused_challenger_shows_in_its_run_note_and_links_to_mlflow(page: Any, platform: SimpleNamespace):
    airflow = platform.airflow
    run_id = airflow.trigger("train_model", {"families": ["logistic_regression"], "roc_auc_lower": 0.9999})
    assert airflow.wait_for_run("train_model", run_id, timeout=900).state.value == "success"
    note = airflow.run("train_model", run_id).note or ""
    assert "REFUSED by the gate" in note, note
    page.goto(f"{platform.url['airflow']}/dags/train_model/runs/{run_id}")
    page.get_by_text("REFUSED by the gate").first.wait_for()
    shot(page, "04-refused-challenger-note")

    # The grid shows the note's first line; "Edit note" shows all of it, links included.
    page.get_by_role("button", name="Edit note").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("REFUSED by the gate").wait_for()
    page.wait_for_timeout(500)  # the dialog fades in
    shot(page, "04b-refused-challenger-full-note")
    links = [a.get_attribute("href") for a in dialog.get_by_role("link").all()]
    links += re.findall(r"\((http[^)\s]+)\)", note)  # the editor may show the Markdown source
    href = next(link for link in links if link and "/#/models/" in link)
    assert href.startswith(platform.url["mlflow"]) and href in note, href
    page.keyboard.press("Escape")
    page.goto(href)
    version = href.rsplit("/", 1)[-1]
    page.get_by_text(f"Version {version}").first.wait_for()
    page.wait_for_timeout(2000)  # let the page finish drawing (it keeps polling, so never "idle")
    shot(page, "05-mlflow-model-version-from-note")


def test_04_the_drift_alert_links_to_the_evidently_report(page: Any, platform: SimpleNamespace):
    airflow = platform.airflow
    window = datetime.now(UTC).isoformat()
    _medops(platform.env, "simulate", "--site", "site-d", "--records", "400", "--drift", "covariate", "--json")
    run_id = airflow.trigger("monitor_drift", {"since": window})
    airflow.wait_for_run("monitor_drift", run_id, timeout=600)
    listed = json.loads(_medops(platform.env, "alerts", "--json").stdout)
    assert listed["channels"] == []  # none configured: the alert waits in the outbox, not in the void
    (alert,) = [a for a in listed["outbox"] if a["verdict"] == "drift"][:1]
    report = alert["report_url"]
    assert report.startswith("http://"), report

    page.goto(f"{platform.url['airflow']}/dags/monitor_drift/runs/{run_id}")
    page.get_by_text("drift", exact=False).first.wait_for()
    page.get_by_role("button", name="Edit note").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("NOT DELIVERED").wait_for()
    page.wait_for_timeout(500)  # the dialog fades in
    assert report in [a.get_attribute("href") for a in dialog.get_by_role("link").all()]
    shot(page, "06-monitor-drift-note-alert-not-delivered")
    page.keyboard.press("Escape")
    page.goto(report)
    page.wait_for_timeout(2000)  # let the page finish drawing (it keeps polling, so never "idle")
    page.get_by_text("Drift", exact=False).first.wait_for()
    shot(page, "07-evidently-report-from-alert")
    # The project's dashboard: the verdict over time and every signal beside its threshold.
    page.goto(report.split("/reports/")[0])
    page.get_by_text("Latest verdict and severity").first.wait_for()
    page.get_by_text("threshold (gate's minimum sensitivity)").first.wait_for()
    page.get_by_text("site-d: prediction drift p-value").first.wait_for()
    page.wait_for_timeout(2000)  # the plots draw after their series arrive
    shot(page, "07b-evidently-dashboard")


def test_05_api_docs_open_in_a_browser_and_authorize(page: Any, platform: SimpleNamespace):
    page.goto(f"{platform.url['serving']}/docs")
    page.get_by_text("medops diagnosis service").first.wait_for()
    shot(page, "08-api-docs")
    page.get_by_role("button", name="Authorize").first.click()
    dialog = page.locator(".modal-ux")
    dialog.locator("input").first.fill(platform.key)
    dialog.locator("button.modal-btn.auth.authorize").click()
    dialog.get_by_text("Authorized", exact=False).first.wait_for()
    shot(page, "09-api-docs-authorized")
    dialog.locator("button.btn-done").click()
    page.locator(".opblock-summary").filter(has_text="/metadata").first.click()
    page.get_by_role("button", name="Try it out").first.click()
    page.get_by_role("button", name="Execute").first.click()
    status = page.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip() == "200"
    shot(page, "10-api-docs-metadata-200")
