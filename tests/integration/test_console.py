"""The web console in a real browser (Debian's Chromium, driven by Playwright): sign in through the
test IdP, see a review that an exec request created appear without reloading, approve it and see the
requester's wait return, open the session and see masked values, make and revoke an API key.
Screenshots of the main pages are saved under the test's output directory."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import IDP_AUDIENCE, make_gateway

CHROMIUM = "/usr/bin/chromium"
TAIL = """
[[identity_providers]]
name = "corp"
issuer = "{issuer}"
audience = "{audience}"
client_id = "wardgate-cli"

[roles]
auditors = ["auditors"]
admins = ["wardgate-admins"]

[recording]
results = "sample"

[[guardrails]]
preset = "standard"
connections = ["shop"]

[[guardrails]]
name = "deletes-need-review"
kinds = ["delete"]
action = "review"
approvers = ["ops"]
connections = ["shop"]

[[masking]]
name = "emails"
columns = ["email"]
connections = ["shop"]
except_groups = ["ops"]
"""


@pytest.fixture(scope="module")
def cgw(tmp_path_factory, pg, idp):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("console"), pg, tail_toml=TAIL.format(issuer=idp.issuer, audience=IDP_AUDIENCE))
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def page(tmp_path):  # noqa: ANN001, ANN201
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        yield context.new_page()
        context.close()
        browser.close()


def shot(page: Page, tmp_path: Path, name: str) -> None:
    out = tmp_path / "screenshots"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)


def sign_in(page: Page, gw, idp, login: str) -> None:  # noqa: ANN001
    page.goto(f"http://127.0.0.1:{gw.http_port}/console/")
    page.get_by_role("link", name="Sign in with corp").click()
    for _ in range(6):  # the IdP's own pages: log in, then confirm
        if page.url.startswith(f"http://127.0.0.1:{gw.http_port}/console"):
            return
        if page.locator("input[name=login]").count():
            page.fill("input[name=login]", login)
            page.fill("input[name=password]", "any")
        page.locator("button[type=submit]").first.click()
        page.wait_for_load_state()
    assert page.url.startswith(f"http://127.0.0.1:{gw.http_port}/console"), page.url


def api(gw, method: str, path: str, key: str, **kw) -> httpx.Response:  # noqa: ANN001, ANN003
    return httpx.request(method, f"http://127.0.0.1:{gw.http_port}{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=90, **kw)


def test_approve_a_review_and_inspect_the_session(cgw, idp, page, tmp_path) -> None:
    alice = cgw.cli_json("apikeys", "create", "--for-agent", "claude-code", "--user", "alice")["key"]
    page.goto(f"http://127.0.0.1:{cgw.http_port}/console/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, tmp_path, "login")
    sign_in(page, cgw, idp, "olivia")
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    expect(page.locator("header.top")).to_contain_text("olivia")
    page.get_by_role("link", name="Reviews").click()
    expect(page.get_by_role("heading", name="Reviews")).to_be_visible()

    held = api(cgw, "POST", "/api/exec", alice, json={"connection": "shop", "sql": "delete from orders where id = -42"}).json()
    assert held["status"] == "pending_approval"
    rid = held["review_id"]
    card = page.locator(f"#review-{rid}")
    expect(card).to_be_visible(timeout=10_000)  # appears by itself: no reload
    expect(card).to_contain_text("delete from orders where id = -42")
    expect(card).to_contain_text("claude-code")
    expect(card.locator(".preview")).to_contain_text("Dry run (EXPLAIN, nothing executed): about")
    expect(card.locator("pre.sql span.kw").first).to_have_text("delete")  # highlighted by PostgreSQL's scanner
    shot(page, tmp_path, "reviews")

    waited: dict = {}
    waiter = threading.Thread(target=lambda: waited.update(
        api(cgw, "GET", f"/api/reviews/{rid}/wait", alice, params={"timeout": 60}).json()))
    waiter.start()
    card.get_by_role("button", name="Approve").click()
    expect(page.locator(".flash")).to_contain_text("approved")
    waiter.join(70)
    assert waited["status"] == "approved"  # the requester's long-poll returned with the decision
    ran = api(cgw, "POST", f"/api/reviews/{rid}/execute", alice).json()
    assert ran["status"] == "completed"

    shown = api(cgw, "POST", "/api/exec", alice, json={"connection": "shop",
                                                       "sql": "select id, email from customers order by id limit 3"}).json()
    assert shown["status"] == "completed"
    masked = shown["rows"][0][1]
    assert "@" not in masked
    page.goto(f"http://127.0.0.1:{cgw.http_port}/console/sessions/{shown['session_id']}")
    expect(page.locator("pre.sql").first).to_contain_text("select id, email from customers")
    expect(page.locator("table.result").first).to_contain_text(masked)
    assert "customer1@example.com" not in page.content()  # an auditor sees what alice saw: masked
    expect(page.locator(".analysis")).to_be_visible()
    page.locator("[data-replay-speed]").select_option("100")
    page.get_by_role("button", name="Replay").click()
    expect(page.locator("[data-replay-clock]")).to_contain_text("done")
    expect(page.locator("article.stmt").first).to_be_visible()
    shot(page, tmp_path, "session")

    page.goto(f"http://127.0.0.1:{cgw.http_port}/console/sessions?user=alice")
    expect(page.get_by_role("cell", name="shop").first).to_be_visible()
    shot(page, tmp_path, "sessions")

    page.get_by_role("link", name="Dashboard").click()
    sessions_chart = page.locator("figure.chart", has_text="Sessions")
    expect(sessions_chart).to_be_visible()
    total = int(sessions_chart.locator("figcaption").inner_text().split("·")[1])
    assert total >= 2  # the approved statement and the masked select, both alice's: an auditor counts everyone's
    expect(page.locator("figure.chart", has_text="Reviews asked for").locator("figcaption")).to_contain_text("1")
    shot(page, tmp_path, "dashboard")


def test_make_and_revoke_an_api_key(cgw, idp, page, tmp_path) -> None:
    sign_in(page, cgw, idp, "dana")
    page.get_by_role("link", name="API keys").click()
    page.fill("input[name=agent]", "browser-test")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("pre.secret").inner_text().strip()
    assert secret.startswith("wgk_")
    me = api(cgw, "GET", "/api/me", secret).json()
    assert (me["user"], me["agent"]) == ("dana", "browser-test")
    shot(page, tmp_path, "keys")
    key_id = secret.split("_")[1]
    page.get_by_role("button", name=f"Revoke key {key_id}").click()
    expect(page.locator(".flash")).to_contain_text(f"Key {key_id} revoked")
    assert api(cgw, "GET", "/api/me", secret).status_code == 401
    page.reload()
    assert secret not in page.content()  # shown once, never again


def test_an_idp_identity_cannot_act_as_the_local_user_of_the_same_name(cgw, idp, page) -> None:
    """The IdP's alice is not the gateway's local user alice: no console session, no API access as her."""
    page.goto(f"http://127.0.0.1:{cgw.http_port}/console/")
    page.get_by_role("link", name="Sign in with corp").click()
    page.fill("input[name=login]", "alice")
    page.fill("input[name=password]", "any")
    page.locator("button[type=submit]").first.click()
    for _ in range(4):
        if "/console/" in page.url:
            break
        page.locator("button[type=submit]").first.click()
    expect(page.locator("main")).to_contain_text("belongs to another identity (local)")
    assert not [c for c in page.context.cookies() if c["name"] == "wardgate_console"]
    token = idp.forge(idp.claims(sub="alice", preferred_username="alice"))
    r = httpx.get(f"http://127.0.0.1:{cgw.http_port}/api/sessions", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and "belongs to another identity (local)" in r.json()["detail"]


def test_forms_need_the_session_token(cgw, idp, page) -> None:
    """A cross-site form post (no CSRF token, foreign origin) is refused, and pages need a signed-in session."""
    anonymous = httpx.get(f"http://127.0.0.1:{cgw.http_port}/console/reviews", follow_redirects=False)
    assert anonymous.status_code == 303 and "/console/login" in anonymous.headers["location"]
    sign_in(page, cgw, idp, "olivia")
    cookie = next(c for c in page.context.cookies() if c["name"] == "wardgate_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    forged = httpx.post(f"http://127.0.0.1:{cgw.http_port}/console/keys", data={"agent": "evil"},
                        cookies={"wardgate_console": cookie["value"]}, headers={"origin": "https://evil.example"})
    assert forged.status_code == 403
    no_token = httpx.post(f"http://127.0.0.1:{cgw.http_port}/console/keys", data={"agent": "evil"},
                          cookies={"wardgate_console": cookie["value"]})
    assert no_token.status_code == 403
    non_ascii = httpx.post(f"http://127.0.0.1:{cgw.http_port}/console/keys", data={"agent": "evil", "csrf": "\u00e9t\u00e9"},
                           cookies={"wardgate_console": cookie["value"]})
    assert non_ascii.status_code == 403  # a non-ASCII token was an internal error (comparing text, not bytes)
    assert not [k for k in cgw.cli_json("apikeys", "list") if k["agent"] == "evil"]
    bad_key = httpx.post(f"http://127.0.0.1:{cgw.http_port}/console/login", data={"api_key": "wgk_nope_nope"})
    assert bad_key.status_code == 401
    cross_site = httpx.post(f"http://127.0.0.1:{cgw.http_port}/console/login", data={"api_key": "wgk_nope_nope"},
                            headers={"origin": "https://evil.example"})
    assert cross_site.status_code == 403


def test_a_sign_in_answer_only_counts_in_the_browser_that_asked(cgw, idp, page) -> None:
    """Login CSRF: a callback link from someone else's sign-in does not sign this browser in."""
    start = httpx.get(f"http://127.0.0.1:{cgw.http_port}/console/login/oidc/corp", follow_redirects=False)
    state = httpx.URL(start.headers["location"]).params["state"]
    page.goto(f"http://127.0.0.1:{cgw.http_port}/console/callback?code=stolen&state={state}")
    expect(page.locator("main")).to_contain_text("Sign-in failed")
    assert not [c for c in page.context.cookies() if c["name"] == "wardgate_console"]
    odd = httpx.get(f"http://127.0.0.1:{cgw.http_port}/console/callback?code=x&state=%C3%A9t%C3%A9")
    assert 400 <= odd.status_code < 500  # a non-ASCII state was an internal error


