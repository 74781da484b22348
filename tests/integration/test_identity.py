"""Identity end to end: IdP tokens and API keys get just-in-time credentials bound to who is acting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import psycopg
import pytest

from tests.conftest import idp_toml, make_gateway


@pytest.fixture(scope="module")
def idgw(tmp_path_factory, pg, idp):  # noqa: ANN001, ANN201
    tail = idp_toml(idp) + """
[credentials]
idp_recheck = "3s"
"""
    gw = make_gateway(tmp_path_factory.mktemp("idgw"), pg, tail_toml=tail)
    gw.start()
    yield gw
    gw.stop()


def wardgate(gw, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    full_env = {k: v for k, v in gw.env.items() if k not in ("WARDGATE_API_KEY", "WARDGATE_TOKEN")}
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-m", "wardgate.cli", "--config", str(gw.config), *args],
                         capture_output=True, text=True, env=full_env, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def api(gw, method: str, path: str, bearer: str, **kw) -> httpx.Response:  # noqa: ANN001, ANN003
    return httpx.request(method, f"http://127.0.0.1:{gw.http_port}{path}", headers={"Authorization": f"Bearer {bearer}"}, **kw)


def test_ci_job_with_client_credentials_runs_psql_as_itself(idgw, idp) -> None:
    token = idp.client_credentials()
    out = wardgate(idgw, "connect", "shop", "--exec", "psql -X -At -c 'select count(*) from orders'",
                   env={"WARDGATE_TOKEN": token, "PGAPPNAME": "t_ci_job"})
    assert out.stdout.strip() == "1000"
    s = idgw.wait_for_session(lambda s: s["application_name"] == "t_ci_job" and s["status"] == "closed")
    assert (s["user"], s["agent"]) == ("svc:ci-bot", None)
    me = json.loads(wardgate(idgw, "whoami", "--json", env={"WARDGATE_TOKEN": token}).stdout)
    assert me["user"] == "svc:ci-bot" and me["kind"] == "service" and me["groups"] == ["deployers"]


def test_person_token_gets_a_credential_for_themselves(idgw, idp) -> None:
    token = idp.forge(idp.claims(sub="olivia", preferred_username="olivia", groups=["ops"]))
    issued = json.loads(wardgate(idgw, "connect", "shop", "--ttl", "10m", "--json", env={"WARDGATE_TOKEN": token}).stdout)
    assert issued["user"] == "olivia" and issued["env"]["PGUSER"] == "olivia"
    with psycopg.connect(issued["url"], application_name="t_olivia") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert idgw.wait_for_session(lambda s: s["application_name"] == "t_olivia")["user"] == "olivia"
    users = {u["name"]: u["groups"] for u in idgw.cli_json("users", "list")}
    assert users["olivia"] == ["ops"]  # provisioned from the token, groups from the claim


def test_agent_key_acts_for_a_user_and_both_are_recorded(idgw) -> None:
    key = idgw.cli_json("apikeys", "create", "--for-agent", "claude-code", "--user", "alice")
    assert key["kind"] == "agent" and key["key"].startswith("wgk_")
    env = {"WARDGATE_API_KEY": key["key"]}
    me = json.loads(wardgate(idgw, "whoami", "--json", env=env).stdout)
    assert (me["user"], me["agent"], me["groups"]) == ("alice", "claude-code", ["dev"])
    issued = json.loads(wardgate(idgw, "connect", "shop", "--json", env=env).stdout)
    assert (issued["user"], issued["agent"]) == ("alice", "claude-code")
    with psycopg.connect(issued["url"], application_name="t_agent") as conn:
        conn.execute("select 1")
    s = idgw.wait_for_session(lambda s: s["application_name"] == "t_agent")
    assert (s["user"], s["agent"]) == ("alice", "claude-code")
    listed = {k["id"]: k for k in idgw.cli_json("apikeys", "list")}
    assert listed[key["id"]]["last_used_at"] is not None and "key" not in listed[key["id"]]


def test_token_exchange_actor_claim_is_an_agent(idgw, idp) -> None:
    token = idp.forge(idp.claims(sub="dana", preferred_username="dana", act={"sub": "cursor"}))
    me = api(idgw, "GET", "/api/me", token).json()
    assert (me["user"], me["agent"], me["kind"]) == ("dana", "cursor", "agent")


def test_a_provider_name_that_is_a_local_user_is_refused(idgw, idp) -> None:
    """alice is a local user here: the provider's alice may not read or act as her, at any door."""
    r = api(idgw, "GET", "/api/me", idp.forge(idp.claims()))
    assert r.status_code == 401 and "belongs to another identity (local)" in r.json()["detail"]


