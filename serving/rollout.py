"""Roll a champion model version out to the stable endpoint, and back.

``deploy(version)``:

1. import ``models:/<name>/<version>`` from the MLflow registry into BentoML and build the Bento
   ``<name>_service:<version>`` (a child process, see ``serving/bento_build.py``);
2. start that Bento beside the running one, on a free loopback port, and smoke-test it: ``/predict``
   on the version's stored hold-out rows must equal what the MLflow model itself predicts (labels
   exactly, probabilities to 1e-9), ``/metadata`` must name it;
3. switch the stable endpoint (``settings.serving_port``): its workers load the version from the
   BentoML store, check it and swap it in whole while they keep answering (README, Serving: why this
   beats a process handoff); the same smoke test then runs against the stable endpoint;
4. stop the candidate server, point ``@champion`` at the version, record the deployment.

If any step fails the stable endpoint keeps (or goes back to) the version it served, ``@champion``
points back to that version, an alert goes out, and :class:`DeployFailed` is raised. With no
stable server running (first deployment, or after ``medops serve-stop``), step 3 starts one from
the new Bento instead.

A version whose gate did not pass is served only on a named person's override (:func:`require_deployable`).
Deployments, rollbacks, overrides and refusals are entries in the audit trail (:mod:`pipelines.governance`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medops.core import assets
from medops.core.audit import PLACEHOLDER_ACTORS
from medops.core.files import file_lock
from medops.core.processes import crash_point, poll_until
from medops.core.settings import REPO_ROOT, Settings
from pipelines import governance
from pipelines.governance import SCHEDULER
from pipelines.prediction_log import SMOKE_TEST_SITE
from serving import control, processes
from serving.keys import rollout_key
from serving.processes import ServerRecord

if TYPE_CHECKING:
    from filelock import BaseFileLock

logger = logging.getLogger("medops.serving")

STABLE = "stable"
CANDIDATE = "candidate"
SMOKE_ROWS = 40
# Where tests/test_rollout_crashes.py kills a rollout (medops.core.processes.crash_point): after each
# step that changes what is running or recorded.
CRASH_POINTS = (
    "after_build",
    "after_candidate_start",
    "after_switch_request",
    "after_stable_start",
    "after_switch",
    "after_champion",
    "after_candidate_stop",
    "after_record",
)


class DeployFailed(RuntimeError):
    """A rollout step failed; the previous version is still (again) serving."""


class SmokeTestFailed(RuntimeError):
    """A server answered, but not what the registered model predicts."""


class DeployRefused(PermissionError):
    """The version may not be served without a named person's override: its gate did not pass."""


@dataclass(frozen=True)
class PreparedBento:
    version: str
    model: str
    bento: str


@dataclass(frozen=True)
class DeployResult:
    version: str
    previous: str | None
    bento: str
    url: str
    switch: str  # "swap": running server switched in place; "start": stable server started
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# registry access (pipelines.model_registry) ---------------------------------------------------------


def _champion_version(settings: Settings) -> str | None:
    from pipelines.model_registry import champion_version

    return champion_version(settings)


def _set_champion(version: str, settings: Settings) -> None:
    from pipelines.model_registry import set_champion

    set_champion(str(version), settings)


def _gate_status(version: str, settings: Settings) -> tuple[bool, str]:
    """(whether the version's gate passed, the recorded reason) from its registry tags."""
    from pipelines.model_registry import version_tags

    tags = version_tags(str(version), settings)
    if "gate_passed" not in tags:
        return False, "no gate decision recorded for it"
    return tags["gate_passed"] == "true", tags.get("gate_reason") or tags.get("gate_decision", "")


def _audit(action: str, version: str, actor: str, reason: str, settings: Settings, **details: Any) -> None:
    entry = governance.record(
        action,
        actor=actor,
        reason=reason,
        settings=settings,
        model_version=str(version),
        details=details,
        anchored=False,
    )
    try:  # the entry's hash also kept on the model version it concerns (MLflow tag ``audit.<seq>``)
        governance.anchor(entry, settings, model_version=str(version))
    except Exception:  # the entry is in the log either way; a lost anchor only weakens one check
        logger.exception("could not anchor audit entry %s on model version %s", entry.seq, version)


