"""``medops keys create|list|revoke``: the service's scoped API keys (``serving.keys``), which a
running service picks up within a second, without a restart."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``keys`` command group to the ``medops`` command line."""
    from medops.app.cli import command, emit, out
    from medops.core.settings import get_settings

    keys_app = typer.Typer(help="API keys of the service: scoped, optionally bound to a site.", no_args_is_help=True)
    app.add_typer(keys_app, name="keys")

    @command(keys_app, name="create")
    def create(
        scope: Annotated[list[str], typer.Option("--scope", help="predict, explain, feedback or admin (repeatable).")],
        site: Annotated[
            str | None, typer.Option("--site", help="Bind the key to this site_id: it can speak for no other.")
        ] = None,
        name: Annotated[str, typer.Option("--name", help="Who or what holds the key.")] = "",
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Make a key and print it, once: only its hash is kept."""
        from serving.keys import create_key

        record, secret = create_key(get_settings(), scope, site_id=site, name=name)
        if as_json:
            return emit(record.to_public() | {"key": secret})
        out.print(f"key id  {record.id}  scopes {', '.join(sorted(record.scopes))}  site {record.site_id or 'any'}")
        out.print(secret, highlight=False)
        out.print("[dim]shown once: store it now; medops keeps only its hash[/]")

    @command(keys_app, name="list")
    def list_keys(as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False) -> None:
        """Every key made with `medops keys create` (ids, names, scopes, sites; never a key)."""
        from serving.keys import read_keys

        rows = [key.to_public() for key in read_keys(get_settings())]
        if as_json:
            return emit({"keys": rows})
        for row in rows:
            state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
            out.print(
                f"{row['id']:<10} {row['name'] or '-':<24} {','.join(row['scopes']):<28} "
                f"{row['site_id'] or 'any site':<20} created {row['created_at']}  {state}",
                highlight=False,
            )

    @command(keys_app, name="revoke")
    def revoke(key_id: Annotated[str, typer.Argument(help="The key's id (medops keys list).")]) -> None:
        """Revoke a key: running services refuse it from the next second on."""
        from serving.keys import revoke_key

        record = revoke_key(get_settings(), key_id)
        out.print(f"revoked {record.id} at {record.revoked_at}")