def test_service_account_key_and_revocation(idgw) -> None:
    key = idgw.cli_json("apikeys", "create", "--name", "deploy-bot", "--group", "deployers", "--ttl", "90d")
    assert api(idgw, "GET", "/api/me", key["key"]).json()["user"] == "svc:deploy-bot"
    idgw.cli("apikeys", "revoke", key["id"])
    r = api(idgw, "GET", "/api/me", key["key"])
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    out = wardgate(idgw, "connect", "shop", env={"WARDGATE_API_KEY": key["key"]}, check=False)
    assert out.returncode == 1 and "revoked" in out.stderr


@pytest.mark.parametrize(
    "bearer,reason",
    [
        ("wgk_000000000000_guess", "not valid"),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "not accepted"),
        ("garbage", "not a JWT"),
    ],
)
def test_bad_bearers_get_401_with_a_reason(idgw, bearer, reason) -> None:
    r = api(idgw, "POST", "/api/credentials", bearer, json={"connection": "shop"})
    assert r.status_code == 401 and reason in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_expired_and_misaddressed_tokens_get_401(idgw, idp) -> None:
    import time

    now = int(time.time())
    expired = idp.forge(idp.claims(iat=now - 900, exp=now - 600))
    assert api(idgw, "GET", "/api/me", expired).status_code == 401
    wrong_aud = idp.forge(idp.claims(aud="https://other.example"))
    assert api(idgw, "GET", "/api/me", wrong_aud).status_code == 401
    assert httpx.get(f"http://127.0.0.1:{idgw.http_port}/api/me").status_code == 401


def test_openapi_is_published(idgw) -> None:
    spec = httpx.get(f"http://127.0.0.1:{idgw.http_port}/openapi.json").json()
    assert "/api/credentials" in spec["paths"] and "/api/me" in spec["paths"]


def test_unknown_connection_is_a_clear_error(idgw) -> None:
    key = idgw.cli_json("apikeys", "create", "--name", "x-bot", "--group", "deployers")
    out = wardgate(idgw, "connect", "shop_nope", env={"WARDGATE_API_KEY": key["key"]}, check=False)
    assert out.returncode == 1 and "no connection named 'shop_nope'" in out.stderr
    assert os.environ.get("WARDGATE_API_KEY") is None


def test_identity_outside_every_group_is_denied_at_every_door(idgw, idp) -> None:
    token = idp.forge(idp.claims(sub="nobody", preferred_username="nobody", groups=["interns"]))
    r = api(idgw, "POST", "/api/credentials", token, json={"connection": "shop"})
    assert r.status_code == 403 and "no access rule allows it" in r.json()["detail"]
    key = idgw.cli_json("apikeys", "create", "--name", "stray-bot", "--group", "marketing")
    out = wardgate(idgw, "connect", "shop", env={"WARDGATE_API_KEY": key["key"]}, check=False)
    assert out.returncode == 1 and "stray-bot (marketing) may not connect" in out.stderr
    # A credential that exists anyway (groups changed after it was issued) is refused at the native door.
    idgw.cli("users", "add", "eve", "--group", "contractors")
    cred = idgw.store().issue_credential("eve", "shop", 600)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(f"postgresql://eve:{cred.secret}@127.0.0.1:{idgw.port}/shop?sslmode=require&application_name=t_eve")
    assert "no access rule allows it" in str(info.value)
    s = idgw.wait_for_session(lambda s: s["application_name"] == "t_eve")
    assert s["status"] == "rejected" and s["error_code"] == "28000"