def require_deployable(
    version: str,
    settings: Settings,
    *,
    override_by: str | None = None,
    override_reason: str | None = None,
    actor: str = SCHEDULER,
) -> str | None:
    """Refuse to serve a version whose gate did not pass, unless a named person overrides it.

    Returns None when the gate passed, else the person who overrode it (audit entry ``override``).
    Without a named person and a reason, raises :class:`DeployRefused` (``refusal``) saying how to override.
    """
    passed, why = _gate_status(version, settings)
    if passed:
        return None
    from pipelines.protocol import approval_reasons, load_protocol
    from pipelines.schema import FEATURES

    protocol = load_protocol()
    reasons = approval_reasons(
        protocol, family=[], features=list(FEATURES), thresholds=None, gate_passed_for_deploy=False
    )
    person = (override_by or "").strip()
    text = (override_reason or "").strip()
    if person.lower() in PLACEHOLDER_ACTORS or not text:
        message = (
            f"model version {version} may not be served: its gate did not pass ({why}). Modification protocol "
            f"v{protocol.version} needs a named person's approval for {'; '.join(reasons) or 'this'}: "
            f"medops deploy --version {version} --override-by NAME --reason TEXT "
            "(deploy_model: params override_by and override_reason)"
        )
        _audit("refusal", version, actor, f"deploy of v{version} refused: gate did not pass ({why})", settings)
        raise DeployRefused(message)
    details = {"overridden": f"gate did not pass: {why}", "protocol_version": protocol.version, "entered_by": actor}
    _audit("override", version, person, text, settings, **details)
    return person


def _raise_alert(title: str, details: str, settings: Settings) -> None:
    """Tell on-call people a rollout failed (webhook / e-mail through medops.core.alerts)."""
    from medops.core.alerts import send_alert

    logger.error("%s: %s", title, details)
    send_alert(title, "failure", [], None, None, settings, severity="error", details=details)


# steps ------------------------------------------------------------------------------------


def control_dir(settings: Settings) -> Path:
    return settings.run_dir / "serving-control"


def _built(version: str, settings: Settings) -> PreparedBento | None:
    """The version's Bento and model if both are already in the BentoML stores (a redeploy, a rollback)."""
    from serving.bento_build import bento_name

    bento = settings.bentoml_home / "bentos" / bento_name(settings) / str(version) / "bento.yaml"
    model = settings.bentoml_home / "models" / settings.model_name / str(version) / "model.yaml"
    if bento.is_file() and model.is_file():
        return PreparedBento(str(version), f"{settings.model_name}:{version}", f"{bento_name(settings)}:{version}")
    return None


