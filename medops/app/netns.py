"""The cluster's train workers on virtual networks of their own (``MEDOPS_CLUSTER_NETNS``).

Where the machine allows it (root, ``ip``), each train worker runs in a network namespace of its
own, joined to this one by a veth pair on a /30 of ``10.231.0.0/16``, and reaches the services on
127.0.0.1 through its gateway (:mod:`medops.app.gateway`), which listens on the veth's host side
only. Names derive from a short hash of ``MEDOPS_HOME``, so two platforms on one machine never meet.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from medops.core.settings import Settings

POOL = ipaddress.ip_network("10.231.0.0/16")
BLOCKS = POOL.num_addresses // 4
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
HOST_PATTERN = "10.231.*"  # the gateways' addresses, as MLflow's --allowed-hosts matches them (fnmatch)


@dataclass(frozen=True)
class Link:
    """One worker's namespace, veth pair and /30: ``gateway`` on this side, ``inside`` in the namespace."""

    namespace: str
    host_if: str
    inside_if: str
    gateway: str
    inside: str


def prefix(settings: Settings) -> str:
    """What every namespace and interface name of this platform starts with (8 characters)."""
    return "mo" + hashlib.sha256(str(settings.home.resolve()).encode()).hexdigest()[:6]


def names(settings: Settings, index: int) -> tuple[str, str, str]:
    """The namespace, the host-side and the namespace-side interface of train worker ``index``."""
    base = prefix(settings)
    host_if, inside_if = f"{base}h{index}", f"{base}n{index}"
    assert len(host_if) <= 15 and len(inside_if) <= 15, "interface name longer than the kernel allows"
    return f"{base}-w{index}", host_if, inside_if


def choose_subnet(seed: str, used: set[ipaddress.IPv4Address]) -> ipaddress.IPv4Network:
    """A /30 of the pool, first tried where ``seed``'s hash points, the next free one otherwise."""
    start = int(hashlib.sha256(seed.encode()).hexdigest(), 16) % BLOCKS
    for step in range(BLOCKS):
        block = ipaddress.ip_network(f"{POOL.network_address + 4 * ((start + step) % BLOCKS)}/30")
        if not any(address in block for address in used):
            return block
    raise RuntimeError(f"no free /30 left in {POOL}")


def rewrite_env(env: dict[str, str], gateway: str) -> dict[str, str]:
    """``env`` with every URL's loopback host (``//127.0.0.1:``, ``@localhost/``…) turned into
    ``gateway``, and ``MEDOPS_HOST`` too: what the worker derives its URLs from."""
    hosts = "|".join(re.escape(name) for name in LOOPBACK_NAMES)
    # after "//" (scheme://host) or "@" (user@host) and before a port or path; "medops@localhost"
    # (an e-mail address) is no URL
    pattern = re.compile(rf"(?<=//)(?:{hosts})(?=[:/]|$)|(?<=@)(?:{hosts})(?=[:/])")
    rewritten = {key: pattern.sub(gateway, value) for key, value in env.items()}
    if "MEDOPS_HOST" in rewritten:
        rewritten["MEDOPS_HOST"] = gateway
    return rewritten


def ports(settings: Settings) -> list[int]:
    """Every port a train worker connects to: PostgreSQL, Redis, Airflow's API server (execution
    API), MLflow, WebDAV, the registry's git daemon."""
    from urllib.parse import urlsplit

    database = urlsplit(settings.postgres_url).port or 5432
    broker = urlsplit(settings.redis_url).port or 6379
    return sorted({database, broker, settings.airflow_port, settings.mlflow_port, settings.webdav_port,
                   settings.registry_port})  # fmt: skip


# The machine ----------------------------------------------------------------------------------------
def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def enabled(settings: Settings) -> bool:
    """``auto``: where the machine allows; ``on``: required; ``off``: processes as before."""
    mode = settings.cluster_netns
    if mode == "off":
        return False
    if mode == "on" and not available():
        raise RuntimeError("MEDOPS_CLUSTER_NETNS=on needs root and the `ip` command")
    return available()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def used_addresses() -> set[ipaddress.IPv4Address]:
    """The IPv4 addresses on this namespace's interfaces."""
    found = set()
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            found.add(ipaddress.ip_interface(fields[fields.index("inet") + 1]).ip)
    return found


def namespaces(settings: Settings) -> list[str]:
    """This platform's namespaces that exist."""
    if shutil.which("ip") is None:
        return []
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.strip() and line.split()[0].startswith(prefix(settings) + "-")]


def gateways(settings: Settings) -> dict[str, str]:
    """The host side of each of this platform's veth pairs (interface name) and its address."""
    found: dict[str, str] = {}
    if shutil.which("ip") is None:
        return found
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[1].split("@")[0].startswith(prefix(settings)) and "inet" in fields:
            found[fields[1].split("@")[0]] = str(ipaddress.ip_interface(fields[fields.index("inet") + 1]).ip)
    return found


def gateway_addresses(settings: Settings) -> set[str]:
    """The host-side addresses of this platform's veth pairs: where its gateways may listen."""
    return set(gateways(settings).values())


def delete(namespace: str, host_if: str | None = None) -> None:
    _ip("netns", "delete", namespace, check=False)
    if host_if:
        _ip("link", "delete", host_if, check=False)


def create(settings: Settings, index: int) -> Link:
    """Worker ``index``'s namespace, made anew (what a crashed run left of it is deleted first)."""
    namespace, host_if, inside_if = names(settings, index)
    delete(namespace, host_if)
    block = choose_subnet(f"{settings.home.resolve()}:{index}", used_addresses())
    gateway, inside = (str(address) for address in list(block.hosts()))
    try:
        _ip("netns", "add", namespace)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", inside_if, "netns", namespace)
        _ip("addr", "add", f"{gateway}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", namespace, "addr", "add", f"{inside}/30", "dev", inside_if)
        _ip("-n", namespace, "link", "set", inside_if, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as error:
        delete(namespace, host_if)
        raise RuntimeError(f"network namespace {namespace}: {error.stderr.strip()}") from error
    return Link(namespace, host_if, inside_if, gateway, inside)


def delete_all(settings: Settings) -> list[str]:
    """Delete this platform's namespaces (their veth pairs go with them); returns their names."""
    found = namespaces(settings)
    for namespace in found:
        delete(namespace)
    return found
