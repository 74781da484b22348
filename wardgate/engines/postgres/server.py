"""The PostgreSQL listener: TLS negotiation, client authentication with Wardgate credentials,
the upstream connection, cancel requests, and the hand-over to the relay."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ...config import Settings
from ...domain import Identity
from ...identity.throttle import Throttle, lockout_message
from ...masking.catalog import Shared
from ...metrics import STATS
from ...policy.gatekeeper import Gatekeeper
from ...recording.journal import event
from ...sql.offload import Offload
from ...store import CREDENTIAL_PREFIX, UNAVAILABLE, UNAVAILABLE_MESSAGE, Store
from . import codec, options, upstream
from .budget import Budget, trim_heap
from .scram import MECHANISM, ScramError, ScramServer, make_verifier
from .session import Relay
from .stream import PeerClosed, StreamProtocol

log = logging.getLogger("wardgate.postgres")

_HINT_CREDENTIAL = "issue a credential with `wardgate credentials issue --user {user} --connection {conn}` and use it as the password"


class Rejected(Exception):
    """The handshake ends with a FATAL error to the client (and a record of the attempt)."""

    def __init__(self, code: str, message: str, hint: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.code, self.hint, self.detail = code, hint, detail


def _event(kind: str, outcome: str, session: dict[str, Any], detail: str) -> dict[str, Any]:
    """An audit event about a native session."""
    return event(kind, outcome, user=session.get("user"), agent=session.get("agent"), source=f"session:{session['sid']}",
                 addr=session.get("addr"), detail=detail)


@dataclass
class LiveSession:
    relay: Relay
    credential_id: str
    user: str
    connection: str
    upstream_pid: int
    upstream_secret: bytes
    cancel_pid: int
    cancel_secret: bytes
    identity: Identity | None = None


class PostgresListener:
    def __init__(
        self, settings: Settings, store: Store, recorder: Any, tls: ssl.SSLContext | None, gatekeeper: Gatekeeper
    ) -> None:
        self.settings = settings
        self.gatekeeper = gatekeeper
        self.store = store
        self.recorder = recorder
        self.tls = tls
        self.sessions: dict[str, LiveSession] = {}
        # Long statements are classified in worker processes, every door's (sql/offload.py).
        self.offload = Offload(timeout=settings.gateway.inspect_timeout)
        self.budget: Budget[Relay] = Budget(settings.gateway.inspect_budget, on_large_release=self._trim_soon)
        self._trim: asyncio.TimerHandle | None = None
        self._gone = 0  # connections ended since memory was last given back
        self.by_cancel_key: dict[int, LiveSession] = {}
        self.reviews: Any = None  # the review workflow, when the gateway has one (reviews.Reviews)
        self.server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._fake_salt_key = secrets.token_bytes(32)
        self.throttle = Throttle()  # failed sign-ins per (client address, user name)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._new_protocol, host, port, reuse_port=reuse_port or None, backlog=1024)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def _new_protocol(self) -> StreamProtocol:
        proto = StreamProtocol(max_message=self.settings.gateway.max_message_size)
        self._background(self._handle(proto))
        return proto

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for live in list(self.sessions.values()):
            live.relay.fail(codec.fatal("57P01", "the gateway is shutting down", hint="reconnect in a moment"), "gateway shutdown", "57P01")
        for task in list(self._tasks):
            task.cancel()
        await self.offload.close()

    def _connection_gone(self) -> None:
        """Every few hundred connections ended (TLS buffers, handshakes that timed out), memory goes back."""
        self._gone += 1
        if self._gone >= 256:
            self._gone = 0
            self._trim_soon()

    def _trim_soon(self) -> None:
        """Give memory back to the system shortly after a session let go of a large message (once for a
        burst of them: trimming walks the heap)."""
        if self._trim is None:
            def trim() -> None:
                self._trim = None
                # What ended sessions held may still sit in reference cycles (a relay and its protocols, an
                # exception's traceback and the frames it keeps, a read among their locals), which only a
                # full collection frees: 8 sessions of 120 MiB left 240 MB behind a round without it. Then
                # the heap is trimmed, in a thread: it walks the heap for milliseconds, and ctypes lets go
                # of the interpreter.
                gc.collect()
                asyncio.get_running_loop().run_in_executor(None, trim_heap)
            self._trim = asyncio.get_running_loop().call_later(1.0, trim)

    # -------------------------------------------------------------------------- handshake

    async def _handle(self, client: StreamProtocol) -> None:
        await asyncio.sleep(0)  # let connection_made run
        transport = client.transport
        peer = transport.get_extra_info("peername") if transport else None
        addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "local"
        sock = transport.get_extra_info("socket") if transport else None
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        record = {"k": "session", "sid": uuid.uuid4().hex, "user": "?", "conn": "?", "addr": addr, "at": time.time(),
                  "tls": False, "app": None, "gw": self.recorder.instance}
        try:
            startup = await asyncio.wait_for(self._negotiate(client), self.settings.gateway.auth_timeout)
        except PeerClosed:
            if len(client.reader):  # it left in the middle of a packet: worth a record
                self._reject(client, record, Rejected("08P01", "the client sent a truncated startup packet and left"))
            else:
                client.abort()  # connected and left without a word (a port check): nothing to record
            return
        except TimeoutError:
            self._reject(client, record, Rejected("08006", "the client did not finish the startup in time"))
            return
        except (ConnectionError, ssl.SSLError) as exc:
            record["tls"] = True
            self._reject(client, record, Rejected("08006", f"TLS handshake failed: {exc}"))
            client.abort()
            return
        except codec.ProtocolViolation as exc:
            self._reject(client, record, Rejected("08P01", f"invalid startup: {exc}"))
            return
        if startup is None:
            return  # a cancel request, handled
        user = startup.parameters.get("user", "")
        record.update(user=user or "?", conn=startup.parameters.get("database") or user or "?", tls=client.tls,
                      app=startup.parameters.get("application_name"))
        try:
            live = await asyncio.wait_for(self._authenticate_and_connect(client, startup, record), self.settings.gateway.auth_timeout + self.settings.gateway.upstream_connect_timeout)
        except Rejected as exc:
            self._reject(client, record, exc)
            return
        except (TimeoutError, PeerClosed, ConnectionError) as exc:
            self._reject(client, record, Rejected("08006", f"the client left during authentication ({type(exc).__name__})"))
            return
        except codec.ProtocolViolation as exc:
            self._reject(client, record, Rejected("08P01", f"protocol violation during authentication: {exc}"))
            return
        except UNAVAILABLE as exc:
            log.error("the store is unavailable: %s", exc, extra={"session_id": record["sid"]})
            self._reject(client, record, Rejected("57P03", f"{UNAVAILABLE_MESSAGE}, so it cannot check credentials now",
                                                  hint="try again in a moment; sessions already open go on"))
            return
        except Exception as exc:  # noqa: BLE001 - any fault here must end in a clear error, not a hang
            log.exception("handshake failed")
            self._reject(client, record, Rejected("XX000", f"internal gateway error during connection setup: {type(exc).__name__}"))
            return
        if live is not None:
            live.relay.start()

    async def _negotiate(self, client: StreamProtocol) -> codec.StartupMessage | None:
        """Answer SSLRequest/GSSENCRequest, serve CancelRequest, return the StartupMessage."""
        while True:
            packet = await client.read_startup()
            if isinstance(packet, codec.SSLRequest):
                if client.tls:
                    raise codec.ProtocolViolation("SSLRequest inside TLS")
                if len(client.reader):
                    # Bytes sent before the TLS handshake could be injected by a man in the middle.
                    raise codec.ProtocolViolation("received unencrypted data after SSL request")
                if self.tls is None:
                    client.write(b"N")
                    continue
                client.write(b"S")
                await client.start_tls(self.tls, server_side=True)
            elif isinstance(packet, codec.GSSENCRequest):
                client.write(b"N")
            elif isinstance(packet, codec.CancelRequest):
                await self._cancel(packet)
                client.close()
                return None
            else:
                return packet

    async def _cancel(self, packet: codec.CancelRequest) -> None:
        live = self.by_cancel_key.get(packet.process_id)
        if live is None or not hmac.compare_digest(live.cancel_secret, packet.secret_key):
            log.info("cancel request with an unknown key ignored")
            return
        await self._cancel_upstream(live)

    def _fake_salt(self, user: str) -> bytes:
        # Unknown users get a stable salt, so the exchange does not reveal which names exist.
        return hmac.new(self._fake_salt_key, user.encode(), hashlib.sha256).digest()[:16]

    async def _authenticate_and_connect(
        self, client: StreamProtocol, startup: codec.StartupMessage, record: dict[str, Any]
    ) -> LiveSession | None:
        params = startup.parameters
        user, conn_name = record["user"], record["conn"]
        if startup.minor > 0 or startup.protocol_options:
            client.write(codec.negotiate_protocol_version(0, startup.protocol_options))
        if not params.get("user"):
            raise Rejected("28000", "no user name given", hint="connect with user=<your Wardgate user name>")
        if params.get("replication") not in (None, "false", "0", "off", "no"):
            raise Rejected("28000", "replication connections are not supported through the gateway")
        if self.settings.gateway.require_tls and not client.tls:
            raise Rejected("28000", "the gateway requires TLS", hint="connect with sslmode=require (or verify-full)")

        # Guessing a credential: after a few failures for this name from this address, refused unchecked.
        throttled = (record["addr"].rsplit(":", 1)[0], user)
        if (wait := self.throttle.wait(throttled)) > 0:
            raise Rejected("28000", f'{lockout_message(wait)} for user "{user}"',
                           hint="check the credential (`wardgate connect` prints a fresh one) and wait before retrying")
        user_row, candidates, agents = await asyncio.to_thread(self.store.auth_material, user, conn_name)
        salt = user_row.scram_salt if user_row is not None else self._fake_salt(user)
        hint = _HINT_CREDENTIAL.format(user=user, conn=conn_name)
        failed = Rejected("28P01", f'password authentication failed for user "{user}" on connection "{conn_name}"', hint=hint)

        if self.settings.gateway.client_auth == "password":
            if not client.tls:
                raise Rejected("28000", "cleartext password authentication needs TLS", hint="connect with sslmode=require")
            client.write(codec.auth_cleartext_password())
            mtype, body = await client.read_message()
            if mtype != ord("p"):
                raise codec.ProtocolViolation("expected a password message")
            password = body.rstrip(b"\x00").decode("utf-8", "replace")
            cred_id = password[len(CREDENTIAL_PREFIX):].split("_", 1)[0] if password.startswith(CREDENTIAL_PREFIX) else ""
            candidate = dict(candidates).get(cred_id)
            # PBKDF2 takes milliseconds: off the event loop, so other sessions do not wait for it.
            probe = await asyncio.to_thread(make_verifier, password, salt, candidate.iterations if candidate else 4096)
            if candidate is None or not hmac.compare_digest(probe.stored_key, candidate.stored_key):
                self.throttle.failed(throttled)
                raise failed
            matched = cred_id
        else:
            client.write(codec.auth_sasl([MECHANISM]))
            mtype, body = await client.read_message()
            if mtype != ord("p"):
                raise codec.ProtocolViolation("expected a SASLInitialResponse")
            mechanism, data = codec.parse_sasl_initial_response(body)
            if mechanism != MECHANISM:
                raise Rejected("28000", f"SASL mechanism {mechanism!r} is not offered; use {MECHANISM}")
            scram = ScramServer(salt, candidates[0][1].iterations if candidates else 4096)
            try:
                client.write(codec.auth_sasl_continue(scram.client_first(data)))
                mtype, body = await client.read_message()
                if mtype != ord("p"):
                    raise codec.ProtocolViolation("expected a SASLResponse")
                matched, final = scram.client_final(body, candidates)  # type: ignore[arg-type,assignment]
            except ScramError as exc:
                if "password authentication failed" in str(exc):
                    self.throttle.failed(throttled)
                    raise failed from None
                raise Rejected("28000", f"SCRAM authentication failed: {exc}") from None
            client.write(codec.auth_sasl_final(final))
        self.throttle.succeeded(throttled)
        record["cred"] = matched
        record["agent"] = agents.get(matched)
        assert user_row is not None  # a credential matched, so the user exists
        record["uid"] = user_row.uid
        identity = Identity(user, tuple(user_row.groups), "agent" if record["agent"] else "user", record["agent"],
                            uid=user_row.uid)
        decision = await asyncio.to_thread(self.gatekeeper.authorize, identity, conn_name, "connect")
        if not decision.allowed:
            raise Rejected("28000", decision.reason, hint="ask an administrator for access (an [[access]] rule)")

        spec = await asyncio.to_thread(self.store.get_connection, conn_name)
        if spec is None:
            raise Rejected("3D000", f"connection {conn_name!r} does not exist", hint="see `wardgate connections list`")
        if refused := options.refused_setting(params):
            setting, why = refused
            raise Rejected("42501", f"the startup setting {setting} {why}",
                           hint="remove it from PGOPTIONS / the connection string (the gateway acts as the connection's "
                                f"role); the settings it passes on: {', '.join(sorted(options.ALLOWED))}")
        forwarded = {k: v for k, v in params.items() if k not in ("user", "database", "replication")}
        masking = self.gatekeeper.masking_policy(identity, conn_name)
        policy = self.gatekeeper.statement_policy(identity, conn_name, masking)
        try:
            up = await upstream.connect(spec, forwarded, self.settings.gateway.upstream_connect_timeout,
                                        standard_strings=bool(policy.rules), read_only=policy.read_only,
                                        password_env_prefix=self.settings.upstream.password_env_prefix)
        except upstream.UpstreamError as exc:
            if exc.code == "42501":  # refused by the gateway's own rule, not a failing database
                raise Rejected(exc.code, str(exc), hint=exc.hint) from None
            STATS.upstream_errors[conn_name] += 1
            code = exc.code if exc.code.startswith(("08", "28", "3D", "53", "57")) else "08001"
            # As on exec: the reason names the database's host and port, which only admins are told; it is
            # logged and kept in the audit log (session.upstream) for them.
            log.warning("session %s: %s", record["sid"], exc, extra={"session_id": record["sid"], "connection": conn_name})
            self.recorder.keep([_event("session.upstream", "error", record, f"{conn_name}: {exc} (SQLSTATE {code})")])
            admin = "admin" in self.gatekeeper.roles(identity)
            raise Rejected(code, str(exc) if admin else upstream.unreachable_message(conn_name),
                           hint=(exc.hint if admin else None) or "the database behind the gateway is unavailable; try "
                                                                 "again, or ask the operator") from None
        self._background(asyncio.to_thread(self.store.mark_used, matched))

        if masking.needs_catalog:
            try:
                shared = self.gatekeeper.shared_catalog(conn_name)
                if not shared.restored:
                    await self._restore_masked(shared, conn_name)
                masking.load_catalog(await upstream.simple_query(up, masking.CATALOG_SQL))
                if (grown := shared.unsaved()) is not None:
                    self._background(asyncio.to_thread(self.store.remember_masked, conn_name, grown))
            except (upstream.UpstreamError, TimeoutError, PeerClosed) as exc:
                up.protocol.close()
                raise Rejected("08001", f"cannot read the catalog of {conn_name!r} to plan masking: {exc}") from None

        # The session is recorded before the client can send its first statement; if it cannot be, no
        # session opens (fail closed: nothing runs unrecorded).
        try:
            self.recorder.write([record, _event("session.start", "ok", record, f"{conn_name} from {record['addr']}"
                                                f"{' over TLS' if record.get('tls') else ''}")])
        except OSError as exc:
            up.protocol.close()
            log.error("cannot write the recording journal: %s", exc, extra={"session_id": record["sid"]})
            raise Rejected("58030", "the gateway cannot record sessions now (its recording journal cannot be written), "
                           "so it opens none", hint="try again later; the gateway's operator has been told") from None
        cancel_pid = secrets.randbelow(2**31 - 1) + 1
        while cancel_pid in self.by_cancel_key:
            cancel_pid = secrets.randbelow(2**31 - 1) + 1
        cancel_secret = secrets.token_bytes(4)
        relay = Relay(
            session_id=record["sid"], connection=conn_name, client=client, upstream=up.protocol,
            record=self.recorder.write_lines, defer=self.recorder.defer, on_end=self._ended,
            record_parts=self.recorder.write_parts, durable=self.recorder.durable,
            on_abandon=self._abandoned, max_message=self.settings.gateway.max_message_size,
            policy=policy,
            masking=masking, on_ddl=self.gatekeeper.shared_catalog(conn_name).changed,
            user=user, agent=record["agent"], results=self.settings.recording.results,
            sample_rows=self.settings.recording.sample_rows, sample_bytes=self.settings.recording.sample_bytes,
            client_encoding=dict(up.parameters).get("client_encoding", "UTF8"), offload=self.offload,
            budget=self.budget,
            review=None if self.reviews is None else (
                lambda statement, decision, sid=record["sid"]: self.reviews.native(identity, conn_name, statement, decision, sid)),
        )
        live = LiveSession(relay, matched, user, conn_name, up.process_id, up.secret_key, cancel_pid, cancel_secret,
                           identity)
        self.sessions[record["sid"]] = live
        STATS.sessions[conn_name] += 1
        log.info("session started from %s", record["addr"], extra={"session_id": record["sid"], "user": user,
                                                                   "connection": conn_name})
        self.by_cancel_key[cancel_pid] = live
        relay.tracker.transaction_status = up.transaction_status
        out = [codec.auth_ok()]
        out += [codec.parameter_status(k, v) for k, v in up.parameters]
        out += up.notices
        out.append(codec.backend_key_data(cancel_pid, cancel_secret))
        out.append(codec.ready_for_query(up.transaction_status))
        client.write(b"".join(out))
        return live

    def _reject(self, client: StreamProtocol, record: dict[str, Any], exc: Rejected) -> None:
        STATS.sessions_refused[exc.code] += 1
        self._connection_gone()
        client.write(codec.fatal(exc.code, str(exc), hint=exc.hint, detail=exc.detail))
        client.close()
        record.update(status="rejected", reason=str(exc), code=exc.code, ended=time.time())
        self.recorder.keep([record, _event("session.start", "denied", record, f"{exc.code}: {exc}")])
        log.info("rejected %s for user %r on %r: %s %s", record["addr"], record["user"], record["conn"], exc.code, exc,
                 extra={"session_id": record["sid"], "user": record["user"], "connection": record["conn"]})

    async def _restore_masked(self, shared: Shared, conn_name: str) -> None:
        """What the store kept of the connection's masked columns; without the store, the rules' names
        still mask, and the next session tries again."""
        try:
            shared.restore(await asyncio.to_thread(self.store.masked_columns, conn_name))
        except Exception as exc:  # the store is down: sessions go on (see test_resilience)
            log.warning("cannot read the masked columns of %s from the store: %s", conn_name, exc)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    def _abandoned(self, relay: Relay) -> None:
        live = self.sessions.get(relay.session_id)
        if live is not None:
            self._background(self._cancel_upstream(live))

    async def _cancel_upstream(self, live: LiveSession) -> None:
        spec = await asyncio.to_thread(self.store.get_connection, live.connection)
        if spec is None:
            return
        try:
            await upstream.cancel(spec, live.upstream_pid, live.upstream_secret)
        except upstream.UpstreamError as exc:
            log.warning("cancel for session %s failed: %s", live.relay.session_id, exc,
                        extra={"session_id": live.relay.session_id})

    def _ended(self, relay: Relay, reason: str, code: str | None = None) -> None:
        self._connection_gone()
        live = self.sessions.pop(relay.session_id, None)
        if live is not None:
            self.by_cancel_key.pop(live.cancel_pid, None)
        end: dict[str, Any] = {"k": "end", "sid": relay.session_id, "at": time.time(), "reason": reason, "code": code}
        detail = reason
        if relay.masking is not None and relay.masking.totals:
            end["masked"] = dict(relay.masking.totals)
            STATS.masked.update(relay.masking.totals)
            detail += "; masked " + ", ".join(f"{k}: {v}" for k, v in sorted(relay.masking.totals.items()))
        who = {"sid": relay.session_id, "user": relay.user, "agent": relay.agent, "addr": None}
        # Kept until written if the journal cannot take it now: no session's end goes missing.
        self.recorder.keep([end, _event("session.end", "ok", who, detail)])
        log.info("session ended: %s", reason, extra={"session_id": relay.session_id, "user": relay.user,
                                                     "connection": relay.connection})

    # -------------------------------------------------------------------------- revocation

    def end_sessions(self, credential_ids: dict[str, str]) -> int:
        """End live sessions whose credential is in `credential_ids` (id -> 'revoked'/'expired')."""
        n = 0
        for live in list(self.sessions.values()):
            why = credential_ids.get(live.credential_id)
            if why is None:
                continue
            n += 1
            live.relay.fail(
                codec.fatal("28000", f"credential {live.credential_id} was {why}; this session is closed",
                            hint=_HINT_CREDENTIAL.format(user=live.user, conn=live.connection)),
                f"credential {why}",
            )
        return n