def prepare_bento(version: str, settings: Settings) -> PreparedBento:
    """Import the version into BentoML and build its Bento, in a child process (see bento_build)."""
    if (built := _built(version, settings)) is not None:
        return built
    command = [sys.executable, "-m", "serving.bento_build", "--version", str(version)]
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=processes.child_env(settings), capture_output=True, text=True, timeout=600
    )
    (settings.run_dir / f"build-{version}.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"building the Bento for model version {version} failed: {tail}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return PreparedBento(version=str(version), model=result["model"], bento=result["bento"])


def evaluation_rows(version: str, settings: Settings, n: int = SMOKE_ROWS):
    """The first ``n`` hold-out rows (features only) the version's training run stored, not split again
    from today's settings; raises :class:`pipelines.model_registry.MissingReference` if it stored none."""
    from pipelines.model_registry import stored_reference
    from pipelines.schema import FEATURES

    holdout = stored_reference(str(version), settings).holdout
    return holdout[list(FEATURES)].head(n).reset_index(drop=True)


def smoke_test(url: str, version: str, settings: Settings, *, expected: Any = None) -> None:
    """Check a server serves ``version`` and predicts what the registered model (``expected``, from
    :func:`expected_predictions`) predicts, through the clinical apps' client with the rollout's own key."""
    import numpy as np
    from pydantic import ValidationError

    from serving.client import MedopsClient, ServiceError

    rows, probabilities, labels = expected or expected_predictions(version, settings)
    key = rollout_key(settings)  # the only key that may speak for the smoke-test site
    records = [dict(row) | {"encounter_id": f"smoke-{i}"} for i, row in enumerate(rows.to_dict("records"))]
    with MedopsClient(url, key, site_id=SMOKE_TEST_SITE, timeout=60, verify=processes.tls_verify(settings)) as client:
        if not client.ready():
            raise SmokeTestFailed(f"{url}/readyz is not ready")
        try:
            answer = client.predict(records)
        except ServiceError as error:
            raise SmokeTestFailed(f"{url}/predict answered {error.status}: {error.message[:300]}") from None
        except ValidationError as error:
            raise SmokeTestFailed(f"{url}/predict answered outside the contract: {str(error)[:300]}") from None
        served_version = client.last_model_version
        if served_version != str(version) or answer.model_version != str(version):
            raise SmokeTestFailed(f"{url} serves model version {served_version}, expected {version}")
        got_probabilities = np.array([p.probability_malignant for p in answer.predictions])
        got_labels = [p.label for p in answer.predictions]
        if [p.encounter_id for p in answer.predictions] != [r["encounter_id"] for r in records]:
            raise SmokeTestFailed(f"{url}/predict returned predictions out of order")
        if got_labels != list(labels):
            wrong = sum(a != b for a, b in zip(got_labels, labels, strict=True))
            raise SmokeTestFailed(f"{url}: {wrong} of {len(labels)} labels differ from the MLflow model's")
        if not np.allclose(got_probabilities, probabilities, rtol=0, atol=1e-9):
            gap = float(np.max(np.abs(got_probabilities - probabilities)))
            raise SmokeTestFailed(f"{url}: probabilities differ from the MLflow model's by up to {gap:.3g}")
        try:
            metadata = client.metadata()
        except (ServiceError, ValidationError):
            metadata = None
        if metadata is None or metadata.model_version != str(version):
            raise SmokeTestFailed(f"{url}/metadata does not describe model version {version}")
        try:
            client.explain(records[:2])
        except ServiceError as error:
            raise SmokeTestFailed(f"{url}/explain answered {error.status}: {error.message[:300]}") from None
        except ValidationError as error:
            raise SmokeTestFailed(f"{url}/explain answered outside the contract: {str(error)[:300]}") from None


def expected_predictions(version: str, settings: Settings):
    """(evaluation rows, probability_malignant, labels) as the MLflow model itself computes them."""
    from pipelines.metrics import probability_malignant
    from pipelines.model_registry import load_model

    rows = evaluation_rows(version, settings)
    model = load_model(str(version), settings)
    probabilities = probability_malignant(model, rows)
    labels = [str(label) for label in model.predict(rows)]
    return rows, probabilities, labels


def _wait_for_workers(record: ServerRecord, version: str, timeout: float) -> None:
    """Wait until every live worker of ``record`` acknowledged serving ``version``."""
    directory = Path(record.control_dir or "")

    def all_switched() -> bool:
        if not processes.is_running(record):
            raise RuntimeError("the stable server exited during the switch")
        workers = processes.worker_pids(record)
        acks = control.read_acks(directory)
        answered = [acks[pid] for pid in workers if pid in acks and acks[pid]["model_version"] == str(version)]
        errors = [ack["error"] for ack in answered if ack.get("error")]
        if errors:
            raise RuntimeError(f"a serving worker could not load model version {version}: {errors[0]}")
        return bool(workers) and len(answered) == len(workers)

    if not poll_until(all_switched, timeout, 0.1):
        raise RuntimeError(f"serving workers did not switch to model version {version} within {timeout:.0f} s")


def switch_stable(record: ServerRecord, version: str, settings: Settings, *, timeout: float = 60) -> ServerRecord:
    """Make the running stable server serve ``version`` (all workers acknowledged); no restart."""
    directory = Path(record.control_dir or control_dir(settings))
    control.request_model(directory, str(version))
    crash_point("after_switch_request")
    _wait_for_workers(record, str(version), timeout)
    record.model_version = str(version)
    processes.write_record(settings, record)
    return record


def _settle_switch(record: ServerRecord, settings: Settings, *, timeout: float) -> ServerRecord:
    """After a rollout killed mid-switch (it asked the workers for a version but did not record it):
    the record follows the workers if all took that version, else all are asked back to the recorded one."""
    requested = control.requested_model(Path(record.control_dir or ""))
    if requested in (None, record.model_version):
        return record
    try:
        _wait_for_workers(record, requested, timeout)
    except RuntimeError:
        return switch_stable(record, record.model_version, settings, timeout=timeout)
    record.model_version = requested
    processes.write_record(settings, record)
    return record


def start_stable(bento: str, version: str, settings: Settings) -> ServerRecord:
    """Start the stable server on ``settings.serving_port`` from ``bento``, serving ``version``."""
    if not processes.port_is_free(settings.host, settings.serving_port):
        raise RuntimeError(
            f"port {settings.serving_port} is taken by a process medops does not know about; "
            "set MEDOPS_SERVING_PORT or stop it"
        )
    directory = control_dir(settings)
    for stale in directory.glob("ack-*.json"):
        stale.unlink(missing_ok=True)
    control.request_model(directory, str(version))
    record = processes.start_server(
        settings,
        bento=bento,
        model_version=str(version),
        port=settings.serving_port,
        role=STABLE,
        control_dir=directory,
    )
    crash_point("after_stable_start")
    try:
        processes.wait_ready(record, timeout=settings.serving_ready_timeout)
        _wait_for_workers(record, str(version), settings.serving_ready_timeout)
    except Exception:
        processes.stop_server(record, settings)
        raise
    return record


def stable_server(settings: Settings) -> ServerRecord | None:
    """The running stable server, or None (a record of a dead one is forgotten)."""
    record = processes.read_record(settings, STABLE)
    if record is not None and not processes.is_running(record):
        processes.forget_record(settings, STABLE)
        return None
    return record


def history_path(settings: Settings) -> Path:
    return settings.run_dir / "deployments.jsonl"


def deployments(settings: Settings) -> list[dict[str, Any]]:
    """Successful deployments, oldest first."""
    try:
        lines = history_path(settings).read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _record_deployment(result: DeployResult, settings: Settings) -> None:
    path = history_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = result.to_dict() | {"at": datetime.now(UTC).isoformat()}
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _deploy_lock(settings: Settings) -> BaseFileLock:
    """One rollout at a time per MEDOPS_HOME (Airflow run, command line, tests)."""
    return file_lock(settings.run_dir / "deploy.lock")


# entry points ---------------------------------------------------------------------------------


def version_to_deploy(settings: Settings, requested: str | None = None, triggering_events: Any = None) -> str:
    """What deploy_model serves: the requested version, else @champion, else the promoting event's.

    ``triggering_events`` is Airflow's ``triggering_asset_events``; ``medops/champion`` events carry
    ``{"model_version": ...}``. @champion comes first: after two promotions in a row, the first event
    names a superseded version, and serving it would point @champion back at it.
    """
    version = str(requested or "").strip() or _champion_version(settings) or ""
    if not version:
        groups = [
            group
            for key, group in dict(triggering_events or {}).items()
            if getattr(key, "name", key) == assets.CHAMPION
        ]
        extras = [getattr(event, "extra", None) or {} for group in groups for event in group]
        version = next((str(e["model_version"]) for e in reversed(extras) if e.get("model_version")), "")
    if not version:
        raise ValueError(f"no model version given and no @champion of {settings.model_name} in the registry")
    return version


def deploy(
    version: str | int,
    settings: Settings,
    *,
    bento: str | None = None,
    override_by: str | None = None,
    override_reason: str | None = None,
    actor: str = SCHEDULER,
    action: str = "deployment",
    reason: str | None = None,
    gate_checked: bool = True,
    champion_seen: str | None = None,
) -> DeployResult:
    """Roll ``version`` out to the stable endpoint with a smoke-tested candidate; see module doc.

    ``bento`` is the tag :func:`prepare_bento` returned, when the caller built it already. The gate
    is checked by :func:`require_deployable` unless ``gate_checked=False`` (a version served before,
    a rollback). The outcome goes to the audit trail as ``action`` (``deployment`` or ``rollback``).

    ``@champion`` ends on ``version`` only if nobody moved it since the caller decided what to serve
    (``champion_seen``: what it named then, by default when this call starts). A promotion in between
    is left alone: that version's own deploy run serves it next.
    """
    version = str(version)
    started = time.monotonic()
    timeout = settings.serving_ready_timeout  # for a candidate to become ready, and for a switch
    overridden_by = (
        require_deployable(version, settings, override_by=override_by, override_reason=override_reason, actor=actor)
        if gate_checked
        else None
    )
    with _deploy_lock(settings):
        leftover = processes.read_record(settings, CANDIDATE)
        if leftover is not None:  # from a rollout that was killed before it could clean up
            processes.stop_server(leftover, settings)
        stable = stable_server(settings)
        if stable is not None:
            stable = _settle_switch(stable, settings, timeout=timeout)
        previous = stable.model_version if stable is not None else _last_deployed(settings)
        champion_before = _champion_version(settings) if champion_seen is None else str(champion_seen)
        candidate: ServerRecord | None = None
        switched = False
        try:
            # made before any server starts, so none has to wait for its next look at keys.json
            rollout_key(settings)
            prepared = (
                PreparedBento(version, f"{settings.model_name}:{version}", bento)
                if bento
                else prepare_bento(version, settings)
            )
            crash_point("after_build")
            expected = expected_predictions(version, settings)
            port = processes.find_free_port(settings.host)
            candidate = processes.start_server(
                settings, bento=prepared.bento, model_version=version, port=port, role=CANDIDATE, workers=1
            )
            crash_point("after_candidate_start")
            processes.wait_ready(candidate, timeout=timeout)
            smoke_test(candidate.url, version, settings, expected=expected)
            if stable is not None:
                switched = True
                stable = switch_stable(stable, version, settings, timeout=timeout)
                mode = "swap"
            else:
                stable = start_stable(prepared.bento, version, settings)
                mode = "start"
            crash_point("after_switch")
            smoke_test(stable.url, version, settings, expected=expected)
            # Moved during the rollout (a concurrent training promoted): left alone, its own run serves it next.
            if _champion_version(settings) == champion_before != version:
                _set_champion(version, settings)
            crash_point("after_champion")
        except Exception as error:
            champion_back = _fall_back(stable if switched else None, version, previous, settings)
            message = f"deploying model version {version} failed: {error}"
            alias = f"back on v{previous}" if champion_back else f"unchanged (v{_champion_version(settings)})"
            still = f"{message}. Still serving: {previous or 'nothing'}; @champion {alias}."
            _raise_alert(f"medops deploy of model version {version} failed", still, settings)
            if previous is not None:
                kept = f"automatic: {message[:300]}; v{previous} kept serving, @champion {alias}"
                _audit("rollback", previous, SCHEDULER, kept, settings, failed_version=version)
            raise DeployFailed(message) from error
        finally:
            if candidate is not None:
                processes.stop_server(candidate, settings)
        crash_point("after_candidate_stop")
        result = DeployResult(version, previous, prepared.bento, stable.url, mode, round(time.monotonic() - started, 1))
        _record_deployment(result, settings)
        crash_point("after_record")
        override = f"; gate override by {overridden_by}" if overridden_by else ""
        was = f"v{previous}" if previous else "nothing"
        reason = reason or f"v{version} serving on {stable.url} (was {was}){override}"
        details = {"previous": previous, "bento": prepared.bento, "switch": mode, "seconds": result.seconds}
        _audit(action, version, actor, reason, settings, **details)
        logger.info("model version %s serving on %s (%s, %.1f s)", version, stable.url, mode, result.seconds)
        return result


def _last_deployed(settings: Settings) -> str | None:
    history = deployments(settings)
    return str(history[-1]["version"]) if history else None


def _fall_back(stable: ServerRecord | None, failed: str, previous: str | None, settings: Settings) -> bool:
    """After a failed rollout: the stable server back on ``previous``; ``@champion`` too when it
    names the version that failed. One that names another version was moved by a promotion meanwhile
    (a concurrent training): pointing it back would undo that promotion, whose own run serves it next.
    Returns whether ``@champion`` was pointed back."""
    if stable is not None and previous is not None:
        try:
            switch_stable(stable, previous, settings)
        except Exception:
            logger.exception("could not switch the stable server back to model version %s", previous)
    if previous is None or previous == failed:
        return False
    try:
        if _champion_version(settings) == failed:
            _set_champion(previous, settings)
            return True
    except Exception:
        logger.exception("could not point @champion back at model version %s", previous)
    return False


def _served_before(version: str, settings: Settings) -> bool:
    return any(str(entry["version"]) == str(version) for entry in deployments(settings))


def rollback(
    settings: Settings,
    version: str | None = None,
    *,
    override_by: str | None = None,
    override_reason: str | None = None,
    actor: str = SCHEDULER,
) -> DeployResult:
    """Serve the version deployed before the current one (or ``version``) and make it @champion; one never
    served before is gate-checked as :func:`deploy` checks it. Recorded as ``rollback``."""
    serving = stable_server(settings)
    current = serving.model_version if serving else _last_deployed(settings)
    if version is None:
        earlier = [str(entry["version"]) for entry in deployments(settings) if str(entry["version"]) != current]
        if not earlier:
            raise DeployFailed("no earlier deployment to roll back to")
        version = earlier[-1]
    version = str(version)
    return deploy(
        version,
        settings,
        override_by=override_by,
        override_reason=override_reason,
        actor=actor,
        action="rollback",
        reason=f"rolled back from {f'v{current}' if current else 'nothing'} to v{version}",
        gate_checked=not _served_before(version, settings),
    )


def serve(
    settings: Settings,
    version: str | None = None,
    *,
    override_by: str | None = None,
    override_reason: str | None = None,
    actor: str = SCHEDULER,
) -> ServerRecord:
    """Start the stable server with the champion (or ``version``) if none is running; returns it. A version
    neither ``@champion`` nor served before is gate-checked as :func:`deploy` checks it."""
    running = stable_server(settings)
    if running is not None:
        return running
    champion = _champion_version(settings)
    version = str(version or champion or "")
    if not version:
        raise RuntimeError(f"no @champion version of {settings.model_name} to serve yet")
    if version != champion and not _served_before(version, settings):
        require_deployable(version, settings, override_by=override_by, override_reason=override_reason, actor=actor)
    started = time.monotonic()
    with _deploy_lock(settings):
        rollout_key(settings)
        prepared = prepare_bento(version, settings)
        record = start_stable(prepared.bento, version, settings)
        seconds = round(time.monotonic() - started, 1)
        _record_deployment(DeployResult(version, None, prepared.bento, record.url, "start", seconds), settings)
    _audit("deployment", version, actor, f"stable server started with v{version} on {record.url}", settings)
    return record


def stop_serving(settings: Settings) -> bool:
    """Stop the stable server; True if one was running."""
    record = processes.read_record(settings, STABLE)
    if record is None:
        return False
    running = processes.is_running(record)
    processes.stop_server(record, settings)
    return running


def stop_all(settings: Settings) -> None:
    """Stop every server the rollout started (stable, and a candidate left by a killed deploy)."""
    for role in (CANDIDATE, STABLE):
        record = processes.read_record(settings, role)
        if record is not None:
            with suppress(Exception):
                processes.stop_server(record, settings)
