"""``medops audit show|verify`` and ``medops lineage``: the audit trail and lineage at the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    """Add ``audit`` (show, verify) and ``lineage`` to the ``medops`` command line."""
    from medops.app.cli import command, emit, out, step
    from medops.core.settings import get_settings

    audit_app = typer.Typer(help="The hash-chained audit trail of every decision.", no_args_is_help=True)
    app.add_typer(audit_app, name="audit")

    @command(audit_app, name="show")
    def audit_show(
        action: Annotated[str | None, typer.Option("--action", help="Only entries of this action.")] = None,
        version: Annotated[str | None, typer.Option("--version", help="Only entries about this model version.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """List the audit trail: sequence, time, actor, action, reason and links of every entry."""
        from medops.core import audit

        rows = [
            entry
            for entry in audit.entries(get_settings())
            if (action is None or entry.action == action)
            and (version is None or entry.links.get("model_version") == str(version))
        ]
        if as_json:
            return emit({"entries": [entry.model_dump() for entry in rows]})
        if not rows:
            out.print("the audit trail is empty" if action is None and version is None else "no matching entries")
            return
        for entry in rows:
            links = " ".join(f"{key}={value}" for key, value in entry.links.items())
            out.print(
                f"{entry.seq:>5}  {entry.time[:19]}Z  {entry.action:<14} {entry.actor:<20} {entry.reason}"
                + (f"  [{links}]" if links else ""),
                highlight=False,
                markup=False,
            )

    @command(audit_app, name="verify")
    def audit_verify(
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Recompute the hash chain (and the hashes kept on MLflow runs and versions); exit 1 if altered."""
        from pipelines.governance import verify_trail

        settings = get_settings()
        result, anchors = verify_trail(settings)
        if as_json:
            emit(result.model_dump() | {"anchors_checked": anchors})
        elif result.ok:
            out.print(
                f"audit trail intact: {result.entries} entries, head seq {result.head_seq} "
                f"{(result.head_hash or '')[:16]}, {anchors} hashes kept on MLflow runs and versions agree",
                highlight=False,
                markup=False,
            )
        else:
            altered = f"audit trail ALTERED at entry seq {result.first_bad_seq}: {result.problem}"
            out.print(altered, highlight=False, markup=False)
        if not result.ok:
            raise typer.Exit(1)

    @command(app)
    def lineage(
        encounter_id: Annotated[
            str | None,
            typer.Option("--encounter-id", help="The clinical application's encounter id (hashed, never stored)."),
        ] = None,
        version: Annotated[str | None, typer.Option("--version", help="A model version instead.")] = None,
        restore: Annotated[
            Path | None,
            typer.Option("--restore", help="Empty folder: write the exact training and hold-out rows, proven."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """prediction -> model version -> run -> gate decision and approvals -> data versions -> DVC hashes."""
        from pipelines import lineage as lineage_steps

        if (encounter_id is None) == (version is None):
            raise typer.BadParameter("give exactly one of --encounter-id or --version")
        settings = get_settings()
        found = (
            lineage_steps.trace_encounter(encounter_id, settings)
            if encounter_id is not None
            else lineage_steps.trace_version(version, settings)
        )
        payload = found.to_dict()
        if restore is not None:
            with step(f"restoring the rows of model version {found.model['version']} and proving them against DVC"):
                restored = lineage_steps.restore_rows(found.model["version"], restore, settings, lineage=found)
            payload["restored"] = restored["restored"]
        if as_json:
            return emit(payload)
        for line in describe(payload):
            out.print(line, highlight=False, markup=False)


def describe(lineage: dict[str, Any]) -> list[str]:
    """The chain as lines a person reads top to bottom (the encounter appears only as its hash)."""
    lines = []
    if prediction := lineage.get("prediction"):
        lines.append(
            f"prediction   {prediction['logged_at']}  site {prediction['site_id']}  P(malignant) "
            f"{prediction['probability_malignant']:.4f} -> {prediction['label']}  (encounter hash "
            f"{prediction['encounter_hash'][:16]}…, request {prediction['request_id'][:12]}, "
            f"{prediction['predictions_for_encounter']} prediction(s) for it)"
        )
    model, run = lineage["model"], lineage["run"]
    aliases = f", @{', @'.join(model['aliases'])}" if model["aliases"] else ""
    lines.append(
        f"model        {model['name']} v{model['version']} ({model['family']}, threshold {model['threshold']}"
        f"{aliases}; {model['gate_decision']})"
    )
    lines.append(
        f"run          {run['run_id']} (trigger {run['trigger']}, by {run['actor'] or '?'}, Airflow run "
        f"{run['airflow_run_id'] or '-'}, code {(run['code_git_sha'] or '?')[:12]})  {run['url']}"
    )
    if gate := lineage.get("gate"):
        overall = gate["overall"]

        def figure(name: str) -> str:
            value = overall.get(name)
            return "n/a" if not value else f"{value['value']:.3f} [{value['lower']:.3f}, {value['upper']:.3f}]"

        lines.append(
            f"gate         {'passed' if gate['passed'] else 'FAILED'} under protocol v{gate['protocol_version']} "
            f"(sha256 {gate['protocol_sha256'][:12]}): sensitivity {figure('sensitivity')}, specificity "
            f"{figure('specificity')}, ROC AUC {figure('roc_auc')} on {overall['rows']} hold-out rows "
            f"({overall['malignant']} malignant)"
        )
        for site, figures in gate["sites"].items():
            counts = f"{figures['rows']} rows, {figures['malignant']} malignant"
            lines.append(f"             {site}: {figures['status']} ({counts})")
    else:
        lines.append("gate         no gate decision stored with this run")
    for entry in lineage["decisions"]:
        lines.append(
            f"decision     seq {entry['seq']} {entry['time'][:19]}Z {entry['action']} by {entry['actor']}: "
            f"{entry['reason']}"
        )
    for data in lineage["data_versions"]:
        lines.append(
            f"data         {data['tag']}  DVC {data['dvc_md5']}  {data['rows']} rows  commit {str(data['commit'])[:12]}"
        )
    holdout = lineage["holdout"]
    lines.append(
        f"hold-out     {holdout['rows']} rows ({holdout['malignant']} malignant) of {holdout['data_version']}, "
        f"rule {holdout['rule']} share {holdout['share']}, fingerprint {(holdout['sha256'] or '?')[:16]}"
    )
    if restored := lineage.get("restored"):
        for name, info in restored["files"].items():
            lines.append(
                f"restored     {Path(restored['dir']) / name}  {info['rows']} rows  sha256 {info['sha256'][:16]}  "
                f"(byte-identical to {restored['verified_against']})"
            )
    return lines
