"""``medops deploy``, ``rollback``, ``serve`` and ``serve-stop``: the functions the ``deploy_model``
DAG calls (``serving.rollout``), at a terminal. Heavy imports happen inside the commands."""

from __future__ import annotations

from typing import Annotated

import typer

# Module level: with postponed annotations, Typer resolves these names in the module's globals.
override_by_option = typer.Option(
    "--override-by", help="The person who decided to serve a version whose gate did not pass (their name)."
)
reason_option = typer.Option("--reason", help="Why that version is served anyway (with --override-by).")


def register(app: typer.Typer) -> None:
    """Add the serving commands to the ``medops`` command line."""
    from medops.app.cli import command, emit, out, step, terminal_user
    from medops.core.settings import get_settings

    @command(app)
    def deploy(
        version: Annotated[str, typer.Option("--version", help="Registry version of the model to roll out.")],
        override_by: Annotated[str | None, override_by_option] = None,
        reason: Annotated[str | None, reason_option] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Roll a model version out: build its Bento, smoke-test it beside the running one, switch.

        A version whose gate did not pass is refused unless --override-by NAME --reason TEXT
        (recorded in the audit trail as an override).
        """
        from serving import rollout

        settings = get_settings()
        actor = terminal_user()
        rollout.require_deployable(version, settings, override_by=override_by, override_reason=reason, actor=actor)
        with step(f"rolling out model version {version} (build, smoke test, switch)"):
            result = rollout.deploy(
                version, settings, override_by=override_by, override_reason=reason, actor=actor, gate_checked=False
            )
        if as_json:
            return emit(result.to_dict())
        before = f"v{result.previous}" if result.previous else "nothing"
        out.print(f"serving  v{result.version} on {result.url} (was {before}; {result.seconds:.0f} s)")

    @command(app)
    def rollback(
        version: Annotated[
            str | None, typer.Option("--version", help="Version to go back to (default: the one deployed before).")
        ] = None,
        override_by: Annotated[str | None, override_by_option] = None,
        reason: Annotated[str | None, reason_option] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Serve the previously deployed model version again and point @champion at it."""
        from serving import rollout

        with step("rolling back"):
            result = rollout.rollback(
                get_settings(), version, override_by=override_by, override_reason=reason, actor=terminal_user()
            )
        if as_json:
            return emit(result.to_dict())
        out.print(f"serving  v{result.version} on {result.url} (was v{result.previous})")

    @command(app, name="serve")
    def serve(
        version: Annotated[
            str | None, typer.Option("--version", help="Model version to serve (default: @champion).")
        ] = None,
        override_by: Annotated[str | None, override_by_option] = None,
        reason: Annotated[str | None, reason_option] = None,
    ) -> None:
        """Start the champion's Bento on the serving port (loopback) if it is not running."""
        from serving import rollout

        with step("starting the stable server"):
            record = rollout.serve(
                get_settings(), version, override_by=override_by, override_reason=reason, actor=terminal_user()
            )
        out.print(f"serving  v{record.model_version} on {record.url} (pid {record.pid}, log {record.log})")

    @command(app, name="serve-stop")
    def serve_stop() -> None:
        """Stop the stable server (and a candidate left by an interrupted rollout)."""
        from serving import rollout

        settings = get_settings()
        was_running = rollout.stop_serving(settings)
        rollout.stop_all(settings)
        out.print("serving stopped" if was_running else "serving was not running")
