"""A connection's secret stays with the server it was entered for: password_env only under the configured
prefix, a stored password dropped when the connection is pointed elsewhere, and no cleartext or md5
password sent upstream without the connection's opt-in (nor over verify-* TLS that was not verified)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from tests.fake_upstream import MD5_SALT, FakeUpstream
from wardgate.config import ConfigError, ConnectionSpec, Settings, load
from wardgate.engines.postgres import upstream
from wardgate.engines.postgres.scram import md5_password
from wardgate.engines.postgres.stream import StreamProtocol
from wardgate.store import Actor, Store
from wardgate.tls import ensure_self_signed


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wardgate.toml"
    path.write_text(f'data_dir = "data"\n{text}')
    return path


def test_password_env_outside_the_prefix_is_refused_at_config_load(tmp_path) -> None:
    path = _config(tmp_path, '[[connections]]\nname = "shop"\npassword_env = "SHOP_PASSWORD"\n')
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert "'shop'" in str(err.value) and "starting with 'WARDGATE_CONN_'" in str(err.value)
    assert "password_env_prefix" in str(err.value)
    for own in ("WARDGATE_SECRET_KEY", "WARDGATE_STORE_URL"):
        with pytest.raises(ConfigError, match="WARDGATE_CONN_"):
            load(_config(tmp_path, f'[[connections]]\nname = "shop"\npassword_env = "{own}"\n'), env={})
    ok = _config(tmp_path, '[[connections]]\nname = "shop"\npassword_env = "WARDGATE_CONN_SHOP"\n')
    assert load(ok, env={}).connections[0].password_env == "WARDGATE_CONN_SHOP"


def test_the_prefix_is_a_setting_and_cannot_open_the_gateways_own_variables(tmp_path) -> None:
    path = _config(tmp_path, '[upstream]\npassword_env_prefix = "PGPASS_"\n'
                             '[[connections]]\nname = "shop"\npassword_env = "PGPASS_SHOP"\n')
    assert load(path, env={}).upstream.password_env_prefix == "PGPASS_"
    with pytest.raises(ConfigError, match="starting with 'OTHER_'"):
        load(path, env={"WARDGATE_UPSTREAM_PASSWORD_ENV_PREFIX": "OTHER_"})
    for prefix in ("", "WARDGATE_", "WARDGATE_SECRET", "WARDGATE_STORE_", "WARDGATE_GATEWAY_X", "a-b"):
        with pytest.raises(ConfigError, match=r"\[upstream\] password_env_prefix"):
            load(path, env={"WARDGATE_UPSTREAM_PASSWORD_ENV_PREFIX": prefix})


def test_password_auth_is_checked(tmp_path) -> None:
    path = _config(tmp_path, '[[connections]]\nname = "shop"\npassword_auth = "md5"\n')
    with pytest.raises(ConfigError, match="password_auth must be one of scram-sha-256, any"):
        load(path, env={})
    path = _config(tmp_path, '[[connections]]\nname = "shop"\npassword_auth = "any"\n')
    assert load(path, env={}).connections[0].password_auth == "any"


def _store(tmp_path: Path) -> Store:
    settings = Settings()
    settings.data_dir = tmp_path
    return Store.open(settings)


ADMIN = Actor("root", "mcp", None, "10.0.0.9")


def _events(store: Store) -> list:
    return [e for e in reversed(store.list_events(limit=100)) if e.kind.startswith("connection.")]


def test_pointing_a_stored_connection_elsewhere_drops_its_secret(tmp_path) -> None:
    store = _store(tmp_path)
    store.add_connection(ConnectionSpec("prod", "db.internal", 5432, "app", "svc", "Secret-Pa55", None, "verify-full"),
                         ADMIN)
    store.add_connection(ConnectionSpec("stage", "db.internal", 5432, "app", "svc", None, "WARDGATE_CONN_STAGE"), ADMIN)
    # The user, or how the password may be sent, is not where the connection points: the secret stays.
    info = store.update_connection("prod", {"user": "svc2", "password_auth": "any"}, ADMIN)
    assert info.note is None and store.get_connection("prod").password == "Secret-Pa55"
    for change in ({"host": "evil.example"}, {"port": 6543}, {"database": "other"}, {"sslmode": "require"},
                   {"sslrootcert": "/tmp/ca.pem"}):
        store.update_connection("prod", {"password": "Secret-Pa55"}, ADMIN)
        info = store.update_connection("prod", change, ADMIN)
        spec = store.get_connection("prod")
        assert (spec.password, spec.password_env) == (None, None), change
        assert info.public()["password"] == "none" and "dropped" in info.note
        store.update_connection("prod", {"host": "db.internal", "port": 5432, "database": "app",
                                         "sslmode": "verify-full", "sslrootcert": None}, ADMIN)
    info = store.update_connection("stage", {"host": "evil.example"}, ADMIN)
    assert store.get_connection("stage").password_env is None and "dropped" in info.note
    # Given again in the same change, it stays (and names the new server).
    store.update_connection("stage", {"host": "db2.internal", "password_env": "WARDGATE_CONN_STAGE"}, ADMIN)
    assert store.get_connection("stage").password_env == "WARDGATE_CONN_STAGE"
    info = store.update_connection("prod", {"host": "db2.internal", "password": "New-Pa55"}, ADMIN)
    assert info.note is None and store.get_connection("prod").password == "New-Pa55"

    events = _events(store)
    assert all(e.user_name == "root" and e.source == "mcp" and e.client_addr == "10.0.0.9" for e in events)
    assert all("Secret-Pa55" not in (e.detail or "") and "New-Pa55" not in (e.detail or "") for e in events)
    dropped = [e.detail for e in events if e.kind == "connection.update" and "dropped" in e.detail]
    assert len(dropped) == 6
    assert dropped[0].startswith('prod: {"host":["db.internal","evil.example"],"password":["set",null]}; the stored '
                                 'password was dropped')
    assert dropped[-1].startswith('stage: {"host":["db.internal","evil.example"],'
                                  '"password_env":["WARDGATE_CONN_STAGE",null]}; the stored password was dropped')
    last = json.loads(events[-1].detail.split(": ", 1)[1])
    assert last == {"host": ["db.internal", "db2.internal"], "password": [None, "set"]}
    # A password given again is "replaced" even when it is the same: the record confirms no guess.
    assert events[2].detail == 'prod: {"password_auth":["scram-sha-256","any"],"user":["svc","svc2"]}'
    assert events[3].detail == 'prod: {"password":["set","replaced"]}'


def test_every_door_of_the_store_checks_password_env(tmp_path) -> None:
    store = _store(tmp_path)
    with pytest.raises(ConfigError, match="starting with 'WARDGATE_CONN_'"):
        store.add_connection(ConnectionSpec("leak", password_env="WARDGATE_SECRET_KEY"), ADMIN)
    assert store.get_connection("leak") is None
    store.add_connection(ConnectionSpec("ok", password="pw"), ADMIN)
    with pytest.raises(ConfigError, match="starting with 'WARDGATE_CONN_'"):
        store.update_connection("ok", {"password_env": "WARDGATE_STORE_URL"}, ADMIN)
    assert store.get_connection("ok").password == "pw"
    with pytest.raises(ConfigError, match="password_auth must be one of"):
        store.update_connection("ok", {"password_auth": "cleartext"}, ADMIN)


def test_a_stored_password_env_from_before_the_prefix_is_not_read() -> None:
    spec = ConnectionSpec("old", password_env="WARDGATE_SECRET_KEY")
    with pytest.raises(upstream.UpstreamError, match="starting with 'WARDGATE_CONN_'"):
        upstream.resolve_password(spec)


async def _handshake(spec: ConnectionSpec, port: int, password: str | None, open_as: str = "disable") -> None:
    """The gateway's handshake with the fake server, over a connection opened as sslmode `open_as`."""
    proto = await upstream._open(dataclasses.replace(spec, port=port, sslmode=open_as), 5.0)
    try:
        await asyncio.wait_for(upstream._handshake(spec, proto, password, {}), 5.0)
    finally:
        proto.abort()


