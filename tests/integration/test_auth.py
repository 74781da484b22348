"""Client authentication with Wardgate credentials, TLS, revocation, and upstream authentication methods."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.conftest import psql


def connect_error(dsn: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=10)
    return info.value


def test_wrong_credential_is_refused_and_recorded(gateway, cred) -> None:
    bad = dict(cred, credential=cred["credential"][:-4] + "AAAA")
    err = connect_error(gateway.dsn(bad, application_name="t_wrong"))
    assert 'password authentication failed for user "alice" on connection "shop"' in str(err)
    assert "wardgate credentials issue --user alice --connection shop" in str(err)
    s = gateway.wait_for_session(lambda s: s["application_name"] == "t_wrong")
    assert s["status"] == "rejected" and s["error_code"] == "28P01"


def test_psql_reports_sqlstate_28P01(gateway, cred) -> None:
    bad = dict(cred, credential="wgc_000000000000_nottherightsecret")
    out = psql(gateway.dsn(bad), "-c", "select 1", check=False, env={"PGAPPNAME": "t_psql_bad"})
    assert out.returncode == 2 and "password authentication failed" in out.stderr


def test_credential_is_bound_to_user_and_connection(gateway, cred) -> None:
    as_bob = dict(cred, user="bob")
    assert "password authentication failed" in str(connect_error(gateway.dsn(as_bob)))
    other_conn = dict(cred, connection="shop_md5")
    assert "password authentication failed" in str(connect_error(gateway.dsn(other_conn)))
    unknown_user = dict(cred, user="mallory")
    assert "password authentication failed" in str(connect_error(gateway.dsn(unknown_user)))


def test_expired_credential_is_refused(gateway) -> None:
    cred = gateway.credential(ttl="1s")
    time.sleep(1.5)
    assert "password authentication failed" in str(connect_error(gateway.dsn(cred)))


def test_revoke_ends_live_sessions_within_a_second(gateway) -> None:
    cred = gateway.credential()
    other = gateway.credential()
    with psycopg.connect(gateway.dsn(cred), autocommit=True) as conn, psycopg.connect(gateway.dsn(other), autocommit=True) as survivor:
        assert conn.execute("select 1").fetchone() == (1,)
        gateway.cli("credentials", "revoke", cred["id"])
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            while time.monotonic() - t0 < 5:
                conn.execute("select 1")
                time.sleep(0.05)
        assert time.monotonic() - t0 < 2
        assert f"credential {cred['id']} was revoked" in str(info.value)
        assert survivor.execute("select 2").fetchone() == (2,)  # other credentials are untouched
    assert "password authentication failed" in str(connect_error(gateway.dsn(cred)))
    listed = {c["id"]: c["status"] for c in gateway.cli_json("credentials", "list", "--all")}
    assert listed[cred["id"]] == "revoked"


def test_tls_verify_full_with_the_gateway_ca(gateway, cred) -> None:
    with psycopg.connect(gateway.dsn(cred, sslmode="verify-full", sslrootcert=str(gateway.ca))) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


def test_scram_without_tls_works_and_is_recorded_as_such(gateway, cred) -> None:
    with psycopg.connect(gateway.dsn(cred, sslmode="disable", application_name="t_plain")) as conn:
        assert not conn.pgconn.ssl_in_use
        conn.execute("select 1")
    assert gateway.wait_for_session(lambda s: s["application_name"] == "t_plain")["tls"] is False


def test_scram_channel_binding_is_not_required(gateway, cred) -> None:
    # libpq with channel_binding=require refuses a server that offers no SCRAM-SHA-256-PLUS:
    # a clear client-side error rather than a silent downgrade.
    err = connect_error(gateway.dsn(cred, channel_binding="require"))
    assert "channel binding" in str(err)


@pytest.mark.parametrize("connection", ["shop_tls", "shop_md5", "shop_trust"])
def test_upstream_authentication_methods_and_tls(gateway, connection) -> None:
    cred = gateway.credential(connection=connection)
    with psycopg.connect(gateway.dsn(cred)) as conn:
        row = conn.execute("select current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid())").fetchone()
    expected = {"shop_tls": ("app", True), "shop_md5": ("md5user", False), "shop_trust": ("trustuser", True)}
    assert row == expected[connection]


def test_missing_upstream_password_gives_a_clear_error(tmp_path, pg) -> None:
    from tests.conftest import make_gateway

    gw = make_gateway(tmp_path / "gw", pg)
    gw.env.pop("WARDGATE_CONN_SHOP_PASSWORD")
    gw.start()
    try:
        cred = gw.credential()
        err = connect_error(gw.dsn(cred))
        # alice is told the database cannot be reached; the reason is for the operator, in the log
        assert "cannot reach the database of connection 'shop'" in str(err)
        deadline = time.monotonic() + 10
        while "WARDGATE_CONN_SHOP_PASSWORD is not set" not in gw.log.read_text():
            assert time.monotonic() < deadline, "the reason was not logged"
            time.sleep(0.1)
    finally:
        gw.stop()


def test_cleartext_mode_requires_tls(tmp_path, pg) -> None:
    from tests.conftest import make_gateway

    gw = make_gateway(tmp_path / "gw", pg, extra_toml='client_auth = "password"')
    gw.start()
    try:
        cred = gw.credential()
        with psycopg.connect(gw.dsn(cred, sslmode="require")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        err = connect_error(gw.dsn(cred, sslmode="disable"))
        assert "cleartext password authentication needs TLS" in str(err)
        bad = dict(cred, credential=cred["credential"] + "x")
        assert "password authentication failed" in str(connect_error(gw.dsn(bad)))
    finally:
        gw.stop()


def test_secrets_never_reach_logs_or_cli_output(gateway, cred, pg) -> None:
    from tests.conftest import APP_PASSWORD

    with psycopg.connect(gateway.dsn(cred)) as conn:
        conn.execute("select 1")
    listing = gateway.cli("connections", "list", "--json").stdout + gateway.cli("connections", "list").stdout
    listing += gateway.cli("credentials", "list", "--json").stdout
    log = gateway.log.read_text()
    for secret in (APP_PASSWORD, cred["credential"]):
        assert secret not in listing
        assert secret not in log


def test_expiry_ends_live_sessions(gateway) -> None:
    cred = gateway.credential(ttl="2s")
    with psycopg.connect(gateway.dsn(cred), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        deadline = time.monotonic() + 6
        with pytest.raises(psycopg.OperationalError) as info:
            while time.monotonic() < deadline:
                conn.execute("select 1")
                time.sleep(0.1)
        assert f"credential {cred['id']} was expired" in str(info.value)


def test_configured_tls_certificate(tmp_path, pg) -> None:
    from tests.conftest import make_gateway
    from wardgate.tls import ensure_self_signed

    ca, cert, key = ensure_self_signed(tmp_path / "corp-pki", ["127.0.0.1"])
    gw = make_gateway(tmp_path / "gw", pg, extra_toml=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    gw.start()
    try:
        cred = gw.credential()
        with psycopg.connect(gw.dsn(cred, sslmode="verify-full", sslrootcert=str(ca))) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        # the generated CA is not the one in use
        assert not gw.ca.exists()
    finally:
        gw.stop()
