"""
### ingest_data

Validates clinical batches that hospitals drop into `MEDOPS_HOME/landing/`, quarantines what fails
and versions what passes in the data registry (git + DVC, tag `data-vN`).

* **Runs when** a file lands (the `medops/landing` Asset's watcher fires), or manually.
* **Every row is accounted for**: accepted rows go into a new data version, rejected rows go to
  `MEDOPS_HOME/quarantine/` with one reason per row; `accepted + quarantined = received`.
  A file that is empty, binary or carries unknown columns (possible patient identifiers) is kept
  whole in quarantine with its reason; the run stays green and its log says so.
* **Emits** the `medops/data` Asset with the new `data_version`, which schedules `train_model`.
  Trigger with `announce_latest` to (re)announce the current version, e.g. on a fresh platform.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

from medops.assets import DATA, LANDING
from medops.dag_defaults import DEFAULT_ARGS


@dag(
    dag_id="ingest_data",
    schedule=[LANDING],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["medops", "data"],
    doc_md=__doc__,
    params={
        "site_id": Param("", type="string", description="site_id for rows that name none (blank: rows must)."),
        "announce_latest": Param(False, type="boolean", description="Emit medops/data for the current version."),
    },
)
def ingest_data():
    @task
    def ensure_registry() -> str:
        """Create the data registry with the seed as data-v1 if this is a fresh platform."""
        from medops.settings import get_settings
        from pipelines.registry import init_registry

        return init_registry(get_settings()).tag

    @task
    def ingest_landed(_: str) -> list[dict]:
        """Validate, quarantine and version every file waiting in the landing folder."""
        from medops.settings import get_settings
        from pipelines.ingest import ingest_landing

        params = get_current_context()["params"]
        results = ingest_landing(get_settings(), site_id=params.get("site_id") or None)
        for result in results:
            print(result.summary())
        if not results:
            print("no files waiting in the landing folder")
        return [result.__dict__ for result in results]

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def new_version(results: list[dict]) -> str | None:
        """Continue only when there is a data version to announce."""
        from medops.settings import get_settings
        from pipelines.registry import latest_version

        versions = [result["version"] for result in results if result.get("version")]
        if versions:
            return versions[-1]
        if get_current_context()["params"].get("announce_latest"):
            return latest_version(get_settings())
        return None

    @task(outlets=[DATA])
    def publish(version: str) -> str:
        """Emit medops/data with the version, so train_model knows what to train on."""
        from medops.settings import get_settings
        from pipelines.registry import describe_version

        info = describe_version(version, get_settings())
        get_current_context()["outlet_events"][DATA].extra = {
            "data_version": info.tag,
            "dvc_md5": info.dvc_md5,
            "rows": info.rows,
        }
        return version

    publish(new_version(ingest_landed(ensure_registry())))


ingest_data()
