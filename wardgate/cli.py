"""The `wardgate` command: run the gateway and manage users, connections, credentials and sessions."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .config import ConfigError, ConnectionSpec, Settings, load, parse_duration
from .recording.views import iso
from .store.secretbox import SecretError

app = typer.Typer(no_args_is_help=True, help="Wardgate: identity-aware access gateway for PostgreSQL.", add_completion=False)
users_app = typer.Typer(no_args_is_help=True, help="Local users (the embedded identity).")
connections_app = typer.Typer(no_args_is_help=True, help="Named PostgreSQL targets the gateway connects to.")
credentials_app = typer.Typer(no_args_is_help=True, help="Short-lived credentials for native clients (psql, drivers).")
sessions_app = typer.Typer(no_args_is_help=True, help="Recorded sessions and their statements.")
app.add_typer(users_app, name="users")
app.add_typer(connections_app, name="connections")
app.add_typer(credentials_app, name="credentials")
app.add_typer(sessions_app, name="sessions")

console = Console()
err = Console(stderr=True, soft_wrap=True)


class State:
    config: str | None = None
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load(self.config)
        return self._settings


state = State()

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def open_store():  # noqa: ANN201
    from .store import Store

    settings = state.settings  # a broken config is reported by main() with exit code 2
    try:
        return Store.open(settings)
    except ConfigError as exc:
        fail(str(exc))


def cli_actor():  # noqa: ANN201
    """Who changes something from the command line: the account running it, on this host."""
    from .store import Actor

    return Actor.local("cli")


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def status(row: Any) -> str:
    """active, revoked or expired, for anything with revoked_at and expires_at (None: never expires)."""
    if row.revoked_at:
        return "revoked"
    return "expired" if row.expires_at is not None and row.expires_at <= time.time() else "active"


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.callback()
def main_options(
    config: str | None = typer.Option(
        None, "--config", "-c", envvar="WARDGATE_CONFIG", help="Config file (default ./wardgate.toml)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more."),
) -> None:
    state.config = config
    state._settings = None
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"wardgate {__version__}")


# ------------------------------------------------------------------------------------ serve


@app.command()
def serve(
    listen: str | None = typer.Option(None, help="PostgreSQL listener HOST:PORT (default 127.0.0.1:6432)."),
    http_listen: str | None = typer.Option(None, help="HTTP listener HOST:PORT (default 127.0.0.1:8080)."),
) -> None:
    """Run the gateway: the PostgreSQL listener and the HTTP listener (with /healthz)."""
    from .app import run
    from .logs import configure

    settings = state.settings
    configure(settings.gateway.log_format)
    if listen:
        settings.gateway.listen = listen
    if http_listen:
        settings.gateway.http_listen = http_listen

    def ready(gw: Any) -> None:
        err.print(
            f"[green]wardgate {__version__} ready[/]: postgres on {settings.gateway.listen} "
            f"(TLS CA {gw.tls_source}), http on {settings.gateway.http_listen}"
        )

    try:
        run(settings, on_ready=ready)
    except OSError as exc:
        fail(f"cannot start: {exc}. Is another gateway running on the same ports? Change [gateway] listen.")


# ------------------------------------------------------------------------------------ users


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="User name; native clients connect with user=NAME."),
    group: list[str] = typer.Option([], "--group", "-g", help="Group membership (repeat for several)."),
    json_out: bool = JsonOpt,
) -> None:
    """Add a local user."""
    from .store import Conflict

    store = open_store()
    try:
        user = store.add_user(name, group, cli_actor())
    except (Conflict, ConfigError) as exc:
        fail(str(exc))
    if json_out:
        emit_json({"name": user.name, "groups": user.groups, "created_at": iso(user.created_at)})
    else:
        console.print(f"added user [bold]{user.name}[/] groups: {', '.join(user.groups) or '-'}")


@users_app.command("login-link")
def users_login_link(
    name: str = typer.Argument(..., help="A local user."),
    ttl: str = typer.Option("10m", help="How long the link stays good (it works once)."),
) -> None:
    """A one-time link that signs a local user in to the web console (for the embedded identity)."""
    from .web import LINK_LABEL, login_link_token

    store = open_store()
    user = store.get_user(name)
    if user is None or user.disabled or user.source != "local":
        fail(f"no local user named {name!r}; people from an identity provider sign in with it")
    try:
        seconds = parse_duration(ttl)
    except ConfigError as exc:
        fail(f"--ttl: {exc}", 2)
    token = login_link_token(store.box.derive(LINK_LABEL), user.uid, seconds)  # the identity, not the name
    scheme = "https" if state.settings.gateway.http_tls else "http"
    print(f"{scheme}://{state.settings.gateway.http_listen}/console/login/link?token={token}")


@users_app.command("list")
def users_list(
    removed: bool = typer.Option(False, "--removed", help="Also the identities removed (restore one with "
                                 "`wardgate users restore NAME`)."),
    json_out: bool = JsonOpt,
) -> None:
    """List users: people (local, or seen from an identity provider) and service accounts (svc:NAME)."""
    rows = open_store().list_users(include_removed=removed)
    if json_out:
        emit_json([{"name": u.former_name or u.name, "uid": u.uid, "kind": u.kind, "source": u.source, "groups": u.groups,
                    "created_at": iso(u.created_at), "removed_at": iso(u.removed_at) if u.removed_at else None}
                   for u in rows])
        return
    table = Table("name", "id", "kind", "from", "groups", "created", *(["removed"] if removed else []))
    for u in rows:
        table.add_row(u.former_name or u.name, u.uid, u.kind, u.source, ", ".join(u.groups) or "-", when(u.created_at),
                      *([when(u.removed_at) if u.removed_at else "-"] if removed else []))
    console.print(table)


@users_app.command("groups")
def users_groups(
    name: str = typer.Argument(..., help="A local user."),
    group: list[str] = typer.Option([], "--group", "-g", help="The user's groups from now on (repeat; none: no group)."),
    json_out: bool = JsonOpt,
) -> None:
    """Set a local user's groups (they replace the old ones; the user's console sessions end)."""
    from .store import Conflict, NotFound

    try:
        user = open_store().set_user_groups(name, group, cli_actor())
    except (Conflict, ConfigError, NotFound) as exc:
        fail(str(exc))
    if json_out:
        emit_json({"name": user.name, "groups": user.groups})
    else:
        console.print(f"user [bold]{user.name}[/] groups: {', '.join(user.groups) or '-'}")


@users_app.command("remove")
def users_remove(name: str = typer.Argument(..., help="A user or service account (svc:NAME)."),
                 json_out: bool = JsonOpt) -> None:
    """Remove an identity: its credentials, API keys, console sessions, grants and open reviews are
    revoked, and it is refused everywhere (a valid IdP token included) until restored. Its recorded
    sessions stay, attached to it; a new user of the same name starts with nothing."""
    from .store import NotFound

    try:
        counts = open_store().remove_user(name, cli_actor())
    except NotFound as exc:
        fail(str(exc))
    if json_out:
        emit_json({"name": name, "status": "removed", "revoked": counts})
        return
    console.print(f"removed [bold]{name}[/]; revoked " + ", ".join(f"{n} {what}" for what, n in counts.items()))


@users_app.command("restore")
def users_restore(name: str = typer.Argument(..., help="The name the removed identity had, or its id "
                                             "(`wardgate users list --removed`)."),
                  json_out: bool = JsonOpt) -> None:
    """Let a removed identity in again. What was revoked stays revoked: it gets new credentials and keys
    as anyone does."""
    from .store import Conflict, NotFound

    try:
        user = open_store().restore_user(name, cli_actor())
    except (NotFound, Conflict) as exc:
        fail(str(exc))
    if json_out:
        emit_json({"name": user.name, "uid": user.uid, "status": "restored"})
        return
    console.print(f"restored [bold]{user.name}[/] ({user.uid}); it has no live credentials or keys")


# ------------------------------------------------------------------------------ connections


@connections_app.command("add")
def connections_add(
    name: str = typer.Argument(..., help="Connection name; native clients use it as dbname."),
    host: str = typer.Option("127.0.0.1", help="Upstream host."),
    port: int = typer.Option(5432, help="Upstream port."),
    database: str = typer.Option(..., "--database", "-d", help="Upstream database name."),
    user: str = typer.Option(..., "--user", "-U", help="Upstream role the gateway logs in as."),
    password_env: str | None = typer.Option(
        None, help="Read the upstream password from this environment variable of the gateway; its name must start "
                   "with [upstream] password_env_prefix (WARDGATE_CONN_ by default)."
    ),
    password_stdin: bool = typer.Option(False, help="Read the upstream password from standard input."),
    ask_password: bool = typer.Option(False, "--password", help="Prompt for the upstream password."),
    sslmode: str = typer.Option("prefer", help="disable, allow, prefer, require, verify-ca or verify-full."),
    sslrootcert: str | None = typer.Option(None, help="CA file to verify the upstream server."),
    password_auth: str = typer.Option(
        "scram-sha-256", help="scram-sha-256: send the password only through SCRAM; any: also to a server that asks "
                              "for md5 or a cleartext password (never over unverified verify-ca/verify-full TLS)."),
    json_out: bool = JsonOpt,
) -> None:
    """Add a connection. Passwords are encrypted at rest and never shown again."""
    from .store import Conflict

    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif ask_password:
        password = getpass.getpass(f"password for {user}@{host}:{port}/{database}: ")
    spec = ConnectionSpec(name, host, port, database, user, password, password_env, sslmode, sslrootcert, password_auth)
    store = open_store()
    try:
        store.add_connection(spec, cli_actor())
    except (Conflict, ConfigError) as exc:
        fail(str(exc))
    info = next(c for c in store.list_connections() if c.spec.name == name)
    if json_out:
        emit_json(info.public())
    else:
        console.print(f"added connection [bold]{name}[/] -> {user}@{host}:{port}/{database} (sslmode={sslmode})")


@connections_app.command("list")
def connections_list(json_out: bool = JsonOpt) -> None:
    """List connections (from the config file and the store). Passwords are never shown."""
    rows = [c.public() for c in open_store().list_connections()]
    if json_out:
        emit_json(rows)
        return
    table = Table("name", "target", "user", "sslmode", "password", "password_auth", "source")
    for r in rows:
        table.add_row(r["name"], f"{r['host']}:{r['port']}/{r['database']}", r["user"], r["sslmode"], r["password"],
                      r["password_auth"], r["source"])
    console.print(table)


@connections_app.command("remove")
def connections_remove(name: str) -> None:
    """Remove a connection; its credentials are revoked."""
    from .store import Conflict, NotFound

    try:
        open_store().remove_connection(name, cli_actor())
    except (Conflict, NotFound) as exc:
        fail(str(exc))
    console.print(f"removed connection [bold]{name}[/]")


# ------------------------------------------------------------------------------ credentials


def _gateway_host_port() -> tuple[str, int]:
    from .config import parse_hostport

    host, port = parse_hostport(state.settings.gateway.listen)
    return ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host), port


@credentials_app.command("issue")
def credentials_issue(
    user: str = typer.Option(..., "--user", "-u", help="Who the credential is for."),
    connection: str = typer.Option(..., "--connection", "-C", help="The connection it opens."),
    ttl: str | None = typer.Option(None, help="Lifetime, e.g. 15m, 2h (default [credentials] default_ttl)."),
    json_out: bool = JsonOpt,
) -> None:
    """Issue a short-lived credential; it is shown once and used as the password by native clients."""
    from .domain import Identity
    from .policy.gatekeeper import Gatekeeper
    from .store import NotFound

    store = open_store()
    row = store.get_user(user)
    if row is None or row.disabled:
        fail(f"no user named {user!r}; add one with `wardgate users add {user}`")
    gatekeeper = Gatekeeper(state.settings)
    gatekeeper.grants = store.active_grants
    decision = gatekeeper.authorize(Identity(user, tuple(row.groups), uid=row.uid), connection, "connect")
    if not decision.allowed:
        fail(f"{decision.reason}. Add an [[access]] rule to the config to allow it.")
    try:
        seconds = parse_duration(ttl) if ttl else state.settings.default_ttl
        issued = store.issue_credential(user, connection, seconds, not_after=decision.until, actor=cli_actor(),
                                        uid=row.uid)
    except (NotFound, ConfigError) as exc:
        fail(str(exc))
    host, port = _gateway_host_port()
    url = f"postgresql://{quote(issued.user, safe='')}:{issued.secret}@{host}:{port}/{issued.connection}?sslmode=require"
    if json_out:
        emit_json(
            {"id": issued.id, "user": issued.user, "connection": issued.connection, "credential": issued.secret,
             "expires_at": iso(issued.expires_at), "url": url}
        )
        return
    console.print(f"credential [bold]{issued.id}[/] for {issued.user} on {issued.connection}, expires {when(issued.expires_at)}")
    console.print(f"password: {issued.secret}", soft_wrap=True, highlight=False)
    console.print(f'psql "{url}"', soft_wrap=True, highlight=False)


@credentials_app.command("list")
def credentials_list(
    user: str | None = typer.Option(None, help="Only this user's."),
    all_: bool = typer.Option(False, "--all", help="Include revoked and expired credentials."),
    json_out: bool = JsonOpt,
) -> None:
    """List credentials (never their secrets)."""
    rows = open_store().list_credentials(user, include_inactive=all_)

    if json_out:
        emit_json(
            [{"id": c.id, "user": u, "connection": c.connection, "status": status(c), "created_at": iso(c.created_at),
              "expires_at": iso(c.expires_at), "last_used_at": iso(c.last_used_at)} for c, u in rows]
        )
        return
    table = Table("id", "user", "connection", "status", "expires", "last used")
    for c, u in rows:
        table.add_row(c.id, u, c.connection, status(c), when(c.expires_at), when(c.last_used_at))
    console.print(table)


@credentials_app.command("revoke")
def credentials_revoke(cred_id: str = typer.Argument(..., help="Credential id (see `credentials list`).")) -> None:
    """Revoke a credential; live sessions using it end within a second."""
    from .store import NotFound

    try:
        open_store().revoke_credential(cred_id, cli_actor())
    except NotFound as exc:
        fail(str(exc))
    console.print(f"revoked credential [bold]{cred_id}[/]; sessions using it are being closed")


# --------------------------------------------------------------------------------- sessions


def parse_when(value: str | None, option: str) -> float | None:
    """An ISO time (UTC unless it says otherwise) or an age such as 24h, as epoch seconds."""
    if not value:
        return None
    try:
        return time.time() - parse_duration(value)
    except ConfigError:
        pass
    try:
        at = dt.datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option} {value!r}: give an ISO time (2026-11-01T00:00, UTC) or an age such as 24h", 2)
    return (at if at.tzinfo else at.replace(tzinfo=dt.UTC)).timestamp()


@sessions_app.command("list")
def sessions_list(
    user: str | None = typer.Option(None, help="Only this user's sessions."),
    connection: str | None = typer.Option(None, help="Only sessions on this connection."),
    status: str | None = typer.Option(None, help="active, closed or rejected."),
    since: str | None = typer.Option(None, help="Started after this: an ISO time or an age (24h, 7d)."),
    until: str | None = typer.Option(None, help="Started before this: an ISO time or an age."),
    outcome: str | None = typer.Option(None, help="With a statement that ended so: ok, error, denied, skipped, aborted."),
    rule: str | None = typer.Option(None, help="With a statement this rule matched (e.g. standard:destructive-ddl)."),
    limit: int = typer.Option(50, help="At most this many, newest first."),
    json_out: bool = JsonOpt,
) -> None:
    """Who connected to what and when (rejected attempts included)."""
    from .recording.views import session_summary

    rows = open_store().list_sessions(user=user, connection=connection, status=status, limit=limit,
                                      since=parse_when(since, "--since"), until=parse_when(until, "--until"),
                                      outcome=outcome, rule=rule)
    if json_out:
        emit_json([session_summary(s, n) for s, n in rows])
        return
    table = Table("id", "user", "connection", "client", "started", "ended", "status", "stmts", "reason")
    for s, n in rows:
        table.add_row(s.id[:12], s.user_name, s.connection, s.client_addr, when(s.started_at), when(s.ended_at),
                      s.status, str(n), s.end_reason or "")
    console.print(table)


@sessions_app.command("show")
def sessions_show(session_id: str = typer.Argument(..., help="Session id or a unique prefix."), json_out: bool = JsonOpt) -> None:
    """A session and every statement with its time, duration, rows and outcome."""
    from .recording.views import show_session
    from .store import NotFound

    store = open_store()
    try:
        s, stmts = store.get_session(session_id)
    except NotFound as exc:
        fail(str(exc))
    if json_out:
        emit_json(show_session(store, s.id))
        return
    console.print(f"[bold]session {s.id}[/]  {s.user_name} -> {s.connection}  from {s.client_addr}  tls={'yes' if s.tls else 'no'}")
    console.print(f"started {when(s.started_at)}  ended {when(s.ended_at)}  status {s.status}  {s.end_reason or ''}")
    table = Table("#", "time", "ms", "statement", "rows", "outcome")
    for st in stmts:
        outcome = st.command_tag or st.status
        if st.error_code:
            outcome = f"{st.status} {st.error_code}: {st.error_message or ''}"
        text = st.text if len(st.text) <= 200 else st.text[:197] + "..."
        table.add_row(str(st.seq), when(st.started_at), f"{st.duration_ms:.2f}" if st.duration_ms is not None else "-",
                      text, "-" if st.rows is None else str(st.rows), outcome)
    console.print(table)


@sessions_app.command("replay")
def sessions_replay(
    session_id: str = typer.Argument(..., help="Session id or a unique prefix."),
    speed: float = typer.Option(1.0, help="Replay this many times faster than it happened."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the whole timeline at once."),
    max_pause: float = typer.Option(10.0, help="Never pause longer than this many seconds between statements."),
) -> None:
    """Replay a session's timeline in the terminal, with its timing: who ran what, and how it ended."""
    from .store import NotFound

    try:
        s, stmts = open_store().get_session(session_id)
    except NotFound as exc:
        fail(str(exc))
    who = f"{s.agent} acting for {s.user_name}" if s.agent else s.user_name
    console.print(f"[bold]session {s.id}[/]  {who} -> {s.connection}  from {s.client_addr}  ({s.application_name or '-'})")
    console.print(f"[dim]{when(s.started_at)}[/]  connected")
    last = s.started_at
    for st in stmts:
        pause = max(0.0, (st.started_at - last) / max(speed, 0.001))
        if not no_wait and pause > 0:
            time.sleep(min(pause, max_pause))
        last = st.started_at
        offset = st.started_at - s.started_at
        colour = {"ok": "green", "denied": "red", "error": "red", "skipped": "yellow"}.get(st.status, "yellow")
        outcome = st.command_tag or st.status
        if st.error_code:
            outcome = f"{st.status} {st.error_code}: {st.error_message or ''}"
        took = f"{st.duration_ms:.1f} ms" if st.duration_ms is not None else "-"
        console.print(f"[dim]+{offset:8.3f}s[/]  [bold]{escape(st.text)}[/]")
        if st.params:
            console.print(f"            [dim]values: {escape(', '.join('NULL' if v is None else repr(v) for v in st.params))}[/]")
        console.print(f"            [{colour}]{escape(outcome)}[/]  {'' if st.rows is None else f'{st.rows} rows  '}{took}")
        if st.decision not in (None, "allow") or st.rules:
            rules = ", ".join(f"{r['rule']} ({'shadow ' if r.get('shadow') else ''}{r['action']})" for r in st.rules or [])
            console.print(f"            [yellow]{st.decision}[/]{': ' + escape(rules) if rules else ''}")
        if st.result and st.result.get("columns"):
            console.print(f"            [dim]columns: {escape(', '.join(st.result['columns']))}[/]")
            for row in st.result.get("sample") or []:
                console.print(f"            [dim]| {escape(' | '.join('NULL' if v is None else str(v) for v in row))}[/]")
    if s.purged_at:
        console.print(f"[dim]its statements were purged by retention on {when(s.purged_at)}[/]")
    if s.ended_at:
        console.print(f"[dim]+{s.ended_at - s.started_at:8.3f}s[/]  ended: {s.end_reason or s.status}"
                      + (f"  masked {', '.join(f'{k}: {v}' for k, v in s.masked.items())}" if s.masked else ""))


