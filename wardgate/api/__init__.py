"""HTTP API of the gateway (FastAPI; OpenAPI at /openapi.json). Every /api route takes a Bearer token
(an OIDC access token from a configured provider, or a Wardgate API key)."""


from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..config import ConfigError, parse_duration, parse_hostport
from ..domain import Identity
from ..identity import AuthenticationError
from ..recording.views import event_view, iso, list_sessions, show_session
from ..store import Conflict, NotFound

if TYPE_CHECKING:
    from ..app import Gateway


class CredentialRequest(BaseModel):
    connection: str = Field(description="Connection name (the dbname native clients use).")
    ttl: str | None = Field(default=None, description="Lifetime such as 15m or 2h; default from the config.")


def create_app(gateway: "Gateway") -> FastAPI:
    app = FastAPI(title="Wardgate", version="0.1.0", description=__doc__)

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
            return gateway.authenticator.authenticate(value)
        except AuthenticationError as exc:
            event(request, "api.authenticate", "denied", detail=str(exc))
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None

    Caller = Annotated[Identity, Depends(identity)]

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        return JSONResponse(gateway.health(), status_code=200 if gateway.ready else 503)

    def require(caller: Identity, *roles: str) -> None:
        if not gateway.gatekeeper.roles(caller) & set(roles):
            raise HTTPException(403, f"this needs the {' or '.join(roles)} role; ask a Wardgate administrator")

    def can_read_all(caller: Identity) -> bool:
        return bool(gateway.gatekeeper.roles(caller) & {"admin", "auditor"})

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
                 limit: int = 50) -> list[dict[str, Any]]:
        if not can_read_all(caller):
            if user not in (None, caller.user):
                raise HTTPException(403, "you may list only your own sessions (auditor or admin role for others)")
            user = caller.user
        return list_sessions(gateway.store, user=user, connection=connection, status=status, limit=min(limit, 1000))

    @app.get("/api/sessions/{session_id}", summary="A session and its statements")
    def session(session_id: str, caller: Caller) -> dict[str, Any]:
        try:
            data = show_session(gateway.store, session_id)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        if data["user"] != caller.user and not can_read_all(caller):
            raise HTTPException(404, f"no session {session_id!r}")  # do not confirm it exists
        return data

    @app.post("/api/credentials/{credential_id}/revoke", summary="Revoke a native credential; its sessions end")
    def revoke_credential(credential_id: str, caller: Caller, request: Request) -> dict[str, Any]:
        state = gateway.store.credential_owner(credential_id)
        if state is None or (state != caller.user and "admin" not in gateway.gatekeeper.roles(caller)):
            event(request, "credential.revoke", "denied", caller, f"credential {credential_id}")
            raise HTTPException(404, f"no credential {credential_id!r} of yours")
        gateway.store.revoke_credential(credential_id)
        event(request, "credential.revoke", "ok", caller, f"credential {credential_id} of {state}")
        return {"id": credential_id, "status": "revoked"}

    @app.get("/api/events", summary="Security events (auditor or admin role)")
    def events(caller: Caller, kind: str | None = None, outcome: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        require(caller, "auditor", "admin")
        return [event_view(e) for e in gateway.store.list_events(kind=kind, outcome=outcome, limit=min(limit, 1000))]

    @app.post("/api/credentials", summary="Issue a short-lived native credential for the caller")
    def issue_credential(body: CredentialRequest, caller: Caller, request: Request) -> dict[str, Any]:
        settings = gateway.settings
        store = gateway.store
        decision = gateway.gatekeeper.authorize(caller, body.connection, "connect")
        if not decision.allowed:
            event(request, "credential.issue", "denied", caller, decision.reason)
            raise HTTPException(403, decision.reason)
        try:
            ttl = parse_duration(body.ttl) if body.ttl else settings.default_ttl
            if caller.kind != "agent":  # an agent acts for an existing person; others are provisioned
                origin = caller.source if caller.source.startswith("oidc:") else "apikey"
                store.ensure_user(caller.user, list(caller.groups), origin)
            lease = settings.idp_recheck if caller.source.startswith("oidc:") and caller.kind != "service" else None
            issued = store.issue_credential(caller.user, body.connection, ttl, agent=caller.agent, lease=lease)
        except (ConfigError, Conflict) as exc:
            raise HTTPException(400, str(exc)) from None
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        event(request, "credential.issue", "ok", caller, f"credential {issued.id} for {issued.connection}, {decision.reason}")
        host, port = parse_hostport(settings.gateway.listen)
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return {
            "id": issued.id, "user": issued.user, "agent": issued.agent, "connection": issued.connection,
            "credential": issued.secret, "expires_at": iso(issued.expires_at),
            "url": f"postgresql://{issued.user}:{issued.secret}@{host}:{port}/{issued.connection}?sslmode=require",
            "env": {"PGHOST": host, "PGPORT": str(port), "PGUSER": issued.user, "PGPASSWORD": issued.secret,
                    "PGDATABASE": issued.connection, "PGSSLMODE": "require"},
            "renew_every": lease / 3 if lease else None,
        }

    @app.post("/api/credentials/{credential_id}/renew", summary="Keep an IdP-bound credential alive with a fresh sign-in")
    def renew_credential(credential_id: str, caller: Caller, request: Request) -> dict[str, Any]:
        try:
            until = gateway.store.renew_lease(credential_id, caller.user, gateway.settings.idp_recheck)
        except NotFound as exc:
            event(request, "credential.renew", "denied", caller, str(exc))
            raise HTTPException(404, str(exc)) from None
        return {"id": credential_id, "valid_until": iso(until)}

    return app
