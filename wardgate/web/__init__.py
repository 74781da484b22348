"""The web console for people, at /console: server-rendered pages over the same Gateway calls as the
API (reviews, sessions, API keys), with no front-end build and nothing fetched from elsewhere.

Sign-in: the configured identity provider (authorization code with PKCE; the access token is
verified like any other and kept only on the server), or an API key pasted once (local users on the
embedded default). The browser holds a random session id in an HttpOnly, SameSite=Lax cookie
(Secure over HTTPS); every form carries a per-session CSRF token, and a POST must also come from
this origin. Console sessions, pending sign-ins and used sign-in links live in the store (by the
SHA-256 of what the browser holds), so every replica knows them and a restart forgets none.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from pglast.parser import scan
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles

from ..config import ConfigError, ConnectionSpec, parse_duration
from ..domain import Identity
from ..engines.postgres import upstream
from ..engines.postgres.stream import PeerClosed
from ..identity import AuthenticationError, LockedOut
from ..identity.login import authorization_url, exchange_code, pkce_pair
from ..recording.views import iso, list_sessions, siem_event
from ..reviews import ReviewError
from ..sql.classify import Classification, classify
from ..store import Actor, Conflict, NotFound

if TYPE_CHECKING:
    from ..app import Gateway

log = logging.getLogger("wardgate.web")
HERE = Path(__file__).parent
COOKIE = "wardgate_console"
STATE_COOKIE = "wardgate_sign_in"
SESSION_TTL = 8 * 3600
PENDING_SIGN_IN_TTL = 600


_TOKEN_CLASS = {"SCONST": "str", "USCONST": "str", "BCONST": "str", "XCONST": "str", "ICONST": "num", "FCONST": "num",
                "SQL_COMMENT": "cmt", "C_COMMENT": "cmt", "PARAM": "num"}


def highlight_sql(text: str) -> Markup:
    """SQL as HTML, coloured by PostgreSQL's own scanner (keywords, strings, numbers, comments); text it
    cannot scan is shown plain. Everything is escaped."""
    try:
        tokens = scan(text)  # offsets in characters, end inclusive
    except Exception:  # noqa: BLE001 - unscannable text: show it as it is
        return escape(text)
    out, last = [], 0
    for t in tokens:
        css = "kw" if t.kind != "NO_KEYWORD" else _TOKEN_CLASS.get(t.name)
        if css is None:
            continue
        out.append(escape(text[last:t.start]))
        out.append(Markup('<span class="{}">{}</span>').format(css, text[t.start:t.end + 1]))
        last = t.end + 1
    out.append(escape(text[last:]))
    return Markup("").join(out)


LINK_LABEL = "console-login-link"


def login_link_token(key: bytes, user: str, ttl: float = 600.0) -> str:
    """A single-use sign-in token for a local user, made by someone with the gateway's secret key (the
    CLI on the gateway's host): `user.issued.expiry.nonce.mac`, the MAC over the rest (`issued`, in ms:
    a link from before its user was removed stays dead after a restore)."""
    now = time.time()
    payload = (f"{base64.urlsafe_b64encode(user.encode()).decode().rstrip('=')}.{int(now * 1000)}.{int(now + ttl)}."
               f"{secrets.token_urlsafe(12)}")
    mac = hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{mac}"


def read_login_token(key: bytes, token: str) -> tuple[str, float, str, float] | None:
    """(user's uid, expiry, nonce, when issued) of a genuine, unexpired token; None otherwise."""
    try:
        payload, mac = token.rsplit(".", 1)
        name, issued, expiry, nonce = payload.split(".", 3)
        if not hmac.compare_digest(mac, hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()):
            return None
        user = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        if float(expiry) < time.time():
            return None
        return user, float(expiry), nonce, int(issued) / 1000
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass
class ConsoleSession:
    key: str  # in the store: session:<SHA-256 of the cookie>
    identity: Identity
    csrf: str
    expires_at: float
    flash: list[str] = field(default_factory=list)

    started_at: float = 0.0

    def data(self) -> dict[str, Any]:
        return {"identity": asdict(self.identity), "csrf": self.csrf, "flash": self.flash, "until": self.expires_at,
                "since": self.started_at}

    @classmethod
    def from_data(cls, key: str, data: dict[str, Any]) -> ConsoleSession:
        ident = dict(data["identity"])
        ident["groups"] = tuple(ident.get("groups") or ())
        return cls(key, Identity(**ident), data["csrf"], float(data.get("until", 0.0)), list(data.get("flash") or []),
                   float(data.get("since", 0.0)))


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Console:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = gateway.store
        self._previews: dict[str, dict[str, Any] | None] = {}  # review id -> its dry run (a cache)
        self._purged = 0.0
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
        self.env.filters["sql"] = highlight_sql
        self.env.filters["when"] = lambda ts: (iso(ts) or "")[:19].replace("T", " ") if isinstance(ts, (int, float)) else (ts or "")[:19].replace("T", " ")

    # -- plumbing

    def app(self) -> Router:
        page = self._page
        return Router(routes=[
            Route("/", page(self.home)),
            Route("/dashboard", page(self.dashboard)),
            Route("/login", page(self.login), methods=["GET", "POST"]),
            Route("/login/oidc/{provider}", page(self.login_oidc)),
            Route("/login/link", page(self.login_link)),
            Route("/callback", page(self.callback)),
            Route("/logout", page(self.logout), methods=["POST"]),
            Route("/reviews", page(self.reviews)),
            Route("/reviews/list", page(self.reviews_fragment)),
            Route("/reviews/{review_id}/{verb}", page(self.decide), methods=["POST"]),
            Route("/sessions", page(self.sessions_page)),
            Route("/sessions/{session_id}", page(self.session_page)),
            Route("/exec", page(self.exec_page), methods=["GET", "POST"]),
            Route("/policies", page(self.policies), methods=["GET", "POST"]),
            Route("/audit", page(self.audit)),
            Route("/audit/export", page(self.audit_export)),
            Route("/access", page(self.access), methods=["GET", "POST"]),
            Route("/users", page(self.users), methods=["POST"]),
            Route("/keys", page(self.keys), methods=["GET", "POST"]),
            Route("/keys/{key_id}/revoke", page(self.revoke_key), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ])

    def _page(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """A page with its console session read from the store first, and its messages for the next
        page (flash) written back after."""
        async def run(request: Request) -> Response:
            session = await asyncio.to_thread(self._load, request.cookies.get(COOKIE))
            request.state.console = session
            before = list(session.flash) if session is not None else None
            response = await handler(request)
            if session is not None and session.flash != before and request.state.console is session:
                await asyncio.to_thread(self.store.console_update, session.key, session.data())
            return response
        return run

    def _load(self, cookie: str | None) -> ConsoleSession | None:
        """The console session a cookie names, if it is live; one signed in with an API key ends with the key."""
        if not cookie or len(cookie) > 128:
            return None
        now = time.time()
        if now - self._purged > 300:
            self._purged = now
            self.store.console_purge(now)
        key = "session:" + _digest(cookie)
        data = self.store.console_get(key)
        if data is None:
            return None
        session = ConsoleSession.from_data(key, data)
        if session.expires_at < now:
            return None
        source = session.identity.source
        if source.startswith("apikey:") and not self.store.api_key_active(source.removeprefix("apikey:")):
            self.store.console_drop(key)
            return None
        # Who it is, as the store says now (one look-up a page): a removal ends the session even if its
        # row was written while the removal committed, and the groups are the user's current ones (a
        # local change, or the IdP's as its tokens last said). A service key acts with the key's groups.
        row = self.store.user_by_uid(session.identity.uid)
        if row is None or row.removed_at is not None or row.disabled or \
                (row.revoked_before is not None and session.started_at <= row.revoked_before):
            self.store.console_drop(key)
            return None
        if session.identity.kind != "service":
            groups = tuple(row.groups or ())
            if groups != session.identity.groups or row.name != session.identity.user:
                session.identity = dataclasses.replace(session.identity, user=row.name, groups=groups)
        return session

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = self._session(request)
        html = self.env.get_template(template).render(
            me=session.identity if session else None, csrf=session.csrf if session else "",
            flash=session.flash[:] if session else [], roles=self.gateway.gatekeeper.roles(session.identity) if session else set(),
            base="/console", **context)
        if session:
            session.flash.clear()
        return HTMLResponse(html, status_code=status, headers={
            "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                       "form-action 'self'; base-uri 'none'",
            "x-frame-options": "DENY", "referrer-policy": "same-origin", "cache-control": "no-store"})

    @staticmethod
    def _actor(request: Request, who: Identity) -> Actor:
        """Who changed something through the console, for the audit log."""
        return Actor(who.user, "console", who.agent, request.client.host if request.client else None)

    @staticmethod
    def _session(request: Request) -> ConsoleSession | None:
        return getattr(request.state, "console", None)

    async def _start(self, request: Request, identity: Identity, landing: str = "/console/dashboard") -> Response:
        sid = secrets.token_urlsafe(32)
        until = time.time() + SESSION_TTL
        if identity.expires_at:
            until = min(until, identity.expires_at)
        session = ConsoleSession("session:" + _digest(sid), identity, secrets.token_urlsafe(24), until,
                                 started_at=time.time())
        await asyncio.to_thread(self.store.console_put, session.key, session.data(), until, identity.user, identity.uid)
        request.state.console = None  # the page that signed in answers with a redirect, as nobody yet
        response = RedirectResponse(landing, status_code=303)
        response.set_cookie(COOKIE, sid, httponly=True, samesite="lax", secure=request.url.scheme == "https",
                            path="/console", max_age=int(until - time.time()))
        return response

    def _require(self, request: Request) -> ConsoleSession | Response:
        session = self._session(request)
        if session is None:
            return RedirectResponse("/console/login?" + urlencode({"next": request.url.path}), status_code=303)
        return session

    @staticmethod
    def _same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        return not origin or origin == f"{request.url.scheme}://{request.url.netloc}"

    async def _form(self, request: Request, session: ConsoleSession) -> dict[str, str] | None:
        """The POSTed form, if it carries this session's CSRF token and comes from this origin; else None."""
        if not self._same_origin(request):
            return None
        form = {k: str(v) for k, v in (await request.form()).items()}
        if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            return None
        return form

    async def _posted(self, request: Request) -> tuple[ConsoleSession, dict[str, str]] | Response:
        """A POST's session and form, or the answer to give instead (sign in first; a stale or forged form)."""
        session = self._require(request)
        if isinstance(session, Response):
            return session
        form = await self._form(request, session)
        if form is None:
            return self._forbidden(request)
        return session, form

    def _forbidden(self, request: Request) -> HTMLResponse:
        return self.render(request, "error.html", 403, message="The form was stale or came from elsewhere; reload the page and try again.")

    # -- sign-in

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/console/dashboard" if self._session(request) else "/console/login", status_code=303)

    async def login(self, request: Request) -> Response:
        providers = [p.name for p in self.gateway.settings.identity_providers if p.client_id]
        if request.method == "GET":
            return self.render(request, "login.html", providers=providers, error=None)
        if not self._same_origin(request):
            return self.render(request, "error.html", 403, message="Sign in from the console's own page.")
        form = {k: str(v) for k, v in (await request.form()).items()}
        key = form.get("api_key", "").strip()
        addr = request.client.host if request.client else None
        try:
            identity = await asyncio.to_thread(self.gateway.authenticator.authenticate, key, None, addr)
        except LockedOut as exc:
            self.gateway.record_event("console.authenticate", "denied", addr=addr, detail=str(exc))
            return self.render(request, "login.html", 429, providers=providers, error=str(exc).capitalize() + ".")
        except AuthenticationError as exc:
            self.gateway.record_event("console.authenticate", "denied", addr=addr, detail=str(exc))
            return self.render(request, "login.html", 401, providers=providers, error="That key is not valid.")
        self.gateway.record_event("console.authenticate", "ok", user=identity.user, agent=identity.agent, addr=addr,
                                  source=identity.source, detail="signed in with an API key")
        return await self._start(request, identity)

    async def login_link(self, request: Request) -> Response:
        """A local user's sign-in link from `wardgate users login-link`: good once, for a few minutes."""
        addr = request.client.host if request.client else None
        found = read_login_token(self.gateway.store.box.derive(LINK_LABEL), request.query_params.get("token", ""))
        row = None
        if found is not None:
            row = await asyncio.to_thread(self.gateway.store.user_by_uid, found[0])  # the link names the uid
        usable = found is not None and row is not None and not row.disabled and row.removed_at is None \
            and row.source == "local" and row.kind == "user" and found[3] > (row.revoked_before or 0)
        # Used once, on any replica, and remembered for as long as the link could be valid.
        if not usable or not await asyncio.to_thread(self.store.console_claim, f"link:{found[2]}", found[1]):  # type: ignore[index]
            self.gateway.record_event("console.authenticate", "denied", addr=addr,
                                      detail="sign-in link invalid, expired, used or not a local user's")
            return self.render(request, "error.html", 401, message="This sign-in link is not valid (used, expired or "
                               "changed). Ask for a new one: wardgate users login-link NAME.")
        identity = Identity(row.name, tuple(row.groups), "user", None, "local", uid=row.uid)
        self.gateway.record_event("console.authenticate", "ok", user=row.name, addr=addr, source="local",
                                  detail="signed in with a one-time link")
        return await self._start(request, identity)

    def _metadata(self, spec: Any) -> dict[str, Any]:
        """The provider's discovery document, fetched once and issuer-checked by the token verifier."""
        return self.gateway.authenticator.tokens.providers[spec.issuer].discover()

    def _redirect_uri(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}/console/callback"

    async def login_oidc(self, request: Request) -> Response:
        spec = next((p for p in self.gateway.settings.identity_providers if p.name == request.path_params["provider"]), None)
        if spec is None or not spec.client_id:
            return self.render(request, "error.html", 404, message="No such identity provider.")
        meta = await asyncio.to_thread(self._metadata, spec)
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(24)
        redirect = self._redirect_uri(request)
        await asyncio.to_thread(self.store.console_put, "signin:" + _digest(state),
                                {"provider": spec.name, "verifier": verifier, "redirect": redirect},
                                time.time() + PENDING_SIGN_IN_TTL)
        response = RedirectResponse(authorization_url(meta, spec, redirect, challenge, state, prompt="login"), status_code=303)
        # The answer must come back to this browser: a callback link made by someone else's sign-in
        # (to sign the victim in as the attacker) carries a state this cookie does not hold.
        response.set_cookie(STATE_COOKIE, state, httponly=True, samesite="lax", secure=request.url.scheme == "https",
                            path="/console", max_age=PENDING_SIGN_IN_TTL)
        return response

    async def callback(self, request: Request) -> Response:
        state = request.query_params.get("state", "")
        mine = hmac.compare_digest(state.encode(), request.cookies.get(STATE_COOKIE, "").encode())
        pending = await asyncio.to_thread(self.store.console_take, "signin:" + _digest(state)) if mine and state else None
        addr = request.client.host if request.client else None
        if pending is None or "code" not in request.query_params:
            reason = request.query_params.get("error_description") or "the sign-in expired or did not come from here"
            self.gateway.record_event("console.authenticate", "denied", addr=addr, detail=reason)
            return self.render(request, "error.html", 400, message=f"Sign-in failed: {reason}. Try again.")
        name, verifier, redirect = pending["provider"], pending["verifier"], pending["redirect"]
        spec = next(p for p in self.gateway.settings.identity_providers if p.name == name)

        def finish() -> Identity:
            with httpx.Client(timeout=30) as http:
                tokens = exchange_code(http, self._metadata(spec), spec, request.query_params["code"], redirect, verifier)
            return self.gateway.authenticator.authenticate(tokens["access_token"])

        try:
            identity = await asyncio.to_thread(finish)
        except (AuthenticationError, httpx.HTTPError, KeyError) as exc:
            self.gateway.record_event("console.authenticate", "denied", addr=addr, detail=str(exc))
            return self.render(request, "error.html", 401, message=f"Sign-in failed: {exc}")
        self.gateway.record_event("console.authenticate", "ok", user=identity.user, addr=addr, source=identity.source,
                                  detail=f"signed in with {name}")
        return await self._start(request, identity)

    async def logout(self, request: Request) -> Response:
        session = self._session(request)
        if session is not None and await self._form(request, session) is not None:
            await asyncio.to_thread(self.store.console_drop, session.key)
            request.state.console = None
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(COOKIE, path="/console")
        return response

    # -- dashboard

    DAYS = 14

    async def dashboard(self, request: Request) -> Response:
        session = self._require(request)
        if isinstance(session, Response):
            return session
        who = session.identity
        everyone = self.gateway.gatekeeper.can_read_all(who)
        counts = await asyncio.to_thread(self.gateway.store.daily_counts, self.DAYS, None if everyone else who.uid)
        today = int(time.time() // 86400)
        days = list(range(today - self.DAYS + 1, today + 1))
        charts = []
        for key, title in (("sessions", "Sessions"), ("refused", "Refused statements"), ("reviews", "Reviews asked for"),
                           ("masked", "Values masked")):
            values = [counts[key].get(d, 0) for d in days]
            top = max(values) or 1
            charts.append({"title": title, "total": sum(values), "bars": [
                {"day": iso(d * 86400)[:10], "value": v, "height": round(60 * v / top, 1)} for d, v in zip(days, values, strict=True)]})
        pending = await self.gateway.reviews.list(who, "pending", 200)
        return self.render(request, "dashboard.html", charts=charts, everyone=everyone, pending=len(pending),
                           days=self.DAYS)

    # -- reviews

    async def _review_lists(self, who: Identity) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        pending = await self.gateway.reviews.list(who, "pending", 200)
        decided = [r for r in await self.gateway.reviews.list(who, None, 50) if r["status"] != "pending"]
        for r in pending:
            r["preview"] = await self._preview(r)
        return pending, decided

    PREVIEW_KINDS = frozenset({"select", "insert", "update", "delete", "merge"})

    async def _preview(self, review: dict[str, Any]) -> dict[str, Any] | None:
        """A dry run for the approver: the planner's estimate (EXPLAIN without ANALYZE, which runs
        nothing), for one plain DML statement without parameters; computed once per review."""
        if review["id"] in self._previews:
            return self._previews[review["id"]]
        c = await self.gateway.postgres.offload.classify_long(review["statement"]) or classify(review["statement"])
        preview = None
        if review["kind"] == "statement" and not review["params"] and c.statements == 1 and not c.error \
                and set(c.kinds) <= self.PREVIEW_KINDS:
            preview = await self._explain(review["connection"], review["statement"])
        if len(self._previews) > 500:
            self._previews.clear()
        self._previews[review["id"]] = preview
        return preview

    async def _explain(self, connection: str, statement: str) -> dict[str, Any]:
        gw = self.gateway
        up = None
        try:
            spec = await asyncio.to_thread(gw.store.get_connection, connection)
            if spec is None:
                return {"error": f"connection {connection!r} is gone"}
            up = await upstream.connect(spec, {"application_name": "wardgate review preview", "client_encoding": "UTF8"}, 5.0,
                                        standard_strings=True,
                                        password_env_prefix=gw.settings.upstream.password_env_prefix)
            # Read-only for the dry run: EXPLAIN without ANALYZE plans the statement and executes nothing.
            await upstream.simple_query(up, "set default_transaction_read_only = on")
            rows = await upstream.simple_query(up, "explain (format json) " + statement, timeout=5.0)
            plan = json.loads(rows[0][0] or "[]")[0]["Plan"]
            node, steps = plan, []
            while node is not None and len(steps) < 4:
                steps.append(node.get("Node Type", "?") + (f" on {node['Relation Name']}" if node.get("Relation Name") else ""))
                children = node.get("Plans") or []
                node = children[0] if children else None
            rows_est = plan.get("Plan Rows", 0)
            if plan.get("Node Type") == "ModifyTable" and plan.get("Plans"):
                rows_est = plan["Plans"][0].get("Plan Rows", rows_est)
            return {"rows": int(rows_est), "plan": " → ".join(steps)}
        except (upstream.UpstreamError, PeerClosed, OSError, TimeoutError, ValueError, KeyError, IndexError) as exc:
            if up is None:  # not opened: the reason names the database's host and port, for the log only
                log.warning("review preview on %s: %s", connection, exc)
                return {"error": upstream.unreachable_message(connection)}
            return {"error": str(exc) or type(exc).__name__}
        finally:
            if up is not None:
                up.protocol.close()

    async def reviews(self, request: Request) -> Response:
        session = self._require(request)
        if isinstance(session, Response):
            return session
        pending, decided = await self._review_lists(session.identity)
        return self.render(request, "reviews.html", pending=pending, decided=decided)

    async def reviews_fragment(self, request: Request) -> Response:
        """The queue alone, for the page's live refresh."""
        session = self._session(request)
        if session is None:
            return Response(status_code=401)
        pending, decided = await self._review_lists(session.identity)
        return self.render(request, "_reviews.html", pending=pending, decided=decided)

    async def decide(self, request: Request) -> Response:
        posted = await self._posted(request)
        if isinstance(posted, Response):
            return posted
        session, form = posted
        verb, review_id = request.path_params["verb"], request.path_params["review_id"]
        try:
            await self.gateway.reviews.decide(session.identity, review_id, verb, form.get("reason") or None)
            session.flash.append(f"Review {review_id[:12]}: {verb}d." if verb != "reject" else f"Review {review_id[:12]}: rejected.")
        except ReviewError as exc:
            session.flash.append(f"Review {review_id[:12]}: {exc}")
        return RedirectResponse("/console/reviews", status_code=303)

    # -- sessions

    async def sessions_page(self, request: Request) -> Response:
        session = self._require(request)
        if isinstance(session, Response):
            return session
        who = session.identity
        q = request.query_params
        filters = {k: q.get(k) or None for k in ("user", "connection", "outcome", "rule")}
        if not self.gateway.gatekeeper.can_read_all(who):
            filters["user"] = None
            filters["uid"] = who.uid
        rows = await asyncio.to_thread(list_sessions, self.gateway.store, limit=200, **filters)
        filters.pop("uid", None)
        return self.render(request, "sessions.html", sessions=rows, filters=filters)

    async def session_page(self, request: Request) -> Response:
        session = self._require(request)
        if isinstance(session, Response):
            return session
        sid = request.path_params["session_id"]
        for attempt in range(10):
            try:
                data = await asyncio.to_thread(self.gateway.exec.session, session.identity, sid)
                analysis = await asyncio.to_thread(self.gateway.analyzer.status, data["id"])
                break
            except NotFound:
                # An exec that just finished reaches the store a moment later (the recorder drains the journal).
                if attempt == 9 or self.gateway.exec.result(sid) is None:
                    return self.render(request, "error.html", 404, message=f"No session {sid}.")
                await asyncio.sleep(0.3)
        started = dt.datetime.fromisoformat(data["started_at"]).timestamp()
        for st in data["statements"]:  # seconds into the session, for the replay control
            st["offset"] = round(dt.datetime.fromisoformat(st["started_at"]).timestamp() - started, 3)
        return self.render(request, "session.html", s=data, analysis=analysis)

    # -- exec

    def _connections(self, who: Identity, verb: str) -> list[str]:
        gk = self.gateway.gatekeeper
        return [c.spec.name for c in self.gateway.store.list_connections() if gk.authorize(who, c.spec.name, verb).allowed]

    async def exec_page(self, request: Request) -> Response:
        session = self._require(request)
        if isinstance(session, Response):
            return session
        who = session.identity
        connections = await asyncio.to_thread(self._connections, who, "exec")
        envelope, form = None, {"connection": connections[0] if connections else "", "sql": ""}
        if request.method == "POST":
            posted = await self._form(request, session)
            if posted is None:
                return self._forbidden(request)
            form = {"connection": posted.get("connection", ""), "sql": posted.get("sql", "")}
            try:
                await asyncio.to_thread(self.gateway.provision, who)
            except Conflict as exc:
                return self.render(request, "error.html", 403, message=str(exc))
            envelope = await self.gateway.exec.run(who, form["connection"], form["sql"], wait=15,
                                                   addr=request.client.host if request.client else None)
        return self.render(request, "exec.html", connections=connections, form=form, envelope=envelope)

    # -- policies

    async def policies(self, request: Request) -> Response:
        session = self._require(request)
        if isinstance(session, Response):
            return session
        who = session.identity
        settings = self.gateway.settings
        checked, form = None, {"connection": "", "sql": "", "user": who.user}
        if request.method == "POST":
            posted = await self._form(request, session)
            if posted is None:
                return self._forbidden(request)
            form = {k: posted.get(k, "") for k in form}
            checked = await asyncio.to_thread(self._check, who, form,
                                              await self.gateway.postgres.offload.classify_long(form["sql"]))
        return self.render(request, "policies.html", access=settings.access, guardrails=settings.guardrails,
                           masking=settings.masking, checked=checked, form=form,
                           connections=await asyncio.to_thread(self._connections, who, "connect"))

    def _check(self, who: Identity, form: dict[str, str], classification: Classification | None) -> dict[str, Any]:
        """`wardgate policy check` for the page: your own rights, or (admins) another user's."""
        gk = self.gateway.gatekeeper
        subject = who
        if form["user"] and form["user"] != who.user:
            if "admin" not in gk.roles(who):
                return {"error": "only admins may check another user's rights"}
            row = self.gateway.store.get_user(form["user"])
            if row is None:
                return {"error": f"no user named {form['user']!r}"}
            subject = Identity(row.name, tuple(row.groups))
        return gk.check(subject, form["connection"], form["sql"], classification=classification)

    # -- audit

    async def audit(self, request: Request) -> Response:
        session = self._require(request)
        if isinstance(session, Response):
            return session
        if not self.gateway.gatekeeper.can_read_all(session.identity):
            return self.render(request, "error.html", 403, message="The audit log is for auditors and admins.")
        q = request.query_params
        kind, outcome = q.get("kind") or None, q.get("outcome") or None
        events = await asyncio.to_thread(self.gateway.store.list_events, kind=kind, outcome=outcome, limit=200)
        verdict = await asyncio.to_thread(self.gateway.store.audit_verify) if q.get("verify") else None
        return self.render(request, "audit.html", events=events, kind=kind or "", outcome=outcome or "", verdict=verdict)

    # -- access: connections, users, native credentials, just-in-time grants

    async def access(self, request: Request) -> Response:
        session = self._require(request)
        if isinstance(session, Response):
            return session
        who = session.identity
        admin = "admin" in self.gateway.gatekeeper.roles(who)
        issued = None
        if request.method == "POST":
            form = await self._form(request, session)
            if form is None:
                return self._forbidden(request)
            issued = await self._access_action(request, session, form, admin)
        store = self.gateway.store
        connections = [c.public() for c in await asyncio.to_thread(store.list_connections)]
        usable = set(await asyncio.to_thread(self._connections, who, "connect"))
        runnable = set(await asyncio.to_thread(self._connections, who, "exec"))
        verbs = {c["name"]: [v for v, ok in (("connect", c["name"] in usable), ("exec", c["name"] in runnable)) if ok]
                 for c in connections}
        if not admin:  # as on the API: targets and database users are for admins
            connections = [c for c in connections if verbs[c["name"]]]
        creds = [(c, user) for c, user in await asyncio.to_thread(
            store.list_credentials, None, False, None if admin else who.uid)]
        grants = [r for r in await self.gateway.reviews.list(who) if r["kind"] == "access"]
        users = [u for u in await asyncio.to_thread(store.list_users) if not u.disabled] if admin else []
        return self.render(request, "access.html", connections=connections, usable=sorted(usable), verbs=verbs, creds=creds,
                           grants=grants, users=users, groups=self._groups(users) if admin else [], admin=admin,
                           issued=issued, password_env_prefix=self.gateway.settings.upstream.password_env_prefix)

    def _groups(self, users: list[Any]) -> list[dict[str, Any]]:
        """Each group a user or an access rule names: its members, and what the access rules give it."""
        rules = self.gateway.gatekeeper.access.rules
        names = sorted({g for u in users for g in (u.groups or [])} | {g for r in rules for g in r.groups if g != "*"})
        out = []
        for g in names:
            grants = [f"{', '.join(r.verbs)} on {', '.join(r.connections)}" + (" (just in time)" if r.just_in_time else "")
                      for r in rules if g in r.groups or "*" in r.groups]
            out.append({"name": g, "members": [u.name for u in users if g in (u.groups or [])], "access": grants})
        return out

    async def users(self, request: Request) -> Response:
        """Admins: add a local user, set a user's groups, remove a user."""
        posted = await self._posted(request)
        if isinstance(posted, Response):
            return posted
        session, form = posted
        who = session.identity
        if "admin" not in self.gateway.gatekeeper.roles(who):
            return self.render(request, "error.html", 403, message="Users and groups are for admins.")
        actor = self._actor(request, who)
        store, name = self.store, form.get("name", "").strip()
        groups = [g.strip() for g in form.get("groups", "").split(",") if g.strip()]
        action = form.get("action")
        try:
            if action == "add-user":
                await asyncio.to_thread(store.add_user, name, groups, actor)
                session.flash.append(f"User {name} added; `wardgate users login-link {name}` signs them in here.")
            elif action == "set-groups":
                user = await asyncio.to_thread(store.set_user_groups, name, groups, actor)
                session.flash.append(f"User {name}: groups {', '.join(user.groups) or '(none)'}.")
            elif action == "remove-user" and name != who.user:
                await asyncio.to_thread(store.remove_user, name, actor)
                session.flash.append(f"User {name} removed; their credentials are revoked.")
            else:
                session.flash.append("That is not something you may do here (you cannot remove yourself).")
        except (ConfigError, Conflict, NotFound) as exc:
            session.flash.append(str(exc))
        return RedirectResponse("/console/access#users", status_code=303)

    async def _access_action(self, request: Request, session: ConsoleSession, form: dict[str, str],
                             admin: bool) -> dict[str, Any] | None:
        who = session.identity
        addr = request.client.host if request.client else None
        actor = Actor(who.user, "console", who.agent, addr)
        action = form.get("action")
        try:
            if action == "issue":
                return await asyncio.to_thread(self.gateway.issue_credential, who, form.get("connection", ""),
                                               form.get("ttl") or None, addr)
            if action == "revoke":
                cred_id = form.get("credential", "")
                owner = await asyncio.to_thread(self.gateway.store.credential_owner, cred_id)
                if owner is None or (not who.owns(owner[0]) and not admin):
                    session.flash.append(f"No credential {cred_id} of yours.")
                    return None
                await asyncio.to_thread(self.gateway.store.revoke_credential, cred_id, actor)
                session.flash.append(f"Credential {cred_id} revoked; its sessions are being closed.")
            elif action == "grant":
                await asyncio.to_thread(self.gateway.provision, who)
                seconds = parse_duration(form.get("duration") or "30m")
                answer = await self.gateway.reviews.request_access(who, form.get("connection", ""), seconds,
                                                                   form.get("reason", ""))
                session.flash.append(f"Access asked for: review {answer['review_id'][:12]} waits for "
                                     f"{', '.join(answer['approvers']) or 'the admins'}.")
            elif action in ("add-connection", "edit-connection") and admin:
                fields = {k: form[k].strip() for k in ("host", "database", "user", "password", "password_env", "sslmode",
                                                       "password_auth")
                          if form.get(k, "").strip()}
                if form.get("port", "").strip():
                    fields["port"] = int(form["port"])
                if action == "add-connection":
                    spec = ConnectionSpec(name=form.get("name", "").strip(), **fields)
                    await asyncio.to_thread(self.gateway.store.add_connection, spec, actor)
                    session.flash.append(f"Connection {spec.name} added.")
                else:
                    info = await asyncio.to_thread(self.gateway.store.update_connection, form.get("name", ""), fields,
                                                   actor)
                    session.flash.append(f"Connection {form.get('name')} changed." + (f" Note: {info.note}." if info.note
                                                                                       else ""))
            else:
                session.flash.append("That is not something you may do here.")
        except (PermissionError, ConfigError, Conflict, NotFound, ReviewError, ValueError, TypeError) as exc:
            session.flash.append(str(exc))
        return None

    async def audit_export(self, request: Request) -> Response:
        """The whole chain as a download, in the export schema (docs/audit.md)."""
        session = self._require(request)
        if isinstance(session, Response):
            return session
        if not self.gateway.gatekeeper.can_read_all(session.identity):
            return self.render(request, "error.html", 403, message="The audit log is for auditors and admins.")
        events = await asyncio.to_thread(lambda: list(self.gateway.store.iter_events()))
        body = "".join(json.dumps(siem_event(e), ensure_ascii=False) + "\n" for e in events)
        self.gateway.record_event("audit.export", "ok", user=session.identity.user, source="console",
                                  detail=f"{len(events)} events")
        return Response(body, media_type="application/x-ndjson", headers={
            "content-disposition": f'attachment; filename="wardgate-audit-{time.strftime("%Y%m%d-%H%M%S")}.jsonl"'})

    # -- API keys

    async def keys(self, request: Request) -> Response:
        session = self._require(request)
        if isinstance(session, Response):
            return session
        who = session.identity
        created = None
        if request.method == "POST":
            form = await self._form(request, session)
            if form is None:
                return self._forbidden(request)
            agent = form.get("agent", "").strip()
            try:
                # As the API does: an IdP identity whose name is a local user's must not act as that user.
                await asyncio.to_thread(self.gateway.provision, who)
            except Conflict as exc:
                return self.render(request, "error.html", 403, message=str(exc))
            if who.kind != "user":
                session.flash.append("An agent cannot make keys." if who.agent else "Agent keys act for people.")
            elif not agent:
                session.flash.append("Name the agent the key is for.")
            else:
                issued = await asyncio.to_thread(
                    self.gateway.store.create_api_key, name=f"{agent} for {who.user}", kind="agent", user_name=who.user,
                    agent=agent, groups=[], ttl=None, created_by=who.user, uid=who.uid,
                    actor=self._actor(request, who))
                created = {"id": issued.row.id, "agent": agent, "secret": issued.secret}
        admin = "admin" in self.gateway.gatekeeper.roles(who)
        rows = [k for k in await asyncio.to_thread(self.gateway.store.list_api_keys)
                if admin or (k.kind == "agent" and who.owns(k.user_id))]
        return self.render(request, "keys.html", keys=rows, created=created)

    async def revoke_key(self, request: Request) -> Response:
        posted = await self._posted(request)
        if isinstance(posted, Response):
            return posted
        session, _ = posted
        who, key_id = session.identity, request.path_params["key_id"]
        admin = "admin" in self.gateway.gatekeeper.roles(who)
        mine = [k for k in await asyncio.to_thread(self.gateway.store.list_api_keys, True)
                if k.id == key_id and (admin or (k.kind == "agent" and who.owns(k.user_id)))]
        if not mine or who.kind == "agent":
            session.flash.append(f"No key {key_id} of yours.")
        else:
            await asyncio.to_thread(self.gateway.store.revoke_api_key, key_id,
                                    self._actor(request, who))
            session.flash.append(f"Key {key_id} revoked.")
        return RedirectResponse("/console/keys", status_code=303)


def create_console(gateway: Gateway) -> Router:
    return Console(gateway).app()
