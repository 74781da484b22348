"""PostgreSQL wire protocol v3: pure parsing and building of messages (no sockets, no event loop).

Everything here works on bytes and returns bytes or plain data, so it can be unit-tested and fuzzed
without a server. The asyncio adapters (`server.py`, `upstream.py`) feed it what they read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# PostgreSQL itself refuses startup packets larger than this (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_LENGTH = 10000

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_HEADER = struct.Struct("!cI")

# Message types a frontend may send once the session is established.
FRONTEND_TYPES = frozenset(b"QPBDECSHFXdcfp")
# Frontend messages whose length is fixed or small; anything larger is a protocol violation.
SMALL_FRONTEND_TYPES = {ord("S"): 4, ord("H"): 4, ord("X"): 4, ord("c"): 4}


class ProtocolViolation(Exception):
    """The peer sent bytes that are not valid protocol (SQLSTATE 08P01). The session cannot continue."""


# --------------------------------------------------------------------------------------------
# Startup phase (untyped packets)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: bytes


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def protocol_options(self) -> list[str]:
        """Options of the `_pq_.` namespace, which a server that does not know them must list."""
        return [k for k in self.parameters if k.startswith("_pq_.")]


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_startup_packet(buf: bytes | bytearray) -> tuple[StartupPacket, int] | None:
    """Parse one untyped startup-phase packet from the front of `buf`.

    Returns the packet and the number of bytes it used, or None when more bytes are needed.
    Raises ProtocolViolation for anything PostgreSQL would refuse.
    """
    if len(buf) < 4:
        return None
    (length,) = _U32.unpack_from(buf, 0)
    if length < 8 or length > MAX_STARTUP_LENGTH:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None
    (code,) = _U32.unpack_from(buf, 4)
    body = bytes(buf[8:length])
    if code == SSL_REQUEST_CODE:
        if length != 8:
            raise ProtocolViolation("invalid SSLRequest length")
        return SSLRequest(), length
    if code == GSSENC_REQUEST_CODE:
        if length != 8:
            raise ProtocolViolation("invalid GSSENCRequest length")
        return GSSENCRequest(), length
    if code == CANCEL_REQUEST_CODE:
        # Protocol 3.2 allows longer secret keys (up to 256 bytes); 3.0 uses 4.
        if length < 16 or length > 12 + 256:
            raise ProtocolViolation("invalid CancelRequest length")
        (pid,) = _U32.unpack_from(buf, 8)
        return CancelRequest(pid, bytes(buf[12:length])), length
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {major}.{minor}: server supports 3.0")
    return StartupMessage(major, minor, _parse_parameters(body)), length


def _parse_parameters(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\x00"):
        raise ProtocolViolation("startup packet is not terminated")
    parts = body[:-1].split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolViolation("startup packet has a parameter without a value")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts), 2):
            key = parts[i].decode("utf-8")
            if not key:
                raise ProtocolViolation("startup packet has an empty parameter name")
            params[key] = parts[i + 1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("startup packet is not valid UTF-8") from exc
    return params


# --------------------------------------------------------------------------------------------
# Typed messages


class MessageReader:
    """Receive buffer that yields whole typed messages `(type, body)`; bounded by `max_length`."""

    __slots__ = ("_buf", "max_length")

    def __init__(self, max_length: int = 1 << 20) -> None:
        self._buf = bytearray()
        self.max_length = max_length

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take_raw(self, n: int) -> bytes | None:
        """Take `n` untyped bytes (the one-byte answer to SSLRequest, say)."""
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def take_startup(self) -> StartupPacket | None:
        parsed = parse_startup_packet(self._buf)
        if parsed is None:
            return None
        packet, used = parsed
        del self._buf[:used]
        return packet

    def next(self) -> tuple[int, bytes] | None:
        if len(self._buf) < 5:
            return None
        mtype, length = _HEADER.unpack_from(self._buf, 0)
        if length < 4 or length > self.max_length:
            raise ProtocolViolation(f"invalid message length {length} for message type {mtype!r}")
        if len(self._buf) < 1 + length:
            return None
        body = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        return mtype[0], body

    def drain(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def __len__(self) -> int:
        return len(self._buf)


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + _U32.pack(len(body) + 4) + body


def cstr(s: str | bytes) -> bytes:
    if isinstance(s, str):
        s = s.encode("utf-8")
    return s + b"\x00"


def read_cstr(body: bytes, pos: int) -> tuple[bytes, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation("string is not terminated")
    return body[pos:end], end + 1


# -- backend messages (what the gateway says to clients)


def auth_ok() -> bytes:
    return message(b"R", _I32.pack(0))


def auth_cleartext_password() -> bytes:
    return message(b"R", _I32.pack(3))


def auth_sasl(mechanisms: list[str]) -> bytes:
    return message(b"R", _I32.pack(10) + b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(11) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(12) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(process_id: int, secret_key: bytes) -> bytes:
    return message(b"K", _U32.pack(process_id) + secret_key)


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unrecognized))
    return message(b"v", body + b"".join(cstr(o) for o in unrecognized))


def error_response(
    code: str,
    text: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    fields = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(code), b"M" + cstr(text)]
    if detail:
        fields.append(b"D" + cstr(detail))
    if hint:
        fields.append(b"H" + cstr(hint))
    return message(b"N" if notice else b"E", b"".join(fields) + b"\x00")


def fatal(code: str, text: str, *, hint: str | None = None, detail: str | None = None) -> bytes:
    return error_response(code, text, severity="FATAL", hint=hint, detail=detail)


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter code."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstr(body, pos + 1)
        out[code] = value.decode("utf-8", "replace")
    return out


# -- frontend messages (what the gateway says to upstream servers)


def startup_message(parameters: dict[str, str], minor: int = 0) -> bytes:
    body = _U32.pack(PROTOCOL_3_0 | minor) + b"".join(cstr(k) + cstr(v) for k, v in parameters.items())
    body += b"\x00"
    return _U32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _U32.pack(8) + _U32.pack(SSL_REQUEST_CODE)


def cancel_request(process_id: int, secret_key: bytes) -> bytes:
    return _U32.pack(12 + len(secret_key)) + _U32.pack(CANCEL_REQUEST_CODE) + _U32.pack(process_id) + secret_key


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mech, pos = read_cstr(body, 0)
    if len(body) < pos + 4:
        raise ProtocolViolation("SASLInitialResponse is truncated")
    (n,) = _I32.unpack_from(body, pos)
    data = body[pos + 4 :]
    if n != -1 and n != len(data):
        raise ProtocolViolation("SASLInitialResponse length does not match its data")
    return mech.decode("ascii", "replace"), data


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolViolation("Authentication message is truncated")
    return _I32.unpack_from(body, 0)[0], body[4:]


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    if len(body) < 8:
        raise ProtocolViolation("BackendKeyData is truncated")
    return _U32.unpack_from(body, 0)[0], body[4:]


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstr(body, 0)
    value, _ = read_cstr(body, pos)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def is_fatal(error_body: bytes) -> bool:
    """Whether an ErrorResponse ends the session (FATAL or PANIC; 'V' is the untranslated severity)."""
    fields = parse_error_fields(error_body)
    return fields.get("V", fields.get("S")) in ("FATAL", "PANIC")


@dataclass(frozen=True, slots=True)
class Field:
    """One column of a RowDescription."""

    name: str
    table_oid: int
    attnum: int
    type_oid: int
    format: int


def row_description(body: bytes) -> list[Field]:
    """A RowDescription's columns, in order."""
    (n,) = struct.unpack_from("!h", body, 0)
    pos, out = 2, []
    for _ in range(n):
        end = body.index(b"\x00", pos)
        name = body[pos:end].decode("utf-8", "replace")
        table, attnum, type_oid, _size, _mod, fmt = struct.unpack_from("!IhIhih", body, end + 1)
        out.append(Field(name, table, attnum, type_oid, fmt))
        pos = end + 19
    return out


def data_row_raw(body: bytes) -> list[bytes | None]:
    """A DataRow's values as bytes (NULL as None)."""
    (n,) = struct.unpack_from("!h", body, 0)
    pos, out = 2, []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + length])
            pos += length
    return out


def data_row_values(body: bytes) -> list[str | None]:
    """A DataRow's values in text format, decoded (NULL as None)."""
    return [None if v is None else v.decode("utf-8", "replace") for v in data_row_raw(body)]


def rows_from_tag(tag: str) -> int | None:
    """Rows affected or returned, from a CommandComplete tag such as 'INSERT 0 5' or 'SELECT 3'."""
    parts = tag.split(" ")
    if parts[0] in ("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "FETCH", "MOVE") and parts[-1].isdigit():
        return int(parts[-1])
    return None
