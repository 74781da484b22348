"""HTTP API of the gateway (FastAPI; OpenAPI at /openapi.json). Every /api route takes a Bearer token
(an OIDC access token from a configured provider, or a Wardgate API key)."""


import asyncio
import hmac
import logging
import os
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field, field_validator

from ..config import ConfigError, parse_duration
from ..domain import Identity
from ..identity import AuthenticationError, LockedOut
from ..recording.views import event_view, iso, list_sessions, show_session
from ..reviews import ReviewError
from ..store import UNAVAILABLE, UNAVAILABLE_MESSAGE, Actor, Conflict, NotFound
from ..text import UNREADABLE_MESSAGE, unreadable

log = logging.getLogger("wardgate.api")

if TYPE_CHECKING:
    from ..app import Gateway


class Body(BaseModel):
    """A request body: no text in it may hold what PostgreSQL cannot read (wardgate/text.py)."""

    @field_validator("*")
    @classmethod
    def _readable(cls, value: Any) -> Any:
        for text in value if isinstance(value, list) else (value,):
            if isinstance(text, str) and unreadable(text):
                raise ValueError(f"the text {UNREADABLE_MESSAGE}")
        return value


class ApiKeyRequest(Body):
    for_agent: str | None = Field(default=None, description="Make a key for this agent, acting for you.",
                                  examples=["claude-code"])
    name: str | None = Field(default=None, description="Service account name (admin role only).")
    groups: list[str] = Field(default_factory=list, description="Service account groups (admin role only).")
    ttl: str | None = Field(default=None, description="Lifetime such as 90d; default: until revoked.", examples=["90d"])


class ExecRequest(Body):
    connection: str = Field(description="Connection name.", examples=["shop"])
    sql: str = Field(description="One statement, or several separated by `;` (without params).",
                     examples=["select id, email from customers where id = $1"])
    params: list[str | None] | None = Field(default=None, description="Text values for $1, $2, ... (one statement only).",
                                            examples=[["1"]])
    wait: float | None = Field(default=None, description="Seconds to wait before answering `running` (default from the config).")

    model_config = {"json_schema_extra": {"examples": [{"connection": "shop", "sql": "select count(*) from orders"}]}}


class DecisionRequest(Body):
    reason: str | None = Field(default=None, description="Why; required to reject.", examples=["no DELETE during the freeze"])


class GrantRequest(Body):
    connection: str = Field(description="Connection name.", examples=["prod"])
    duration: str = Field(default="1h", description="How long, from approval (at most the rule's max_duration).",
                          examples=["30m"])
    reason: str = Field(description="Why; approvers see it.", examples=["incident 4211: fix the stuck orders"])


class ExecuteRequest(Body):
    wait: float | None = Field(default=None, description="Seconds to wait before answering `running`.", examples=[10])


EXEC_EXAMPLES = {
    "completed": {"status": "completed", "session_id": "4f1c...", "connection": "shop", "columns": ["id", "email"],
                  "rows": [["1", "[email]"]], "row_count": 1, "command_tags": ["SELECT 1"], "duration_ms": 2.1,
                  "truncated": False, "masked": {"email": 1}},
    "denied": {"status": "denied", "connection": "shop", "session_id": "9a0b...",
               "reason": "denied by rule standard:unconditional-writes: DELETE without a condition",
               "rules": [{"rule": "standard:unconditional-writes", "action": "deny"}], "next": "change the statement..."},
    "pending_approval": {"status": "pending_approval", "review_id": "c3d2...", "review_url": "http://.../api/reviews/c3d2...",
                         "approvers": ["dba"], "min_approvals": 1, "next": "ask dba to approve review c3d2..."},
    "running": {"status": "running", "session_id": "77e1...", "next": "GET /api/sessions/77e1.../wait?timeout=60"},
    "failed": {"status": "failed", "session_id": "5b6c...", "code": "42P01", "error": "relation \"nope\" does not exist"},
}