def test_exec_policies_and_audit_pages(cgw, idp, page, tmp_path) -> None:
    sign_in(page, cgw, idp, "dana")  # known only to the IdP: the console provisions her like the API does
    page.get_by_role("link", name="Exec").click()
    page.fill("textarea[name=sql]", "select id, email from customers order by id limit 2")
    page.get_by_role("button", name="Run").click()
    outcome = page.locator("section.outcome")
    expect(outcome).to_contain_text("completed")
    expect(outcome.locator("table.result")).to_contain_text("[email]")  # masked for dana
    assert "customer1@example.com" not in page.content()
    shot(page, tmp_path, "exec")
    page.fill("textarea[name=sql]", "delete from orders where id = -7")
    page.get_by_role("button", name="Run").click()
    expect(outcome).to_contain_text("pending approval")
    expect(outcome.get_by_role("link")).to_have_attribute("href", re.compile(r"/console/reviews#review-"))

    page.get_by_role("link", name="Policies").click()
    expect(page.get_by_role("cell", name="standard:destructive-ddl")).to_be_visible()
    page.fill("textarea[name=sql]", "drop table orders")
    page.get_by_role("button", name="Check").click()
    expect(page.locator(".verdict")).to_contain_text("deny")
    expect(page.locator(".verdict")).to_contain_text("standard:destructive-ddl")
    expect(page.locator(".verdict")).to_contain_text("Results masked by emails")
    shot(page, tmp_path, "policies")
    page.goto(f"http://127.0.0.1:{cgw.http_port}/console/audit")
    expect(page.locator("main")).to_contain_text("for auditors and admins")  # dana is neither

    page.context.clear_cookies()
    sign_in(page, cgw, idp, "olivia")
    page.get_by_role("link", name="Audit").click()
    page.get_by_role("button", name="Verify the chain").click()
    expect(page.locator(".verify")).to_contain_text("Chain intact")
    expect(page.get_by_role("cell", name="console.authenticate").first).to_be_visible()
    shot(page, tmp_path, "audit")
    exported = page.request.get(f"http://127.0.0.1:{cgw.http_port}/console/audit/export")
    assert exported.ok and "attachment" in exported.headers["content-disposition"]
    seqs = [json.loads(line)["event"]["sequence"] for line in exported.text().splitlines()]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 10