@sessions_app.command("purge")
def sessions_purge(
    older_than: str | None = typer.Option(None, help="Sessions that ended longer ago than this (default: [recording] retention)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only count what would go."),
    json_out: bool = JsonOpt,
) -> None:
    """Remove old session content (statements, values, results); the audit log records what was purged."""
    keep = older_than or state.settings.recording.retention
    if not keep:
        fail("give --older-than (e.g. 90d) or set [recording] retention in wardgate.toml", 2)
    try:
        seconds = parse_duration(keep)
    except ConfigError as exc:
        fail(f"--older-than: {exc}", 2)
    from .store import Actor

    done = open_store().purge_sessions(time.time() - seconds, Actor.local("cli"), dry_run=dry_run)
    if json_out:
        emit_json({**done, "before": iso(done["before"]), "dry_run": dry_run})
        return
    verb = "would purge" if dry_run else "purged"
    console.print(f"{verb} the content of {done['sessions']} session(s) that ended more than {keep} ago "
                  f"({done['statements']} statements)")


@sessions_app.command("analysis")
def sessions_analysis(session_id: str = typer.Argument(..., help="Session id or a unique prefix."),
                      json_out: bool = JsonOpt) -> None:
    """A session's risk analysis: level, title, explanation and the findings behind it."""
    from .analysis.service import analysis_status
    from .store import NotFound

    try:
        answer = analysis_status(open_store(), state.settings.analysis, session_id)
    except NotFound as exc:
        fail(str(exc))
    if json_out:
        emit_json(answer)
        return
    if answer["status"] != "ready":
        console.print(f"analysis {answer['status']}: {answer.get('reason', '')}")
        return
    colour = {"low": "green", "medium": "yellow", "high": "red"}[answer["level"]]
    console.print(f"[bold {colour}]{answer['level'].upper()}[/]  [bold]{escape(answer['title'])}[/]  ({answer['source']})")
    console.print(escape(answer["explanation"]))
    for f in answer["findings"]:
        console.print(f"  [{colour}]-[/] {f['level']}: {escape(f['title'])} ({f['rule']})")