class CredentialRequest(Body):
    connection: str = Field(description="Connection name (the dbname native clients use).", examples=["shop"])
    ttl: str | None = Field(default=None, description="Lifetime such as 15m or 2h; default from the config.", examples=["2h"])


def create_app(gateway: "Gateway") -> FastAPI:
    # No /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN (offline hosts, and script
    # from elsewhere). The schema stays at /openapi.json for any OpenAPI viewer or client generator.
    app = FastAPI(title="Wardgate", version="0.1.0", description=__doc__, docs_url=None, redoc_url=None)

    def event(request: Request, kind: str, outcome: str, who: Identity | None = None, detail: str | None = None) -> None:
        gateway.record_event(
            kind, outcome, detail=detail, addr=request.client.host if request.client else None,
            user=who.user if who else None, agent=who.agent if who else None, source=who.source if who else None,
        )

    def identity(request: Request) -> Identity:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            event(request, "api.authenticate", "denied", detail="no bearer credentials")
            raise HTTPException(401, "send `Authorization: Bearer <token or API key>`", headers={"WWW-Authenticate": "Bearer"})
        try:
            who = gateway.authenticator.authenticate(value, addr=request.client.host if request.client else None)
        except LockedOut as exc:
            event(request, "api.authenticate", "denied", detail=str(exc))
            raise HTTPException(429, str(exc), headers={"Retry-After": str(max(1, round(exc.retry_after + 0.5)))}) from None
        except AuthenticationError as exc:
            event(request, "api.authenticate", "denied", detail=str(exc))
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
        if gateway.authenticator.first_use(value):
            event(request, "api.authenticate", "ok", who, f"{who.kind} signed in with {who.source}")
        return who

    Caller = Annotated[Identity, Depends(identity)]

    def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.error("the store is unavailable: %s", exc)
        return JSONResponse({"detail": f"{UNAVAILABLE_MESSAGE}; try again in a moment"}, status_code=503,
                            headers={"Retry-After": "5"})

    for kind in UNAVAILABLE:
        app.add_exception_handler(kind, store_unavailable)

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        # FastAPI's own answer echoes each bad value back: a lone surrogate then cannot even be encoded
        # (a 500), and a long value comes back whole. Where and why is enough to correct the request.
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        return JSONResponse({"detail": [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                                         "type": str(e.get("type", ""))} for e in errors]}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid_request)

    from ..web import create_console

    app.mount("/console", create_console(gateway))

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        return JSONResponse(gateway.health(), status_code=200 if gateway.ready else 503)

    @app.get("/livez", include_in_schema=False)
    async def livez() -> JSONResponse:
        """Liveness: the event loop answers (a stuck process does not)."""
        return JSONResponse({"status": "alive"})

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        """Readiness: started, the store answers and the recorder runs; else 503 with the reasons (a load
        balancer then sends new clients to another replica)."""
        problems = await gateway.readiness()
        return JSONResponse({"status": "ready" if not problems else "not ready", "problems": problems},
                            status_code=200 if not problems else 503)

    metrics_registry = CollectorRegistry()
    metrics_registry.register(gateway.metrics_collector())
    metrics_token = os.environ.get(gateway.settings.gateway.metrics_token_env, "") \
        if gateway.settings.gateway.metrics_token_env else ""

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if gateway.settings.gateway.metrics_token_env:
            presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not metrics_token or not hmac.compare_digest(presented.encode(), metrics_token.encode()):
                return JSONResponse({"detail": "metrics need the bearer token of [gateway] metrics_token_env"},
                                    status_code=401, headers={"www-authenticate": "Bearer"})
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)


    def require(caller: Identity, *roles: str) -> None:
        if not gateway.gatekeeper.roles(caller) & set(roles):
            raise HTTPException(403, f"this needs the {' or '.join(roles)} role; ask a Wardgate administrator")

    can_read_all = gateway.gatekeeper.can_read_all

    @app.get("/api/me", summary="Who the caller is")
    def me(caller: Caller) -> dict[str, Any]:
        return {**caller.public(), "roles": sorted(gateway.gatekeeper.roles(caller))}

    @app.get("/api/connections", summary="Connections the caller may use, and how")
    def connections(caller: Caller) -> list[dict[str, Any]]:
        admin = "admin" in gateway.gatekeeper.roles(caller)
        out = []
        for info in gateway.store.list_connections():
            verbs = [v for v in ("connect", "exec") if gateway.gatekeeper.authorize(caller, info.spec.name, v).allowed]
            if verbs or admin:
                entry = {"name": info.spec.name, "type": "postgresql", "verbs": verbs}
                if admin:
                    entry.update(info.public())
                out.append(entry)
        return out

    @app.get("/api/sessions", summary="Recorded sessions: your own, or any with the auditor or admin role")
    def sessions(caller: Caller, user: str | None = None, connection: str | None = None, status: str | None = None,
                 since: float | None = None, until: float | None = None, outcome: str | None = None,
                 rule: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Filters: `since`/`until` (epoch seconds, by start), `outcome` (sessions with a statement that ended
        ok, error, denied, skipped or aborted), `rule` (sessions with a statement that rule matched)."""
        if not can_read_all(caller):
            if user not in (None, caller.user):
                raise HTTPException(403, "you may list only your own sessions (auditor or admin role for others)")
            return list_sessions(gateway.store, uid=caller.uid, connection=connection, status=status,
                                 limit=min(limit, 1000), since=since, until=until, outcome=outcome, rule=rule)
        return list_sessions(gateway.store, user=user, connection=connection, status=status, limit=min(limit, 1000),
                             since=since, until=until, outcome=outcome, rule=rule)

    @app.get("/api/sessions/{session_id}", summary="A session and its statements")
    def session(session_id: str, caller: Caller) -> dict[str, Any]:
        try:
            return gateway.exec.session(caller, session_id)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/sessions/{session_id}/analysis",
             summary="A session's risk analysis: ready, pending or unavailable (wait: long-poll up to 120 s)")
    async def session_analysis(session_id: str, caller: Caller, wait: float = 0) -> dict[str, Any]:
        try:
            return await gateway.analyzer.wait(caller, session_id, min(max(wait, 0.0), 120.0))
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post("/api/credentials/{credential_id}/revoke", summary="Revoke a native credential; its sessions end")
    def revoke_credential(credential_id: str, caller: Caller, request: Request) -> dict[str, Any]:
        owner = gateway.store.credential_owner(credential_id)
        if owner is None or (not caller.owns(owner[0]) and "admin" not in gateway.gatekeeper.roles(caller)):
            event(request, "credential.revoke", "denied", caller, f"credential {credential_id}")
            raise HTTPException(404, f"no credential {credential_id!r} of yours")
        gateway.store.revoke_credential(credential_id)
        event(request, "credential.revoke", "ok", caller, f"credential {credential_id} of {owner[1]}")
        return {"id": credential_id, "status": "revoked"}

    def key_view(k: Any) -> dict[str, Any]:
        return {"id": k.id, "name": k.name, "kind": k.kind, "user": k.user_name, "agent": k.agent, "groups": k.groups,
                "created_at": iso(k.created_at), "expires_at": iso(k.expires_at), "revoked_at": iso(k.revoked_at),
                "last_used_at": iso(k.last_used_at)}

    @app.post("/api/apikeys", summary="Create an API key: for an agent acting for you, or (admin) a service account")
    def create_api_key(body: ApiKeyRequest, caller: Caller, request: Request) -> dict[str, Any]:
        if caller.agent:
            raise HTTPException(403, "an agent cannot create keys; the person it acts for can")
        try:
            ttl = parse_duration(body.ttl) if body.ttl else None
            if body.for_agent:
                if body.name or body.groups:
                    raise HTTPException(400, "an agent key carries your groups; give for_agent only")
                if caller.kind != "user":
                    raise HTTPException(403, "agent keys act for people; a service account has no agents")
                issued = gateway.store.create_api_key(name=f"{body.for_agent} for {caller.user}", kind="agent",
                                                      user_name=caller.user, agent=body.for_agent, groups=[], ttl=ttl,
                                                      created_by=caller.user, uid=caller.uid)
            else:
                require(caller, "admin")
                if not body.name:
                    raise HTTPException(400, "give for_agent, or name (and groups) for a service account")
                issued = gateway.store.create_api_key(name=body.name, kind="service", user_name=body.name, agent=None,
                                                      groups=body.groups, ttl=ttl, created_by=caller.user)
        except (ConfigError, Conflict) as exc:
            raise HTTPException(400, str(exc)) from None
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        event(request, "apikey.create", "ok", caller, f"API key {issued.row.id} ({issued.row.name})")
        return {**key_view(issued.row), "key": issued.secret}

    @app.get("/api/apikeys", summary="Your API keys (admin: all)")
    def list_api_keys(caller: Caller) -> list[dict[str, Any]]:
        admin = "admin" in gateway.gatekeeper.roles(caller)
        return [key_view(k) for k in gateway.store.list_api_keys(uid=None if admin else caller.uid)]

    @app.post("/api/apikeys/{key_id}/revoke", summary="Revoke one of your API keys (admin: any)")
    def revoke_api_key(key_id: str, caller: Caller, request: Request) -> dict[str, Any]:
        # An agent may revoke its own key, never its person's other keys (nor another agent's).
        own = caller.source.removeprefix("apikey:") if caller.agent and caller.source.startswith("apikey:") else None
        mine = {k.id for k in gateway.store.list_api_keys(include_inactive=True, uid=caller.uid)
                if not caller.agent or k.id == own}
        if key_id not in mine and ("admin" not in gateway.gatekeeper.roles(caller) or caller.agent):
            event(request, "apikey.revoke", "denied", caller, f"API key {key_id}")
            raise HTTPException(404, f"no API key {key_id!r} of yours")
        try:
            gateway.store.revoke_api_key(key_id)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        event(request, "apikey.revoke", "ok", caller, f"API key {key_id}")
        return {"id": key_id, "status": "revoked"}

    @app.post("/api/admin/policy/reload", summary="(admin) Read the config file's policy again, here and on every replica")
    async def reload_policy(caller: Caller, request: Request) -> dict[str, Any]:
        require(caller, "admin")
        who = Actor(caller.user, "api", caller.agent, request.client.host if request.client else None)
        out = await gateway.reload_policy(who)
        if not out["reloaded"]:
            raise HTTPException(422, f"the config file does not load; the policy in force stays: {out['error']}")
        return out

    @app.get("/api/events", summary="Security events (auditor or admin role)")
    def events(caller: Caller, kind: str | None = None, outcome: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        require(caller, "auditor", "admin")
        return [event_view(e) for e in gateway.store.list_events(kind=kind, outcome=outcome, limit=min(limit, 1000))]

    @app.post("/api/credentials", summary="Issue a short-lived native credential for the caller")
    def issue_credential(body: CredentialRequest, caller: Caller, request: Request) -> dict[str, Any]:
        try:
            return gateway.issue_credential(caller, body.connection, body.ttl, addr(request))
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from None
        except (ConfigError, Conflict) as exc:
            raise HTTPException(400, str(exc)) from None
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post("/api/credentials/{credential_id}/renew", summary="Keep an IdP-bound credential alive with a fresh sign-in")
    def renew_credential(credential_id: str, caller: Caller, request: Request) -> dict[str, Any]:
        try:
            if not caller.source.startswith("oidc:"):
                # The lease stands for "the IdP still vouches for this person": only its token says so.
                raise NotFound("a credential bound to an IdP sign-in is renewed with that sign-in's token "
                               "(`wardgate login`), not with an API key")
            until = gateway.store.renew_lease(credential_id, caller.uid, gateway.settings.idp_recheck,
                                              agent=caller.agent)
        except NotFound as exc:
            event(request, "credential.renew", "denied", caller, str(exc))
            raise HTTPException(404, str(exc)) from None
        return {"id": credential_id, "valid_until": iso(until)}

    def addr(request: Request) -> str | None:
        return request.client.host if request.client else None

    envelope_doc = {200: {"description": "An exec envelope; `status` says what happened and `next` what to do.",
                          "content": {"application/json": {"examples": {k: {"value": v} for k, v in EXEC_EXAMPLES.items()}}}}}

    @app.post("/api/exec", summary="Run a statement through the gateway's policy, masking and recording",
              responses=envelope_doc)
    async def exec_(body: ExecRequest, caller: Caller, request: Request) -> dict[str, Any]:
        # The caller was checked live in the store by `identity` (the Caller dependency), in this request.
        return await gateway.exec.run(caller, body.connection, body.sql, body.params, wait=body.wait, addr=addr(request))

    @app.get("/api/sessions/{session_id}/wait", summary="Long-poll an exec session until it finishes",
             responses=envelope_doc)
    async def wait_session(session_id: str, caller: Caller, timeout: float = 60) -> dict[str, Any]:
        timeout = min(max(timeout, 0.0), 300.0)
        owner = await asyncio.to_thread(gateway.exec.owner, session_id)
        if not can_read_all(caller) and not caller.owns(owner):
            raise HTTPException(404, f"no session {session_id!r}")
        envelope = await gateway.exec.wait(session_id, timeout)
        if envelope is None:  # not a live exec: the record is the answer
            return {"status": "recorded", "session_id": session_id, "session": await asyncio.to_thread(show_session, gateway.store, session_id)}
        return envelope

    def review_error(exc: ReviewError) -> HTTPException:
        return HTTPException(exc.status, str(exc))

    @app.get("/api/reviews", summary="Reviews you asked for or may decide (auditor, admin: all)")
    async def reviews(caller: Caller, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return await gateway.reviews.list(caller, status, limit)

    @app.get("/api/reviews/{review_id}", summary="A review, with its statement and history")
    async def review(review_id: str, caller: Caller) -> dict[str, Any]:
        try:
            return await gateway.reviews.get(caller, review_id)
        except ReviewError as exc:
            raise review_error(exc) from None

    @app.get("/api/reviews/{review_id}/wait", summary="Long-poll a review until it is decided (timeout clamped to 2..300 s)")
    async def wait_review(review_id: str, caller: Caller, timeout: float = 60) -> dict[str, Any]:
        try:
            return await gateway.reviews.wait(caller, review_id, min(max(timeout, 2.0), 300.0))
        except ReviewError as exc:
            raise review_error(exc) from None

    for verb in ("approve", "reject", "revoke"):
        def decide_route(verb: str = verb) -> Any:
            async def decide(review_id: str, caller: Caller, body: DecisionRequest | None = None) -> dict[str, Any]:
                try:
                    return await gateway.reviews.decide(caller, review_id, verb, body.reason if body else None)
                except ReviewError as exc:
                    raise review_error(exc) from None
            return decide
        app.post(f"/api/reviews/{{review_id}}/{verb}", summary=f"{verb.capitalize()} a review (approvers only; never your own)",
                 name=f"review_{verb}")(decide_route())

    @app.post("/api/grants", summary="Ask for just-in-time access to a connection (an access review)",
              responses={200: {"description": "pending_approval with the review id",
                               "content": {"application/json": {"example": {
                                   "status": "pending_approval", "review_id": "1c9e...", "connection": "prod",
                                   "approvers": ["sre"], "min_approvals": 1, "next": "ask sre to approve review 1c9e..."}}}}})
    async def request_grant(body: GrantRequest, caller: Caller) -> dict[str, Any]:
        try:
            duration = parse_duration(body.duration)
            return await gateway.reviews.request_access(caller, body.connection, duration, body.reason)
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        except ReviewError as exc:
            raise review_error(exc) from None

    @app.get("/api/grants", summary="Your access grants (approvers: the ones you may decide)")
    async def grants(caller: Caller) -> list[dict[str, Any]]:
        return [r for r in await gateway.reviews.list(caller) if r["kind"] == "access"]

    @app.post("/api/reviews/{review_id}/execute", summary="Run an approved review's stored statement, once (requester only)",
              responses=envelope_doc)
    async def execute_review(review_id: str, caller: Caller, request: Request, body: ExecuteRequest | None = None) -> dict[str, Any]:
        try:
            return await gateway.reviews.execute(caller, review_id, wait=body.wait if body else None, addr=addr(request))
        except ReviewError as exc:
            raise review_error(exc) from None

    # Every route's answer, by example, in the OpenAPI document.
    for route in app.routes:
        example = ROUTE_EXAMPLES.get((next(iter(getattr(route, "methods", {"?"}))), getattr(route, "path", "")))
        if example is not None and 200 not in route.responses:  # type: ignore[attr-defined]
            route.responses[200] = {"description": "Successful Response",  # type: ignore[attr-defined]
                                    "content": {"application/json": {"example": example}}}
    return app


_SESSION = {"id": "4f1c2a...", "user": "alice", "agent": None, "connection": "shop", "client_addr": "10.0.0.7",
            "started_at": "2026-11-22T10:00:00Z", "ended_at": "2026-11-22T10:05:00Z", "status": "closed",
            "end_reason": "client closed", "tls": True, "application_name": "psql", "statements": 3, "masked": {"email": 12}}
_REVIEW = {"id": "c3d2...", "kind": "statement", "status": "pending", "requester": "alice", "agent": "claude-code",
           "connection": "shop", "statement": "delete from orders where id = 7", "params": [], "sha256": "9f2c...",
           "policy_version": "a1b2c3d4e5f60718", "rules": [{"rule": "deletes-need-review", "action": "review",
                                                             "reason": "statement kind delete"}],
           "approvers": ["dba"], "min_approvals": 1, "approvals": 0, "created_at": "2026-11-22T10:00:00Z",
           "expires_at": "2026-11-23T10:00:00Z", "decided_at": None, "executed_at": None, "session_id": None,
           "url": "https://wardgate.example.com/api/reviews/c3d2...", "history": []}
ROUTE_EXAMPLES: dict[tuple[str, str], Any] = {
    ("GET", "/api/me"): {"user": "alice", "groups": ["dev"], "kind": "agent", "agent": "claude-code", "source": "oidc:corp",
                         "expires_at": "2026-11-22T11:00:00Z", "roles": []},
    ("GET", "/api/connections"): [{"name": "shop", "type": "postgresql", "verbs": ["connect", "exec"]}],
    ("GET", "/api/sessions"): [_SESSION],
    ("GET", "/api/sessions/{session_id}"): {**_SESSION, "statements": [
        {"seq": 1, "kind": "simple", "text": "select id, email from customers limit 5", "param_count": 0,
         "started_at": "2026-11-22T10:00:01Z", "duration_ms": 0.8, "status": "ok", "rows": 5, "command_tag": "SELECT 5",
         "error_code": None, "error_message": None}]},
    ("GET", "/api/sessions/{session_id}/analysis"): {
        "session_id": "4f1c2a...", "status": "ready", "level": "high", "title": "Privilege command",
        "explanation": "1 statement(s) change roles, grants or server settings, e.g. 'grant all on customers to public'.",
        "source": "rules", "analyzed_at": 1795082400.0, "findings": [
            {"rule": "privilege", "level": "high", "title": "Privilege command",
             "explanation": "1 statement(s) change roles, grants or server settings"}]},
    ("POST", "/api/credentials/{credential_id}/revoke"): {"id": "a1b2c3d4e5f6", "status": "revoked"},
    ("POST", "/api/apikeys"): {"id": "7d1e...", "name": "claude-code for alice", "kind": "agent", "user": "alice",
                               "agent": "claude-code", "groups": ["dev"], "key": "wgk_7d1e..._(shown once)"},
    ("GET", "/api/apikeys"): [{"id": "7d1e...", "name": "claude-code for alice", "kind": "agent", "user": "alice",
                               "agent": "claude-code", "groups": ["dev"], "created_at": "2026-11-22T09:00:00Z",
                               "expires_at": None, "revoked_at": None, "last_used_at": "2026-11-22T10:00:00Z"}],
    ("POST", "/api/apikeys/{key_id}/revoke"): {"id": "7d1e...", "status": "revoked"},
    ("POST", "/api/admin/policy/reload"): {"reloaded": True, "changed": ["guardrails"], "replicas_told": True},
    ("GET", "/api/events"): [{"id": "e0f1...", "at": "2026-11-22T10:00:00Z", "kind": "review.approve", "outcome": "ok",
                              "user": "olivia", "agent": None, "source": "review:c3d2...", "client_addr": None,
                              "detail": "customer asked"}],
    ("POST", "/api/credentials"): {"id": "a1b2c3d4e5f6", "user": "alice", "agent": None, "connection": "shop",
                                   "credential": "wgc_a1b2c3d4e5f6_(shown once)", "expires_at": "2026-11-22T10:15:00Z",
                                   "url": "postgresql://alice:wgc_...@gateway:6432/shop?sslmode=require",
                                   "env": {"PGHOST": "gateway", "PGPORT": "6432"}, "renew_every": None},
    ("POST", "/api/credentials/{credential_id}/renew"): {"id": "a1b2c3d4e5f6", "valid_until": "2026-11-22T10:01:00Z"},
    ("GET", "/api/reviews"): [_REVIEW],
    ("GET", "/api/reviews/{review_id}"): _REVIEW,
    ("GET", "/api/reviews/{review_id}/wait"): {**_REVIEW, "status": "approved", "approvals": 1, "timed_out": False},
    ("POST", "/api/reviews/{review_id}/approve"): {**_REVIEW, "status": "approved", "approvals": 1,
                                                  "history": [{"by": "olivia", "decision": "approve", "reason": None,
                                                               "at": "2026-11-22T10:02:00Z"}]},
    ("POST", "/api/reviews/{review_id}/reject"): {**_REVIEW, "status": "rejected", "history": [
        {"by": "olivia", "decision": "reject", "reason": "not during the freeze", "at": "2026-11-22T10:02:00Z"}]},
    ("POST", "/api/reviews/{review_id}/revoke"): {**_REVIEW, "status": "revoked"},
    ("GET", "/api/grants"): [{**_REVIEW, "kind": "access", "status": "approved", "statement": "access to prod for 1800s",
                              "duration_seconds": 1800, "reason": "incident 4211", "window_end": "2026-11-22T10:32:00Z",
                              "active": True}],
}


class ReadableRequests:
    """ASGI middleware: a request whose path or query holds a NUL character (%00) is answered 400 before
    any route reads it (see wardgate/text.py; bodies are checked by their models, `Body`)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (unreadable(scope.get("path", "")) or b"%00" in scope.get("query_string", b"")):
            await JSONResponse({"detail": f"the request's path or query {UNREADABLE_MESSAGE}"}, 400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: `X-Content-Type-Options: nosniff` on every HTTP answer (API, console, MCP, errors),
    so that no browser reads a JSON or text answer as HTML or script."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-content-type-options" for name, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