@pytest.fixture
def signed_in_env(idgw, tmp_path) -> dict:  # noqa: ANN001
    return {"WARDGATE_TOKEN_FILE": str(tmp_path / "cfg" / "tokens.json")}


def test_person_logs_in_with_pkce_and_queries_as_themselves(idgw, idp, signed_in_env) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "wardgate.cli", "--config", str(idgw.config), "login", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**{k: v for k, v in idgw.env.items() if k != "WARDGATE_API_KEY"}, **signed_in_env})
    url = proc.stdout.readline().strip()
    assert url.startswith(f"{idp.issuer}/auth?") and "code_challenge_method=S256" in url
    callback = idp.sign_in(url, "dana")
    assert callback.status_code == 200
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    token_file = signed_in_env["WARDGATE_TOKEN_FILE"]
    assert oct(os.stat(token_file).st_mode & 0o777) == "0o600"
    saved = json.load(open(token_file))
    assert saved["refresh_token"] and saved["access_token"]
    me = json.loads(wardgate(idgw, "whoami", "--json", env=signed_in_env).stdout)
    assert (me["user"], me["groups"], me["kind"]) == ("dana", ["dev"], "user")
    out = wardgate(idgw, "connect", "shop", "--exec", "psql -X -At -c 'select current_user'",
                   env={**signed_in_env, "PGAPPNAME": "t_login"})
    assert out.stdout.strip() == "app"
    assert idgw.wait_for_session(lambda s: s["application_name"] == "t_login")["user"] == "dana"


def test_expired_access_token_is_refreshed(idgw, idp, signed_in_env) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "wardgate.cli", "--config", str(idgw.config), "login", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**idgw.env, **signed_in_env})
    idp.sign_in(proc.stdout.readline().strip(), "dana")
    assert proc.wait(30) == 0
    path = signed_in_env["WARDGATE_TOKEN_FILE"]
    saved = json.load(open(path))
    saved["expires_at"] = 0  # as if the access token had run out
    json.dump(saved, open(path, "w"))
    me = json.loads(wardgate(idgw, "whoami", "--json", env=signed_in_env).stdout)
    assert me["user"] == "dana"
    assert json.load(open(path))["access_token"] != saved["access_token"]
    saved = json.load(open(path))
    saved.update(expires_at=0, refresh_token="not-a-real-refresh-token")
    json.dump(saved, open(path, "w"))
    out = wardgate(idgw, "whoami", env=signed_in_env, check=False)
    assert out.returncode == 1 and "wardgate login" in out.stderr


def test_not_signed_in_says_what_to_do(idgw, signed_in_env) -> None:
    out = wardgate(idgw, "whoami", env=signed_in_env, check=False)
    assert out.returncode == 1 and "wardgate login" in out.stderr


def test_device_flow_login(idgw, idp, signed_in_env) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "wardgate.cli", "--config", str(idgw.config), "login", "--device"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**idgw.env, **signed_in_env})
    url = proc.stdout.readline().strip()
    assert url.startswith(f"{idp.issuer}/device")
    page = idp.sign_in(url, "olivia", device=True)
    assert page.status_code == 200
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    me = json.loads(wardgate(idgw, "whoami", "--json", env=signed_in_env).stdout)
    assert (me["user"], me["groups"]) == ("olivia", ["auditors", "ops"])