def test_access_credentials_and_connections(cgw, idp, page, pg, tmp_path) -> None:
    from tests.conftest import APP_PASSWORD, psql

    sign_in(page, cgw, idp, "dana")
    page.get_by_role("link", name="Access").click()
    assert "WARDGATE_CONN_SHOP_PASSWORD" not in page.content() and "127.0.0.1:" not in page.locator("main table").first.inner_text()
    page.get_by_role("button", name="Issue a credential").click()
    url = page.locator("pre.secret").inner_text().removeprefix('psql "').removesuffix('"')
    assert url.startswith("postgresql://dana:wgc_")
    dsn = url.replace("sslmode=require", "sslmode=require&application_name=t_console")
    assert psql(dsn, "-Atc", "select 1").stdout.strip() == "1"  # a real client with the credential from the page
    cred_id = url.split("wgc_")[1].split("_")[0]
    page.get_by_role("button", name=f"Revoke credential {cred_id}").click()
    expect(page.locator(".flash")).to_contain_text(f"Credential {cred_id} revoked")
    assert psql(dsn, "-Atc", "select 1", check=False).returncode != 0
    shot(page, tmp_path, "access")

    admin_key = cgw.cli_json("apikeys", "create", "--name", "console-admin", "--group", "wardgate-admins")["key"]
    page.context.clear_cookies()
    page.goto(f"http://127.0.0.1:{cgw.http_port}/console/login")
    page.fill("input[name=api_key]", admin_key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name="Access").click()
    page.get_by_text("Add or change a connection").click()
    page.fill("input[name=name] >> nth=0", "shop_console")
    page.fill("input[name=host]", "127.0.0.1")
    page.fill("input[name=port]", str(pg.port))
    page.fill("input[name=database]", "shop")
    page.fill("input[name=user]", "app")
    page.fill("input[name=password]", APP_PASSWORD)
    page.locator("select[name=sslmode]").select_option("disable")
    page.get_by_role("button", name="Add").click()
    expect(page.locator(".flash")).to_contain_text("Connection shop_console added")
    expect(page.get_by_role("cell", name="shop_console")).to_be_visible()
    assert APP_PASSWORD not in page.content()
    made = next(e for e in cgw.cli_json("events", "--kind", "connection.create") if "shop_console" in e["detail"])
    assert made["source"] == "console" and made["user"] == "svc:console-admin" and APP_PASSWORD not in made["detail"]
    expect(page.get_by_role("cell", name="dana", exact=True)).to_be_visible()  # users and their groups, for admins