# ---------------------------------------------------------------------------------- api keys

apikeys_app = typer.Typer(no_args_is_help=True, help="API keys for machines and for agents acting for a user.")
app.add_typer(apikeys_app, name="apikeys")


@apikeys_app.command("create")
def apikeys_create(
    name: str | None = typer.Option(None, help="Service account name (the identity the key carries)."),
    group: list[str] = typer.Option([], "--group", "-g", help="Groups of the service account (repeat for several)."),
    for_agent: str | None = typer.Option(None, "--for-agent", help="Make a key for this agent acting for --user."),
    user: str | None = typer.Option(
        None, "--user", "-u", help="With --for-agent: the person the agent acts for (administrators, on the store). "
        "Without it, the key is made through the gateway for you, the signed-in person."
    ),
    ttl: str | None = typer.Option(None, help="Lifetime, e.g. 90d (default: until revoked)."),
    json_out: bool = JsonOpt,
) -> None:
    """Create an API key. It is shown once and stored hashed."""
    from .store import Conflict, NotFound

    if for_agent and not user:
        made = _api("POST", "/api/apikeys", None, None, json={"for_agent": for_agent, "ttl": ttl})
        if json_out:
            emit_json(made)
        else:
            console.print(f"API key [bold]{made['id']}[/] for {for_agent} acting for {made['user']}")
            console.print(f"key: {made['key']}", soft_wrap=True, highlight=False)
        return
    if for_agent:
        if group:
            fail("an agent key carries the person's groups; drop --group")
        kind, owner, label = "agent", user, f"{for_agent} for {user}"
    else:
        if not name:
            fail("give --name for a service account, or --for-agent with --user")
        kind, owner, label = "service", name, name
    try:
        seconds = parse_duration(ttl) if ttl else None
        issued = open_store().create_api_key(
            name=label, kind=kind, user_name=owner, agent=for_agent, groups=group, ttl=seconds, created_by="cli",
            actor=cli_actor(),
        )
    except (NotFound, ConfigError, Conflict) as exc:
        fail(str(exc))
    row = issued.row
    if json_out:
        emit_json({"id": row.id, "name": row.name, "kind": row.kind, "user": row.user_name, "agent": row.agent,
                   "groups": row.groups, "expires_at": iso(row.expires_at), "key": issued.secret})
        return
    console.print(f"API key [bold]{row.id}[/] ({label}), expires {when(row.expires_at) if row.expires_at else 'never'}")
    console.print(f"key: {issued.secret}", soft_wrap=True, highlight=False)
    console.print("It is shown once. Use it as `Authorization: Bearer <key>` or WARDGATE_API_KEY.")