def _refused(spec: ConnectionSpec, fake: FakeUpstream, password: str | None = "pw", open_as: str = "disable") -> str:
    with pytest.raises(upstream.UpstreamError) as err:
        asyncio.run(_handshake(spec, fake.port, password, open_as))
    fake.settle()
    return str(err.value)


@pytest.mark.parametrize(("method", "name"), [(3, "cleartext"), (5, "md5")])
def test_no_cleartext_or_md5_password_without_the_opt_in(method, name) -> None:
    with FakeUpstream(method) as fake:
        spec = ConnectionSpec("legacy", "127.0.0.1", 0, "app", "svc", "pw", None, "disable")
        message = _refused(spec, fake)
        assert fake.connections == 1 and fake.received == []
        assert "'legacy'" in message and f"asks for {name} password" in message and "password_auth" in message
        # With the opt-in the password goes (and the server's refusal comes back): the check above can fail.
        message = _refused(dataclasses.replace(spec, password_auth="any"), fake)
        assert "refused the gateway: password authentication failed (fake server)" in message
        sent = b"pw\x00" if method == 3 else md5_password("svc", "pw", MD5_SALT) + b"\x00"
        assert fake.received == [sent]


def test_no_password_configured_says_to_give_it_again() -> None:
    with FakeUpstream(3) as fake:
        message = _refused(ConnectionSpec("moved", password_auth="any"), fake, password=None)
        assert fake.received == [] and "none is configured" in message and "give the password" in message


def test_never_over_verify_tls_that_was_not_verified(tmp_path) -> None:
    _, cert, key = ensure_self_signed(tmp_path / "tls", ["127.0.0.1"])
    with FakeUpstream(3, tls=(cert, key)) as fake:
        # TLS without verification (as sslmode=require opens it), under a connection that asks for verify-full
        for sslmode in ("verify-full", "verify-ca"):
            spec = ConnectionSpec("pinned", "127.0.0.1", 0, "app", "svc", "pw", None, sslmode, None, "any")
            message = _refused(spec, fake, open_as="require")
            assert fake.received == [] and "not verified" in message and f"sslmode={sslmode}" in message
        spec = ConnectionSpec("pinned", "127.0.0.1", 0, "app", "svc", "pw", None, "require", None, "any")
        assert "password authentication failed" in _refused(spec, fake, open_as="require")
        assert fake.received == [b"pw\x00"]


def test_the_tls_check_reads_the_connection(tmp_path) -> None:
    """_tls_verified on a verified connection: the CA given, the name checked."""
    ca, cert, key = ensure_self_signed(tmp_path / "tls", ["127.0.0.1"])

    async def opened(sslmode: str) -> bool:
        spec = ConnectionSpec("pinned", "127.0.0.1", fake.port, "app", "svc", "pw", None, sslmode, str(ca), "any")
        proto = await upstream._open(spec, 5.0)
        try:
            return upstream._tls_verified(spec, proto)
        finally:
            proto.abort()

    with FakeUpstream(3, tls=(cert, key)) as fake:
        assert asyncio.run(opened("verify-full")) and asyncio.run(opened("verify-ca"))
        fake.settle()
    proto = StreamProtocol()  # never connected, no TLS
    assert not upstream._tls_verified(ConnectionSpec("x", sslmode="verify-full"), proto)
