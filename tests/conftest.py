"""Shared fixtures: a real PostgreSQL (the machine's binaries, in a temp dir) and a real gateway process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from wardgate.config import load, parse_duration
from wardgate.localpg import LocalPostgres, free_port
from wardgate.recording import views
from wardgate.store import Store
from wardgate.tls import ensure_self_signed

ROOT = Path(__file__).resolve().parent.parent
SHOP_SQL = ROOT / "wardgate" / "demo" / "shop.sql"
APP_PASSWORD = "app-Secret-4242"
MD5_PASSWORD = "md5-Secret-4242"


def wardgate_cmd() -> list[str]:
    return [sys.executable, "-m", "wardgate.cli"]


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> LocalPostgres:
    """Upstream PostgreSQL with TLS, SCRAM (app), md5 (md5user) and trust (trustuser) roles, and the shop data."""
    server = upstream_postgres(tmp_path_factory.mktemp("upstream"))
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def upstream_postgres(base: Path) -> LocalPostgres:
    """What the `pg` fixture starts (`make soak` starts one too): TLS, SCRAM, md5 and trust roles, the shop data."""
    ca, cert, key = ensure_self_signed(base / "tls", ["127.0.0.1"])
    # pytest's temp root is private to root; the server runs as `postgres` and needs its own place.
    server = LocalPostgres(Path(tempfile.mkdtemp(prefix="wardgate-pg-")))
    server.initdb(
        ssl_cert=(cert, key),
        hba=[
            "host all trustuser 127.0.0.1/32 trust",
            "host all md5user 127.0.0.1/32 md5",
            "host all all 127.0.0.1/32 scram-sha-256",
        ],
    )
    server.start()
    server.ca = ca  # type: ignore[attr-defined]
    server.create_database("app", APP_PASSWORD, "shop", SHOP_SQL)
    server.psql(f"SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD '{MD5_PASSWORD}'")
    server.psql("CREATE ROLE trustuser LOGIN")
    server.psql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO md5user, trustuser", database="shop")
    return server


@dataclass
class Gateway:
    dir: Path
    config: Path
    port: int
    http_port: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log: Path | None = None
    _store: Store | None = None
    http_scheme: str = "http"

    @property
    def ca(self) -> Path:
        return self.dir / "data" / "tls" / "ca.crt"

    def settings(self):  # noqa: ANN201
        return load(self.config, env=self.env)

    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.settings())
        return self._store

    def cli(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*wardgate_cmd(), "--config", str(self.config), *args],
            capture_output=True, text=True, env=self.env, input=input, timeout=60,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"wardgate {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def cli_json(self, *args: str):  # noqa: ANN201
        return json.loads(self.cli(*args, "--json").stdout)

    def credential(self, user: str = "alice", connection: str = "shop", ttl: str = "15m") -> dict:
        """Issue through the store, as `wardgate credentials issue --json` does (the CLI is tested on its own)."""
        issued = self.store().issue_credential(user, connection, parse_duration(ttl))
        return {"id": issued.id, "user": user, "connection": connection, "credential": issued.secret}

    def dsn(self, cred: dict, sslmode: str = "require", **extra: str) -> str:
        q = "&".join([f"sslmode={sslmode}", *(f"{k}={v}" for k, v in extra.items())])
        return f"postgresql://{cred['user']}:{cred['credential']}@127.0.0.1:{self.port}/{cred['connection']}?{q}"

    def start(self) -> None:
        self.log = self.dir / "gateway.log"
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*wardgate_cmd(), "--config", str(self.config), "-v", "serve"], stdout=fh, stderr=fh, env=self.env
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()}")
            try:
                url = f"{self.http_scheme}://127.0.0.1:{self.http_port}/healthz"
                if httpx.get(url, timeout=1, verify=False).status_code == 200:  # noqa: S501 - readiness only
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not become ready: {self.log.read_text()}")

    def stop(self, sig: int = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def session(self, session_id: str, *, until=None, timeout: float = 10.0) -> dict:  # noqa: ANN001
        """`sessions show` once the recording satisfies `until` (the recorder drains asynchronously)."""
        deadline = time.time() + timeout
        while True:
            data = views.show_session(self.store(), session_id)
            if until is None or until(data) or time.time() > deadline:
                return data
            time.sleep(0.2)

    def sessions(self, **filters) -> list[dict]:  # noqa: ANN003
        return views.list_sessions(self.store(), limit=200, **filters)

    def wait_for_session(self, predicate, timeout: float = 10.0) -> dict:  # noqa: ANN001
        deadline = time.time() + timeout
        while time.time() < deadline:
            for s in self.sessions():
                if predicate(s):
                    return s
            time.sleep(0.2)
        raise AssertionError("no recorded session matched")


TLS_CONNECTION = """
[[connections]]
name = "shop_tls"
host = "127.0.0.1"
port = {port}
database = "shop"
user = "app"
password_env = "WARDGATE_CONN_SHOP_PASSWORD"
sslmode = "verify-full"
sslrootcert = "{ca}"
"""


def until_refused(attempt: Callable[[], object], rule: str, failure: str, timeout: float = 10.0) -> None:
    """Run `attempt` until the gateway refuses it by `rule` (a policy change takes effect), or fail with `failure`."""
    import psycopg

    deadline = time.time() + timeout
    while True:
        try:
            attempt()
        except psycopg.errors.InsufficientPrivilege as exc:
            assert rule in str(exc)
            return
        assert time.time() < deadline, failure
        time.sleep(0.2)


def clean_env() -> dict[str, str]:
    """This process's environment without WARDGATE_* settings (a test's gateway gets only its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WARDGATE_")}