@apikeys_app.command("list")
def apikeys_list(all_: bool = typer.Option(False, "--all", help="Include revoked and expired keys."), json_out: bool = JsonOpt) -> None:
    """List API keys (never the keys themselves)."""
    rows = open_store().list_api_keys(include_inactive=all_)

    if json_out:
        emit_json([{"id": k.id, "name": k.name, "kind": k.kind, "user": k.user_name, "agent": k.agent, "groups": k.groups,
                    "status": status(k), "created_at": iso(k.created_at), "expires_at": iso(k.expires_at),
                    "last_used_at": iso(k.last_used_at)} for k in rows])
        return
    table = Table("id", "name", "kind", "acts as", "groups", "status", "last used")
    for k in rows:
        acts = f"{k.agent} for {k.user_name}" if k.agent else k.user_name
        table.add_row(k.id, k.name, k.kind, acts, ", ".join(k.groups) or "-", status(k), when(k.last_used_at))
    console.print(table)


@apikeys_app.command("revoke")
def apikeys_revoke(key_id: str = typer.Argument(..., help="Key id (see `apikeys list`).")) -> None:
    """Revoke an API key at once."""
    from .store import NotFound

    try:
        open_store().revoke_api_key(key_id, cli_actor())
    except NotFound as exc:
        fail(str(exc))
    console.print(f"revoked API key [bold]{key_id}[/]")


# ------------------------------------------------------------------------- self-service (HTTP)


