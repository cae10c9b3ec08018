"""The pure parts of the train workers' network namespaces: names, the /30 chosen, the worker's
environment pointed at its gateway, the ports forwarded; and, where the machine allows (root,
``ip``), one namespace made, reached through its gateway only, and deleted."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medops.app import cluster, netns
from medops.core import processes
from medops.core.settings import Settings


def test_names_are_per_platform_and_fit_the_kernel(tmp_path: Path):
    one, other = Settings(home=tmp_path / "a"), Settings(home=tmp_path / "b")
    assert netns.prefix(one) != netns.prefix(other) and len(netns.prefix(one)) == 8
    for index in (1, 2, 99, 999):
        namespace, host_if, inside_if = netns.names(one, index)
        assert namespace.startswith(netns.prefix(one) + "-") and host_if != inside_if
        assert len(host_if) <= 15 and len(inside_if) <= 15
    assert netns.names(one, 1) != netns.names(one, 2)


def test_subnet_is_a_free_slash_30_of_the_pool():
    first = netns.choose_subnet("home:1", set())
    assert first.prefixlen == 30 and first.subnet_of(netns.POOL)
    assert netns.choose_subnet("home:1", set()) == first  # stable
    assert netns.choose_subnet("home:2", set()) != first
    taken = {first.network_address + 1}
    second = netns.choose_subnet("home:1", taken)
    assert second != first and not any(address in second for address in taken)
    unrelated = {ipaddress.ip_address("192.168.1.1")}
    assert netns.choose_subnet("home:1", unrelated) == first


def test_env_rewrite_points_every_loopback_url_at_the_gateway():
    env = {
        "AIRFLOW__CELERY__BROKER_URL": "redis://127.0.0.1:6379/11",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://medops@127.0.0.1:5432/x_airflow",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+postgresql+psycopg2://medops@localhost/x_airflow",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://127.0.0.1:8080/execution/",
        "MEDOPS_REGISTRY_URL": "git://127.0.0.1:9418/registry",
        "MEDOPS_HOST": "127.0.0.1",
        "MEDOPS_HOME": "/tmp/127.0.0.1/home",  # a path, not a URL's host
        "OTHER": "http://127.0.0.10:1/",  # another address
        "MEDOPS_ALERT_EMAIL_FROM": "medops@localhost",  # an e-mail address
        "BARE": "redis://localhost",
    }
    out = netns.rewrite_env(env, "10.231.0.1")
    assert out["AIRFLOW__CELERY__BROKER_URL"] == "redis://10.231.0.1:6379/11"
    assert out["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "postgresql+psycopg2://medops@10.231.0.1:5432/x_airflow"
    assert out["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+postgresql+psycopg2://medops@10.231.0.1/x_airflow"
    assert out["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://10.231.0.1:8080/execution/"
    assert out["MEDOPS_REGISTRY_URL"] == "git://10.231.0.1:9418/registry"
    assert out["MEDOPS_HOST"] == "10.231.0.1"
    assert out["OTHER"] == env["OTHER"]
    assert out["MEDOPS_HOME"] == env["MEDOPS_HOME"]
    assert out["MEDOPS_ALERT_EMAIL_FROM"] == "medops@localhost" and out["BARE"] == "redis://10.231.0.1"
    assert not [v for v in out.values() if "//127.0.0.1:" in v or "@127.0.0.1:" in v or "@localhost/" in v]
    # what the worker derives from MEDOPS_HOST: the DVC remote and MLflow through the gateway too
    worker = Settings(host=out["MEDOPS_HOST"], profile="cluster")
    assert worker.dvc_remote_url.startswith("webdav://10.231.0.1:") and worker.tracking_uri.startswith("http://10.231")


def test_mlflow_accepts_the_gateways_host_header():
    from fnmatch import fnmatch

    gateway = str(next(netns.choose_subnet("x", set()).hosts()))
    assert fnmatch(f"{gateway}:5000", f"{netns.HOST_PATTERN}:5000")
    assert str(netns.POOL).startswith(netns.HOST_PATTERN.rstrip("*"))


def test_every_service_port_is_forwarded(tmp_path: Path):
    settings = Settings(home=tmp_path, postgres_url="postgresql://postgres@127.0.0.1:5433/postgres")
    assert netns.ports(settings) == sorted(
        {5433, 6379, settings.airflow_port, settings.mlflow_port, settings.webdav_port, settings.registry_port}
    )


def test_off_means_plain_processes(tmp_path: Path):
    assert netns.enabled(Settings(home=tmp_path, cluster_netns="off")) is False
    assert "plain processes" in cluster.isolation(Settings(home=tmp_path, cluster_netns="off"))
    assert cluster.gateway_name(1) in cluster.process_names(Settings(home=tmp_path), workers=1)


@pytest.mark.skipif(not netns.available(), reason="needs root and `ip`")
def test_a_namespace_reaches_loopback_through_its_gateway_only(tmp_path: Path):
    settings = Settings(home=tmp_path / "home", mlflow_port=0)
    settings.run_dir.mkdir(parents=True)
    import socket

    server = socket.create_server(("127.0.0.1", 0))  # a service on loopback
    port = server.getsockname()[1]
    probe = (
        "import socket, sys\n"
        "try:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('open')\n"
        "except OSError:\n    print('closed')\n"
    )
    try:
        link = netns.create(settings, 1)
        assert netns.namespaces(settings) == [link.namespace]
        assert netns.gateway_addresses(settings) == {link.gateway}
        assert netns.gateways(settings) == {link.host_if: link.gateway}
        argv = [sys.executable, "-m", "medops.app.gateway", link.gateway, str(port)]
        processes.start("gateway-1", argv, settings, env=processes.child_env(settings))
        processes.wait_until(lambda: cluster._reachable(link.gateway, port), 30, "gateway")

        def inside(host: str) -> str:
            argv = ["ip", "netns", "exec", link.namespace, sys.executable, "-c", probe, host, str(port)]
            return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()

        assert inside("127.0.0.1") == "closed"
        assert inside(link.gateway) == "open"
        assert netns.create(settings, 1).namespace == link.namespace  # a leftover is made anew
    finally:
        processes.stop("gateway-1", settings)
        server.close()
        netns.delete_all(settings)
    assert netns.namespaces(settings) == [] and netns.gateway_addresses(settings) == set()
    assert shutil.which("ip") and os.geteuid() == 0
