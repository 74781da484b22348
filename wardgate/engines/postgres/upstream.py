"""The gateway's own connection to an upstream PostgreSQL server, with credentials only it holds."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from dataclasses import dataclass, field

from ...config import DEFAULT_PASSWORD_ENV_PREFIX, ConnectionSpec, password_env_refusal
from ...sql import encoding
from . import codec
from .scram import MECHANISM, ScramClient, ScramError, md5_password
from .stream import PeerClosed, StreamProtocol


class UpstreamError(Exception):
    """The upstream server could not be reached or refused the gateway. `code` is a SQLSTATE."""

    def __init__(self, message: str, code: str = "08001", detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail
        self.hint = hint


@dataclass
class Upstream:
    protocol: StreamProtocol
    parameters: list[tuple[str, str]] = field(default_factory=list)
    process_id: int = 0
    secret_key: bytes = b""
    transaction_status: bytes = b"I"
    notices: list[bytes] = field(default_factory=list)


NO_PASSWORD_HINT = ("if its host, port, database, sslmode or sslrootcert was changed, its stored password was "
                    "dropped on purpose: give the password (or password_env) again in the same change")


def unreachable_message(connection: str) -> str:
    """A failure to open the database of `connection`, as told to someone who may not see why."""
    return (f"the gateway cannot reach the database of connection {connection!r} right now; an administrator "
            "can see why in the gateway's log and audit events")


def resolve_password(spec: ConnectionSpec, password_env_prefix: str = DEFAULT_PASSWORD_ENV_PREFIX) -> str | None:
    if spec.password_env:
        # Checked here too: a stored connection may predate the prefix.
        if why := password_env_refusal(spec.password_env, password_env_prefix):
            raise UpstreamError(f"connection {spec.name!r}: {why}", "28000")
        value = os.environ.get(spec.password_env)
        if value is None:
            raise UpstreamError(
                f"connection {spec.name!r}: environment variable {spec.password_env} is not set in the gateway's environment",
                "08001",
            )
        return value
    return spec.password


def client_ssl_context(spec: ConnectionSpec) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=spec.sslrootcert) if spec.sslrootcert else ssl.create_default_context()
    if spec.sslmode in ("prefer", "require", "allow") and not spec.sslrootcert:
        # libpq's semantics: encryption without verification unless verify-ca/verify-full is asked.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif spec.sslmode in ("prefer", "require", "allow", "verify-ca"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def _open(spec: ConnectionSpec, timeout: float) -> StreamProtocol:
    loop = asyncio.get_running_loop()
    try:
        _, proto = await asyncio.wait_for(loop.create_connection(StreamProtocol, spec.host, spec.port), timeout)
    except (TimeoutError, OSError) as exc:
        reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
        raise UpstreamError(
            f"cannot reach connection {spec.name!r} at {spec.host}:{spec.port}: {reason}", "08001"
        ) from exc
    proto.transport.set_write_buffer_limits(high=256 * 1024)  # type: ignore[union-attr]
    sock = proto.transport.get_extra_info("socket")  # type: ignore[union-attr]
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if spec.sslmode in ("disable", "allow"):
        return proto
    proto.write(codec.ssl_request())
    answer = await asyncio.wait_for(proto.read_raw(1), timeout)
    if answer == b"S":
        hostname = spec.host if spec.sslmode == "verify-full" else None
        try:
            await asyncio.wait_for(
                proto.start_tls(client_ssl_context(spec), server_side=False, server_hostname=hostname), timeout
            )
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            proto.abort()
            raise UpstreamError(f"TLS to connection {spec.name!r} failed: {exc}", "08001") from exc
    elif answer == b"N":
        if spec.sslmode in ("require", "verify-ca", "verify-full"):
            proto.close()
            raise UpstreamError(
                f"connection {spec.name!r} requires TLS (sslmode={spec.sslmode}) but the server does not offer it",
                "08001",
            )
    else:
        proto.abort()
        raise UpstreamError(f"connection {spec.name!r}: unexpected answer to SSLRequest", "08P01")
    return proto


async def connect(spec: ConnectionSpec, parameters: dict[str, str], timeout: float = 10.0, *,
                  standard_strings: bool = False, read_only: bool = False,
                  password_env_prefix: str = DEFAULT_PASSWORD_ENV_PREFIX) -> Upstream:
    """Open, encrypt per sslmode, authenticate and wait for ReadyForQuery.

    `standard_strings`: the session's statements are read by rules, which read SQL as PostgreSQL does
    with standard_conforming_strings on, in an encoding the gateway decodes exactly (sql/encoding.py);
    a session that starts otherwise (the client's options, the role's or the database's settings) is
    refused, on every door that opens one.
    `read_only`: the session's transactions are read-only (default_transaction_read_only, sent after the
    client's own settings, which PostgreSQL applies in order, so it wins over their `options`).
    `password_env_prefix`: [upstream] password_env_prefix, which the connection's password_env must start with."""
    password = resolve_password(spec, password_env_prefix)
    proto = await _open(spec, timeout)
    try:
        if read_only:
            parameters = {**parameters, "default_transaction_read_only": "on"}
        up = await asyncio.wait_for(_handshake(spec, proto, password, parameters), timeout)
        settings = dict(up.parameters)
        if standard_strings and settings.get("standard_conforming_strings", "on") != "on":
            raise UpstreamError("standard_conforming_strings is off for this session; the gateway's rules read SQL "
                                "with it on", "42501",
                                hint="do not set it in the connection's options (PGOPTIONS) or the role's settings")
        refused = encoding.refusal(settings.get("client_encoding", "UTF8"), settings.get("server_encoding", "UTF8"))
        if standard_strings and refused is not None:
            raise UpstreamError(refused, "42501", hint="set client_encoding to UTF8 (PGCLIENTENCODING, the connection "
                                "string, or the role's and database's settings)")
        return up
    except TimeoutError as exc:
        proto.abort()
        raise UpstreamError(f"connection {spec.name!r} did not finish its handshake in {timeout:.0f}s", "08001") from exc
    except PeerClosed as exc:
        raise UpstreamError(f"connection {spec.name!r} closed during the handshake", "08006") from exc
    except UpstreamError:
        proto.abort()
        raise


def _tls_verified(spec: ConnectionSpec, proto: StreamProtocol) -> bool:
    """Whether the connection is TLS whose certificate was checked (and its name, for verify-full)."""
    tls = proto.transport.get_extra_info("ssl_object") if proto.tls and proto.transport is not None else None
    if tls is None or tls.context.verify_mode != ssl.CERT_REQUIRED or not tls.getpeercert():
        return False
    return spec.sslmode != "verify-full" or (tls.context.check_hostname and tls.server_hostname == spec.host)


async def _handshake(spec: ConnectionSpec, proto: StreamProtocol, password: str | None, parameters: dict[str, str]) -> Upstream:
    params = {"user": spec.user, "database": spec.database}
    params.update({k: v for k, v in parameters.items() if k not in ("user", "database") and not k.startswith("_pq_.")})
    proto.write(codec.startup_message(params))
    up = Upstream(proto)
    scram: ScramClient | None = None

    def need_password() -> str:
        if password is None:
            raise UpstreamError(f"connection {spec.name!r} asks for a password and none is configured; {NO_PASSWORD_HINT}",
                                "28000", hint=NO_PASSWORD_HINT)
        return password

    def plain_password(method: str) -> str:
        """The password for a cleartext or md5 request, which hands the server the password (or what
        stands for it): only with the connection's opt-in, and never over verify-* TLS not verified."""
        secret = need_password()
        if spec.password_auth != "any":
            raise UpstreamError(
                f"connection {spec.name!r}: the server asks for {method} password authentication, and the gateway "
                f"sends a password only through SCRAM-SHA-256 unless the connection's password_auth is \"any\" "
                f"(it is {spec.password_auth!r}); nothing was sent", "28000",
                hint="have the server use scram-sha-256 (password_encryption and pg_hba.conf), or set the "
                     "connection's password_auth to \"any\" if this server may receive it")
        if spec.sslmode in ("verify-ca", "verify-full") and not _tls_verified(spec, proto):
            raise UpstreamError(
                f"connection {spec.name!r}: the server asks for {method} password authentication over a TLS "
                f"connection that is not verified (sslmode={spec.sslmode}); nothing was sent", "28000",
                hint="check the connection's sslrootcert and the server's certificate")
        return secret

    while True:
        mtype, body = await proto.read_message()
        if mtype == ord("R"):
            code, data = codec.parse_authentication(body)
            if code == 0:
                continue
            if code == 3:
                proto.write(codec.password_message(codec.cstr(plain_password("cleartext"))))
            elif code == 5:
                proto.write(codec.password_message(codec.cstr(md5_password(spec.user, plain_password("md5"), data[:4]))))
            elif code == 10:
                mechanisms = [m.decode() for m in data.split(b"\x00") if m]
                if MECHANISM not in mechanisms:
                    raise UpstreamError(f"connection {spec.name!r} offers only {mechanisms}; the gateway speaks {MECHANISM}", "28000")
                scram = ScramClient(need_password())
                proto.write(codec.sasl_initial_response(MECHANISM, scram.client_first()))
            elif code == 11 and scram is not None:
                try:
                    # PBKDF2 over the salt, thousands of rounds: in a thread (hashlib lets go of the
                    # interpreter), so that connecting holds no other session up.
                    proto.write(codec.password_message(await asyncio.to_thread(scram.server_first, data)))
                except ScramError as exc:
                    raise UpstreamError(f"connection {spec.name!r}: {exc}", "28000") from exc
            elif code == 12 and scram is not None:
                try:
                    scram.server_final(data)
                except ScramError as exc:
                    raise UpstreamError(f"connection {spec.name!r}: {exc}", "28000") from exc
            else:
                raise UpstreamError(f"connection {spec.name!r} asks for an authentication method the gateway does not support ({code})", "28000")
        elif mtype == ord("E"):
            fields = codec.parse_error_fields(body)
            raise UpstreamError(
                f"connection {spec.name!r} refused the gateway: {fields.get('M', 'unknown error')}",
                fields.get("C", "08001"),
            )
        elif mtype == ord("S"):
            up.parameters.append(codec.parse_parameter_status(body))
        elif mtype == ord("K"):
            up.process_id, up.secret_key = codec.parse_backend_key_data(body)
        elif mtype == ord("N"):
            up.notices.append(codec.message(b"N", body))
        elif mtype == ord("v"):
            continue  # NegotiateProtocolVersion: we asked for 3.0, nothing to adjust
        elif mtype == ord("Z"):
            up.transaction_status = body[:1] or b"I"
            return up
        else:
            raise UpstreamError(f"connection {spec.name!r} sent an unexpected message {chr(mtype)!r} during startup", "08P01")


async def cancel(spec: ConnectionSpec, process_id: int, secret_key: bytes, timeout: float = 5.0) -> None:
    """Send a CancelRequest for an upstream backend (over TLS where the connection requires it)."""
    proto = await _open(spec, timeout)
    proto.write(codec.cancel_request(process_id, secret_key))
    try:
        await asyncio.wait_for(proto.read_raw(1), timeout)
    except (TimeoutError, PeerClosed):
        pass
    finally:
        proto.close()


async def simple_query(up: Upstream, sql: str, timeout: float = 10.0) -> list[tuple[str | None, ...]]:
    """Run one query on an upstream connection before it is handed to a client (text results)."""
    proto = up.protocol
    proto.write(codec.message(b"Q", codec.cstr(sql)))
    rows: list[tuple[str | None, ...]] = []
    error: dict[str, str] | None = None

    async def read() -> None:
        nonlocal error
        while True:
            mtype, body = await proto.read_message()
            if mtype == ord("D"):
                rows.append(tuple(codec.data_row_values(body)))
            elif mtype == ord("E"):
                error = codec.parse_error_fields(body)
            elif mtype == ord("Z"):
                up.transaction_status = body[:1] or b"I"
                return

    await asyncio.wait_for(read(), timeout)
    if error is not None:
        raise UpstreamError(f"catalog query failed: {error.get('M')}", error.get("C", "XX000"))
    return rows
