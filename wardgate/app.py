"""Wires the parts together and runs the listeners until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
import time
from typing import Any
from urllib.parse import quote

from . import loopwatch
from .analysis.service import Analyzer
from .config import ConfigError, Settings, load, parse_duration, parse_hostport
from .engines.postgres.server import PostgresListener
from .exec import ExecRunner
from .identity.authenticator import Authenticator
from .logs import RequestIds
from .metrics import STATS, GatewayCollector
from .policy import snapshot as policy_snapshot
from .policy.gatekeeper import Gatekeeper
from .recording.journal import event
from .recording.recorder import Recorder, stalled
from .recording.sinks import Shipper
from .recording.views import iso
from .reviews import Reviews
from .store import Actor, Conflict, Refused, Store
from .store.bus import Bus
from .tls import ensure_self_signed, server_context

log = logging.getLogger("wardgate")


def tls_context(settings: Settings) -> tuple[ssl.SSLContext, str]:
    """The listeners' TLS context and a description of where its certificate came from."""
    if settings.gateway.tls_cert:
        return server_context(settings.gateway.tls_cert, settings.gateway.tls_key), settings.gateway.tls_cert
    host, _ = parse_hostport(settings.gateway.listen)
    ca, cert, key = ensure_self_signed(settings.data_dir / "tls", [host])
    return server_context(cert, key), str(ca)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.open(settings)
        self.store.signer  # noqa: B018 - a secret key that cannot open the store's signing key stops the start here
        self.recorder = Recorder(self.store, settings)
        self.tls, self.tls_source = tls_context(settings)
        self.gatekeeper = Gatekeeper(settings, masking_salt=self.store.box.derive("masking"))
        self.gatekeeper.grants = self.store.active_grants
        self.postgres = PostgresListener(settings, self.store, self.recorder, self.tls, self.gatekeeper)
        self.authenticator = Authenticator(settings, self.store)
        self.exec = ExecRunner(self)
        self.reviews = Reviews(self)
        self.analyzer = Analyzer(self, settings.analysis)
        self.postgres.reviews = self.reviews
        self.shipper = Shipper(self.store, settings.audit_sinks, settings.data_dir) if settings.audit_sinks else None
        # Other replicas' changes, as they commit (PostgreSQL store): reviews and exec results wake
        # their waiters here, revoked credentials end their sessions here.
        self.bus = Bus(settings.store_url)
        self._check_credentials = asyncio.Event()
        self.bus.on("review", self.reviews.wake)
        self.bus.on("exec", self.exec.heard)
        self.bus.on("purge", self.exec.purged)
        self.bus.on("policy", lambda _key: self.background(self.reload_policy(Actor.local("another replica"), tell=False)))
        self._background: set[asyncio.Task[Any]] = set()
        self.bus.on("credential", lambda _key: self._check_credentials.set())
        self.bus.on("*", lambda _key: (self.reviews.wake_all(), self.exec.heard_all(), self._check_credentials.set()))
        self.started_at = time.time()
        self.ready = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.http_server: Any = None
        self.mcp: Any = None
        self._exit = contextlib.AsyncExitStack()

    def provision(self, caller: Any) -> Any:
        """The caller, checked live in the store and with its user's id (a token's user is made on first
        sight). Blocking; raises store.Conflict for an identity removed, disabled or named like another."""
        try:
            return self.store.resolve(caller)
        except Refused as exc:
            raise Conflict(str(exc)) from None

    def issue_credential(self, caller: Any, connection: str, ttl: str | None, addr: str | None) -> dict[str, Any]:
        """A native credential for the caller, with how to use it (shown once). Blocking. Raises
        PermissionError (no access), ConfigError or Conflict (bad request), NotFound (no connection)."""
        settings = self.settings
        fields = {"user": caller.user, "agent": caller.agent, "source": caller.source, "addr": addr}
        decision = self.gatekeeper.authorize(caller, connection, "connect")
        if not decision.allowed:
            self.record_event("credential.issue", "denied", detail=decision.reason, **fields)
            raise PermissionError(decision.reason)
        seconds = parse_duration(ttl) if ttl else settings.default_ttl
        caller = self.provision(caller)
        lease = settings.idp_recheck if caller.source.startswith("oidc:") and caller.kind != "service" else None
        issued = self.store.issue_credential(caller.user, connection, seconds, agent=caller.agent, lease=lease,
                                             not_after=decision.until, uid=caller.uid)
        self.record_event("credential.issue", "ok", detail=f"credential {issued.id} for {issued.connection}, {decision.reason}",
                          **fields)
        host, port = parse_hostport(settings.gateway.listen)
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return {
            "id": issued.id, "user": issued.user, "agent": issued.agent, "connection": issued.connection,
            "credential": issued.secret, "expires_at": iso(issued.expires_at),
            "url": f"postgresql://{quote(issued.user, safe='')}:{issued.secret}@{host}:{port}/{issued.connection}"
                   "?sslmode=require",  # a service account's name has a ':' (svc:ci)
            "env": {"PGHOST": host, "PGPORT": str(port), "PGUSER": issued.user, "PGPASSWORD": issued.secret,
                    "PGDATABASE": issued.connection, "PGSSLMODE": "require"},
            "renew_every": lease / 3 if lease else None,
        }

    def record_event(self, kind: str, outcome: str, **fields: Any) -> None:
        """Record a security event, durable on return (before the action it describes completes);
        safe to call from any thread (the API's workers)."""
        record = event(kind, outcome, **fields)
        try:
            self.recorder.write([record])
        except OSError:
            log.exception("cannot record event %s", record["kind"])

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ready else "starting",
            "postgres_listener": self.settings.gateway.listen,
            "live_sessions": len(self.postgres.sessions),
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "recorder": "running" if self.recorder.drainer_alive else "stopped",
            # Other replicas' changes (PostgreSQL store): off on the embedded store, where there is one gateway.
            "events": ("listening" if self.bus.listening else "reconnecting") if self.bus.enabled else "off",
            # Delivery position only: a sink's error can name internal hosts, and this endpoint is public.
            "audit_sinks": {name: {"delivered_seq": st["delivered"], "healthy": st["error"] is None}
                            for name, st in (self.shipper.state.items() if self.shipper is not None else ())},
        }

    def background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload_policy(self, actor: Actor, tell: bool = True) -> dict[str, Any]:
        """Read the config file's policy again (access rules, guardrails, masking, roles) and use it from
        the next decision: new sessions, every exec and review, and the statements still to come in live
        sessions (their masking stays as it began). A file that does not load changes nothing. With
        `tell`, every other replica does the same (PostgreSQL store)."""
        try:
            fresh = await asyncio.to_thread(load, self.settings.path)
        except ConfigError as exc:
            log.error("policy reload refused, the policy in force stays: %s", exc)
            return {"reloaded": False, "error": str(exc)}
        self.gatekeeper.reload(fresh)
        for part in ("access", "guardrails", "masking", "roles"):
            setattr(self.settings, part, getattr(fresh, part))
        self.reviews.refresh_policy_version()
        for live in list(self.postgres.sessions.values()):
            if live.identity is not None:
                # The session's masking (and the catalog it has read) stays as it started.
                live.relay.policy = self.gatekeeper.statement_policy(live.identity, live.connection, live.relay.masking)
        changed = await asyncio.to_thread(self.store.note_policy, policy_snapshot(self.settings), actor)
        told = tell and await asyncio.to_thread(self.store.announce_now, "policy", "reload")
        log.info("policy reloaded (%s)%s", ", ".join(changed) if changed else "no change",
                 "; the other replicas were told" if told else "")
        return {"reloaded": True, "changed": sorted(changed or []), "replicas_told": bool(told)}

    def metrics_collector(self) -> GatewayCollector:
        def extra() -> dict[str, Any]:
            return {"recorder": self.recorder.drainer_alive, "listening": self.bus.listening,
                    "backlog": sum(1 for _ in self.settings.journal_dir.glob("*.ready"))}
        return GatewayCollector(STATS, lambda: (live.connection for live in self.postgres.sessions.values()), extra)

    async def readiness(self) -> list[str]:
        """Why this replica should not take new clients now (empty: ready)."""
        problems = []
        if not self.ready:
            problems.append("starting or stopping")
        if not self.recorder.drainer_alive:
            problems.append("the recorder process is not running")
        if self.recorder.failure is not None:
            problems.append(f"the recording journal ({self.recorder.journal.dir}) cannot be written: "
                            f"{self.recorder.failure}; no session opens until it can")
        why = stalled(self.settings.journal_dir)
        if why is not None:
            problems.append(f"records are not reaching the store ({why}); they wait in the journal "
                            f"({self.settings.journal_dir}) and the log says why")
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store.ping), 5)
        except Exception as exc:  # noqa: BLE001 - whatever the store says, it is not answering
            problems.append(f"the store does not answer: {type(exc).__name__}")
        return problems

    async def watch_credentials(self, interval: float = 0.5) -> None:
        """End live sessions whose credential was revoked or expired (checked against the store)."""
        while True:
            try:  # a revocation announced by any replica (or the CLI) is checked at once
                await asyncio.wait_for(self._check_credentials.wait(), interval)
            except TimeoutError:
                pass
            self._check_credentials.clear()
            ids = {live.credential_id for live in self.postgres.sessions.values()}
            if not ids:
                continue
            try:
                dead = await asyncio.to_thread(self.store.dead_credentials, ids)
            except Exception:  # noqa: BLE001 - keep watching when the store hiccups
                log.exception("cannot check credentials")
                continue
            if dead:
                self.postgres.end_sessions(dead)

    async def retention(self, interval: float = 3600.0) -> None:
        """Purge session content older than [recording] retention, at start and then hourly."""
        keep = self.settings.recording.retention_seconds
        assert keep is not None
        while True:
            try:
                done = await asyncio.to_thread(self.store.purge_sessions, time.time() - keep,
                                               Actor.local(f"retention:{self.settings.recording.retention}"))
                if done["sessions"]:
                    log.info("retention: purged the content of %d sessions (%d statements)", done["sessions"],
                             done["statements"])
            except Exception:  # noqa: BLE001 - try again at the next round
                log.exception("retention purge failed")
            await asyncio.sleep(interval)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        recovered = await asyncio.to_thread(self.recorder.recover)
        if recovered:
            log.warning("recovered %d journal records left by a gateway process that ended", recovered)
        self.recorder.start()
        changed = await asyncio.to_thread(self.store.note_policy, policy_snapshot(self.settings),
                                        Actor.local(f"config:{self.settings.path or '(defaults)'}"))
        if changed:
            log.info("policy recorded in the audit log (changed: %s)", ", ".join(changed))
        host, port = parse_hostport(self.settings.gateway.listen)
        await self.postgres.start(host, port)
        self._tasks.append(asyncio.create_task(self.recorder.run(), name="recorder"))
        self._tasks.append(asyncio.create_task(self.watch_credentials(), name="credentials"))
        if self.bus.enabled:
            self._tasks.append(asyncio.create_task(self.bus.run(), name="events"))
        self._tasks.append(asyncio.create_task(self.reviews.run(), name="reviews"))
        self._tasks.append(asyncio.create_task(self.reviews.notifier.run(), name="notifications"))
        if self.shipper is not None:
            self._tasks.append(asyncio.create_task(self.shipper.run(), name="audit-sinks"))
        if self.settings.recording.retention_seconds is not None:
            self._tasks.append(asyncio.create_task(self.retention(), name="retention"))
        await self._start_http()
        self.ready = True

    async def _start_http(self) -> None:
        import uvicorn

        from .api import ReadableRequests, SecurityHeaders, create_app

        host, port = parse_hostport(self.settings.gateway.http_listen)
        kwargs: dict[str, Any] = {}
        if self.settings.gateway.http_tls:
            cert = self.settings.gateway.tls_cert or str(self.settings.data_dir / "tls" / "server.crt")
            key = self.settings.gateway.tls_key or str(self.settings.data_dir / "tls" / "server.key")
            kwargs = {"ssl_certfile": cert, "ssl_keyfile": key}
        app = create_app(self)
        if self.settings.mcp.enabled:
            from .mcp import create_server, transport_security

            self.mcp = create_server(self, self.settings.mcp_resource_url)
            # Stateless: each MCP request stands alone, so any replica behind a load balancer answers it
            # (what lasts, such as a running exec or a review, is in the store).
            app.mount("/", self.mcp.streamable_http_app(
                streamable_http_path="/mcp", host=host, stateless_http=True,
                transport_security=transport_security(self.settings.mcp_resource_url, host, port)))
            # uvicorn runs without lifespan here, so the MCP session manager is started by hand.
            await self._exit.enter_async_context(self.mcp.session_manager.run())
        # X-Forwarded-For is believed only from [gateway] trusted_proxies: uvicorn's default trusts it from
        # loopback, where anyone on the host could then pick the address the throttle and the records see.
        proxies = self.settings.gateway.trusted_proxies
        kwargs.update({"proxy_headers": True, "forwarded_allow_ips": list(proxies)} if proxies else {"proxy_headers": False})
        config = uvicorn.Config(RequestIds(SecurityHeaders(ReadableRequests(app))), host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False, **kwargs)
        self.http_server = uvicorn.Server(config)
        self.http_server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._tasks.append(asyncio.create_task(self.http_server.serve(), name="http"))
        for _ in range(200):
            if self.http_server.started:
                return
            if self._tasks[-1].done():
                self._tasks[-1].result()
                raise OSError(f"the HTTP listener could not start on {host}:{port}")
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        self.ready = False
        await self.postgres.close()
        if self.http_server is not None:
            self.http_server.should_exit = True
        for task in self._tasks:
            if task.get_name() != "http":
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._exit.aclose()
        except Exception:  # noqa: BLE001 - closing the MCP sessions must not stop the shutdown
            log.exception("closing the MCP server")
        await self.recorder.close()
        self.store.close()


