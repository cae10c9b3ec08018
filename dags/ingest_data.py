"""
### ingest_data

Validates clinical batches that hospitals drop into `MEDOPS_HOME/landing/`, quarantines what fails
and versions what passes in the data registry (git + DVC, tag `data-vN`).

* **Runs when** a file lands (the `medops/landing` Asset's watcher fires), or manually.
* **Every row is accounted for**: accepted rows go into a new data version, rejected rows go to
  `MEDOPS_HOME/quarantine/` with one reason per row. A file that is empty, binary or carries
  unknown columns (possible patient identifiers) is quarantined whole, named by its SHA-256.
* **Crash-safe**: each file is ingested under the registry lock and a journal; a run that died
  half-way is finished or rolled back when the next one starts (Airflow's retry included).
* **Retention**: ingested files stay in `landing/processed/` for `MEDOPS_LANDING_RETENTION_DAYS`.
* **Emits** the `medops/data` Asset with the new `data_version`, which schedules `train_model`.
  Trigger with `announce_latest` to (re)announce the current version, e.g. on a fresh platform.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

from medops.orchestration import DATA, DEFAULT_ARGS, LANDING


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
        "site_id": Param(
            None,
            type=["null", "string"],
            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
            description="site_id for rows that name none. Blank: every row must name its site.",
        ),
        "announce_latest": Param(False, type="boolean", description="Emit medops/data for the current version."),
    },
)
def ingest_data():
    @task
    def ingest_landed() -> list[dict]:
        """Validate, quarantine and version every file waiting in the landing folder.

        On a fresh platform this first creates the data registry with the seed as data-v1.
        """
        from medops.app.run_notes import summary
        from medops.core.settings import get_settings
        from medops.orchestration import actor_of
        from pipelines.data_registry import init_registry
        from pipelines.ingest import ingest_landing

        settings, context = get_settings(), get_current_context()
        actor = actor_of(context)
        init_registry(settings, actor=actor)
        results = ingest_landing(settings, site_id=context["params"].get("site_id") or None, actor=actor)
        for result in results:
            print(result.summary())
        versions = [result.version for result in results if result.version]
        summary(
            f"{len(results)} landed file(s): {sum(r.accepted for r in results)} rows accepted, "
            f"{sum(r.quarantined for r in results)} quarantined, new version(s): {', '.join(versions) or 'none'}",
            {"quarantine": str(settings.quarantine_dir) if any(r.quarantined for r in results) else None},
            "publish announces the new version on medops/data; train_model trains on it" if versions else None,
        )
        return [result.to_dict() for result in results]

    @task(outlets=[DATA])
    def publish(results: list[dict]) -> str:
        """Emit medops/data with the new version, so train_model knows what to train on."""
        from airflow.sdk.exceptions import AirflowSkipException

        from medops.app.run_notes import summary
        from medops.core.settings import get_settings
        from pipelines.data_registry import describe_version, latest_version

        settings, context = get_settings(), get_current_context()
        versions = [result["version"] for result in results if result.get("version")]
        if not versions and context["params"].get("announce_latest"):
            versions = [latest_version(settings)]
        if not versions:
            raise AirflowSkipException("no new data version to announce")
        info = describe_version(versions[-1], settings)
        context["outlet_events"][DATA].extra = {"data_version": info.tag, "dvc_md5": info.dvc_md5, "rows": info.rows}
        summary(f"announced {info.tag} ({info.rows} rows, DVC md5 {info.dvc_md5}) on medops/data",
                {"versions": "medops status / Airflow → Assets → medops/data"}, "train_model runs on it")  # fmt: skip
        return info.tag

    publish(ingest_landed())


ingest_data()
