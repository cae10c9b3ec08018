"""One settings object for every part of medops (env prefix ``MEDOPS_``).

Built lazily by :func:`get_settings` and overridden in tests with :func:`reset_settings`.
Nothing here touches the disk at import time; directories are created by ``medops init``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from medops.core.files import write_atomically

REPO_ROOT = Path(__file__).resolve().parents[2]

MODEL_NAME = "breast_cancer_diagnosis"
MLFLOW_ADMIN_PASSWORD = "mlflow_admin_password"  # a secret's name under MEDOPS_HOME/secrets


class Settings(BaseSettings):
    """Everything an operator can configure; names of the ``MEDOPS_*`` variables are a contract."""

    model_config = SettingsConfigDict(env_prefix="MEDOPS_", extra="ignore")

    home: Path = Field(default=REPO_ROOT / ".medops", description="Where all runtime state lives.")
    api_keys: str | None = Field(default=None, description="Comma-separated bearer keys for the service.")

    airflow_port: int = 8080
    mlflow_port: int = 5000
    serving_port: int = 3000
    evidently_port: int = 8000
    host: str = Field(default="127.0.0.1", description="Servers listen on loopback only.")

    alert_webhook_url: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    alert_email_to: str | None = None
    alert_email_from: str = "medops@localhost"
    alert_dedup_minutes: float = Field(default=60.0, description="Identical alerts within this window are sent once.")

    drift_min_rows: int = 200
    drift_share_threshold: float = Field(default=0.3, description="Share of drifted columns that means drift.")
    retrain_cooldown_hours: float = 6.0
    require_approval: bool = False

    landing_retention_days: float = Field(
        default=30.0,
        ge=0,
        description="Landed files already ingested are kept in landing/processed/ this long, then deleted.",
    )

    dvc_remote: str | None = None
    mlflow_tracking_uri: str | None = None
    profile: Literal["standalone", "cluster"] = Field(
        default="standalone",
        description="standalone: Airflow on SQLite (LocalExecutor); cluster: PostgreSQL, Celery workers, servers.",
    )
    cluster_workers: int = Field(default=2, ge=1, description="Celery workers of the cluster profile.")
    cluster_netns: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Cluster: each train worker in a network namespace of its own, reaching the services through "
        "a gateway (auto: where root and `ip` allow; on: required; off: plain processes).",
    )
    postgres_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        description="Cluster: a PostgreSQL superuser connection; medops creates its role and databases with it.",
    )
    cluster_db_prefix: str = Field(
        default="medops", pattern=r"^[a-z][a-z0-9_]*$", description="Cluster: databases <prefix>_airflow, _mlflow."
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Cluster: Celery's broker.")
    webdav_port: int = Field(default=8090, description="Cluster: the WebDAV server of the DVC remote.")
    registry_port: int = Field(default=9418, description="Cluster: the git daemon serving the data registry.")
    registry_url: str | None = Field(
        default=None,
        description="A host without the data registry (the cluster's train workers) reads data versions from this "
        "git URL, cloned under its own MEDOPS_HOME; unset: the registry under MEDOPS_HOME.",
    )
    secrets_from_env: bool = Field(
        default=False,
        description="A host given its logins by configuration (the cluster's train workers): MLflow's comes from "
        "MLFLOW_TRACKING_USERNAME/_PASSWORD, and no secret is read from or generated under MEDOPS_HOME/secrets.",
    )
    model_name: str = MODEL_NAME

    # The promotion gate's floors and the hold-out share live in pipelines/modification_protocol.yaml,
    # versioned with the code, not in settings: loosening them needs a named person's approval.
    min_sensitivity: float = Field(
        default=0.95,
        description="Monitoring: the sensitivity a served champion is expected to keep (estimated or from feedback).",
    )
    sensitivity_target: float = Field(default=0.98, description="Operating point chosen on validation folds.")
    seed: int = 42
    cv_folds: int = 5
    train_jobs: int = Field(
        default=1,
        description="Parallel fits in the search (worker start-up costs more than it saves on data this small).",
    )

    max_records: int = 1000
    max_body_bytes: int = 2 * 1024 * 1024
    serving_workers: int = 1
    serving_ready_timeout: float = Field(
        default=300,
        gt=0,
        description="Seconds a rollout waits for a new Bento server to be ready, or for the stable server's "
        "workers to switch models, before it keeps the old version (a loaded host starts Python slowly).",
    )
    prediction_log_durable: bool = Field(
        default=True,
        description="A /predict answer waits for the fsync of its prediction-log row. False exists only as "
        "make bench's baseline for what that wait costs: answers could then be lost in a crash (never in production).",
    )

    # Per API key and per serving worker process (a server with N workers admits up to N times
    # these); 0 switches a limit off. /explain has its own, stricter, limits.
    rate_limit_per_second: float = Field(default=50.0, description="Sustained requests per second per key.")
    rate_limit_burst: int = Field(default=100, description="Requests a key may send at once above its rate.")
    concurrency_limit: int = Field(default=8, description="Requests of one key in progress at once.")
    explain_rate_limit_per_second: float = 2.0
    explain_rate_limit_burst: int = 4
    explain_concurrency_limit: int = 2
    feedback_lookback_days: int = Field(
        default=30, description="/feedback accepts labels for encounters answered within this many days."
    )
    served_index_size: int = Field(
        default=100_000, description="Encounters per serving worker remembered in memory for /feedback checks."
    )
    tls_certfile: Path | None = Field(default=None, description="PEM certificate the service presents (HTTPS).")
    tls_keyfile: Path | None = Field(default=None, description="PEM private key of the certificate.")
    tls_ca_file: Path | None = Field(
        default=None, description="What medops' own clients verify the service against (default: the certificate)."
    )

    # Monitoring verdicts (monitoring.signals, monitoring.judge). The drift thresholds were chosen
    # on generated windows only (bench/monitoring_power.py: calibrate, a seed apart from the run
    # reported); see that module's docstring for how.
    monitor_site_min_rows: int = Field(
        default=50, description="Fewest scored rows of one site for its own drift and estimated-performance signals."
    )
    monitor_prediction_drift_p_value: float = Field(
        default=1e-4,
        description="Prediction drift: K-S p-value of probability_malignant vs the reference scores at or below this.",
    )
    monitor_material_shift: float = Field(
        default=0.4,
        description="A drifted feature counts only if it moved at least this far "
        "(Wasserstein distance in reference standard deviations).",
    )
    monitor_importance_share: float = Field(
        default=0.3, description="Importance-weighted share of drifted features at or above this is drift."
    )
    monitor_top_features: int = Field(
        default=5, description="How many of the most important features are watched for a strong shift."
    )
    monitor_strong_drift_p_value: float = Field(
        default=3e-4, description="A top feature drifted strongly: K-S p-value at or below this (and a material shift)."
    )
    monitor_top_shift_p_value: float = Field(
        default=3e-4,
        description="The most important features' means moved together: Hotelling T² p-value at or below this "
        "(and a shift of at least monitor_top_shift_distance).",
    )
    monitor_top_shift_distance: float = Field(
        default=0.3, description="Least joint shift of the most important features (Mahalanobis distance)."
    )
    monitor_strong_drift_distance: float = Field(
        default=0.5,
        description="A top feature drifted strongly where the reference has over 1,000 rows "
        "(Wasserstein distance in reference standard deviations).",
    )
    monitor_min_expected_malignant: float = Field(
        default=40.0, description="Fewest expected malignant cases in a window or site for estimated sensitivity."
    )
    monitor_feedback_min_malignant: int = Field(
        default=25, description="Fewest labelled malignant cases in a window or site for realized sensitivity."
    )
    monitor_realized_confidence: float = Field(
        default=0.999,
        gt=0.5,
        lt=1.0,
        description="Realized sensitivity is confidently below the gate when the upper end of its Wilson interval "
        "at this two-sided level is (window and each site judged every window: 95 % would let a champion "
        "just at the gate fire on about one window in ten).",
    )
    monitor_label_window: int = Field(
        default=300,
        gt=0,
        description="Realized performance is judged on the latest this many labelled predictions of each site "
        "and of all sites together (the window's and earlier ones): labels come back after the window closed.",
    )
    monitor_refusal_min_requests: int = Field(
        default=50, description="Fewest records a site sent (scored and refused) before its refusal rate is judged."
    )
    monitor_refusal_jump: float = Field(
        default=0.05,
        description="Refusal rate this far above the site's baseline (its 95 % upper bound) is an incident.",
    )
    monitor_refusal_critical_rate: float = Field(
        default=0.2, description="A data-quality incident is critical at or above this refusal rate."
    )

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # Layout under MEDOPS_HOME ------------------------------------------------------------
    @property
    def landing_dir(self) -> Path:
        return self.home / "landing"

    @property
    def quarantine_dir(self) -> Path:
        return self.home / "quarantine"

    @property
    def ingest_journal_dir(self) -> Path:
        """One entry per ingest in progress: what to finish or roll back after a crash."""
        return self.home / "state" / "ingest-journal"

    @property
    def registry_dir(self) -> Path:
        """The data registry: a git + DVC repository whose tags ``data-vN`` are data versions."""
        return self.home / "registry"

    @property
    def registry_clone_dir(self) -> Path:
        """A worker host's clone of the data registry (``registry_url``), fetched before each read."""
        return self.home / "registry-clone"

    @property
    def dvc_remote_url(self) -> str:
        if self.dvc_remote:
            return self.dvc_remote
        if self.profile == "cluster":
            return f"webdav://{self.host}:{self.webdav_port}/"
        return str(self.dvc_remote_dir)

    @property
    def dvc_remote_dir(self) -> Path:
        """Where the DVC remote's files live on this host (served over WebDAV in the cluster profile)."""
        return self.home / "dvc-remote"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def airflow_passwords_file(self) -> Path:
        """Airflow's simple auth manager reads its users' passwords here (medops writes it, 0600)."""
        return self.airflow_home / "simple_auth_manager_passwords.json"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_url(self) -> str:
        """medops' own MLflow server: the UI (standalone) or the tracking server (cluster), behind basic auth."""
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def tracking_uri(self) -> str:
        """What clients use: in the cluster profile the tracking server, whose artifacts are proxied."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if self.profile == "cluster":
            return self.mlflow_url
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def predictions_dir(self) -> Path:
        """Append-only prediction log and feedback labels."""
        return self.home / "predictions"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def evidently_workspace(self) -> Path:
        return self.home / "evidently"

    @property
    def run_dir(self) -> Path:
        """Pid files and logs of the processes `make run` starts."""
        return self.home / "run"

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def api_keys_file(self) -> Path:
        """Scoped API keys (``medops keys``): hashes only, never a key itself."""
        return self.secrets_dir / "keys.json"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_certfile is not None and self.tls_keyfile is not None

    # Secrets generated on first use, kept under MEDOPS_HOME, never in code ----------------
    def secret(self, name: str) -> str:
        """A generated secret shared by every process of this ``MEDOPS_HOME`` (e.g. Airflow's JWT key).

        Generated once and linked into place (``write_atomically(..., overwrite=False)``): no reader
        sees a half-written file, and two workers starting together end up with the same key. An
        empty secret is an error, never a key.
        """
        if self.secrets_from_env:
            raise RuntimeError(f"the secret {name} is not given to this host (MEDOPS_SECRETS_FROM_ENV is set)")
        path = self.secrets_dir / name
        if not path.exists():
            self.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.secrets_dir.chmod(0o700)
            # Never readable by others, not even for a moment; the first of concurrent writers wins,
            # so every serving worker hashes encounter ids with the same key.
            with contextlib.suppress(FileExistsError):
                write_atomically(path, secrets.token_urlsafe(32) + "\n", mode=0o600, overwrite=False)
        value = path.read_text().strip()
        if not value:
            raise RuntimeError(f"the secret {path} is empty: delete it to have a new one generated")
        return value

    def evidently_secret(self) -> str:
        """What the Evidently UI asks of a write through its API (reading stays open on loopback)."""
        return self.secret("evidently_secret")

    def mlflow_credentials(self) -> dict[str, str]:
        """MLflow's admin on medops' own server, as the variables MLflow's client reads them from; on a
        host given its logins by configuration (``secrets_from_env``), those variables as they are."""
        if self.secrets_from_env:
            names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
            login = {name: os.environ.get(name, "") for name in names}
            if not all(login.values()):
                raise RuntimeError("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD must be set on this host")
            return login
        return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": self.secret(MLFLOW_ADMIN_PASSWORD)}

    def service_api_keys(self) -> list[str]:
        """Bearer keys the service accepts: ``MEDOPS_API_KEYS`` or a key generated on first run."""
        if self.api_keys:
            return [key.strip() for key in self.api_keys.split(",") if key.strip()]
        return [self.secret("api_key")]

    def encounter_hash_key(self) -> bytes:
        """Key of the HMAC that replaces encounter ids in the prediction log."""
        return self.secret("encounter_hash_key").encode()


@functools.cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change ``MEDOPS_*`` variables and call this)."""
    get_settings.cache_clear()