def make_gateway(
    base: Path, pg: LocalPostgres, extra_toml: str = "", store_url: str | None = None, tail_toml: str = "",
    env_extra: dict[str, str] | None = None, users: bool = True,
) -> Gateway:
    base.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    config = base / "wardgate.toml"
    tls_block = TLS_CONNECTION.format(port=pg.port, ca=pg.ca) if getattr(pg, "ca", None) else ""
    config.write_text(
        f"""
data_dir = "data"

[gateway]
listen = "127.0.0.1:{port}"
http_listen = "127.0.0.1:{http_port}"
{extra_toml}
{tls_block}
[[connections]]
name = "shop"
host = "127.0.0.1"
port = {pg.port}
database = "shop"
user = "app"
password_env = "WARDGATE_CONN_SHOP_PASSWORD"
sslmode = "disable"

[[connections]]
name = "shop_md5"
host = "127.0.0.1"
port = {pg.port}
database = "shop"
user = "md5user"
password_env = "WARDGATE_CONN_SHOP_MD5_PASSWORD"
sslmode = "disable"
password_auth = "any"

[[connections]]
name = "shop_trust"
host = "127.0.0.1"
port = {pg.port}
database = "shop"
user = "trustuser"
sslmode = "require"

[[access]]
name = "engineers"
groups = ["dev", "ops", "deployers"]
connections = ["shop*"]
"""
        + tail_toml
    )
    env = clean_env()
    env.update(WARDGATE_CONN_SHOP_PASSWORD=APP_PASSWORD, WARDGATE_CONN_SHOP_MD5_PASSWORD=MD5_PASSWORD, PYTHONUNBUFFERED="1")
    if store_url:
        env["WARDGATE_STORE_URL"] = store_url
    env.update(env_extra or {})
    gw = Gateway(base, config, port, http_port, env)
    if users:
        gw.cli("users", "add", "alice", "--group", "dev")
        gw.cli("users", "add", "bob", "--group", "ops")
    return gw


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, pg: LocalPostgres) -> Gateway:
    gw = make_gateway(tmp_path_factory.mktemp("gateway"), pg)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def cred(gateway: Gateway) -> dict:
    return gateway.credential()


def psql(dsn: str, *args: str, input: str | None = None, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", dsn, *args], capture_output=True, text=True, input=input,
        timeout=60, env={**os.environ, **(env or {})},
    )
    if check and out.returncode != 0:
        raise AssertionError(f"psql failed ({out.returncode}): {out.stderr}")
    return out


IDP_DIR = ROOT / "tests" / "idp"
IDP_AUDIENCE = "https://wardgate.test"
IDP_ACCOUNTS = {"alice": {"groups": ["dev"]}, "dana": {"groups": ["dev"]}, "olivia": {"groups": ["ops", "auditors"]}, "nobody": {"groups": []}}