def test_a_local_user_signs_in_with_a_one_time_link(cgw, page) -> None:
    link = cgw.cli("users", "login-link", "bob").stdout.strip()
    assert link.startswith(f"http://127.0.0.1:{cgw.http_port}/console/login/link?token=")
    page.goto(link)
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    expect(page.locator("header.top")).to_contain_text("bob")
    page.context.clear_cookies()
    page.goto(link)  # used already
    expect(page.locator("main")).to_contain_text("not valid")
    token = link.split("token=")[1]
    forged = token.replace(token.split(".")[0], "YWxpY2U")  # the same link, rewritten for alice
    page.goto(link.split("token=")[0] + "token=" + forged)
    expect(page.locator("main")).to_contain_text("not valid")
    assert cgw.cli("users", "login-link", "nobody-here", check=False).returncode == 1
    events = cgw.cli_json("events", "--kind", "console.authenticate", "--limit", "200")
    assert {("ok", "bob")} <= {(e["outcome"], e["user"]) for e in events}
    assert len([e for e in events if e["outcome"] == "denied" and "link" in e["detail"]]) >= 2


def sign_in_with_key(page: Page, gw, key: str) -> None:  # noqa: ANN001
    page.goto(f"http://127.0.0.1:{gw.http_port}/console/login")
    page.fill("input[name=api_key]", key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()


def test_admins_manage_users_and_groups(cgw, page, tmp_path) -> None:
    admin_key = cgw.cli_json("apikeys", "create", "--name", "users-admin", "--group", "wardgate-admins")["key"]
    sign_in_with_key(page, cgw, admin_key)
    page.get_by_role("link", name="Access").click()
    page.get_by_text("Add a local user").click()
    form = page.locator("form", has=page.get_by_role("button", name="Add user"))
    form.locator("input[name=name]").fill("erin")
    form.locator("input[name=groups]").fill("analysts")
    form.get_by_role("button", name="Add user").click()
    expect(page.locator(".flash")).to_contain_text("User erin added")
    expect(page.get_by_role("textbox", name="Groups of erin")).to_have_value("analysts")

    # erin signs in (another browser), then an admin changes her groups: her console session ends at once
    other = page.context.browser.new_context()
    erin = other.new_page()
    erin.goto(cgw.cli("users", "login-link", "erin").stdout.strip())
    expect(erin.locator("header.top")).to_contain_text("erin")
    page.get_by_role("textbox", name="Groups of erin").fill("analysts, oncall")
    page.get_by_role("button", name="Save the groups of erin").click()
    expect(page.locator(".flash")).to_contain_text("User erin: groups analysts, oncall")
    expect(page.get_by_role("row", name=re.compile(r"^oncall"))).to_contain_text("erin")
    erin.reload()
    expect(erin.get_by_role("button", name="Sign in")).to_be_visible()  # signed out: the old groups are gone
    assert cgw.store().get_user("erin").groups == ["analysts", "oncall"]
    shot(page, tmp_path, "users")

    # erin signs in again; removing her ends that console session too, and her link does not work after
    erin.goto(cgw.cli("users", "login-link", "erin").stdout.strip())
    expect(erin.locator("header.top")).to_contain_text("erin")
    unused = cgw.cli("users", "login-link", "erin").stdout.strip()
    page.get_by_role("button", name="Remove user erin").click()
    expect(page.locator(".flash")).to_contain_text("User erin removed")
    erin.reload()
    expect(erin.get_by_role("button", name="Sign in")).to_be_visible()
    erin.goto(unused)
    expect(erin.locator("main")).to_contain_text("not valid")
    expect(page.get_by_role("textbox", name="Groups of erin")).to_have_count(0)
    kinds = {e["kind"]: e for e in cgw.cli_json("events", "--limit", "50") if "erin" in (e["detail"] or "")}
    assert {"user.create", "user.groups", "user.remove"} <= set(kinds)
    assert kinds["user.groups"]["source"] == "console" and kinds["user.groups"]["user"] == "svc:users-admin"

    # Not for everyone: a non-admin's forged form is refused, and nothing changes
    key = cgw.cli_json("apikeys", "create", "--name", "not-admin", "--group", "dev")["key"]
    sign_in_with_key(erin, cgw, key)
    csrf = erin.locator("input[name=csrf]").first.get_attribute("value")
    answer = erin.request.post(f"http://127.0.0.1:{cgw.http_port}/console/users",
                               form={"csrf": csrf, "action": "add-user", "name": "mallory", "groups": "wardgate-admins"})
    assert answer.status == 403 and cgw.store().get_user("mallory") is None
    other.close()


def test_console_sessions_and_used_links_outlive_a_restart(cgw, page) -> None:
    link = cgw.cli("users", "login-link", "bob").stdout.strip()
    page.goto(link)
    expect(page.locator("header.top")).to_contain_text("bob")
    key = cgw.cli_json("apikeys", "create", "--name", "restart-key", "--group", "dev")
    other = page.context.browser.new_context()
    keyed = other.new_page()
    sign_in_with_key(keyed, cgw, key["key"])
    cgw.stop()
    cgw.start()  # or another replica on the same store
    page.reload()
    expect(page.locator("header.top")).to_contain_text("bob")  # still signed in
    page.context.clear_cookies()
    page.goto(link)  # used before the restart: still used
    expect(page.locator("main")).to_contain_text("not valid")
    # A session signed in with an API key ends with the key
    keyed.reload()
    expect(keyed.get_by_role("heading", name="Dashboard")).to_be_visible()
    cgw.cli("apikeys", "revoke", key["id"])
    keyed.reload()
    expect(keyed.get_by_role("button", name="Sign in")).to_be_visible()
    other.close()


AXE = Path(__file__).parents[1] / "browser" / "node_modules" / "axe-core" / "axe.min.js"


def test_pages_are_accessible_and_fit_a_narrow_screen(cgw, tmp_path) -> None:
    """axe-core (WCAG 2 A and AA rules) finds nothing serious on any page, at desktop width and on a
    phone-sized screen, where no page scrolls sideways."""
    assert AXE.exists(), "run `make test` (it installs tests/browser's npm packages)"
    admin_key = cgw.cli_json("apikeys", "create", "--name", "a11y-admin", "--group", "wardgate-admins")["key"]
    from tests.conftest import psql

    psql(cgw.dsn(cgw.credential("alice"), application_name="t_a11y"), "-Atc", "select email from customers limit 3")
    sid = next(s["id"] for s in cgw.cli_json("sessions", "list") if s["application_name"] == "t_a11y")
    paths = ["/console/login", "/console/dashboard", "/console/reviews", "/console/sessions", f"/console/sessions/{sid}",
             "/console/exec", "/console/access", "/console/policies", "/console/audit", "/console/keys"]
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        for width, height in ((1200, 900), (390, 844)):
            # The console's CSP rightly refuses injected scripts; the checker needs them.
            context = browser.new_context(viewport={"width": width, "height": height}, bypass_csp=True)
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{cgw.http_port}/console/login")
            for path in paths:
                if path == "/console/dashboard":
                    sign_in_with_key(page, cgw, admin_key)
                page.goto(f"http://127.0.0.1:{cgw.http_port}{path}")
                page.add_script_tag(path=str(AXE))
                found = page.evaluate("""async () => (await axe.run(document, {runOnly: ["wcag2a", "wcag2aa", "wcag21a",
                    "wcag21aa", "best-practice"]})).violations.filter(v => ["serious", "critical"].includes(v.impact))
                    .map(v => v.id + ": " + v.help + " at " + v.nodes.slice(0, 3).map(n => n.target.join(" ")).join(", "))""")
                problems += [f"{path} ({width}px): {f}" for f in found]
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                if overflow > 1:
                    problems.append(f"{path} ({width}px): the page scrolls sideways by {overflow}px")
                shot(page, tmp_path, f"{path.removeprefix('/console/').replace('/', '-')[:24]}-{width}px")
            context.close()
        browser.close()
    assert not problems, "\n".join(problems)
