"""Identity lifecycle through the real doors: removed means removed (every credential, key, console
session, grant and review of it), records follow a stable id and not a name, service accounts have
their own namespace, and an IdP person is keyed by the token's subject."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest

from tests.conftest import APP_PASSWORD, idp_toml, make_gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pg, idp):  # noqa: ANN001, ANN201
    tail = idp_toml(idp) + f"""
[[access]]
name = "vault-jit"
groups = ["dev"]
connections = ["vault"]
approvers = ["dba"]
max_duration = "1h"

[[connections]]
name = "vault"
host = "127.0.0.1"
port = {pg.port}
database = "shop"
user = "trustuser"
sslmode = "require"

[[guardrails]]
name = "deletes-need-review"
kinds = ["delete"]
action = "review"
approvers = ["dba"]
connections = ["shop"]

[[guardrails]]
name = "truncates-need-two"
kinds = ["truncate"]
action = "review"
approvers = ["dba"]
min_approvals = 2
connections = ["shop"]
"""
    g = make_gateway(tmp_path_factory.mktemp("identities"), pg, tail_toml=tail)
    g.start()
    yield g
    g.stop()


def api(gw, method: str, path: str, bearer: str, **kw) -> httpx.Response:  # noqa: ANN001, ANN003
    return httpx.request(method, f"http://127.0.0.1:{gw.http_port}{path}", headers={"Authorization": f"Bearer {bearer}"},
                         timeout=30, **kw)


def person(idp, sub: str, name: str, groups: list[str], **extra) -> str:  # noqa: ANN001, ANN003
    return idp.forge(idp.claims(sub=sub, preferred_username=name, groups=groups, **extra))


def agent_key(gw, bearer: str, agent: str) -> dict:  # noqa: ANN001
    r = api(gw, "POST", "/api/apikeys", bearer, json={"for_agent": agent})
    assert r.status_code == 200, r.text
    return r.json()


def ask_review(gw, bearer: str, sql: str) -> str:  # noqa: ANN001
    r = api(gw, "POST", "/api/exec", bearer, json={"connection": "shop", "sql": sql})
    assert r.json()["status"] == "pending_approval", r.text
    return r.json()["review_id"]


def admin_key(gw) -> str:  # noqa: ANN001
    return gw.cli_json("apikeys", "create", "--name", f"root-{time.monotonic_ns()}", "--group", "wardgate-admins")["key"]


def session_ended(pg_conn: psycopg.Connection) -> bool:
    try:
        pg_conn.execute("select 1")
    except psycopg.Error:
        return True
    return False


def test_removing_an_idp_person_ends_every_credential_and_keeps_them_out(gw, idp) -> None:  # noqa: ANN001
    carol = person(idp, "carol-sub", "carol", ["dev"])
    dora = person(idp, "dora-sub", "dora", ["dba"])
    issued = api(gw, "POST", "/api/credentials", carol, json={"connection": "shop"}).json()
    live = psycopg.connect(issued["url"], application_name="t_carol_live", autocommit=True)
    live.execute("select 'carol was here'")
    key = agent_key(gw, carol, "helper")
    pending = ask_review(gw, carol, "delete from orders where id = -1")
    approved = ask_review(gw, carol, "delete from orders where id = -2")
    assert api(gw, "POST", f"/api/reviews/{approved}/approve", dora, json={}).json()["status"] == "approved"
    grant = api(gw, "POST", "/api/grants", carol, json={"connection": "vault", "duration": "30m", "reason": "t"}).json()
    assert api(gw, "POST", f"/api/reviews/{grant['review_id']}/approve", dora, json={}).json()["status"] == "approved"
    assert api(gw, "GET", "/api/me", key["key"]).status_code == 200
    carol_uid = api(gw, "GET", "/api/me", carol).json()["uid"]

    out = gw.cli("users", "remove", "carol")
    assert "removed carol" in out.stdout

    # every door refuses her, the still-valid token included, and she is not made again
    for bearer in (carol, key["key"]):
        r = api(gw, "GET", "/api/me", bearer)
        assert r.status_code == 401, r.text
    assert "removed" in api(gw, "GET", "/api/me", carol).json()["detail"]
    assert all(u["name"] != "carol" for u in gw.cli_json("users", "list"))
    deadline = time.monotonic() + 30
    while not session_ended(live):  # the revoked credential ends the live session (an event, polled)
        assert time.monotonic() < deadline, "carol's live native session was not ended"
        time.sleep(0.2)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(issued["url"], connect_timeout=10).close()
    admin = admin_key(gw)
    for review_id in (pending, approved, grant["review_id"]):
        assert api(gw, "GET", f"/api/reviews/{review_id}", admin).json()["status"] == "revoked"
    assert gw.store().active_grants(carol_uid) == {}

    # someone new of the same name (another subject) starts with nothing
    carol2 = person(idp, "carol-2-sub", "carol", ["dev"])
    me = api(gw, "GET", "/api/me", carol2).json()
    assert me["user"] == "carol"
    assert api(gw, "GET", "/api/sessions?limit=200", carol2).json() == []
    assert api(gw, "GET", "/api/apikeys", carol2).json() == []
    assert api(gw, "GET", "/api/grants", carol2).json() == []
    r = api(gw, "POST", f"/api/reviews/{approved}/execute", carol2, json={})
    assert r.status_code in (403, 404, 409)
    assert api(gw, "GET", f"/api/reviews/{approved}", carol2).status_code == 404

    # restoring: refused while the name is taken; then the old identity's token works, its keys do not
    assert gw.cli("users", "restore", "carol", check=False).returncode != 0
    gw.cli("users", "remove", "carol")
    ambiguous = gw.cli("users", "restore", "carol", check=False)
    assert ambiguous.returncode != 0 and carol_uid in ambiguous.stderr + ambiguous.stdout
    gw.cli("users", "restore", carol_uid)
    assert api(gw, "GET", "/api/me", carol).status_code == 200
    assert api(gw, "GET", "/api/me", key["key"]).status_code == 401
    mine = api(gw, "GET", "/api/sessions?limit=200", carol).json()
    assert any(s["application_name"] == "t_carol_live" for s in mine)
    assert api(gw, "GET", "/api/me", carol2).status_code == 401  # the second carol is removed now


def test_a_readded_local_name_starts_with_nothing(gw, idp) -> None:  # noqa: ANN001
    gw.cli("users", "add", "erin", "--group", "dev")
    old_key = gw.cli_json("apikeys", "create", "--for-agent", "bot", "--user", "erin")
    r = api(gw, "POST", "/api/exec", old_key["key"], json={"connection": "shop", "sql": "select 'old erin'"})
    assert r.json()["status"] == "completed", r.text
    link = gw.cli("users", "login-link", "erin").stdout.strip()
    gw.cli("users", "remove", "erin")
    gw.cli("users", "add", "erin", "--group", "dev")

    assert api(gw, "GET", "/api/me", old_key["key"]).status_code == 401  # not revived with the new erin's groups
    new_key = gw.cli_json("apikeys", "create", "--for-agent", "bot", "--user", "erin")
    assert api(gw, "GET", "/api/sessions?limit=200", new_key["key"]).json() == []
    assert [k["id"] for k in api(gw, "GET", "/api/apikeys", new_key["key"]).json()] == [new_key["id"]]
    # the old erin's sign-in link does not sign in the new one
    r = httpx.get(link, follow_redirects=False, timeout=30)
    assert r.status_code == 401
    # native: the old erin's credential is revoked, the new one's works and records the new identity
    cred = gw.credential("erin")
    with psycopg.connect(gw.dsn(cred), application_name="t_new_erin") as conn:
        conn.execute("select 1")
    s = gw.wait_for_session(lambda s: s["application_name"] == "t_new_erin" and s["status"] == "closed")
    assert [x["id"] for x in api(gw, "GET", "/api/sessions?limit=200", new_key["key"]).json()] == [s["id"]]


def test_removed_local_user_is_signed_out_of_the_console(gw) -> None:  # noqa: ANN001
    gw.cli("users", "add", "gina", "--group", "dev")
    link = gw.cli("users", "login-link", "gina").stdout.strip()
    with httpx.Client(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30) as browser:
        assert browser.get(link, follow_redirects=True).status_code == 200
        assert browser.get("/console/sessions", follow_redirects=False).status_code == 200
        gw.cli("users", "remove", "gina")
        r = browser.get("/console/sessions", follow_redirects=False)
        assert r.status_code in (302, 303) and "/console/login" in r.headers["location"]


def test_service_accounts_have_their_own_namespace(gw, idp) -> None:  # noqa: ANN001
    svc = gw.cli_json("apikeys", "create", "--name", "ci", "--group", "deployers")
    assert svc["user"] == "svc:ci"
    # a person whose display name is the service's: a different identity, which sees none of its keys
    ci_person = person(idp, "ci-person", "ci", ["dev"])
    assert api(gw, "GET", "/api/me", ci_person).json()["user"] == "ci"
    assert api(gw, "GET", "/api/apikeys", ci_person).json() == []
    assert api(gw, "POST", f"/api/apikeys/{svc['id']}/revoke", ci_person).status_code == 404
    assert api(gw, "GET", "/api/me", svc["key"]).status_code == 200
    # no token may name a person into the service namespace
    r = api(gw, "GET", "/api/me", person(idp, "sneaky", "svc:ci", ["dev"]))
    assert r.status_code == 401 and "not a valid user name" in r.json()["detail"]
    # a service key named after an approver, with the approvers' group, is not that approver
    requester = person(idp, "hal-sub", "hal", ["dev"])
    review_id = ask_review(gw, requester, "delete from orders where id = -3")
    person(idp, "ivy-sub", "ivy", ["dba"])
    fake = gw.cli_json("apikeys", "create", "--name", "ivy", "--group", "dba")
    r = api(gw, "POST", f"/api/reviews/{review_id}/approve", fake["key"], json={})
    assert r.status_code in (403, 404), r.text
    admin = admin_key(gw)
    assert api(gw, "GET", f"/api/reviews/{review_id}", admin).json()["status"] == "pending"
    # removing a service account ends its keys
    gw.cli("users", "remove", "svc:ci")
    assert api(gw, "GET", "/api/me", svc["key"]).status_code == 401


def test_an_idp_person_is_keyed_by_subject_not_by_name(gw, idp) -> None:  # noqa: ANN001
    frank = person(idp, "frank-sub", "frank", ["dev"])
    me = api(gw, "GET", "/api/me", frank).json()
    ran = api(gw, "POST", "/api/exec", frank, json={"connection": "shop", "sql": "select 'frank'"})
    assert ran.json()["status"] == "completed", ran.text
    # another subject taking the name is refused; the same subject renamed keeps its identity and history
    r = api(gw, "GET", "/api/me", person(idp, "other-sub", "frank", ["dev", "wardgate-admins"]))
    assert r.status_code == 401 and "belongs to another identity" in r.json()["detail"]
    renamed = person(idp, "frank-sub", "franklin", ["dev"])
    me2 = api(gw, "GET", "/api/me", renamed).json()
    assert (me2["user"], me2["uid"]) == ("franklin", me["uid"])
    sid = ran.json()["session_id"]
    gw.wait_for_session(lambda s: s["id"] == sid)  # recorded (the journal is applied in the background)
    assert [s["user"] for s in api(gw, "GET", "/api/sessions?limit=200", renamed).json()] == ["frank"]


def test_a_lease_is_renewed_only_with_the_idp_token(gw, idp) -> None:  # noqa: ANN001
    kim = person(idp, "kim-sub", "kim", ["dev"])
    issued = api(gw, "POST", "/api/credentials", kim, json={"connection": "shop"}).json()
    assert issued["renew_every"]
    key = agent_key(gw, kim, "helper")
    r = api(gw, "POST", f"/api/credentials/{issued['id']}/renew", key["key"])
    assert r.status_code == 404 and "sign-in's token" in r.json()["detail"]
    assert api(gw, "POST", f"/api/credentials/{issued['id']}/renew", kim).status_code == 200


@pytest.mark.parametrize("act", ["claude", {}, {"sub": ""}, ["claude"], {"client_id": "x"}])
def test_a_malformed_act_claim_is_refused(gw, idp, act) -> None:  # noqa: ANN001
    r = api(gw, "GET", "/api/me", person(idp, "alice-idp", "lee", ["dev"], act=act))
    assert r.status_code == 401 and "act claim" in r.json()["detail"]


def test_an_agent_key_acts_with_the_groups_the_idp_last_confirmed(gw, idp) -> None:  # noqa: ANN001
    mona = person(idp, "mona-sub", "mona", ["dev"])
    key = agent_key(gw, mona, "helper")
    assert api(gw, "GET", "/api/me", key["key"]).json()["groups"] == ["dev"]
    # the IdP now says mona is in ops only: her agent's next request acts with that
    api(gw, "GET", "/api/me", person(idp, "mona-sub", "mona", ["ops"]))
    assert api(gw, "GET", "/api/me", key["key"]).json()["groups"] == ["ops"]
    # no token of hers for longer than [credentials] agent_recheck: the key waits for her next sign-in
    with gw.store().engine.begin() as conn:
        conn.exec_driver_sql("UPDATE users SET seen_at = 0 WHERE name = 'mona'")
    r = api(gw, "GET", "/api/me", key["key"])
    assert r.status_code == 401 and "sign in to Wardgate again" in r.json()["detail"]
    api(gw, "GET", "/api/me", mona)
    assert api(gw, "GET", "/api/me", key["key"]).status_code == 200


def test_an_agent_key_revokes_only_itself(gw, idp) -> None:  # noqa: ANN001
    nora = person(idp, "nora-sub", "nora", ["dev"])
    first, second = agent_key(gw, nora, "one"), agent_key(gw, nora, "two")
    assert api(gw, "POST", f"/api/apikeys/{second['id']}/revoke", first["key"]).status_code == 404
    assert api(gw, "GET", "/api/me", second["key"]).status_code == 200
    assert api(gw, "POST", f"/api/apikeys/{first['id']}/revoke", first["key"]).status_code == 200
    assert api(gw, "GET", "/api/me", first["key"]).status_code == 401


def test_an_approved_review_runs_only_for_the_agent_that_asked(gw, idp) -> None:  # noqa: ANN001
    otto = person(idp, "otto-sub", "otto", ["dev"])
    dora = person(idp, "dora-sub", "dora", ["dba"])
    asking, other = agent_key(gw, otto, "asker"), agent_key(gw, otto, "other")
    review_id = ask_review(gw, asking["key"], "delete from orders where id = -4")
    assert api(gw, "POST", f"/api/reviews/{review_id}/approve", dora, json={}).json()["status"] == "approved"
    for bearer in (other["key"], otto):
        r = api(gw, "POST", f"/api/reviews/{review_id}/execute", bearer, json={})
        assert r.status_code == 403 and "asker" in r.json()["detail"], r.text
    r = api(gw, "POST", f"/api/reviews/{review_id}/execute", asking["key"], json={})
    assert r.json()["status"] == "completed", r.text


def test_no_name_can_block_its_removal(gw, idp) -> None:  # noqa: ANN001
    """'#' marks removed identities and a name fits its column: names that could collide with a removed
    one or overflow are refused at every door, and removal of the longest allowed name works."""
    for name in ("x#removed-1", "y" * 121):
        r = api(gw, "GET", "/api/me", person(idp, f"sub-{len(name)}", name, ["dev"]))
        assert r.status_code == 401 and "not a valid user name" in r.json()["detail"], r.text
    service = idp.forge(idp.claims(sub="bad#client", client_id="bad#client", preferred_username=None))
    r = api(gw, "GET", "/api/me", service)
    assert r.status_code == 401 and "not a valid service name" in r.json()["detail"], r.text
    assert gw.cli("users", "add", "bad#name", check=False).returncode != 0
    assert gw.cli("apikeys", "create", "--name", "s" * 117, "--group", "dev", check=False).returncode != 0
    longest = "l" * 120
    r = api(gw, "GET", "/api/me", person(idp, "longest-sub", longest, ["dev"]))
    assert r.status_code == 200, r.text
    gw.cli("users", "remove", longest)
    assert api(gw, "GET", "/api/me", person(idp, "longest-sub", longest, ["dev"])).status_code == 401
    removed = {u["name"]: u for u in gw.cli_json("users", "list", "--removed")}
    assert removed[longest]["removed_at"]


def test_names_that_read_alike_are_one_name(gw, idp) -> None:  # noqa: ANN001
    gw.cli("users", "add", "Quinn", "--group", "dev")
    out = gw.cli("users", "add", "quinn", check=False)
    assert out.returncode != 0 and "reads like" in out.stderr + out.stdout
    for lookalike in ("quinn", "\uff31uinn"):  # the same letters in another case, or full width
        r = api(gw, "GET", "/api/me", person(idp, f"alike-{lookalike}", lookalike, ["dev", "wardgate-admins"]))
        assert r.status_code == 401 and "reads" in r.json()["detail"], r.text
    # restoring names the identity exactly: not another case of it (SQLite's LIKE would match one)
    gw.cli("users", "remove", "Quinn")
    assert gw.cli("users", "restore", "quinn", check=False).returncode != 0
    gw.cli("users", "restore", "Quinn")
    assert any(u["name"] == "Quinn" for u in gw.cli_json("users", "list"))


def test_a_removed_person_does_not_come_back_as_a_service(gw, idp) -> None:  # noqa: ANN001
    rex = person(idp, "rex-sub", "rex", ["dev"])
    assert api(gw, "GET", "/api/me", rex).status_code == 200
    gw.cli("users", "remove", "rex")
    as_service = idp.forge(idp.claims(sub="rex-sub", client_id="rex-sub", preferred_username="rex", groups=["dba"]))
    r = api(gw, "GET", "/api/me", as_service)
    assert r.status_code == 401 and "removed" in r.json()["detail"], r.text
    assert not any(u["name"] == "svc:rex" for u in gw.cli_json("users", "list"))


def test_a_restore_revives_nothing_issued_before_the_removal(gw) -> None:  # noqa: ANN001
    gw.cli("users", "add", "pia", "--group", "dev")
    link = gw.cli("users", "login-link", "pia").stdout.strip()
    key = gw.cli_json("apikeys", "create", "--for-agent", "bot", "--user", "pia")
    cred = gw.credential("pia")
    gw.cli("users", "remove", "pia")
    # as if the key and the credential had been issued while the removal committed (not revoked by it)
    with gw.store().engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE api_keys SET revoked_at = NULL WHERE id = '{key['id']}'")
        conn.exec_driver_sql(f"UPDATE credentials SET revoked_at = NULL WHERE id = '{cred['id']}'")
    gw.cli("users", "restore", "pia")
    assert api(gw, "GET", "/api/me", key["key"]).status_code == 401
    assert httpx.get(link, follow_redirects=False, timeout=30).status_code == 401
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gw.dsn(cred), connect_timeout=10).close()
    fresh = gw.cli_json("apikeys", "create", "--for-agent", "bot", "--user", "pia")
    assert api(gw, "GET", "/api/me", fresh["key"]).status_code == 200


def test_a_console_session_is_checked_against_the_store_on_every_page(gw, idp) -> None:  # noqa: ANN001
    # an agent key's console session acts with its person's groups as the IdP last gave them
    vic = person(idp, "vic-sub", "vic", ["dev"])
    key = agent_key(gw, vic, "helper")
    with httpx.Client(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30) as browser:
        page = browser.post("/console/login", data={"api_key": key["key"]}, follow_redirects=True)
        assert page.status_code == 200
        assert "<option selected>shop</option>" in browser.get("/console/exec").text
        api(gw, "GET", "/api/me", person(idp, "vic-sub", "vic", ["sales"]))  # the IdP no longer says dev
        assert "No connection allows you exec" in browser.get("/console/exec").text
    # a console session written while its user's removal committed is refused, and stays so after a restore
    def put_back(rows: list) -> None:  # the rows as a sign-in racing the removal would write them
        with gw.store().engine.begin() as conn:
            for row in rows:
                conn.exec_driver_sql("INSERT INTO console_state (key, data, expires_at, user_name, user_id) "
                                     "VALUES (?, ?, ?, ?, ?)", tuple(row))

    gw.cli("users", "add", "rue", "--group", "dev")
    link = gw.cli("users", "login-link", "rue").stdout.strip()
    with httpx.Client(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30) as browser:
        assert browser.get(link, follow_redirects=True).status_code == 200
        with gw.store().engine.begin() as conn:
            rows = conn.exec_driver_sql("SELECT key, data, expires_at, user_name, user_id FROM console_state "
                                        "WHERE user_name = 'rue'").fetchall()
        gw.cli("users", "remove", "rue")
        put_back(rows)
        r = browser.get("/console/sessions", follow_redirects=False)
        assert r.status_code in (302, 303) and "/console/login" in r.headers["location"]
        gw.cli("users", "restore", "rue")
        put_back(rows)
        r = browser.get("/console/sessions", follow_redirects=False)
        assert r.status_code in (302, 303) and "/console/login" in r.headers["location"]


def test_approvals_count_identities_not_names(gw, idp, pg) -> None:  # noqa: ANN001
    asker = person(idp, "tess-sub", "tess", ["dev"])
    review_id = ask_review(gw, asker, "truncate orders")
    wes = person(idp, "wes-sub", "wes", ["dba"])
    assert api(gw, "POST", f"/api/reviews/{review_id}/approve", wes, json={}).json()["status"] == "pending"
    # the same approver under a new name (the IdP renamed them) is still one approver
    wesley = person(idp, "wes-sub", "wesley", ["dba"])
    r = api(gw, "POST", f"/api/reviews/{review_id}/approve", wesley, json={})
    assert r.status_code == 409 and "approved this review already" in r.json()["detail"], r.text
    admin = admin_key(gw)
    view = api(gw, "GET", f"/api/reviews/{review_id}", admin).json()
    assert (view["status"], view["approvals"]) == ("pending", 1)
    assert api(gw, "POST", f"/api/reviews/{review_id}/approve", person(idp, "yan-sub", "yan", ["dba"]),
               json={}).json()["status"] == "approved"
    with psycopg.connect(pg.dsn("app", APP_PASSWORD, "shop")) as db:
        assert db.execute("select count(*) from orders").fetchone()[0] > 0  # approved, not run


def test_two_keys_with_one_agent_name_are_two_agents(gw, idp) -> None:  # noqa: ANN001
    """An agent is its key, not its name: a key its person made later with the same name does not run the
    review the first one asked for (nor does the first one's name, once that key is revoked)."""
    uri = person(idp, "uri-sub", "uri", ["dev"])
    dora = person(idp, "dora-sub", "dora", ["dba"])
    first, second = agent_key(gw, uri, "claude"), agent_key(gw, uri, "claude")
    review_id = ask_review(gw, first["key"], "delete from orders where id = -5")
    assert api(gw, "POST", f"/api/reviews/{review_id}/approve", dora, json={}).json()["status"] == "approved"
    r = api(gw, "POST", f"/api/reviews/{review_id}/execute", second["key"], json={})
    assert r.status_code == 403, r.text
    r = api(gw, "POST", f"/api/reviews/{review_id}/execute", first["key"], json={})
    assert r.json()["status"] == "completed", r.text