class ApiError(Exception):
    pass


def _api(method: str, path: str, bearer: str | None, gateway_url: str | None, *, refresh: bool = False,
         raise_errors: bool = False, timeout: float = 30, **kwargs: Any) -> Any:
    import httpx

    from .config import parse_hostport
    from .identity import AuthenticationError
    from .identity.login import current_access_token

    bearer = bearer or os.environ.get("WARDGATE_API_KEY") or os.environ.get("WARDGATE_TOKEN")
    if not bearer:
        try:
            bearer = current_access_token(force_refresh=refresh)
        except AuthenticationError as exc:
            if raise_errors:
                raise ApiError(str(exc)) from None
            fail(str(exc))
    if not bearer:
        fail("not signed in: run `wardgate login`, or set WARDGATE_API_KEY (or WARDGATE_TOKEN)")
    if not gateway_url:
        settings = state.settings
        host, port = parse_hostport(settings.gateway.http_listen)
        gateway_url = f"{'https' if settings.gateway.http_tls else 'http'}://{host}:{port}"
    try:
        r = httpx.request(method, gateway_url.rstrip("/") + path, headers={"Authorization": f"Bearer {bearer}"}, timeout=timeout,
                          **kwargs)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the gateway at {gateway_url}: {exc}")
    if r.status_code >= 400:
        detail = r.json().get("detail", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
        message = f"the gateway refused your identity: {detail}" if r.status_code == 401 else str(detail)
        if raise_errors:
            raise ApiError(message)
        fail(message)
    return r.json()


ApiKeyOpt = typer.Option(None, "--api-key", help="Bearer secret (default $WARDGATE_API_KEY or $WARDGATE_TOKEN).")
GatewayOpt = typer.Option(None, "--gateway", envvar="WARDGATE_URL", help="Gateway HTTP URL (default from the config).")


@app.command()
def login(
    provider: str | None = typer.Option(None, help="Identity provider name from the config (default: the first)."),
    device: bool = typer.Option(False, "--device", help="Use the device flow (sign in on another device)."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Print the sign-in URL instead of opening a browser."),
) -> None:
    """Sign in with the organisation's identity provider; tokens are kept (0600) and refreshed."""
    import webbrowser

    from .identity import AuthenticationError
    from .identity.login import login_device, login_pkce, save

    providers = state.settings.identity_providers
    spec = next((p for p in providers if provider in (None, p.name)), None)
    if spec is None:
        fail("no identity provider is configured" if not providers else f"no identity provider named {provider!r}")

    def show_url(url: str) -> None:
        err.print("Open this URL to sign in:")
        print(url, flush=True)
        if not no_browser:
            webbrowser.open(url)

    def show_code(url: str, code: str) -> None:
        err.print(f"On any device, open the URL below and enter the code [bold]{code}[/]:")
        print(url, flush=True)

    try:
        tokens = login_device(spec, show_code) if device else login_pkce(spec, show_url)
    except (AuthenticationError, OSError) as exc:
        fail(str(exc))
    path = save(tokens)
    err.print(f"signed in with {spec.name}; tokens saved to {path}")


@app.command()
def logout() -> None:
    """Forget the stored sign-in."""
    from .identity.login import token_file

    token_file().unlink(missing_ok=True)
    err.print("signed out")


@app.command()
def whoami(api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt) -> None:
    """Show who the gateway takes you for: user, groups, agent, expiry."""
    me = _api("GET", "/api/me", api_key, gateway)
    if json_out:
        emit_json(me)
        return
    who = f"{me['agent']} acting for {me['user']}" if me.get("agent") else me["user"]
    console.print(f"[bold]{who}[/] ({me['kind']}, {me['source']})  groups: {', '.join(me['groups']) or '-'}"
                  f"  expires: {when(me['expires_at']) if me.get('expires_at') else 'never'}")


@app.command()
def connect(
    connection: str = typer.Argument(..., help="Connection name."),
    ttl: str | None = typer.Option(None, help="Credential lifetime, e.g. 30m."),
    exec_: str | None = typer.Option(None, "--exec", help="Run this command (e.g. psql) with PG* variables set."),
    env_out: bool = typer.Option(False, "--env", help="Print `export PG...=` lines instead of a URL."),
    keep_alive: bool = typer.Option(False, "--keep-alive", help="Stay and renew an IdP-bound credential until Ctrl-C."),
    api_key: str | None = ApiKeyOpt,
    gateway: str | None = GatewayOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Get a just-in-time credential for CONNECTION, bound to your identity, and use it."""
    import shlex

    issued = _api("POST", "/api/credentials", api_key, gateway, json={"connection": connection, "ttl": ttl})
    renew_every = issued.get("renew_every")
    if exec_:
        argv = shlex.split(exec_)
        if not renew_every:
            os.execvpe(argv[0], argv, {**os.environ, **issued["env"]})  # noqa: S606 - the user asked to run it
        child = subprocess.Popen(argv, env={**os.environ, **issued["env"]})
        _renew_while(lambda: child.poll() is None, issued, renew_every, api_key, gateway)
        raise typer.Exit(child.wait())
    if json_out:
        emit_json(issued)
    elif env_out:
        for k, v in issued["env"].items():
            sys.stdout.write(f"export {k}={shlex.quote(v)}\n")
    else:
        err.print(f"credential {issued['id']} for {issued['user']} on {issued['connection']}, expires {issued['expires_at']}")
        console.print(f'psql "{issued["url"]}"', soft_wrap=True, highlight=False)
    if renew_every and not keep_alive:
        err.print(f"[yellow]note:[/] this credential is bound to your sign-in and lapses in {int(renew_every * 3)}s "
                  "unless renewed: use --exec, or --keep-alive to renew from here")
    elif renew_every:
        err.print("renewing; press Ctrl-C to stop (sessions then end within a minute)")
        try:
            _renew_while(lambda: True, issued, renew_every, api_key, gateway)
        except KeyboardInterrupt:
            pass


def _renew_while(alive: Any, issued: dict[str, Any], every: float, api_key: str | None, gateway: str | None) -> None:
    """Renew the credential's lease with a fresh sign-in while `alive()`; stop at the first refusal."""
    deadline = time.monotonic() + every
    while alive():
        time.sleep(0.2)
        if time.monotonic() < deadline:
            continue
        deadline = time.monotonic() + every
        try:
            _api("POST", f"/api/credentials/{issued['id']}/renew", api_key, gateway, refresh=True, raise_errors=True)
        except ApiError as exc:
            err.print(f"[red]your sign-in is no longer confirmed ({exc}); the gateway will end the session[/]")
            return

# ------------------------------------------------------------------------- exec and reviews (HTTP)

EXIT_FAILED, EXIT_DENIED, EXIT_PENDING, EXIT_RUNNING = 1, 3, 4, 5


def show_envelope(out: dict[str, Any], json_out: bool) -> None:
    """Print an exec envelope and exit with the code its status stands for."""
    if json_out:
        emit_json(out)
    else:
        st = out["status"]
        if st == "completed":
            table = Table(*out["columns"], box=None, header_style="bold") if out["columns"] else None
            for row in out["rows"]:
                table.add_row(*["[dim]NULL[/]" if v is None else escape(v) for v in row])  # type: ignore[union-attr]
            if table is not None:
                console.print(table)
            masked = ", ".join(f"{k}: {v}" for k, v in out.get("masked", {}).items())
            err.print(f"{'; '.join(out['command_tags']) or 'done'}  {out['row_count']} rows"
                      f"{' (truncated)' if out['truncated'] else ''}  {out['duration_ms']:.1f} ms"
                      f"{'  masked ' + masked if masked else ''}  session {out['session_id']}")
        elif st == "failed":
            err.print(f"[red]failed[/] ({out.get('code')}): {escape(out.get('error', ''))}")
            for key in ("detail", "hint"):
                if out.get(key):
                    err.print(f"{key}: {escape(out[key])}")
        elif st == "denied":
            err.print(f"[red]denied[/]: {escape(out.get('reason', ''))}")
            err.print(out.get("next", ""))
        elif st == "pending_approval":
            err.print(f"[yellow]pending approval[/]: review {out['review_id']}  ({out['review_url']})")
            err.print(f"next: {out['next']}")
        elif st == "running":
            err.print(f"[yellow]still running[/] in session {out['session_id']}")
            err.print(f"next: {out['next']}")
    code = {"completed": 0, "recorded": 0, "failed": EXIT_FAILED, "denied": EXIT_DENIED, "pending_approval": EXIT_PENDING,
            "running": EXIT_RUNNING}.get(out["status"], EXIT_FAILED)
    if code:
        raise typer.Exit(code)


@app.command("exec")
def exec_command(
    connection: str = typer.Argument(..., help="Connection name."),
    command: str | None = typer.Option(None, "-c", "--command", help="SQL to run (default: read from stdin)."),
    param: list[str] = typer.Option([], "--param", "-p", help="A value for $1, $2, ... (repeat; one statement only)."),
    wait: float | None = typer.Option(None, help="Seconds to wait before the answer is `running`."),
    api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt,
) -> None:
    """Run SQL through the gateway's policy, masking and recording, as you.

    Exit codes: 0 completed, 1 failed, 3 denied, 4 pending approval (see `wardgate reviews`), 5 still running.
    """
    sql = command if command is not None else sys.stdin.read()
    if not sql.strip():
        fail("no SQL given: use -c 'select ...' or pipe it on stdin", 2)
    body: dict[str, Any] = {"connection": connection, "sql": sql, "params": param or None}
    if wait is not None:
        body["wait"] = wait
    show_envelope(_api("POST", "/api/exec", api_key, gateway, json=body, timeout=(wait or 300) + 30), json_out)


@sessions_app.command("wait")
def sessions_wait(
    session_id: str = typer.Argument(..., help="Session id from a `running` answer."),
    timeout: float = typer.Option(60, help="Seconds to wait (at most 300)."),
    api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt,
) -> None:
    """Wait for a running exec to finish and show its result."""
    show_envelope(_api("GET", f"/api/sessions/{session_id}/wait", api_key, gateway, params={"timeout": timeout},
                       timeout=timeout + 30), json_out)


grants_app = typer.Typer(no_args_is_help=True, help="Just-in-time access: ask for a window on a connection.")
app.add_typer(grants_app, name="grants")


@grants_app.command("request")
def grants_request(
    connection: str = typer.Argument(..., help="Connection name."),
    duration: str = typer.Option("1h", help="How long, from approval (at most the access rule's max_duration)."),
    reason: str = typer.Option(..., help="Why you need it; approvers see it."),
    api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt,
) -> None:
    """Ask for access under a just-in-time access rule; approvers decide with `wardgate reviews approve`."""
    out = _api("POST", "/api/grants", api_key, gateway, json={"connection": connection, "duration": duration, "reason": reason})
    if json_out:
        emit_json(out)
    else:
        err.print(f"[yellow]pending approval[/]: review {out['review_id']}  ({out['review_url']})")
        err.print(f"next: {out['next']}")


@grants_app.command("list")
def grants_list(api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt) -> None:
    """Your grants, and the ones you may decide."""
    rows = _api("GET", "/api/grants", api_key, gateway)
    if json_out:
        emit_json(rows)
        return
    table = Table("review", "status", "requester", "connection", "window", "ends", "reason")
    for r in rows:
        state_ = "active" if r.get("active") else r["status"]
        table.add_row(r["id"], state_, r["requester"], r["connection"], f"{int(r['duration_seconds'] or 0)}s",
                      r.get("window_end") or "-", escape(r.get("reason") or ""))
    console.print(table)


reviews_app = typer.Typer(no_args_is_help=True, help="Statements held for approval: list, decide, wait, run.")
app.add_typer(reviews_app, name="reviews")


def show_review(r: dict[str, Any]) -> None:
    who = f"{r['agent']} acting for {r['requester']}" if r.get("agent") else r["requester"]
    console.print(f"[bold]review {r['id']}[/]  {r['status']}  ({r['approvals']}/{r['min_approvals']} approvals)")
    console.print(f"requested by {who} on {r['connection']} at {r['created_at']}; expires {r['expires_at']}")
    console.print(f"approvers: {', '.join(r['approvers']) or 'admins'}")
    for rule in r["rules"]:
        console.print(f"rule {rule['rule']}: {escape(rule['reason'])}")
    console.print(f"[dim]sha256 {r['sha256']}[/]")
    console.print(escape(r["statement"]))
    if r.get("params"):
        console.print(f"params: {r['params']}")
    for step in r.get("history", []):
        console.print(f"  {step['at']}  {step['by']} {step['decision']}" + (f": {escape(step['reason'])}" if step["reason"] else ""))


@reviews_app.command("list")
def reviews_list(
    status_: str | None = typer.Option(None, "--status", help="pending, approved, rejected, revoked, executed, expired."),
    api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt,
) -> None:
    """Reviews you asked for, or may decide."""
    rows = _api("GET", "/api/reviews", api_key, gateway, params={"status": status_} if status_ else None)
    if json_out:
        emit_json(rows)
        return
    table = Table("id", "status", "requester", "connection", "statement", "created")
    for r in rows:
        who = f"{r['agent']} for {r['requester']}" if r.get("agent") else r["requester"]
        text = r["statement"] if len(r["statement"]) < 60 else r["statement"][:57] + "..."
        table.add_row(r["id"], r["status"], who, r["connection"], escape(text), r["created_at"])
    console.print(table)


@reviews_app.command("show")
def reviews_show(review_id: str, api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt,
                 json_out: bool = JsonOpt) -> None:
    """One review: the exact statement, the rules, and its history."""
    r = _api("GET", f"/api/reviews/{review_id}", api_key, gateway)
    emit_json(r) if json_out else show_review(r)


def _decide(review_id: str, verb: str, reason: str | None, api_key: str | None, gateway: str | None, json_out: bool) -> None:
    r = _api("POST", f"/api/reviews/{review_id}/{verb}", api_key, gateway, json={"reason": reason})
    emit_json(r) if json_out else err.print(f"review {review_id} is {r['status']}")


@reviews_app.command("approve")
def reviews_approve(review_id: str, reason: str | None = typer.Option(None, help="Why (optional)."),
                    api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt) -> None:
    """Approve a review (approvers only; never your own)."""
    _decide(review_id, "approve", reason, api_key, gateway, json_out)


@reviews_app.command("reject")
def reviews_reject(review_id: str, reason: str = typer.Option(..., help="Why; the requester sees it."),
                   api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt) -> None:
    """Reject a review, with a reason."""
    _decide(review_id, "reject", reason, api_key, gateway, json_out)


@reviews_app.command("revoke")
def reviews_revoke(review_id: str, reason: str | None = typer.Option(None, help="Why (optional)."),
                   api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt) -> None:
    """Withdraw a pending or approved review before it runs."""
    _decide(review_id, "revoke", reason, api_key, gateway, json_out)


@reviews_app.command("wait")
def reviews_wait(review_id: str, timeout: float = typer.Option(60, help="Seconds to wait (2 to 300)."),
                 api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt) -> None:
    """Wait until a review is decided. Exit 0 approved, 4 still pending, 3 anything else."""
    r = _api("GET", f"/api/reviews/{review_id}/wait", api_key, gateway, params={"timeout": timeout}, timeout=timeout + 30)
    if json_out:
        emit_json(r)
    else:
        err.print(f"review {review_id} is {r['status']}" + (" (timed out waiting)" if r["timed_out"] else ""))
    if r["status"] != "approved":
        raise typer.Exit(EXIT_PENDING if r["status"] == "pending" else EXIT_DENIED)


@reviews_app.command("execute")
def reviews_execute(review_id: str, wait: float | None = typer.Option(None, help="Seconds to wait before `running`."),
                    api_key: str | None = ApiKeyOpt, gateway: str | None = GatewayOpt, json_out: bool = JsonOpt) -> None:
    """Run the approved statement of your review, exactly as stored, once."""
    body = {"wait": wait} if wait is not None else None
    show_envelope(_api("POST", f"/api/reviews/{review_id}/execute", api_key, gateway, json=body,
                       timeout=(wait or 300) + 30), json_out)


audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log: verify it, export its key.")
app.add_typer(audit_app, name="audit")


def _anchor_paths(given: str) -> list[Path]:
    """An --anchor's files: a configured file sink by name (its file and the rotated ones it keeps),
    else the path given."""
    spec = next((sp for sp in state.settings.audit_sinks if sp.name == given), None)
    if spec is None:
        return [Path(given)]
    if spec.type != "file":
        fail(f"the {spec.type} sink {given} cannot be read back from here: pass a file of what the receiver kept "
             "(its JSON, one message a line)", 2)
    path = Path(spec.path)
    path = path if path.is_absolute() else state.settings.data_dir / path
    rotated = [path.with_name(f"{path.name}.{i}") for i in range(spec.backups, 0, -1)]
    return [p for p in [*rotated, path] if p.exists()] or [path]


@audit_app.command("verify")
def audit_verify(
    anchor: list[str] = typer.Option([], "--anchor", metavar="FILE|SINK",
                                     help="Also check the store against a signed checkpoint kept outside it: the head "
                                          "file beside the journal (journal/audit-head.json), a file sink's name or "
                                          "file, or a file of what a SIEM received. Repeatable."),
    json_out: bool = JsonOpt,
) -> None:
    """Check the whole hash chain, every signed checkpoint, and every recorded session and statement
    against the seals the chain commits to; name the first thing changed. Exit 1 if anything is."""
    from .recording.anchors import read_anchors
    from .store.secretbox import SecretError

    anchors = []
    for given in anchor:
        held = []
        for path in _anchor_paths(given):
            try:
                held += [(given, cp) for cp in read_anchors(path)]
            except ValueError:
                continue  # a rotated file may hold no checkpoint
            except OSError as exc:
                fail(f"cannot read the anchor {given}: {exc}", 2)
        if not held:
            fail(f"cannot read the anchor {given}: it holds no signed audit checkpoint", 2)
        anchors += held
    try:
        verdict = open_store().audit_verify([cp for _, cp in anchors])
        if verdict.anchor is not None and not verdict.ok:
            verdict.problem = f"{verdict.problem} (anchor: {anchors[verdict.anchor][0]})"
    except SecretError as exc:  # the signing key itself was replaced in the store
        if json_out:
            emit_json({"ok": False, "problem": str(exc)})
        else:
            err.print(f"[red]audit log cannot be verified[/]: {escape(str(exc))}")
        raise typer.Exit(1) from None
    if json_out:
        newest: dict[str, int] = {}
        for given, cp in anchors:
            newest[given] = max(newest.get(given, 0), int(cp["seq"]))
        emit_json({**verdict.public(), "anchors": [{"from": given, "seq": seq, "checkpoints": sum(
            1 for g, _ in anchors if g == given)} for given, seq in newest.items()]})
    elif verdict.ok:
        console.print(f"[green]audit log intact[/]: {verdict.events} events, {verdict.checkpoints} signed checkpoints, "
                      f"head at seq {verdict.head_seq}; {verdict.rows} recorded statements match their seals")
        for given in dict.fromkeys(g for g, _ in anchors):
            kept = [int(cp["seq"]) for g, cp in anchors if g == given]
            console.print(f"  holds all {len(kept)} signed checkpoint(s) kept in {escape(given)} (up to seq {max(kept)})")
    else:
        where = f" at seq {verdict.seq}" + (f" (event {verdict.event_id})" if verdict.event_id else "") if verdict.seq else ""
        err.print(f"[red]audit log broken{where}[/]: {escape(verdict.problem or '')}")
        if verdict.findings_total > 1:
            err.print(f"  and {verdict.findings_total - 1} more finding(s); --json lists them")
    if not verdict.ok:
        raise typer.Exit(1)


def _cef(e: Any) -> str:
    def esc(v: Any) -> str:
        return str(v).replace("\\", "\\\\").replace("=", "\\=").replace("\n", " ")

    severity = 7 if e.outcome == "denied" else 3
    head = "|".join(x.replace("|", "\\|") for x in ("CEF:0", "Wardgate", "Wardgate", "0.1.0", e.kind, e.kind, str(severity)))
    ext = {"rt": int(e.at * 1000), "suser": e.user_name, "suid": e.agent, "src": e.client_addr, "outcome": e.outcome,
           "cs1Label": "source", "cs1": e.source, "msg": e.detail, "cn1Label": "seq", "cn1": e.seq, "cs2Label": "hash",
           "cs2": e.hash, "externalId": e.id}
    return head + "|" + " ".join(f"{k}={esc(v)}" for k, v in ext.items() if v is not None)


@audit_app.command("export")
def audit_export(
    since: str | None = typer.Option(None, help="Only events after this: an ISO time (2026-11-01T00:00) or an age (24h)."),
    format_: str = typer.Option("jsonl", "--format", help="jsonl (one JSON object a line) or cef (ArcSight CEF)."),
) -> None:
    """Write audit events to stdout, oldest first, with their chain positions and hashes (schema: docs/audit.md)."""
    from .recording.views import siem_event

    if format_ not in ("jsonl", "cef"):
        fail("--format is jsonl or cef", 2)
    for e in open_store().iter_events(since=parse_when(since, "--since") or 0.0):
        if format_ == "cef":
            print(_cef(e))
        else:
            print(json.dumps(siem_event(e), ensure_ascii=False))


@audit_app.command("sinks")
def audit_sinks(json_out: bool = JsonOpt) -> None:
    """How far each streaming sink of wardgate.toml has delivered the audit log."""
    store = open_store()
    head, cursors = store.audit_head(), store.sink_cursors()
    rows = [{"name": spec.name, "type": spec.type, "delivered_seq": cursors.get(spec.name, (0, 0.0))[0],
             "behind": head - cursors.get(spec.name, (0, 0.0))[0],
             "last_delivery": when(cursors[spec.name][1]) if spec.name in cursors else None}
            for spec in state.settings.audit_sinks]
    if json_out:
        emit_json({"head_seq": head, "sinks": rows})
        return
    if not rows:
        console.print("no audit sinks configured; add [[audit_sinks]] to wardgate.toml (see docs/audit.md)")
        return
    table = Table("sink", "type", "delivered up to", "behind", "last delivery", title=f"audit log head: seq {head}")
    for r in rows:
        table.add_row(r["name"], r["type"], str(r["delivered_seq"]), str(r["behind"]), r["last_delivery"] or "never")
    console.print(table)


@audit_app.command("pubkey")
def audit_pubkey() -> None:
    """Print the public key that verifies the checkpoints (PEM), to keep outside the gateway."""
    print(open_store().signer.public_pem, end="")


@app.command("events")
def events_list(
    kind: str | None = typer.Option(None, help="Only this kind, e.g. api.authenticate, credential.issue."),
    outcome: str | None = typer.Option(None, help="ok or denied."),
    limit: int = typer.Option(100, help="At most this many, newest first."),
    json_out: bool = JsonOpt,
) -> None:
    """Security events outside native sessions: API sign-in failures, refusals, credentials issued."""
    from .recording.views import event_view

    rows = open_store().list_events(kind=kind, outcome=outcome, limit=limit)
    if json_out:
        emit_json([event_view(e) for e in rows])
        return
    table = Table("time", "kind", "outcome", "who", "client", "detail")
    for e in rows:
        who = f"{e.agent} for {e.user_name}" if e.agent else (e.user_name or "-")
        table.add_row(when(e.at), e.kind, e.outcome, who, e.client_addr or "-", e.detail or "")
    console.print(table)


# ----------------------------------------------------------------------------------- policy

policy_app = typer.Typer(no_args_is_help=True, help="Inspect the policy without running anything, or reload it.")
app.add_typer(policy_app, name="policy")


@policy_app.command("reload")
def policy_reload() -> None:
    """Tell every running gateway replica to read its config file's policy again (PostgreSQL store)."""
    if open_store().announce_now("policy", "reload"):
        console.print("every replica listening on the store reloads its policy now; `wardgate events --kind "
                      "policy.change` shows what changed")
        return
    fail("the embedded store has no event channel: send the gateway SIGHUP (kill -HUP <pid>) or "
         "POST /api/admin/policy/reload as an admin")


@policy_app.command("check")
def policy_check(
    user: str = typer.Option(..., "--user", "-u", help="Whose rights to use (a known user)."),
    connection: str = typer.Option(..., "--connection", "-C", help="Connection name."),
    sql: str = typer.Option(..., "--sql", help="The statement (or statements) to check."),
    json_out: bool = JsonOpt,
) -> None:
    """The decision a statement would get: action, matched rules, reasons."""
    from .domain import Identity
    from .policy.gatekeeper import Gatekeeper

    row = open_store().get_user(user)
    if row is None:
        fail(f"no user named {user!r}")
    result = Gatekeeper(state.settings).check(Identity(user, tuple(row.groups), uid=row.uid), connection, sql)
    if json_out:
        emit_json(result)
        return
    action = result["action"]
    colour = {"allow": "green", "deny": "red", "review": "yellow"}[action]
    console.print(f"[bold {colour}]{action}[/]  ({result['access']['reason']})")
    for m in result["matches"]:
        console.print(f"  {'shadow ' if m['shadow'] else ''}{m['action']} by {m['rule']}: {m['reason']}"
                      + (f" ({m['message']})" if m["message"] else ""))
    for mk in result["masking"]:
        what = ", ".join(mk["columns"] + mk["detectors"])
        console.print(f"  results masked by {mk['rule']} ({mk['strategy']}): {what}")


# ------------------------------------------------------------------------------------ admin


admin_app = typer.Typer(no_args_is_help=True, help="Administration helpers.")
app.add_typer(admin_app, name="admin")


@admin_app.command("genkey")
def admin_genkey() -> None:
    """Print a new secret key for WARDGATE_SECRET_KEY (encrypts secrets at rest)."""
    from cryptography.fernet import Fernet

    sys.stdout.write(Fernet.generate_key().decode() + "\n")


@admin_app.command("migrate")
def admin_migrate() -> None:
    """Create or upgrade the store's tables."""
    open_store()
    console.print(f"store is up to date ({state.settings.store_url.split('://')[0]})")


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        err.print(f"[bold red]configuration error:[/] {escape(str(exc))}")
        sys.exit(2)
    except SecretError as exc:
        err.print(f"[bold red]secret key error:[/] {escape(str(exc))}")
        sys.exit(2)


if __name__ == "__main__":
    main()