def run(settings: Settings, on_ready: Any = None) -> None:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        runner = asyncio.run

    async def main() -> None:
        gateway = Gateway(settings)
        loop = asyncio.get_running_loop()
        watching = None
        if settings.gateway.slow_callback_ms:
            # asyncio's debug mode logs every callback that held the loop longer than this ("Executing ...
            # took"), and loopwatch any stretch in which the loop ran nothing else (uvloop does not time what
            # a socket's read runs): the soak runs with both and fails on any. They cost speed: off by default.
            loop.set_debug(True)
            loop.slow_callback_duration = settings.gateway.slow_callback_ms / 1000
            watching = loop.create_task(loopwatch.watch(settings.gateway.slow_callback_ms / 1000), name="loopwatch")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, gateway.stop)
        # kill -HUP: read the policy again here and on every replica
        loop.add_signal_handler(signal.SIGHUP, lambda: gateway.background(gateway.reload_policy(Actor.local("SIGHUP"))))
        await gateway.start()
        # What start-up allocated lives as long as the process: keep it out of every garbage collection,
        # so that a collection triggered by the relay's short-lived objects never walks the whole heap.
        gc.freeze()
        if on_ready is not None:
            on_ready(gateway)
        await gateway._stop.wait()
        if watching is not None:
            watching.cancel()
        await gateway.shutdown()

    runner(main())
