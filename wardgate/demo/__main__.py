"""`make demo`: a local PostgreSQL with the sample shop, a demo user, and the gateway in front of it.

Everything lives under ./.demo and ./wardgate.toml; a second run reuses them. Ctrl-C stops it all.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from ..config import ConnectionSpec, load
from ..localpg import LocalPostgres, LocalPostgresError
from ..store import Store

HERE = Path(__file__).parent
DEMO_PG_PORT = int(os.environ.get("WARDGATE_DEMO_PG_PORT", "54329"))
HEADER = "# Written by `make demo`."
ACCESS_RULE = """
# Who may reach which connection. No rule, no access.
[[access]]
name = "developers"
groups = ["dev"]
connections = ["shop"]
verbs = ["connect", "exec"]

# The guardrails a security team starts from: dangerous functions, DROP/TRUNCATE/ALTER SYSTEM and
# destructive ALTER TABLE, DELETE/UPDATE/MERGE whose condition holds for every row, DO/CALL, stored
# code and DDL that binds a function, role and privilege administration. Statements that do not
# parse are always refused.
# Try: wardgate policy check --user demo --connection shop --sql "delete from orders"
[[guardrails]]
preset = "standard"
connections = ["shop"]

# Personal data is masked in every text-like column before it reaches the person or the agent.
# Members of the "dba" group would see it in clear.
[[masking]]
name = "pii"
detectors = ["email", "card", "ssn", "phone", "iban", "ip"]
connections = ["shop"]
except_groups = ["dba"]

[[masking]]
name = "card-numbers"
columns = ["card_number"]
strategy = "partial"
connections = ["shop"]
except_groups = ["dba"]
"""
CONFIG = HEADER + """ Edit freely; see README.md for every setting.
data_dir = ".demo/wardgate"

[gateway]
listen = "127.0.0.1:6432"
http_listen = "127.0.0.1:8080"

[credentials]
default_ttl = "15m"
max_ttl = "12h"
""" + ACCESS_RULE

console = Console(stderr=True)


def _pg_dir(root: Path) -> Path:
    """Where the demo database lives: ./.demo/pg, or a private place the postgres user can reach."""
    preferred = root / ".demo" / "pg"
    if os.geteuid() != 0:
        return preferred
    root.joinpath(".demo").mkdir(exist_ok=True)
    probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(root / ".demo")], capture_output=True)
    if probe.returncode == 0:
        return preferred
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:10]
    return Path(pwd.getpwnam("postgres").pw_dir) / f"wardgate-demo-{digest}"


def main() -> int:
    root = Path.cwd()
    state_file = root / ".demo" / "state.json"
    (root / ".demo").mkdir(exist_ok=True)
    state = json.loads(state_file.read_text()) if state_file.exists() else {}

    config_path = root / "wardgate.toml"
    if not config_path.exists():
        config_path.write_text(CONFIG)
        console.print(f"wrote {config_path.name}")
    settings = load(config_path)
    if not (settings.access and settings.guardrails and settings.masking) and config_path.read_text().startswith(HEADER):
        # A demo config from before access rules existed: give the demo user its access.
        with open(config_path, "a") as fh:
            fh.write(ACCESS_RULE)
        settings = load(config_path)

    pg = LocalPostgres(Path(state.get("pg_dir") or _pg_dir(root)), port=DEMO_PG_PORT)
    first = not pg.initialized
    if first:
        with console.status("initialising a local PostgreSQL with the sample shop database..."):
            pg.initdb()
            pg.start()
            password = secrets.token_urlsafe(18)
            pg.create_database("shop_app", password, "shop", HERE / "shop.sql")
        state.update(pg_dir=str(pg.dir), upstream_password=password)
        state_file.write_text(json.dumps(state))
        os.chmod(state_file, 0o600)
    else:
        with console.status("starting the local PostgreSQL..."):
            pg.start()

    try:
        store = Store.open(settings)
        if store.get_connection("shop") is None:
            store.add_connection(
                ConnectionSpec("shop", "127.0.0.1", pg.port, "shop", "shop_app", state["upstream_password"], None, "prefer")
            )
        if store.get_user("demo") is None:
            store.add_user("demo", ["dev"])
        issued = store.issue_credential("demo", "shop", 8 * 3600)
        from ..web import LINK_LABEL, login_link_token

        console_link = (f"http://{settings.gateway.http_listen}/console/login/link?token="
                        + login_link_token(store.box.derive(LINK_LABEL), store.get_user("demo").uid, 3600))
        store.close()

        from ..app import run
        from ..config import parse_hostport

        host, port = parse_hostport(settings.gateway.listen)
        url = f"postgresql://demo:{issued.secret}@{host}:{port}/shop?sslmode=require"

        def ready(gateway) -> None:  # noqa: ANN001
            out = Console()
            out.print("\n[bold green]Wardgate demo is running.[/] Connect with:\n")
            out.print(f'psql "{url}"', soft_wrap=True, highlight=False)
            out.print(
                f"\nThe credential is for user [bold]demo[/] (id {issued.id}) and expires in 8 hours."
                f"\nWeb console (signs you in as demo, once, within the hour): {console_link}"
                f"\nHealth: http://{settings.gateway.http_listen}/healthz"
                f"\nAI agents (MCP): http://{settings.gateway.http_listen}/mcp with a key from "
                "[bold].venv/bin/wardgate apikeys create --for-agent claude-code --user demo[/]"
                "\nIn another terminal: [bold].venv/bin/wardgate sessions list[/], "
                "[bold].venv/bin/wardgate credentials issue --user demo --connection shop[/]"
                "\nPress Ctrl-C to stop the gateway and the database.\n",
                highlight=False,
            )
            sys.stdout.flush()

        run(settings, on_ready=ready)
    except OSError as exc:
        console.print(f"[red]cannot start the gateway: {exc}[/] (is something else listening on 6432 or 8080?)")
        return 1
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LocalPostgresError as exc:
        console.print(f"[red]{exc}[/]")
        sys.exit(1)