def test_refusals_and_issues_are_recorded_as_events(idgw, idp) -> None:
    import time

    marker = f"wgk_{int(time.time())}_forged"
    api(idgw, "GET", "/api/me", marker)
    stray = idp.forge(idp.claims(sub="carl", preferred_username="carl", groups=["sales"]))
    api(idgw, "POST", "/api/credentials", stray, json={"connection": "shop"})
    ok_key = idgw.cli_json("apikeys", "create", "--name", "event-bot", "--group", "deployers")
    assert api(idgw, "POST", "/api/credentials", ok_key["key"], json={"connection": "shop"}).status_code == 200
    deadline = time.time() + 10
    while time.time() < deadline:
        events = idgw.cli_json("events", "--limit", "50")
        kinds = {(e["kind"], e["outcome"], e["user"]) for e in events}
        if {("api.authenticate", "denied", None), ("credential.issue", "denied", "carl"),
                ("credential.issue", "ok", "svc:event-bot")} <= kinds:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"events not recorded: {kinds}")
    denied_auth = [e for e in events if e["kind"] == "api.authenticate" and "not valid" in (e["detail"] or "")]
    assert denied_auth and denied_auth[0]["client_addr"] == "127.0.0.1"
    assert marker not in json.dumps(events)  # the presented secret itself is never stored


def test_a_service_key_cannot_take_over_a_local_users_name(idgw) -> None:
    """A service account named alice is svc:alice, its own identity: never the person alice."""
    key = idgw.cli_json("apikeys", "create", "--name", "alice", "--group", "deployers")
    assert api(idgw, "GET", "/api/me", key["key"]).json()["user"] == "svc:alice"
    r = api(idgw, "POST", "/api/credentials", key["key"], json={"connection": "shop"})
    assert r.status_code == 200 and r.json()["user"] == "svc:alice" and "//svc%3Aalice:" in r.json()["url"]
    assert all(s["user"] == "svc:alice" for s in api(idgw, "GET", "/api/sessions?limit=200", key["key"]).json())


def test_management_roles(idgw, idp) -> None:
    auditor = idp.forge(idp.claims(sub="olivia", preferred_username="olivia", groups=["ops", "auditors"]))
    plain = idp.forge(idp.claims(sub="pat", preferred_username="pat", groups=["dev"]))
    admin = idgw.cli_json("apikeys", "create", "--name", "root-bot", "--group", "wardgate-admins", "--group", "ops")["key"]
    assert api(idgw, "GET", "/api/me", auditor).json()["roles"] == ["auditor"]
    assert api(idgw, "GET", "/api/me", plain).json()["roles"] == []

    # pat gets a credential and uses it; olivia may read pat's session, pat may not read others'
    issued = api(idgw, "POST", "/api/credentials", plain, json={"connection": "shop"}).json()
    with psycopg.connect(issued["url"], application_name="t_pat") as conn:
        conn.execute("select 'pat was here'")
    s = idgw.wait_for_session(lambda s: s["application_name"] == "t_pat" and s["status"] == "closed")
    assert api(idgw, "GET", f"/api/sessions/{s['id']}", auditor).json()["user"] == "pat"
    assert api(idgw, "GET", f"/api/sessions/{s['id']}", plain).json()["statements"][1]["text"] == "select 'pat was here'"
    others = [x for x in api(idgw, "GET", "/api/sessions?limit=200", plain).json() if x["user"] != "pat"]
    assert others == []
    assert api(idgw, "GET", "/api/sessions?user=olivia", plain).status_code == 403
    assert {x["user"] for x in api(idgw, "GET", "/api/sessions?user=pat", auditor).json()} == {"pat"}
    assert api(idgw, "GET", "/api/events", plain).status_code == 403
    assert api(idgw, "GET", "/api/events", auditor).status_code == 200

    # connections the caller may use
    names = {c["name"]: c["verbs"] for c in api(idgw, "GET", "/api/connections", plain).json()}
    assert names["shop"] == ["connect", "exec"]
    stray = idp.forge(idp.claims(sub="sam", preferred_username="sam", groups=["sales"]))
    assert api(idgw, "GET", "/api/connections", stray).json() == []

    # revocation: not someone else's, unless admin; the live session ends
    second = api(idgw, "POST", "/api/credentials", plain, json={"connection": "shop"}).json()
    assert api(idgw, "POST", f"/api/credentials/{second['id']}/revoke", auditor).status_code == 404
    conn = psycopg.connect(second["url"], autocommit=True)
    assert api(idgw, "POST", f"/api/credentials/{second['id']}/revoke", admin).json()["status"] == "revoked"
    with pytest.raises(psycopg.OperationalError):
        for _ in range(40):
            conn.execute("select 1")
            __import__("time").sleep(0.1)
    conn.close()
    third = api(idgw, "POST", "/api/credentials", plain, json={"connection": "shop"}).json()
    assert api(idgw, "POST", f"/api/credentials/{third['id']}/revoke", plain).status_code == 200


