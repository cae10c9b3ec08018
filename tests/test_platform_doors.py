"""The platform's doors: Airflow's and MLflow's passwords are medops' secrets, written where each
reads them and nowhere else; every server on loopback; nothing under MEDOPS_HOME open to others.

The unit tests here run in a second. The ``assert_*`` checks run on a real platform: the
end-to-end tests (standalone and cluster) call them on the platform they started.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx
import psutil
import pytest
from rich.console import Console

from medops.app import platform
from medops.app.airflow_api import admin_password, write_passwords_file
from medops.core.settings import Settings

LOOPBACK = {"127.0.0.1", "::1"}
LARGEST_READ = 5 * 1024 * 1024


def test_airflow_reads_medops_password_and_prints_none(medops_home: Settings, monkeypatch, capsys):
    """Airflow prints (into run/*.log) a password it generates for a user missing from its file:
    medops writes the file first, so Airflow generates and prints nothing."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    settings = medops_home
    assert admin_password(settings) is None  # before `medops up`: no API server to log in to (dag.test())
    path = write_passwords_file(settings)
    password = admin_password(settings)
    assert password == (settings.secrets_dir / "airflow_admin_password").read_text().strip()
    assert len(password) >= 40 and json.loads(path.read_text()) == {"admin": password}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    env = platform.airflow_env(settings)
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == str(path)
    for name in ("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"):
        monkeypatch.setenv(name, env[name])
    SimpleAuthManager().init()
    assert password not in capsys.readouterr().out
    assert json.loads(path.read_text()) == {"admin": password}  # Airflow kept medops' password
    write_passwords_file(settings)
    assert admin_password(settings) == password  # a restart keeps it


def test_mlflow_auth_config_is_private_and_read_by_mlflow(medops_home: Settings, monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    settings = medops_home
    path = platform.write_mlflow_auth_config(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    config = read_auth_config()
    login = settings.mlflow_credentials()
    assert (config.admin_username, config.admin_password) == (
        login["MLFLOW_TRACKING_USERNAME"],
        login["MLFLOW_TRACKING_PASSWORD"],
    )
    assert config.default_permission == "NO_PERMISSIONS"
    assert config.database_uri == f"sqlite:///{settings.mlflow_dir / 'basic_auth.db'}"


def test_mlflow_clients_log_in_to_medops_server_only(tmp_path: Path, monkeypatch):
    from medops.core.processes import child_env
    from pipelines.model_registry import configure_mlflow

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    configure_mlflow(Settings(home=tmp_path / "standalone"))  # the SQLite store: no server, no login
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
    cluster = Settings(home=tmp_path / "cluster", profile="cluster")
    configure_mlflow(cluster)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == cluster.mlflow_credentials()["MLFLOW_TRACKING_PASSWORD"]
    assert "MLFLOW_TRACKING_PASSWORD" in child_env(cluster)  # Airflow's tasks call the tracking server
    assert "MLFLOW_TRACKING_PASSWORD" not in child_env(cluster, service_keys=False)  # the UIs never do


def test_the_summary_says_where_credentials_are_not_what_they_are(medops_home: Settings):
    settings = medops_home
    secrets = [
        settings.service_api_keys()[0],
        settings.secret("airflow_admin_password"),
        settings.mlflow_credentials()["MLFLOW_TRACKING_PASSWORD"],
    ]
    console = Console(record=True, width=300)
    platform.print_summary(settings, console)
    text = console.export_text()
    assert not [secret for secret in secrets if secret in text]
    for name in ("api_key", "airflow_admin_password", "mlflow_admin_password"):
        assert str(settings.secrets_dir / name) in text
    assert f"$(cat {settings.secrets_dir / 'api_key'})" in text  # the curl example reads the key itself


def test_the_platform_checks_catch_an_open_file_and_a_leaked_secret(tmp_path: Path):
    """The checks the end-to-end tests run on a real platform, shown failing where they must."""
    home = tmp_path / "home"
    (home / "cache" / "files").mkdir(parents=True)
    home.chmod(0o711)  # others may pass through, not list it
    (home / "cache").chmod(0o700)
    dvc_like = home / "cache" / "files" / "ab12"
    dvc_like.write_text("rows")
    dvc_like.chmod(0o444)  # readable by all, but inside a folder others cannot enter
    assert assert_nothing_readable_by_others(home) == 4
    (home / "run").mkdir()
    (home / "run").chmod(0o755)  # not mkdir's mode: the umask (medops sets 077 in-process) would mask it
    log = home / "run" / "airflow.log"
    log.write_text("Password for user 'admin': s3cret-value\n")
    log.chmod(0o644)
    with pytest.raises(AssertionError, match="run/airflow.log"):
        assert_nothing_readable_by_others(home)
    with pytest.raises(AssertionError, match="run/airflow.log"):
        assert_no_secret_in_files(home, ["s3cret-value"])
    assert assert_no_secret_in_files(home, ["other-secret"]) == 2


# On a running platform ------------------------------------------------------------------------------
def platform_pids(home: Path) -> set[int]:
    """Every process the platform started for ``home``, with all their descendants."""
    found: set[int] = set()
    for process in psutil.process_iter():
        try:
            if process.environ().get("MEDOPS_HOME") == str(home):
                found |= {process.pid, *(child.pid for child in process.children(recursive=True))}
        except psutil.Error:
            continue
    return found


def _gateways(home: Path) -> dict[int, str]:
    """The pid of each running gateway (``medops.app.gateway``) and the one address it may listen on:
    the one it was started with, if that is the host side of one of this platform's veth pairs."""
    from medops.app import netns

    addresses = netns.gateway_addresses(Settings(home=home))
    found = {}
    for process in psutil.process_iter():
        try:
            argv = process.cmdline()
        except psutil.Error:
            continue
        if argv[1:3] == ["-m", "medops.app.gateway"] and len(argv) > 3 and argv[3] in addresses:
            found[process.pid] = argv[3]
    return found


def assert_listening_on_loopback_only(home: Path) -> int:
    """No process of the platform listens off loopback, but for the train workers' gateways (cluster
    profile, network namespaces) on the host side of medops' own veth pairs, each on its own pair's
    address only; returns how many listening sockets it has."""
    pids = platform_pids(home)
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    gateways = _gateways(home)
    exposed = [
        f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})"
        for c in listening
        if c.laddr.ip not in LOOPBACK and gateways.get(c.pid) != c.laddr.ip
    ]
    assert exposed == [], exposed
    assert listening, "no listening socket of the platform found: the check saw none of its processes"
    return len(listening)


def assert_no_secret_in_files(home: Path, secrets: list[str]) -> int:
    """No file under ``home`` holds one of ``secrets``, except the secrets themselves and the two
    private files each server reads its admin password from; returns how many files were read."""
    settings = Settings(home=home)
    allowed = {settings.airflow_passwords_file, settings.mlflow_dir / "basic_auth.ini"}
    wanted = [secret.encode() for secret in secrets]
    assert all(len(secret) >= 6 for secret in wanted)
    found, read = [], 0
    for path in home.rglob("*"):
        if path.is_symlink() or not path.is_file() or path in allowed or path.parent == settings.secrets_dir:
            continue
        try:  # the platform runs on: a temporary file may be gone by now
            if path.stat().st_size >= LARGEST_READ:
                continue
            content, read = path.read_bytes(), read + 1
        except FileNotFoundError:
            continue
        found += [str(path.relative_to(home)) for secret in wanted if secret in content]
    assert found == [], f"secrets in {found}"
    assert read, "no file read"
    return read


def assert_nothing_readable_by_others(home: Path) -> int:
    """An entry counts as readable by other users only if it has o+r and every directory from
    ``home`` down to it has o+x: DVC's 0444 cache files inside 0700 folders are out of their reach.
    Returns how many entries were checked."""
    open_ = []
    entries = [home, *home.rglob("*")]
    for path in entries:
        try:  # the platform runs on: a temporary file may be gone by now
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or not mode & stat.S_IROTH:
            continue
        ancestors = [path.parent, *path.parent.parents][: len(path.relative_to(home).parts)]
        if all(folder.stat().st_mode & stat.S_IXOTH for folder in ancestors):
            open_.append(f"{path.relative_to(home)} {stat.filemode(mode)}")
    assert open_ == [], open_
    return len(entries)


def assert_mlflow_asks_for_a_password(url: str, login: dict[str, str], model_name: str) -> None:
    """MLflow's REST API refuses anyone without medops' MLflow login (writes and reads) and serves it."""
    create = f"{url}/api/2.0/mlflow/registered-models/create"
    refused = httpx.post(create, json={"name": "door-probe"}, timeout=30)
    assert refused.status_code == 401, refused.text[:300]
    wrong = httpx.get(f"{url}/api/2.0/mlflow/registered-models/search", auth=("admin", "guess"), timeout=30)
    assert wrong.status_code == 401, wrong.text[:300]
    auth = (login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"])
    champion = {"name": model_name, "alias": "champion"}
    alias = httpx.get(f"{url}/api/2.0/mlflow/registered-models/alias", params=champion, auth=auth, timeout=30)
    assert alias.status_code == 200, alias.text[:300]
    ui = httpx.get(f"{url}/", auth=auth, timeout=30)
    assert ui.status_code == 200 and "<html" in ui.text.lower()
    assert httpx.get(f"{url}/", headers={"Host": "rebind.example"}, auth=auth, timeout=30).status_code == 403
