"""Startup options, proven against the real server: for each options string, what a session straight to
PostgreSQL applied (every setting it took from the client, in pg_settings, and current_setting of each) is
what settings_from_options says, and a string the parser refuses the server refuses in the same words.
Then through the gateway: every way of switching the database role is refused with 42501 naming the
setting, no upstream session ever starts for it (the server's own connection log), and ordinary
clients' settings still pass."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import psycopg
import pytest

from tests.conftest import psql
from wardgate.engines.postgres.options import OptionsError, settings_from_options

TARGET = "wg_opt_target"  # a role app and trustuser may SET ROLE to: what a role switch would reach


@pytest.fixture(scope="module")
def target(pg):  # noqa: ANN001, ANN201
    pg.psql(f"CREATE ROLE {TARGET} NOLOGIN; GRANT {TARGET} TO app, trustuser")
    yield TARGET
    pg.psql(f"DROP ROLE {TARGET}")


def connect(pg, user: str, options: str | None = None) -> psycopg.Connection:  # noqa: ANN001
    """A session straight to the upstream server: trustuser (trust), or the superuser postgres."""
    password = pg.password if user == "postgres" else None
    kwargs = {"options": options} if options is not None else {}
    return psycopg.connect(host="127.0.0.1", port=pg.port, user=user, password=password, dbname="shop",
                           sslmode="disable", autocommit=True, **kwargs)


def applied(conn: psycopg.Connection, names: list[str]) -> tuple[dict, dict]:
    """The settings this session took from the client (pg_settings), and current_setting of each of `names`."""
    rows = conn.execute("select lower(name), setting from pg_settings where source = 'client'").fetchall()
    # pg_settings leaves out role, session_authorization and custom placeholders: read those by name
    current = {n.lower(): conn.execute("select current_setting(%s)", [n]).fetchone()[0]
               for n in ["role", "session_authorization", *names]}
    current["current_user"] = conn.execute("select current_user").fetchone()[0]
    return dict(rows), current


# (user, options) that start a session: the server's settings must be exactly the parser's.
APPLIED = [
    ("trustuser", ""),
    ("trustuser", "-c statement_timeout=5s"),
    ("trustuser", "--statement-timeout=7s"),
    ("trustuser", "-c Application-Name=dashes"),
    ("trustuser", r"-c application_name=a\ b\ c"),
    ("trustuser", r"-c application_name=back\\slash"),
    ("trustuser", r"-c application_name=a\\ -c search_path=x"),  # an escaped backslash does not keep the space
    ("trustuser", r"-c application_name=a\ -c\ search_path=x"),  # an escaped space does
    ("trustuser", r"-c se\arch_path=esc"),
    ("trustuser", "\t-c\tlock_timeout=3s\n-c\fidle_session_timeout=1min\v-c\rwork_mem=2MB "),
    ("trustuser", "-e"),
    ("trustuser", "-e -c DateStyle=German"),
    ("trustuser", "-ecextra_float_digits=1"),
    ("trustuser", "-Ecextra_float_digits=0"),
    ("trustuser", "-e-lock-timeout=4s"),
    ("trustuser", "-fs -fi -fo -fb -ft -fn -fm -fh"),
    ("trustuser", "-fseqscan"),
    ("trustuser", "-S 4MB -S8MB"),
    ("trustuser", "-P"),
    ("trustuser", "-W 0"),
    ("trustuser", "-E -T -n -b -j -C x -D /nonexistent -r /tmp/nowhere -v 2"),
    ("trustuser", "-c search_path=public --"),
    ("trustuser", "--"),
    ("trustuser", "-c application_name=x=y=z"),
    ("trustuser", "-c application_name="),
    ("trustuser", f"-ecrole={TARGET}"),  # the review's finding: -e, then -c role=...
    ("trustuser", f"-Ecrole={TARGET}"),
    ("trustuser", f"-e-role={TARGET}"),
    ("trustuser", f"-c ROLE={TARGET}"),
    ("trustuser", rf"-c r\ole={TARGET}"),
    ("trustuser", rf"-c application_name=a\\ -c role={TARGET}"),
    ("postgres", "-d 0"),
    ("postgres", "-d 5"),
    ("postgres", "-d2x"),
    ("postgres", "-d 4294967297"),
    ("postgres", r"-d\ 3"),
    ("postgres", "-s"),
    ("postgres", "-tpa -t pl -texecutor"),
    ("postgres", "-O"),
    ("postgres", "-c log_statement=none -c log-min-duration-statement=-1"),
    ("postgres", "-c myext.knob=1"),  # a custom setting's placeholder
    ("postgres", "-c session-authorization=trustuser"),
]


def plain(settings: list[tuple[str, str]]) -> str:
    """The same settings as the simplest options: `-c name=value` each, spaces and backslashes escaped."""
    def escape(text: str) -> str:
        return "".join("\\" + c if c in " \t\n\v\f\r\\" else c for c in text)
    return " ".join(f"-c {escape(name)}={escape(value)}" for name, value in settings)


@pytest.mark.parametrize(("user", "options"), APPLIED)
def test_the_server_applies_what_the_parser_reads(pg, target, user, options) -> None:
    model = settings_from_options(options)
    names = [name for name, _ in model]
    with connect(pg, user, options) as conn:
        got = applied(conn, names)
    with connect(pg, user, plain(model)) as ref:  # what the parser says the options amount to
        want = applied(ref, names)
    assert got == want, (options, model)


# Options the parser refuses: the server refuses them with the same message.
# (Valid settings only before the fault: the server applies each as it reads it, so a bad one would fail first.)
SYNTAX = ["foo", "-c work_mem=1MB foo bar", "foo -x", "-c work_mem=1MB -- x", "foo -- bar", "-- -c work_mem=1MB", "-x",
          "-ec", "-c", "-c work_mem=1MB -B", "-c\\", "-f x", "-fx", "-f \\", "-t p", "-tx", "-Xe", "-c work_mem=1MB -Xe",
          "foo -c work_mem=1MB -Xe", "-", "-e:", "-c role", "--role", "foo -c role", "-c --", "-c work_mem=1MB -e\u00e9"]


@pytest.mark.parametrize("options", SYNTAX)
def test_what_the_parser_refuses_the_server_refuses_alike(pg, options) -> None:
    with pytest.raises(OptionsError) as model:
        settings_from_options(options)
    with pytest.raises(psycopg.OperationalError) as server:
        connect(pg, "trustuser", options).close()
    assert str(server.value).split("FATAL:  ", 1)[1].split("\n")[0] == str(model.value), str(server.value)


# Options the parser reads whose settings the server will not take: its error names one of them.
REFUSED = [("trustuser", "-B 64MB"), ("trustuser", "-F"), ("trustuser", "-h 0.0.0.0"), ("trustuser", "-i"),
           ("trustuser", "-k /tmp"), ("trustuser", "-l"), ("trustuser", "-N 5"), ("trustuser", "-p 5999"),
           ("trustuser", "-d 1"), ("trustuser", "-s"), ("trustuser", "-t pa"), ("trustuser", "-O"),
           ("trustuser", "-c -x=y"), ("trustuser", "-c nosuch_setting=1"), ("trustuser", "-c =x"),
           ("postgres", "-d 6"), ("trustuser", "-c session_authorization=postgres")]


@pytest.mark.parametrize(("user", "options"), REFUSED)
def test_settings_the_server_refuses_are_the_ones_the_parser_names(pg, user, options) -> None:
    model = settings_from_options(options)
    with pytest.raises(psycopg.OperationalError) as server:
        connect(pg, user, options).close()
    message = str(server.value).lower()
    assert any(f'"{name.lower()}"' in message or f"set {name.replace('_', ' ')}" in message for name, _ in model), \
        (model, message)


def test_a_role_switch_in_options_or_as_a_parameter_reaches_the_role_on_the_server(pg, target) -> None:
    """Ground truth for the attacks the gateway refuses below: straight to PostgreSQL they work."""
    with connect(pg, "trustuser", f"-ecrole={target}") as conn:
        assert conn.execute("select current_user, session_user").fetchone() == (target, "trustuser")

    async def parameter() -> tuple[str, str]:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="trustuser", database="shop", ssl=False,
                                     server_settings={"Role": target})
        try:
            return tuple(await conn.fetchrow("select current_user, session_user"))
        finally:
            await conn.close()

    assert asyncio.run(parameter()) == (target, "trustuser")  # a parameter's name is case-blind too


@pytest.fixture(scope="module")
def connection_log(pg):  # noqa: ANN001, ANN201
    """The upstream server logs each session it authorizes; a function that says whether one with this
    application_name was."""
    pg.psql("ALTER SYSTEM SET log_connections = on")
    pg.psql("SELECT pg_reload_conf()")
    deadline = time.time() + 10
    while pg.psql("SHOW log_connections").strip() != "on":
        assert time.time() < deadline, "log_connections did not take effect"
        time.sleep(0.1)
    log = pg.dir / "postgres.log"

    def authorized(app: str) -> bool:
        return f"application_name={app}" in log.read_text(errors="replace")

    yield authorized
    pg.psql("ALTER SYSTEM RESET log_connections")
    pg.psql("SELECT pg_reload_conf()")


ATTACKS = [  # (PGOPTIONS, the setting the gateway names)
    ("-ecrole={t}", "role"),
    ("-Ecrole={t}", "role"),
    ("-c role={t}", "role"),
    ("--role={t}", "role"),
    ("-e-role={t}", "role"),
    ("-c ROLE={t}", "ROLE"),
    (r"-c r\ole={t}", "role"),
    (r"-c application_name=a\\ -c role={t}", "role"),
    ("-c session_authorization={t}", "session_authorization"),
    ("--session-authorization={t}", "session-authorization"),
    (r"-c\ role={t}", " role"),
    ("-c log_statement=none", "log_statement"),
    ("-d 5", "-d"),
    ("-c role", "options"),
]


@pytest.mark.parametrize(("pgoptions", "setting"), ATTACKS)
def test_the_gateway_refuses_role_switches_and_other_settings(gateway, cred, pg, target, connection_log,
                                                              pgoptions, setting) -> None:
    app = f"wg-attack-{uuid.uuid4().hex[:12]}"
    options = pgoptions.format(t=target)
    out = psql(gateway.dsn(cred, application_name=app), "-Atc", "select current_user", check=False,
               env={"PGOPTIONS": options})
    assert out.returncode != 0 and f"the startup setting {setting} " in out.stderr, out.stderr
    assert "PGOPTIONS" in out.stderr and target not in out.stdout

    async def attempt() -> None:
        await asyncpg.connect(gateway.dsn(cred, application_name=app), server_settings={"options": options})

    with pytest.raises(asyncpg.InsufficientPrivilegeError) as exc:
        asyncio.run(attempt())
    assert exc.value.sqlstate == "42501" and f"the startup setting {setting} " in str(exc.value)
    # and no session reached the server: the gateway refused before opening one
    assert not connection_log(app)


@pytest.mark.parametrize(("settings", "setting"), [
    ({"Role": TARGET}, "Role"),
    ({"session_authorization": TARGET}, "session_authorization"),
    ({"wardgate_unknown_parameter": "1"}, "wardgate_unknown_parameter"),
    ({"log_statement": "all"}, "log_statement"),
    ({"standard_conforming_strings": "off"}, "standard_conforming_strings"),
])
def test_the_gateway_refuses_startup_parameters_off_the_list(gateway, cred, target, connection_log,
                                                             settings, setting) -> None:
    app = f"wg-param-{uuid.uuid4().hex[:12]}"

    async def attempt() -> None:
        await asyncpg.connect(gateway.dsn(cred), server_settings={"application_name": app, **settings})

    with pytest.raises(asyncpg.InsufficientPrivilegeError) as exc:
        asyncio.run(attempt())
    assert f"the startup setting {setting} as a parameter of its own" in str(exc.value)
    assert not connection_log(app)


def test_ordinary_clients_still_connect(gateway, cred, target, connection_log) -> None:
    app = f"wg-ok-{uuid.uuid4().hex[:12]}"
    out = psql(gateway.dsn(cred, application_name=app), "-Atc", "select current_user, current_setting('application_name'), "
               "current_setting('statement_timeout')", env={"PGOPTIONS": "-c statement_timeout=5s"})
    assert out.stdout.strip() == f"app|{app}|5s"
    assert connection_log(app)  # the log does show sessions that reach the server
    # psql's own application_name, PGDATESTYLE/PGTZ (libpq sends them as parameters), options with escapes
    out = psql(gateway.dsn(cred), "-Atc", "select current_setting('application_name'), current_setting('DateStyle'), "
               "current_setting('TimeZone'), current_setting('search_path'), current_user",
               env={"PGDATESTYLE": "German", "PGTZ": "UTC", "PGOPTIONS": r"-e -c search_path=public,\ x -fs -S 4MB"})
    assert out.stdout.strip() == "psql|German, DMY|UTC|public, x|app"
    with psycopg.connect(gateway.dsn(cred), options="-c DateStyle=ISO,DMY --lock-timeout=2s -c jit=off") as conn:
        assert conn.execute("select current_setting('lock_timeout'), current_user").fetchone() == ("2s", "app")

    async def driver() -> tuple:
        # what asyncpg sends, with the settings node-postgres and pgjdbc send as parameters; the session
        # opening is the point, so what the server reports back at once is read, without a statement
        conn = await asyncpg.connect(gateway.dsn(cred), server_settings={
            "application_name": "asyncpg-app", "statement_timeout": "9000", "lock_timeout": "100",
            "idle_in_transaction_session_timeout": "60000", "DateStyle": "ISO", "TimeZone": "Europe/Paris",
            "extra_float_digits": "3", "search_path": "public"})
        try:
            reported = conn.get_settings()
            return reported.application_name, reported.TimeZone, reported.DateStyle
        finally:
            await conn.close()

    assert asyncio.run(driver()) == ("asyncpg-app", "Europe/Paris", "ISO, MDY")