def _login(idgw, idp, env: dict, who: str) -> dict:  # noqa: ANN001
    proc = subprocess.Popen([sys.executable, "-m", "wardgate.cli", "--config", str(idgw.config), "login", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**idgw.env, **env})
    idp.sign_in(proc.stdout.readline().strip(), who)
    assert proc.wait(30) == 0
    return json.load(open(env["WARDGATE_TOKEN_FILE"]))


def test_idp_bound_session_lives_while_the_sign_in_holds_and_ends_when_it_does_not(idgw, idp, signed_in_env) -> None:
    _login(idgw, idp, signed_in_env, "dana")
    env = {**{k: v for k, v in idgw.env.items() if k not in ("WARDGATE_API_KEY", "WARDGATE_TOKEN")}, **signed_in_env}
    # outlives several 3 s leases: wardgate connect renews with a fresh sign-in each time
    ok = subprocess.run([sys.executable, "-m", "wardgate.cli", "--config", str(idgw.config), "connect", "shop", "--exec",
                         "psql -X -At -c 'select pg_sleep(7)' -c 'select 42'"], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0 and ok.stdout.split()[-1] == "42", ok.stderr

    proc = subprocess.Popen([sys.executable, "-m", "wardgate.cli", "--config", str(idgw.config), "connect", "shop", "--exec",
                             "psql -X -At -c 'select pg_sleep(60)'"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env, "PGAPPNAME": "t_lease"})
    idgw.wait_for_session(lambda s: s["application_name"] == "t_lease")
    # the IdP ends the person's sign-in: the refresh token no longer works
    tokens = json.load(open(signed_in_env["WARDGATE_TOKEN_FILE"]))
    r = httpx.post(f"{idp.issuer}/token/revocation", data={"token": tokens["refresh_token"], "client_id": "wardgate-cli"})
    assert r.status_code == 200
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "no longer confirmed" in err
    s = idgw.wait_for_session(lambda s: s["application_name"] == "t_lease" and s["status"] == "closed")
    assert s["end_reason"].startswith("credential not renewed")


def test_an_unrenewed_idp_credential_lapses(idgw, idp) -> None:
    import time

    token = idp.forge(idp.claims(sub="quinn", preferred_username="quinn", groups=["dev"]))
    issued = api(idgw, "POST", "/api/credentials", token, json={"connection": "shop"}).json()
    assert issued["renew_every"] == 1.0
    assert api(idgw, "POST", f"/api/credentials/{issued['id']}/renew", token).status_code == 200
    time.sleep(3.5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(issued["url"])
    r = api(idgw, "POST", f"/api/credentials/{issued['id']}/renew", token)
    assert r.status_code == 404 and "lapsed" in r.json()["detail"]


def _forged_variants(idp) -> dict[str, str]:  # noqa: ANN001
    import base64 as b64
    import hashlib as hl
    import hmac as hm
    import time

    from cryptography.hazmat.primitives.asymmetric import rsa
    from joserfc.jwk import KeySet, RSAKey

    def enc(obj: dict) -> str:
        return b64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    stranger = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=2048)).as_dict(private=True)
    public = KeySet.import_key_set({"keys": [k for k in idp.private_keys if k["alg"] == "RS256"]}).keys[0]
    head, body = enc({"alg": "HS256", "kid": public.kid}), enc(idp.claims())
    hs256 = f"{head}.{body}." + b64.urlsafe_b64encode(
        hm.new(public.as_pem(private=False), f"{head}.{body}".encode(), hl.sha256).digest()).rstrip(b"=").decode()
    real = idp.client_credentials()
    h, p, s = real.split(".")
    claims = json.loads(b64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims["groups"] = ["wardgate-admins"]
    return {
        "expired": idp.forge(idp.claims(iat=now - 900, exp=now - 600)),
        "wrong audience": idp.forge(idp.claims(aud="https://other.example")),
        "wrong issuer": idp.forge(idp.claims(iss="https://evil.example")),
        "unknown kid": idp.forge(idp.claims(), key={**stranger, "alg": "RS256", "kid": "not-published"}),
        "alg none": f"{enc({'alg': 'none'})}.{enc(idp.claims())}.",
        "HS256 with the public key": hs256,
        "tampered payload": f"{h}.{enc(claims)}.{s}",
    }


def test_every_forged_token_is_refused_at_the_api_and_recorded(idgw, idp) -> None:
    import time

    for name, token in _forged_variants(idp).items():
        r = api(idgw, "POST", "/api/credentials", token, json={"connection": "shop"})
        assert r.status_code == 401, name
        assert r.json()["detail"], name
    time.sleep(1)
    denied = [e for e in idgw.cli_json("events", "--kind", "api.authenticate", "--outcome", "denied", "--limit", "200")]
    details = " | ".join(e["detail"] or "" for e in denied)
    for fragment in ("expired", "aud", "not accepted here", "does not publish", "'none' is not accepted",
                     "'HS256' is not accepted", "signature"):
        assert fragment in details, fragment


def test_a_person_makes_a_key_for_their_agent_through_the_api(idgw, idp) -> None:
    person = idp.forge(idp.claims(sub="rhea", preferred_username="rhea", groups=["dev"]))
    made = api(idgw, "POST", "/api/apikeys", person, json={"for_agent": "codex", "ttl": "1d"}).json()
    assert (made["user"], made["agent"], made["kind"]) == ("rhea", "codex", "agent")
    me = api(idgw, "GET", "/api/me", made["key"]).json()
    assert (me["user"], me["agent"], me["groups"], me["roles"]) == ("rhea", "codex", ["dev"], [])
    # the agent cannot mint keys, nor may a non-admin make service accounts
    assert api(idgw, "POST", "/api/apikeys", made["key"], json={"for_agent": "other"}).status_code == 403
    assert api(idgw, "POST", "/api/apikeys", person, json={"name": "svc", "groups": ["wardgate-admins"]}).status_code == 403
    mine = api(idgw, "GET", "/api/apikeys", person).json()
    assert [k["id"] for k in mine] == [made["id"]] and all("key" not in k for k in mine)
    other = idp.forge(idp.claims(sub="sol", preferred_username="sol", groups=["dev"]))
    assert api(idgw, "POST", f"/api/apikeys/{made['id']}/revoke", other).status_code == 404
    assert api(idgw, "POST", f"/api/apikeys/{made['id']}/revoke", person).json()["status"] == "revoked"
    assert api(idgw, "GET", "/api/me", made["key"]).status_code == 401


def test_signed_in_person_creates_an_agent_key_from_the_cli(idgw, idp, signed_in_env) -> None:
    _login(idgw, idp, signed_in_env, "dana")
    env = {**{k: v for k, v in idgw.env.items() if k not in ("WARDGATE_API_KEY", "WARDGATE_TOKEN")}, **signed_in_env}
    out = subprocess.run([sys.executable, "-m", "wardgate.cli", "--config", str(idgw.config), "apikeys", "create",
                          "--for-agent", "claude-code", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert (made["user"], made["agent"]) == ("dana", "claude-code")