def idp_toml(idp: "IdP") -> str:
    """The config of a gateway that takes the test IdP's tokens, with admins and auditors by group."""
    return f"""
[[identity_providers]]
name = "corp"
issuer = "{idp.issuer}"
audience = "{IDP_AUDIENCE}"
client_id = "wardgate-cli"

[roles]
admins = ["wardgate-admins"]
auditors = ["auditors"]
"""


@dataclass
class IdP:
    issuer: str
    keys_file: Path
    proc: subprocess.Popen

    @property
    def private_keys(self) -> list[dict]:
        return json.loads(self.keys_file.read_text())["keys"]

    def client_credentials(self, client_id: str = "ci-bot", secret: str = "ci-bot-secret") -> str:
        r = httpx.post(f"{self.issuer}/token", auth=(client_id, secret),
                       data={"grant_type": "client_credentials", "resource": IDP_AUDIENCE, "scope": "openid"})
        r.raise_for_status()
        return r.json()["access_token"]

    def forge(self, claims: dict, *, alg: str = "RS256", key: dict | None = None, kid: str | None = None) -> str:
        """A token signed with the provider's own key (or `key`), carrying exactly `claims`."""
        from joserfc import jwt
        from joserfc.jwk import KeySet

        jwk = key or next(k for k in self.private_keys if k["alg"] == alg)
        header = {"alg": alg, "kid": kid or jwk.get("kid"), "typ": "at+jwt"}
        return jwt.encode(header, claims, KeySet.import_key_set({"keys": [jwk]}).keys[0])

    def sign_in(self, url: str, login: str, max_steps: int = 12, device: bool = False) -> httpx.Response:
        """Act as the person's browser: follow the IdP's pages, submit its forms, deliver the code."""
        import re

        with httpx.Client(timeout=10) as browser:
            r = browser.get(url)
            for _ in range(max_steps):
                if r.status_code in (302, 303) and r.headers.get("location"):
                    target = httpx.URL(str(r.url)).join(r.headers["location"])
                    r = browser.get(target)
                    if not str(target).startswith(self.issuer):
                        return r  # the loopback redirect of the signing-in program
                    continue
                form = re.search(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', r.text, re.S)
                if not form and device and r.status_code == 200:
                    return r  # the device flow ends on the IdP's own "you may close this" page
                if not form:
                    raise AssertionError(f"IdP page without a form: {r.status_code} {r.text[:300]}")
                fields = dict(re.findall(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form.group(2)))
                if 'name="login"' in form.group(2):
                    fields.update(login=login, password="any")
                r = browser.post(httpx.URL(str(r.url)).join(form.group(1)), data=fields)
        raise AssertionError("sign-in did not finish")

    def claims(self, **overrides) -> dict:  # noqa: ANN003
        now = int(time.time())
        base = {"iss": self.issuer, "aud": IDP_AUDIENCE, "sub": "alice", "preferred_username": "alice",
                "groups": ["dev"], "iat": now, "exp": now + 300}
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> IdP:
    """The npm package oidc-provider on loopback, with RS256 and ES256 keys."""
    if not (IDP_DIR / "node_modules" / "oidc-provider").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=IDP_DIR, check=True, capture_output=True)
    port = free_port()
    keys = tmp_path_factory.mktemp("idp") / "keys.json"
    env = {**os.environ, "IDP_ACCOUNTS": json.dumps(IDP_ACCOUNTS), "IDP_RESOURCE": IDP_AUDIENCE}
    proc = subprocess.Popen(["node", str(IDP_DIR / "server.mjs"), str(port), str(keys)], cwd=IDP_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    issuer = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"the test IdP did not start: {proc.stdout.read()}")
    yield IdP(issuer, keys, proc)
    proc.terminate()
    proc.wait(10)


@contextlib.contextmanager
def bystander_session(gw: Gateway):  # noqa: ANN201
    """A live session, mid-transaction, that must keep working while others misbehave: checked to be
    intact when it is given back."""
    import psycopg

    with psycopg.connect(gw.dsn(gw.credential()), autocommit=True) as conn:
        conn.execute("begin")
        conn.execute("create temp table keep (a int)")
        yield conn
        conn.execute("insert into keep values (1)")
        assert conn.execute("select count(*) from keep").fetchone() == (1,)
        conn.execute("commit")
