"""Where the service listens: loopback unless TLS and keys are configured, and HTTPS when a certificate
and key are given (a real ``bentoml serve`` with a self-signed certificate made here)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from serving_fixtures import API_KEY, auth, records, serving_home, shared_registry

from medops.core.settings import Settings
from serving import keys, processes


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 and its key (PEM files in ``directory``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "service.crt", directory / "service.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_a_host_beyond_loopback_needs_tls_and_keys(medops_home: Settings, tmp_path: Path):
    cert, key = self_signed_certificate(tmp_path)

    def start(**options: object) -> None:
        settings = Settings(home=tmp_path / "home", **options)
        processes.start_server(settings, bento="never-started:1", model_version="1", port=1, role="exposed")

    with pytest.raises(processes.ExposureRefused, match=r"MEDOPS_HOST=0.0.0.0 .* without TLS .* and authentication"):
        start(host="0.0.0.0")  # noqa: S104
    with pytest.raises(processes.ExposureRefused, match="without authentication"):
        start(host="10.1.2.3", tls_certfile=cert, tls_keyfile=key)  # the first-run key was handed to nobody
    with pytest.raises(processes.ExposureRefused, match="without TLS"):
        start(host="10.1.2.3", api_keys="chosen-key")
    assert not list((tmp_path / "home").glob("run/serving-*")), "nothing was started"

    with pytest.raises(processes.ServerStartError, match="MEDOPS_TLS_KEYFILE is not set"):
        processes.tls_arguments(Settings(home=tmp_path / "home", tls_certfile=cert))
    secured = Settings(home=tmp_path / "home", host="0.0.0.0", tls_certfile=cert, tls_keyfile=key)  # noqa: S104
    keys.create_key(secured, ["predict"], name="clinic")  # a key someone made on purpose counts
    processes.check_exposure(secured)
    assert processes.tls_arguments(secured) == ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        processes.check_exposure(Settings(home=tmp_path / "home", host=loopback))


@pytest.mark.integration
def test_the_service_speaks_https_with_the_given_certificate(tmp_path_factory: pytest.TempPathFactory):
    from serving import rollout

    root = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(root)
    tracking_uri, version = shared_registry()
    with serving_home(
        root, MEDOPS_MLFLOW_TRACKING_URI=tracking_uri, MEDOPS_TLS_CERTFILE=str(cert), MEDOPS_TLS_KEYFILE=str(key)
    ) as settings:
        prepared = rollout.prepare_bento(version, settings)
        keys.rollout_key(settings)
        record = processes.start_server(
            settings,
            bento=prepared.bento,
            model_version=version,
            port=processes.find_free_port(),
            role="tls",
            workers=1,
        )
        try:
            processes.wait_ready(record)  # verifies the certificate itself
            assert record.url.startswith("https://127.0.0.1:")
            answer = httpx.post(f"{record.url}/predict", json={"records": records(2)}, headers=auth(), verify=str(cert))
            assert answer.status_code == 200 and answer.json()["model_version"] == version

            done = subprocess.run(
                ["curl", "-sS", "--max-time", "30", "--cacert", str(cert), "-H", f"Authorization: Bearer {API_KEY}",
                 "-H", "Content-Type: application/json", "--data-binary", json.dumps({"records": records(1)}),
                 f"{record.url}/predict"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["model_version"] == version

            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                httpx.get(f"{record.url}/readyz")  # not signed by a public authority: refused by default
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{record.port}/readyz")  # no plain HTTP beside it
            rollout.smoke_test(record.url, version, settings)  # the rollout's own checks over HTTPS
        finally:
            processes.stop_server(record, settings)
