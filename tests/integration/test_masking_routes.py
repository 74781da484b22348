"""No masked value reaches a client by any route: every byte a client receives, against the truth read
straight from the database.

alice (group dev) is under the column rules (card_number, national_id; orders.status) and the content
detectors (email, phone, ...) of tests/integration/test_masking.py's MASKING; bob (ops) is exempt. The
secrets are read directly from PostgreSQL when the module starts (not through the gateway): every
card_number and national_id (column rules), every email and phone (content detectors), each also as a
client could recover it from a derived form (separators stripped, case changed, reversed, an unsalted
md5, a bytea's hex, base64, a binary integer).

Every route is run three ways:
- straight against PostgreSQL as the connection's role (the control): the route must expose secrets
  there, or it proves nothing;
- through the gateway as alice, with a tap in front of the gateway that keeps every byte the gateway
  sends (RowDescription, DataRow, ErrorResponse, NoticeResponse, NotificationResponse, anything): no
  secret may occur in them, and each statement must end refused (42501, naming a rule), answered (its
  values masked), or with the session closed by the gateway (recorded as such);
- for the protocol routes, byte-exact sequences from a raw client; for the SQL routes, through psql,
  psycopg (text: the simple protocol; binary: the extended one), asyncpg (prepared statements) and JDBC.

A property test sends random interleavings of Parse/Bind/Describe/Execute/Close/Sync/Flush/Query over a
few statement and portal names (the unnamed ones too) and a pool of statements, SQL PREPARE, DECLARE,
FETCH and the like among them. WARDGATE_FUZZ_EXAMPLES sets its number of examples (`make soak` runs more).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import APP_PASSWORD, make_gateway
from tests.integration.test_masking import MASKING
from tests.pgwire import RawClient
from wardgate.engines.postgres import codec

EXAMPLES = int(os.environ.get("WARDGATE_FUZZ_EXAMPLES", "500"))  # `make soak` sets it far higher
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
MESSAGE_NAMES = {
    "R": "Authentication", "S": "ParameterStatus", "K": "BackendKeyData", "Z": "ReadyForQuery",
    "T": "RowDescription", "D": "DataRow", "C": "CommandComplete", "E": "ErrorResponse", "N": "NoticeResponse",
    "A": "NotificationResponse", "1": "ParseComplete", "2": "BindComplete", "3": "CloseComplete", "n": "NoData",
    "s": "PortalSuspended", "t": "ParameterDescription", "I": "EmptyQueryResponse", "H": "CopyOutResponse",
    "G": "CopyInResponse", "W": "CopyBothResponse", "d": "CopyData", "c": "CopyDone", "V": "FunctionCallResponse",
    "v": "NegotiateProtocolVersion",
}
RULE = re.compile(r"by rule [\w.:-]+|\bmasking:[\w-]+")  # a refusal names the rule that made it
# What the module saw end in a session closed by the gateway (no leak, but worth knowing): route -> reason.
CLOSED: dict[str, str] = {}


# --- ground truth ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leak:
    message: str  # the backend message type it was in
    kind: str  # card_number, national_id, email or phone
    value: str  # the value as stored
    form: str  # how it appeared (as stored, digits only, md5, ...)

    def __str__(self) -> str:
        return f"{self.kind} {self.value!r} ({self.form}) in {self.message}"


def _forms(kind: str, value: str) -> list[tuple[str, str]]:
    """The forms of a secret a client could read it back from, lowercased, most literal first."""
    digits = re.sub(r"\D", "", value)
    out = [("as stored", value)]
    if kind == "card_number":
        out += [("digits only", digits), ("dashed", value.replace(" ", "-")), ("reversed", value[::-1]),
                ("reversed digits", digits[::-1]), ("md5", hashlib.md5(value.encode()).hexdigest())]  # noqa: S324
    elif kind == "national_id":
        out += [("reversed", value[::-1]), ("md5", hashlib.md5(value.encode()).hexdigest())]  # noqa: S324
    elif kind == "phone":
        local = re.sub(r"^\+\d{1,3}[ .-]?", "", value)
        out += [("digits only", digits), ("+digits", "+" + digits), ("without country code", local),
                ("local digits", re.sub(r"\D", "", local))]
    elif kind == "email":
        out += [("md5", hashlib.md5(value.encode()).hexdigest())]  # noqa: S324
    seen, forms = set(), []
    for form, text in out:
        text = text.lower()
        if len(text) >= 7 and text not in seen:
            seen.add(text)
            forms.append((form, text))
    return forms


class Secrets:
    """Every value alice must not see, read directly from the database."""

    KINDS = ("card_number", "national_id", "email", "phone")

    def __init__(self, rows: Iterable[tuple[str | None, ...]]) -> None:
        self.values: dict[str, list[str]] = {k: [] for k in self.KINDS}
        self.needles: dict[str, tuple[str, str, str]] = {}  # lowercased form -> (kind, value, form)
        for row in rows:
            for kind, value in zip(self.KINDS, row, strict=True):
                if value:
                    self.values[kind].append(value)
                    for form, text in _forms(kind, value):
                        self.needles.setdefault(text, (kind, value, form))

    def leaks(self, messages: list[tuple[str, bytes]]) -> list[Leak]:
        """Secrets in any of `messages`, (type, body) as received."""
        by_type: dict[str, list[str]] = {}
        for mtype, body in messages:
            by_type.setdefault(mtype, []).append(readings(mtype, body))
        found: dict[tuple[str, str, str], Leak] = {}
        for mtype, texts in by_type.items():
            hay = "\n\x00\n".join(texts)
            for needle, (kind, value, form) in self.needles.items():
                if needle in hay and (mtype, kind, value) not in found:
                    found[(mtype, kind, value)] = Leak(MESSAGE_NAMES.get(mtype, repr(mtype)), kind, value, form)
        return list(found.values())

    def leaks_in_text(self, text: str, where: str) -> list[Leak]:
        hay = readings("", text.encode("utf-8", "replace"))
        out: dict[tuple[str, str], Leak] = {}
        for needle, (kind, value, form) in self.needles.items():
            if needle in hay:
                out.setdefault((kind, value), Leak(where, kind, value, form))
        return list(out.values())


_HEX = re.compile(r"\\x((?:[0-9a-f]{2}){4,})")
_B64 = re.compile(r"[A-Za-z0-9+/]{12,}={0,2}")


def readings(mtype: str, body: bytes) -> str:
    """A message as text (UTF-8, errors replaced), lowercased, with what else a client could read in it:
    the digits of values that may be binary integers or numerics, a bytea's hex decoded, base64 decoded."""
    text = body.decode("utf-8", "replace")
    extra: list[str] = []
    if mtype == "D":
        try:
            values = codec.data_row_raw(body)
        except (struct.error, ValueError):
            values = []
        for v in values:
            if v is not None:
                extra += _binary_numbers(v)
    for m in _HEX.finditer(text.lower()):
        extra.append(binascii.unhexlify(m.group(1)).decode("utf-8", "replace"))
    for m in _B64.finditer(text):
        chunk = m.group(0)
        try:
            extra.append(base64.b64decode(chunk + "=" * (-len(chunk) % 4), validate=True).decode("utf-8", "replace"))
        except (binascii.Error, ValueError):
            pass
    return "\n".join([text, *extra]).lower()


def _binary_numbers(v: bytes) -> list[str]:
    out = []
    if len(v) == 4:
        out.append(str(struct.unpack("!i", v)[0]))
    if len(v) == 8:
        out.append(str(struct.unpack("!q", v)[0]))
        out.append(repr(struct.unpack("!d", v)[0]))
    if len(v) >= 8:  # numeric: ndigits, weight, sign, dscale, then base-10000 digits
        ndigits, weight, sign, _ = struct.unpack_from("!hhHh", v)
        if 0 < ndigits <= 64 and len(v) == 8 + 2 * ndigits and sign in (0, 0x4000):
            digits = struct.unpack_from(f"!{ndigits}h", v, 8)
            if all(0 <= d < 10000 for d in digits):
                out.append(str(int("".join(f"{d:04d}" for d in digits))) + ("0000" * max(0, weight + 1 - ndigits)))
    return out


@pytest.fixture(scope="module")
def truth(pg) -> Secrets:  # noqa: ANN001
    with psycopg.connect(pg.dsn(database="shop")) as conn:
        rows = conn.execute("select card_number, national_id, email, phone from customers order by id").fetchall()
    secrets = Secrets(rows)
    assert len(secrets.values["card_number"]) >= 100 and len(secrets.values["email"]) >= 100
    return secrets


def card_attnum(pg) -> int:  # noqa: ANN001
    with psycopg.connect(pg.dsn(database="shop")) as conn:
        return conn.execute("select attnum from pg_attribute where attrelid = 'public.customers'::regclass "
                            "and attname = 'card_number'").fetchone()[0]


def column_name(pg, attnum: int) -> str:  # noqa: ANN001
    with psycopg.connect(pg.dsn(database="shop")) as conn:
        return conn.execute("select attname from pg_attribute where attrelid = 'public.customers'::regclass "
                            "and attnum = %s", (attnum,)).fetchone()[0]


def restore_card_number(pg, attnum: int) -> None:  # noqa: ANN001
    """Put customers.card_number back under its name, straight on the database (whatever the gateway did)."""
    name = column_name(pg, attnum)
    if name != "card_number":
        with psycopg.connect(pg.dsn(database="shop"), autocommit=True) as conn:
            conn.execute(f'alter table public.customers rename column "{name}" to card_number')
    assert column_name(pg, attnum) == "card_number"


# --- the gateway, and a tap in front of it ------------------------------------------------------------------

@pytest.fixture(scope="module")
def rgw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("routes"), pg, tail_toml=MASKING)
    gw.start()
    attnum = card_attnum(pg)
    yield gw
    gw.stop()
    restore_card_number(pg, attnum)  # never leave the shared database renamed, whatever happened


class Tap:
    """A TCP relay in front of a server that keeps every byte the server sends, per connection. A byte is
    kept before it is passed on, so whatever a client has read is in `received` by then."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.streams: list[bytearray] = []
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            buf = bytearray()
            with self.lock:
                self.streams.append(buf)
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, buf), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if keep is not None:
                    with self.lock:
                        keep += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def messages(self, connection: int | None = None) -> list[tuple[str, bytes]]:
        """Every message received, over all connections so far or on the one numbered `connection` (in the
        order they were made); typed messages only, as no SSL or GSS request is made."""
        with self.lock:
            streams = [bytes(b) for b in self.streams]
        if connection is not None:
            streams = streams[connection:connection + 1]
        out: list[tuple[str, bytes]] = []
        for data in streams:
            reader = codec.MessageReader(1 << 30)
            reader.feed(data)
            try:
                while (m := reader.next()) is not None:
                    out.append((chr(m[0]), m[1]))
            except codec.ProtocolViolation:
                pass
            rest = reader.drain()
            if rest:
                out.append(("?", rest))  # whatever did not frame is searched too
        return out

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def tap(rgw):  # noqa: ANN001, ANN201
    t = Tap(rgw.port)
    yield t
    t.close()


@pytest.fixture
def direct_tap(pg):  # noqa: ANN001, ANN201
    t = Tap(pg.port)
    yield t
    t.close()


def alice_dsn(gw, port: int, user: str = "alice", libpq: bool = True) -> str:  # noqa: ANN001
    cred = gw.credential(user)
    extra = "&gssencmode=disable" if libpq else ""
    return f"postgresql://{user}:{cred['credential']}@127.0.0.1:{port}/shop?sslmode=disable{extra}"


def app_dsn(port: int, libpq: bool = True) -> str:
    extra = "&gssencmode=disable" if libpq else ""
    return f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{port}/shop?sslmode=disable{extra}"


def assert_no_leak(secrets: Secrets, messages: list[tuple[str, bytes]], route: str, *texts: tuple[str, str]) -> None:
    """No ground-truth secret in anything the client received (and in what the client printed, `texts`)."""
    leaks = secrets.leaks(messages)
    for where, text in texts:
        leaks += secrets.leaks_in_text(text, where)
    assert not leaks, f"{route}: {len(leaks)} secret(s) reached the client: " + "; ".join(map(str, leaks[:12]))


def assert_leaks(secrets: Secrets, messages: list[tuple[str, bytes]], route: str, kinds: set[str]) -> None:
    """The control: straight against PostgreSQL the route does expose `kinds` (else it proves nothing)."""
    shown = {leak.kind for leak in secrets.leaks(messages)}
    assert kinds <= shown, f"{route}: without the gateway the route showed {sorted(shown)}, expected {sorted(kinds)}"


# --- outcomes -----------------------------------------------------------------------------------------------

@dataclass
class Step:
    """How one statement ended, as its client saw it."""

    sql: str
    rows: int = 0
    code: str | None = None  # SQLSTATE of its error
    message: str = ""
    closed: bool = False  # the session ended (FATAL, or the connection went)

    @property
    def refused(self) -> bool:
        return self.code == "42501" and bool(RULE.search(self.message))

    def __str__(self) -> str:
        if self.closed:
            return f"{self.sql!r}: session closed ({self.code} {self.message})"
        if self.code:
            return f"{self.sql!r}: error {self.code} {self.message}"
        return f"{self.sql!r}: {self.rows} rows"


def judge(route: str, steps: list[Step], target: int, allowed: tuple[str, ...] = ()) -> str:
    """A route ends refused (42501 naming a rule), answered (with rows at its target statement, masked: the
    bytes are checked apart), or with the session closed by the gateway. A server error is an answer only
    where the route is about the error's text (`allowed`, SQLSTATE prefixes)."""
    for i, step in enumerate(steps):
        if step.closed:
            CLOSED[route] = str(step)
            return "closed"
        if step.refused:
            return "refused"
        if step.code is not None:
            assert step.code.startswith(allowed) and allowed, f"{route}: neither refused nor answered: {step}"
            if i == target:
                return "error"
    assert len(steps) > target, f"{route}: stopped before its statement: {[str(s) for s in steps]}"
    assert steps[target].rows > 0 or allowed, f"{route}: answered without rows: {steps[target]}"
    return "answered"


# --- frontend messages --------------------------------------------------------------------------------------

def parse(name: str, sql: str) -> bytes:
    return codec.message(b"P", codec.cstr(name) + codec.cstr(sql) + b"\x00\x00")


def bind(portal: str, stmt: str, result_formats: tuple[int, ...] = ()) -> bytes:
    body = codec.cstr(portal) + codec.cstr(stmt) + b"\x00\x00" + b"\x00\x00"
    body += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    return codec.message(b"B", body)


def describe(kind: str, name: str) -> bytes:
    return codec.message(b"D", kind.encode() + codec.cstr(name))


def execute(portal: str, max_rows: int = 0) -> bytes:
    return codec.message(b"E", codec.cstr(portal) + struct.pack("!i", max_rows))


def close(kind: str, name: str) -> bytes:
    return codec.message(b"C", kind.encode() + codec.cstr(name))


def query(sql: str) -> bytes:
    return codec.message(b"Q", codec.cstr(sql))


SYNC = codec.message(b"S")
FLUSH = codec.message(b"H")


class Wire(RawClient):
    """The raw client, keeping every message it reads."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.got: list[tuple[str, bytes]] = []
        self.closed_by_peer = False

    def read(self) -> tuple[str, bytes]:
        m = super().read()
        self.got.append(m)
        return m

    def exchange(self, *msgs: bytes) -> list[tuple[str, bytes]]:
        """Send `msgs` at once and read up to the ReadyForQuery of each Sync and Query among them (each Query
        here is sent where no extended-protocol error can make the server skip it)."""
        self.send(b"".join(msgs))
        want = sum(1 for m in msgs if m[:1] in (b"S", b"Q"))
        out: list[tuple[str, bytes]] = []
        try:
            while want:
                m = self.read()
                out.append(m)
                if m[0] == "Z":
                    want -= 1
                elif m[0] == "E" and codec.is_fatal(m[1]):
                    self.closed_by_peer = True
                    return out
        except TimeoutError as exc:
            raise AssertionError(f"the session stopped answering; read so far: {out}") from exc
        except (ConnectionError, OSError):
            self.closed_by_peer = True
        return out


def outcome(sql: str, reply: list[tuple[str, bytes]], closed: bool) -> Step:
    step = Step(sql, rows=sum(1 for t, _ in reply if t == "D"), closed=closed)
    errors = [codec.parse_error_fields(b) for t, b in reply if t == "E"]
    if errors:
        step.code, step.message = errors[0].get("C"), errors[0].get("M", "")
        step.closed = step.closed or errors[0].get("V", errors[0].get("S")) in ("FATAL", "PANIC")
    return step


def wire_login(port: int, as_gateway, user: str = "alice") -> Wire:  # noqa: ANN001
    c = Wire(port)
    if as_gateway is None:
        c.login("app", APP_PASSWORD, "shop")
    else:
        c.login(user, as_gateway.credential(user)["credential"], "shop")
    return c


# --- protocol routes (raw client, byte-exact) ---------------------------------------------------------------

MASKED = "select email, card_number, phone from customers limit 5"
MASKED_ALL = "SELECT email, card_number, phone FROM customers"
KINDS = {"email", "card_number", "phone"}


def route_unnamed_redefined_without_describe(c: Wire) -> list[Step]:
    """The unnamed portal described as `select 1`, then bound again to the masked query, with no Describe."""
    first = c.exchange(parse("", "select 1"), bind("", ""), describe("P", ""), execute(""), SYNC)
    steps = [outcome("select 1", first, c.closed_by_peer)]
    if not c.closed_by_peer:
        steps.append(outcome(MASKED, c.exchange(parse("", MASKED), bind("", ""), execute(""), SYNC), c.closed_by_peer))
    return steps


def route_named_statement_redefined_by_sql_prepare(c: Wire) -> list[Step]:
    """s1 described as `select 1`; SQL DEALLOCATE and PREPARE make s1 the masked query; then Bind s1."""
    steps = [outcome("parse s1", c.exchange(parse("s1", "select 1"), describe("S", "s1"), SYNC), c.closed_by_peer)]
    sql = "DEALLOCATE s1; PREPARE s1 AS SELECT email, card_number, phone FROM customers LIMIT 5"
    if not c.closed_by_peer:
        steps.append(outcome(sql, c.exchange(query(sql)), c.closed_by_peer))
    if not c.closed_by_peer and not steps[-1].code:
        steps.append(outcome("bind s1", c.exchange(bind("", "s1"), execute(""), SYNC), c.closed_by_peer))
    return steps


def route_portal_redefined_by_sql_declare(c: Wire) -> list[Step]:
    """A named portal cur1 bound from `select 1` and described; SQL CLOSE and DECLARE make it a cursor over
    the masked columns; then Execute cur1."""
    steps = [outcome("BEGIN", c.exchange(query("BEGIN")), c.closed_by_peer)]
    steps.append(outcome("bind cur1", c.exchange(parse("", "select 1"), bind("cur1", ""), describe("P", "cur1"), SYNC),
                         c.closed_by_peer))
    sql = f"CLOSE cur1; DECLARE cur1 CURSOR WITH HOLD FOR {MASKED_ALL}"
    if not c.closed_by_peer:
        steps.append(outcome(sql, c.exchange(query(sql)), c.closed_by_peer))
    if not c.closed_by_peer and not steps[-1].code:
        steps.append(outcome("execute cur1", c.exchange(execute("cur1"), SYNC), c.closed_by_peer))
    return steps


def route_portal_redefined_by_declare_in_the_same_pipeline(c: Wire, begin: bool = True) -> list[Step]:
    """The same, with CLOSE and DECLARE sent as Parse/Bind/Execute of the unnamed portal in the pipeline
    that executes cur1 (in a transaction block, or in the pipeline's implicit transaction)."""
    steps = []
    if begin:
        steps.append(outcome("BEGIN", c.exchange(query("BEGIN")), c.closed_by_peer))
    reply = c.exchange(parse("", "select 1"), bind("cur1", ""), describe("P", "cur1"),
                       parse("", "CLOSE cur1"), bind("", ""), execute(""),
                       parse("", f"DECLARE cur1 CURSOR WITH HOLD FOR {MASKED_ALL}"), bind("", ""), execute(""),
                       execute("cur1"), SYNC)
    steps.append(outcome("declare and execute cur1", reply, c.closed_by_peer))
    return steps


def route_holdable_cursor_redefined_then_commit(c: Wire) -> list[Step]:
    """cur1 described as `select 1`, redefined by SQL as a holdable cursor, COMMIT, then Execute cur1."""
    steps = [outcome("BEGIN", c.exchange(query("BEGIN")), c.closed_by_peer)]
    steps.append(outcome("bind cur1", c.exchange(parse("", "select 1"), bind("cur1", ""), describe("P", "cur1"), SYNC),
                         c.closed_by_peer))
    for sql in (f"CLOSE cur1; DECLARE cur1 CURSOR WITH HOLD FOR {MASKED_ALL}", "COMMIT"):
        if not c.closed_by_peer and not steps[-1].code:
            steps.append(outcome(sql, c.exchange(query(sql)), c.closed_by_peer))
    if not c.closed_by_peer and not steps[-1].code:
        steps.append(outcome("execute cur1", c.exchange(execute("cur1"), SYNC), c.closed_by_peer))
    return steps


def route_sql_prepare_then_protocol_execute(c: Wire) -> list[Step]:
    """SQL PREPARE p, then `EXECUTE p` through the extended protocol, described and not."""
    steps = [outcome("prepare p", c.exchange(query("PREPARE p AS SELECT card_number, national_id FROM customers")),
                     c.closed_by_peer)]
    if not c.closed_by_peer and not steps[-1].code:
        steps.append(outcome("execute p (described)", c.exchange(parse("", "EXECUTE p"), bind("", ""), describe("P", ""),
                                                                 execute(""), SYNC), c.closed_by_peer))
    if not c.closed_by_peer and not steps[-1].code:
        steps.append(outcome("execute p (not described)", c.exchange(parse("", "EXECUTE p"), bind("", ""), execute(""), SYNC),
                             c.closed_by_peer))
    return steps


def route_described_portal_redefined_by_another_portal(c: Wire) -> list[Step]:
    """Describe p1 (`select 1`); Execute p2, which closes p1, and p3, which declares p1 over the masked
    columns; then Execute p1."""
    steps = [outcome("BEGIN", c.exchange(query("BEGIN")), c.closed_by_peer)]
    reply = c.exchange(parse("", "select 1"), bind("p1", ""), describe("P", "p1"),
                       parse("s2", "close p1"), bind("p2", "s2"), execute("p2"),
                       parse("s3", f"declare p1 cursor for {MASKED_ALL}"), bind("p3", "s3"), execute("p3"),
                       execute("p1"), SYNC)
    steps.append(outcome("execute p1", reply, c.closed_by_peer))
    return steps


def route_described_statement_closed_and_reparsed(c: Wire) -> list[Step]:
    """s1 parsed as `select 1` and described; Close S s1 and Parse s1 as the masked query, no Describe."""
    reply = c.exchange(parse("s1", "select 1"), describe("S", "s1"), close("S", "s1"), parse("s1", MASKED),
                       bind("", "s1"), execute(""), SYNC)
    return [outcome("execute s1", reply, c.closed_by_peer)]


def route_binary_formats_on_a_described_statement(c: Wire) -> list[Step]:
    """The masked query described as a statement, then bound asking binary results (text columns read alike)."""
    reply = c.exchange(parse("s1", "select national_id::bigint as n, card_number from customers limit 5"),
                       describe("S", "s1"), bind("", "s1", (1,)), execute(""), SYNC)
    return [outcome("execute s1 binary", reply, c.closed_by_peer)]


PROTOCOL_ROUTES: dict[str, tuple[Callable[[Wire], list[Step]], set[str]]] = {
    "unnamed portal described as select 1, rebound to the masked query without Describe":
        (route_unnamed_redefined_without_describe, KINDS),
    "named statement described, then DEALLOCATE and PREPARE of the same name in SQL":
        (route_named_statement_redefined_by_sql_prepare, KINDS),
    "named portal described, then CLOSE and DECLARE of the same name in SQL":
        (route_portal_redefined_by_sql_declare, KINDS),
    "named portal described, CLOSE and DECLARE through the unnamed portal in the same pipeline":
        (route_portal_redefined_by_declare_in_the_same_pipeline, KINDS),
    "the same pipeline outside a transaction block":
        (lambda c: route_portal_redefined_by_declare_in_the_same_pipeline(c, begin=False), KINDS),
    "holdable cursor redefined by SQL, COMMIT in between":
        (route_holdable_cursor_redefined_then_commit, KINDS),
    "SQL PREPARE, then EXECUTE through the extended protocol":
        (route_sql_prepare_then_protocol_execute, {"card_number", "national_id"}),
    "Describe of one portal, another portal's Execute redefines it with SQL, then Execute of the first":
        (route_described_portal_redefined_by_another_portal, KINDS),
    "statement described, closed and parsed again under the same name":
        (route_described_statement_closed_and_reparsed, KINDS),
    "binary result formats on a described statement":
        (route_binary_formats_on_a_described_statement, {"card_number", "national_id"}),
}


@pytest.mark.parametrize("route", PROTOCOL_ROUTES)
def test_protocol_route_exposes_secrets_without_the_gateway(pg, truth, route) -> None:  # noqa: ANN001
    run, kinds = PROTOCOL_ROUTES[route]
    c = wire_login(pg.port, None)
    try:
        steps = run(c)
    finally:
        c.close()
    assert not any(s.code for s in steps), [str(s) for s in steps]
    assert_leaks(truth, c.got, route, kinds)


@pytest.mark.parametrize("route", PROTOCOL_ROUTES)
def test_protocol_route_leaks_nothing_through_the_gateway(rgw, truth, route) -> None:  # noqa: ANN001
    run, _ = PROTOCOL_ROUTES[route]
    c = wire_login(rgw.port, rgw)
    try:
        steps = run(c)
    finally:
        c.close()
    assert_no_leak(truth, c.got, route)
    judge(route, steps, target=len(steps) - 1)


# --- SQL routes, through every client -----------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    steps: tuple[str, ...]
    kinds: frozenset[str]  # what it exposes without the gateway
    target: int = -1  # the statement whose rows (or error) are the point
    allowed: tuple[str, ...] = ()  # SQLSTATE prefixes of the server errors that are the point of the route

    @property
    def index(self) -> int:
        return self.target % len(self.steps)


def R(*steps: str, kinds: Iterable[str] = ("card_number",), target: int = -1, allowed: tuple[str, ...] = ()) -> Route:  # noqa: N802
    return Route(tuple(steps), frozenset(kinds), target, allowed)


AS = "customers as c(a, b, e, p, k, n)"  # id, name, email, phone, card_number, national_id renamed by position
SQL_ROUTES: dict[str, Route] = {}
for col, kind in (("k", "card_number"), ("n", "national_id")):
    SQL_ROUTES.update({
        f"upper({kind}) renamed by position": R(f"select upper({col}) from {AS}", kinds=[kind]),
        f"{kind} || ''": R(f"select {col} || '' from {AS}", kinds=[kind]),
        f"string_agg({kind})": R(f"select string_agg({col}, ',') from {AS}", kinds=[kind]),
        f"lag({kind}) over ()": R(f"select lag({col}) over () from {AS}", kinds=[kind]),
        f"row({kind})::text": R(f"select row({col})::text from {AS}", kinds=[kind]),
    })
SQL_ROUTES.update({
    "c.to_jsonb (a function in column notation)": R("select c.to_jsonb from customers c", kinds=["card_number", "national_id"]),
    "customers.to_json": R("select customers.to_json from customers", kinds=["card_number", "national_id"]),
    "select into a temp table, then read it": R("select card_number as x into temp t1 from customers", "select x from t1"),
    "SQL PREPARE then EXECUTE": R("prepare p as select card_number, national_id from customers", "execute p",
                                  kinds=["card_number", "national_id"]),
    "create temp table as execute, then read it": R("prepare p as select card_number, national_id from customers",
                                                    "create temp table t as execute p", "select * from t",
                                                    kinds=["card_number", "national_id"]),
    "table_to_xml": R("select table_to_xml('customers', true, false, '')", kinds=["card_number", "national_id"]),
    "query_to_xml": R("select query_to_xml('select * from customers', true, false, '')",
                      kinds=["card_number", "national_id"]),
    "cursor_to_xml": R("begin", "declare xc cursor for select * from customers",
                       "select cursor_to_xml('xc', 500, true, false, '')", "rollback", target=2,
                       kinds=["card_number", "national_id"]),
    "schema_to_xml": R("select schema_to_xml('public', true, false, '')", kinds=["card_number", "national_id"]),
    "database_to_xml": R("select database_to_xml(true, false, '')", kinds=["card_number", "national_id"]),
    "table_to_xml_and_xmlschema": R("select table_to_xml_and_xmlschema('customers', true, false, '')",
                                    kinds=["card_number", "national_id"]),
    "xpath over table_to_xml": R("select xpath('//card_number/text()', table_to_xml('customers', true, false, ''))"),
    "national_id::int (an integer carries it)": R("select national_id::int from customers", kinds=["national_id"]),
    "national_id::bigint": R("select national_id::bigint from customers", kinds=["national_id"]),
    "card number without its spaces": R("select replace(card_number, ' ', '') from customers"),
    "reverse(card_number)": R("select reverse(card_number) from customers"),
    "md5(national_id) (an unsalted hash of nine digits)": R("select md5(national_id) from customers", kinds=["national_id"]),
    "card_number as bytea": R("select convert_to(card_number, 'UTF8') from customers"),
    # Not here: a value masked by content only and transformed on purpose (`regexp_replace(phone, '[^0-9]', '',
    # 'g')`), which detectors do not recognise by design (docs/security.md, "Content detectors are heuristics");
    # a column rule is what covers such a column.
    # values in other messages
    "email::int (the value in the error)": R("select email::int from customers limit 1", kinds=["email"], allowed=("22",)),
    "phone::date": R("select phone::date from customers limit 1", kinds=["phone"], allowed=("22",)),
    "card_number::int": R("select card_number::int from customers limit 1", allowed=("22",)),
    "national_id::date": R("select national_id::date from customers limit 1", kinds=["national_id"], allowed=("22",)),
    "unique violation quoting an existing email": R(
        "begin", "update customers set email = (select email from customers where id = 2) where id = 1", "rollback",
        kinds=["email"], target=1, allowed=("23505",)),
    "unique index over a duplicated card number": R(
        "begin", "update customers set card_number = (select card_number from customers where id = 2) where id = 1",
        "create unique index on customers (card_number)", "rollback", target=2, allowed=("23505",)),
    "not-null violation: Failing row contains": R(
        "begin", "update customers set name = null where id = 1", "rollback",
        kinds=["card_number", "national_id", "email", "phone"], target=1, allowed=("23502",)),
    "check violation: Failing row contains": R(
        "begin", "alter table customers add constraint wardgate_routes_check check (id < 0) not valid",
        "update customers set name = name where id = 1", "rollback",
        kinds=["card_number", "national_id", "email", "phone"], target=2, allowed=("23514",)),
    "pg_notify(email) to a channel it listens on": R("listen x", "select pg_notify('x', email) from customers limit 3",
                                                     "select 1", kinds=["email"], target=1),
    "pg_notify(card_number)": R("listen x", "select pg_notify('x', card_number) from customers limit 3", "select 1",
                                target=1),
    "pg_notify(national_id)": R("listen x", "select pg_notify('x', national_id) from customers limit 3", "select 1",
                                kinds=["national_id"], target=1),
    # found by an attack run against the demo
    "a FULL JOIN's merged USING column (no origin)": R(
        "select k from (select null::text k) a full join (select card_number k from customers) b using (k)"),
    "a LATERAL VALUES row (no origin)": R("select x from customers c, lateral (values (c.card_number)) v(x)"),
    "a scalar subquery over VALUES": R("select (select k from (values (c.card_number)) v(k)) from customers c"),
    "INSERT from the statement's own WITH over the table, then read the copy": R(
        "create temp table wr_copy (a int, b text, c text, d text, k text, f text, g timestamptz)",
        "with w as (select * from customers) insert into wr_copy select * from w", "select k from wr_copy"),
    "INSERT from a LATERAL join's right side, then read the copy": R(
        "create temp table wr_lateral (k text)",
        "insert into wr_lateral (k) select x from customers c cross join lateral (select c.card_number) s(x)",
        "select k from wr_lateral"),
    "current_setting(card_number) in a condition (the value in the error)": R(
        "select 1 from customers where case when id = 57 then current_setting(card_number) end is null",
        allowed=("42704",)),
    "a regclass cast in ORDER BY (the value in the error)": R(
        "select 1 from customers order by quote_ident(card_number)::regclass", allowed=("42P01",)),
    "CREATE INDEX over an expression of the masked column (the value in the error)": R(
        "create index wr_index on customers ((card_number::tsquery)) where id = 57", allowed=("42601",)),
    "CREATE STATISTICS over an expression, then ANALYZE (the value in the error)": R(
        "begin", "create statistics wr_stats on (card_number::tsquery) from customers", "analyze customers",
        "rollback", target=2, allowed=("42601",)),
    "pg_notify(card_number) in a condition": R("listen x", "select 1 from customers where pg_notify('x', card_number) "
                                               "is not null", "select 1", target=1),
})


def run_one(conn: psycopg.Connection, sql: str, binary: bool) -> Step:
    """One statement through psycopg: its rows, or how it failed."""
    try:
        cur = conn.cursor(binary=binary).execute(sql)
        return Step(sql, rows=len(cur.fetchall()) if cur.description else 0)
    except psycopg.Error as exc:
        diag = exc.diag
        closed = conn.closed or conn.broken or diag.severity_nonlocalized in ("FATAL", "PANIC") or not exc.sqlstate
        return Step(sql, code=exc.sqlstate or "08006", message=diag.message_primary or str(exc), closed=bool(closed))


def _psycopg_steps(dsn: str, steps: tuple[str, ...], binary: bool) -> list[Step]:
    """Each statement in turn (autocommit), up to one refused or the session's end."""
    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in steps:
            out.append(run_one(conn, sql, binary))
            if out[-1].refused or out[-1].closed:
                break
    return out


def _asyncpg_steps(dsn: str, steps: tuple[str, ...]) -> list[Step]:
    async def main() -> list[Step]:
        out = []
        conn = await asyncpg.connect(dsn)
        try:
            for sql in steps:
                step = Step(sql)
                out.append(step)
                try:
                    stmt = await conn.prepare(sql)
                    step.rows = len(await stmt.fetch())
                except asyncpg.PostgresError as exc:
                    step.code, step.message = exc.sqlstate, getattr(exc, "message", str(exc))
                    step.closed = conn.is_closed() or getattr(exc, "severity_en", None) in ("FATAL", "PANIC")
                    if step.refused or step.closed:
                        break
                except (asyncpg.InterfaceError, ConnectionError, OSError) as exc:
                    step.closed, step.message = True, str(exc)
                    break
        finally:
            if not conn.is_closed():
                await conn.close()
        return out

    return asyncio.run(main())


def _psql_steps(dsn: str, steps: tuple[str, ...], messages: Callable[[], list[tuple[str, bytes]]]) -> tuple[list[Step], str]:
    """psql, each statement a -c (one Query each); stops at the first error (ON_ERROR_STOP). The outcome of
    each is read from the messages between ReadyForQuerys; psql's exit code and output must agree."""
    args = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", dsn]
    for sql in steps:
        args += ["-c", sql]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    got = messages()
    ready = [i for i, (t, _) in enumerate(got) if t == "Z"]
    segments = [got[a + 1:b + 1] for a, b in zip(ready, ready[1:], strict=False)]
    if ready and ready[-1] != len(got) - 1:
        segments.append(got[ready[-1] + 1:])  # what came after the last ReadyForQuery (a FATAL, say)
    result = []
    for sql, seg in zip(steps, segments, strict=False):
        step = outcome(sql, seg, closed=False)
        result.append(step)
        if step.code:
            break
    if out.returncode == 2 and (not result or not result[-1].closed):  # the connection went bad
        result.append(Step("(psql)", code="08006", message=out.stderr.strip(), closed=True))
    failed = any(s.code for s in result)
    assert (out.returncode == 0) == (not failed), (out.returncode, out.stderr, [str(s) for s in result])
    if not failed:
        assert len(result) == len(steps), (out.stdout, out.stderr)
    else:
        last = next(s for s in result if s.code)
        assert last.closed or last.code in out.stderr, (last, out.stderr)
    return result, out.stdout + out.stderr


CLIENTS = ("psql", "psycopg-text", "psycopg-binary", "asyncpg-prepared")


def run_sql_route(client: str, dsn: str, asyncpg_dsn: str, route: Route, tap: Tap) -> tuple[list[Step], str]:
    if client == "psql":
        return _psql_steps(dsn, route.steps, tap.messages)
    if client == "asyncpg-prepared":
        return _asyncpg_steps(asyncpg_dsn, route.steps), ""
    return _psycopg_steps(dsn, route.steps, binary=client == "psycopg-binary"), ""


@pytest.mark.parametrize("name", SQL_ROUTES)
def test_sql_route_exposes_secrets_without_the_gateway(truth, direct_tap, name) -> None:  # noqa: ANN001
    route = SQL_ROUTES[name]
    steps = _psycopg_steps(app_dsn(direct_tap.port), route.steps, binary=False)
    target = route.index
    assert len(steps) > target, [str(s) for s in steps]
    bad = [s for s in steps if s.code and not (route.allowed and s.code.startswith(route.allowed))]
    assert not bad and (steps[target].rows or route.allowed), [str(s) for s in steps]
    assert_leaks(truth, direct_tap.messages(), name, set(route.kinds))


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("name", SQL_ROUTES)
def test_sql_route_leaks_nothing_through_the_gateway(rgw, truth, tap, name, client) -> None:  # noqa: ANN001
    route = SQL_ROUTES[name]
    steps, printed = run_sql_route(client, alice_dsn(rgw, tap.port), alice_dsn(rgw, tap.port, libpq=False), route, tap)
    assert_no_leak(truth, tap.messages(), f"{name} [{client}]", ("psql output", printed))
    judge(f"{name} [{client}]", steps, route.index, route.allowed)


# --- renames ------------------------------------------------------------------------------------------------

def check_sessions(truth: Secrets, tap: Tap, sessions: dict[int, str]) -> list[str]:
    """The leaks of each of the tap's connections, apart (every connection it saw must be one of them)."""
    assert len(tap.streams) == len(sessions), (len(tap.streams), sessions)
    problems = []
    for i, label in sessions.items():
        try:
            assert_no_leak(truth, tap.messages(i), label)
        except AssertionError as exc:
            problems.append(str(exc).split("\nassert")[0][:900])
    return problems


def judged(route: str, steps: list[Step]) -> list[str]:
    try:
        judge(route, steps, 0)
    except AssertionError as exc:
        return [str(exc).split("\nassert")[0]]
    return []


@pytest.mark.parametrize("client", ["psycopg-text", "psycopg-binary"])
def test_rename_of_a_masked_column_by_alice(rgw, pg, truth, tap, client) -> None:  # noqa: ANN001
    """alice renames card_number and reads it under its new name: in the same session, and in a new one."""
    attnum = card_attnum(pg)
    route = f"rename card_number to cn by alice, then select cn [{client}]"
    binary = client == "psycopg-binary"
    try:
        with psycopg.connect(alice_dsn(rgw, tap.port), autocommit=True) as conn:
            alter = run_one(conn, "alter table customers rename column card_number to cn", binary=False)
            renamed = column_name(pg, attnum) == "cn"  # the truth: what the database says now
            assert renamed == (alter.code is None), (renamed, str(alter))
            same = run_one(conn, "select cn from customers", binary) if renamed else None
        new = _psycopg_steps(alice_dsn(rgw, tap.port), ("select cn from customers",), binary) if renamed else []
        # the tap's connections: 0 is the session that renamed, 1 the new one
        sessions = {0: f"{route}: same session", 1: f"{route}: new session"} if renamed else {0: route}
        problems = check_sessions(truth, tap, sessions)
        if not renamed:  # the rename itself refused: the route ends there
            judge(route, [alter], 0)
        else:
            problems += judged(f"{route}: same session", [same]) + judged(f"{route}: new session", new)
        assert not problems, "\n".join(problems)
    finally:
        restore_card_number(pg, attnum)


@pytest.mark.parametrize("client", ["psycopg-text", "psycopg-binary"])
def test_rename_by_an_exempt_user_then_alice_reads_the_new_name(rgw, pg, truth, client) -> None:  # noqa: ANN001
    """bob (exempt) renames card_number; alice reads cn in a session opened before, and in a new one. Three
    rounds, each from the original schema: what alice's open session gets has varied from run to run."""
    attnum = card_attnum(pg)
    binary = client == "psycopg-binary"
    problems: list[str] = []
    for round_ in range(1, 4):
        route = f"rename by bob, then alice selects cn [{client}, round {round_}]"
        tap = Tap(rgw.port)
        try:
            with psycopg.connect(alice_dsn(rgw, tap.port), autocommit=True) as before:
                assert before.execute("select 1").fetchone() == (1,)  # the session is open, its catalog read
                with psycopg.connect(rgw.dsn(rgw.credential("bob")), autocommit=True) as bob:
                    bob.execute("alter table customers rename column card_number to cn")
                assert column_name(pg, attnum) == "cn"
                open_step = run_one(before, "select cn from customers", binary)
            new_steps = _psycopg_steps(alice_dsn(rgw, tap.port), ("select cn from customers",), binary)
            # the tap's connections: 0 is alice's session opened before the rename, 1 the new one (bob's is direct)
            problems += check_sessions(truth, tap, {0: f"{route}: already-open session", 1: f"{route}: new session"})
            problems += judged(f"{route}: already-open session", [open_step]) + judged(f"{route}: new session", new_steps)
        finally:
            tap.close()
            restore_card_number(pg, attnum)
    assert not problems, "\n".join(problems)


def test_rename_control_exposes_secrets_without_the_gateway(pg, truth, direct_tap) -> None:  # noqa: ANN001
    attnum = card_attnum(pg)
    try:
        steps = _psycopg_steps(app_dsn(direct_tap.port), ("alter table customers rename column card_number to cn",
                                                           "select cn from customers"), binary=False)
        assert not any(s.code for s in steps) and steps[-1].rows, [str(s) for s in steps]
        assert_leaks(truth, direct_tap.messages(), "rename", {"card_number"})
    finally:
        restore_card_number(pg, attnum)


# --- JDBC ---------------------------------------------------------------------------------------------------

JAVA = r"""
import java.sql.*;
import java.nio.file.*;
import java.util.*;

public class Routes {
    public static void main(String[] args) throws Exception {
        List<String> lines = Files.readAllLines(Paths.get(args[3]));
        for (String line : lines) {
            if (line.isEmpty()) continue;
            String[] route = line.split("\t");
            try (Connection conn = DriverManager.getConnection(args[0], args[1], args[2])) {
                conn.setAutoCommit(true);
                for (int i = 0; i < route.length; i++) {
                    for (int run = 0; run < 2; run++) {  // the second run uses a named server-side statement
                        try (PreparedStatement st = conn.prepareStatement(route[i])) {
                            boolean rs = st.execute();
                            int rows = 0;
                            if (rs) { try (ResultSet r = st.getResultSet()) { while (r.next()) rows++; } }
                            System.out.println("STEP\t" + i + "\t" + rows);
                        } catch (SQLException e) {
                            System.out.println("ERR\t" + i + "\t" + e.getSQLState() + "\t" + e.getMessage().replace('\n', ' '));
                            if ("42501".equals(e.getSQLState()) || conn.isClosed()) { i = route.length; break; }
                            if (!conn.getAutoCommit()) conn.rollback();
                        }
                    }
                }
            } catch (SQLException e) {
                System.out.println("CLOSED\t" + e.getSQLState() + "\t" + e.getMessage().replace('\n', ' '));
            }
            System.out.println("END");
        }
    }
}
"""
JDBC_ROUTES = [n for n, r in SQL_ROUTES.items() if "begin" not in r.steps and "listen x" not in r.steps]


def test_sql_routes_through_jdbc(rgw, truth, tap, tmp_path) -> None:  # noqa: ANN001
    """The SQL routes (those without a transaction or LISTEN) through the PostgreSQL JDBC driver, each run
    twice so the second uses a named server-side statement (prepareThreshold=1); every byte is checked."""
    if not (JDBC_JAR.exists() and shutil.which("java")):
        pytest.skip("JDBC is optional here: no /usr/share/java/postgresql.jar or java")
    src = tmp_path / "Routes.java"
    src.write_text(JAVA)
    routes = tmp_path / "routes.tsv"
    routes.write_text("\n".join("\t".join(SQL_ROUTES[n].steps) for n in JDBC_ROUTES) + "\n")
    cred = rgw.credential("alice", ttl="30m")
    url = f"jdbc:postgresql://127.0.0.1:{tap.port}/shop?sslmode=disable&prepareThreshold=1&assumeMinServerVersion=10"
    out = subprocess.run(["java", "-cp", str(JDBC_JAR), str(src), url, "alice", cred["credential"], str(routes)],
                         capture_output=True, text=True, timeout=110, env={**os.environ, "JAVA_TOOL_OPTIONS": "-Xshare:auto"})
    assert out.returncode == 0, out.stderr[-3000:]
    blocks = out.stdout.split("END\n")
    assert len(blocks) - 1 == len(JDBC_ROUTES), out.stdout[-2000:]
    assert len(tap.streams) == len(JDBC_ROUTES)  # a connection per route, in order
    problems = []
    for i, (name, block) in enumerate(zip(JDBC_ROUTES, blocks, strict=False)):
        try:
            assert_no_leak(truth, tap.messages(i), f"{name} [jdbc]", ("JDBC output", block))
        except AssertionError as exc:
            problems.append(str(exc).split("\nassert")[0][:700])
        route = SQL_ROUTES[name]
        steps: dict[int, Step] = {}
        for line in block.splitlines():
            parts = line.split("\t")
            if parts[0] == "STEP":
                steps.setdefault(int(parts[1]), Step(route.steps[int(parts[1])], rows=int(parts[2])))
            elif parts[0] == "ERR":
                steps.setdefault(int(parts[1]), Step(route.steps[int(parts[1])], code=parts[2], message=parts[3]))
            elif parts[0] == "CLOSED":
                steps[len(steps)] = Step("(connection)", code=parts[1], message=parts[2], closed=True)
        try:
            judge(f"{name} [jdbc]", [steps[k] for k in sorted(steps)], route.index, route.allowed)
        except AssertionError as exc:
            problems.append(str(exc).split("\nassert")[0][:700])
    assert not problems, "\n".join(problems)


# --- the property: random interleavings ---------------------------------------------------------------------

MASKED_POOL = "select email, card_number, phone, national_id from customers limit 3"
POOL = (
    "select 1",
    "select id from customers limit 2",
    MASKED_POOL,
    f"prepare s1 as {MASKED_POOL}",
    "prepare s2 as select 1",
    "prepare c1 as select id from customers limit 2",
    "execute s1",
    "execute s2",
    "execute c1",
    "deallocate s1",
    "deallocate s2",
    "deallocate all",
    f"declare c1 cursor for {MASKED_POOL}",
    f"declare c2 cursor with hold for {MASKED_POOL}",
    "declare c1 cursor with hold for select 1",
    "declare s1 cursor for select 1",
    "fetch 2 from c1",
    "fetch all from c2",
    "fetch next from s1",
    "move 1 in c1",
    "close c1",
    "close c2",
    "close all",
    "begin",
    "commit",
    "rollback",
    "discard all",
)
STATEMENTS = ("", "s1", "s2")
PORTALS = ("", "c1", "c2", "s1")


# Statements over the masked columns come up more often than the others.
WEIGHTED_POOL = POOL + (MASKED_POOL, f"prepare s1 as {MASKED_POOL}", "execute s1", f"declare c1 cursor for {MASKED_POOL}",
                        f"declare c2 cursor with hold for {MASKED_POOL}", "fetch 2 from c1", "fetch all from c2")
sql_of = st.one_of(st.just(MASKED_POOL), st.sampled_from(WEIGHTED_POOL))  # the masked query half the time


@st.composite
def message_op(draw) -> list[tuple[str, bytes]]:  # noqa: ANN001
    """One frontend message, any of them, on any of the names."""
    kind = draw(st.sampled_from("PBDDEECSHQ"))
    if kind == "P":
        name, sql = draw(st.sampled_from(STATEMENTS)), draw(sql_of)
        return [(f"Parse {name!r} {sql!r}", parse(name, sql))]
    if kind == "B":
        portal, stmt = draw(st.sampled_from(PORTALS)), draw(st.sampled_from(STATEMENTS))
        fmt = draw(st.sampled_from([(), (1,), (0,)]))
        return [(f"Bind {portal!r} {stmt!r} {fmt}", bind(portal, stmt, fmt))]
    if kind == "D":
        if draw(st.booleans()):
            name = draw(st.sampled_from(STATEMENTS))
            return [(f"Describe S {name!r}", describe("S", name))]
        name = draw(st.sampled_from(PORTALS))
        return [(f"Describe P {name!r}", describe("P", name))]
    if kind == "E":
        portal, n = draw(st.sampled_from(PORTALS)), draw(st.sampled_from([0, 0, 1, 2]))
        return [(f"Execute {portal!r} {n}", execute(portal, n))]
    if kind == "C":
        if draw(st.booleans()):
            name = draw(st.sampled_from(STATEMENTS))
            return [(f"Close S {name!r}", close("S", name))]
        name = draw(st.sampled_from(PORTALS))
        return [(f"Close P {name!r}", close("P", name))]
    if kind == "S":
        return [("Sync", SYNC)]
    if kind == "H":
        return [("Flush", FLUSH)]
    sql = draw(sql_of)
    return [(f"Query {sql!r}", query(sql))]


@st.composite
def run_op(draw) -> list[tuple[str, bytes]]:  # noqa: ANN001
    """A statement run as drivers run one: Parse, Bind, a Describe (of the statement, the portal, or none),
    Execute, and sometimes a Sync or Flush after."""
    stmt, portal, sql = draw(st.sampled_from(STATEMENTS)), draw(st.sampled_from(PORTALS)), draw(sql_of)
    fmt = draw(st.sampled_from([(), (1,)]))
    out = [(f"Parse {stmt!r} {sql!r}", parse(stmt, sql)), (f"Bind {portal!r} {stmt!r} {fmt}", bind(portal, stmt, fmt))]
    which = draw(st.sampled_from(["S", "P", None]))
    if which == "S":
        out.insert(1, (f"Describe S {stmt!r}", describe("S", stmt)))
    elif which == "P":
        out.append((f"Describe P {portal!r}", describe("P", portal)))
    n = draw(st.sampled_from([0, 0, 2]))
    out.append((f"Execute {portal!r} {n}", execute(portal, n)))
    return out


@st.composite
def rerun_op(draw) -> list[tuple[str, bytes]]:  # noqa: ANN001
    """An earlier statement or portal run again: Bind and Execute, or Execute alone."""
    stmt, portal = draw(st.sampled_from(STATEMENTS)), draw(st.sampled_from(PORTALS))
    out = [(f"Bind {portal!r} {stmt!r}", bind(portal, stmt))] if draw(st.booleans()) else []
    return out + [(f"Execute {portal!r} 0", execute(portal))]


@st.composite
def sql_name_op(draw) -> list[tuple[str, bytes]]:  # noqa: ANN001
    """A name defined in SQL over the masked columns (PREPARE, DECLARE [WITH HOLD], in a transaction or
    not), then used through the protocol: Bind of the statement, or Execute of the cursor as a portal,
    described or not."""
    out = [("Query 'begin'", query("begin"))] if draw(st.booleans()) else []
    if draw(st.booleans()):
        name, portal = draw(st.sampled_from(["s1", "s2"])), draw(st.sampled_from(PORTALS))
        out.append((f"Query 'prepare {name} as ...'", query(f"prepare {name} as {MASKED_POOL}")))
        out.append((f"Bind {portal!r} {name!r}", bind(portal, name)))
    else:
        portal, hold = draw(st.sampled_from(["c1", "c2", "s1"])), draw(st.sampled_from(["", " with hold"]))
        out.append((f"Query 'declare {portal} cursor{hold} for ...'", query(f"declare {portal} cursor{hold} for {MASKED_POOL}")))
    if draw(st.booleans()):
        out.append((f"Describe P {portal!r}", describe("P", portal)))
    return out + [(f"Execute {portal!r} 0", execute(portal))]


@st.composite
def fragment(draw) -> list[tuple[str, bytes]]:  # noqa: ANN001
    """A message or a run, mostly ended by a Sync: after an error the server skips every extended-protocol
    message up to the next Sync, so without them most of a program would never run."""
    out = draw(st.one_of(message_op(), run_op(), run_op(), rerun_op(), sql_name_op()))
    end = draw(st.sampled_from(["Sync", "Sync", "Sync", "Flush", None, None]))
    return out + ([(end, SYNC if end == "Sync" else FLUSH)] if end else [])


frontend_ops = st.lists(fragment(), min_size=1, max_size=8).map(lambda parts: [m for part in parts for m in part])


MARKER = "select 'wardgate-routes-end' as marker"


def run_program(port: int, login: Callable[[Wire], None], program: list[tuple[str, bytes]]) -> Wire:
    """Send the program's messages at once (pipelined), then Sync, ROLLBACK (so no aborted transaction is
    left) and a marker Query, and read everything up to the marker's ReadyForQuery: whatever Syncs, errors
    and skipped Queries came before, the marker is answered last. A closed session ends it."""
    c = Wire(port)
    login(c)
    try:
        c.send(b"".join(m for _, m in program) + SYNC + query("ROLLBACK") + query(MARKER))
        seen_marker = False
        while True:
            mtype, body = c.read()
            if mtype == "D" and b"wardgate-routes-end" in body:
                seen_marker = True
            elif mtype == "Z" and seen_marker:
                break
            elif mtype == "E" and codec.is_fatal(body):
                c.closed_by_peer = True
                break
    except (ConnectionError, OSError) as exc:
        if isinstance(exc, TimeoutError):
            raise AssertionError("the session stopped answering (no ReadyForQuery after the marker)") from exc
        c.closed_by_peer = True
    finally:
        c.close()
    return c


PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Target:
    """What the property runs against (a short repr, for hypothesis's report of a failing example)."""

    port: int
    credential: str
    truth: Secrets

    def __repr__(self) -> str:
        return f"<the gateway on port {self.port}, as alice>"


@pytest.fixture(scope="module")
def target(rgw, truth) -> Target:  # noqa: ANN001
    return Target(rgw.port, rgw.credential("alice", ttl="2h")["credential"], truth)


@pytest.mark.timeout(max(110, EXAMPLES // 5))
@PROPERTY
@given(program=frontend_ops)
def test_property_random_protocol_interleavings_leak_nothing(target, program) -> None:  # noqa: ANN001
    c = run_program(target.port, lambda w: w.login("alice", target.credential, "shop"), program)
    assert_no_leak(target.truth, c.got, "program:\n  " + "\n  ".join(label for label, _ in program))
    # what the examples came to (--hypothesis-show-statistics): masked rows must be among them, often
    rows = [b for t, b in c.got if t == "D"]
    event("masked values received" if any(b"[email]" in b or b"national_id:" in b for b in rows) else "no masked values")
    errors = [codec.parse_error_fields(b) for t, b in c.got if t == "E"]
    if any(e.get("C") == "42501" and RULE.search(e.get("M", "")) for e in errors):
        event("a statement refused by a rule")
    if c.closed_by_peer:
        fatal = [e for e in errors if e.get("V", e.get("S")) in ("FATAL", "PANIC")]
        event("session closed by the gateway: " + (re.sub(r"[0-9a-f]{6,}|\d+", "N", fatal[0].get("M", ""))[:110]
                                                    if fatal else "connection closed"))


def test_property_pool_exposes_secrets_without_the_gateway(pg, truth) -> None:  # noqa: ANN001
    """The control of the property: the masked statement of the pool, by Parse/Bind/Execute without Describe,
    shows every kind straight from PostgreSQL (so a program that runs it through the gateway unmasked fails)."""
    program = [("", parse("", MASKED_POOL)), ("", bind("", "")), ("", execute(""))]
    c = run_program(pg.port, lambda w: w.login("app", APP_PASSWORD, "shop"), program)
    assert_leaks(truth, c.got, "pool", {"email", "card_number", "phone", "national_id"})


def test_secret_forms_are_found_in_every_reading(truth) -> None:
    """The helper itself: a value is found as stored, case-changed, stripped of separators, in a bytea's hex,
    in base64 and as a binary integer; masked forms are not taken for it."""
    card, nid, email, phone = (truth.values[k][0] for k in Secrets.KINDS)
    digits = re.sub(r"\D", "", card)
    found = {
        "as stored": [("D", b"\x00\x01" + struct.pack("!i", len(card)) + card.encode())],
        "upper": [("E", b"Minvalid input: " + email.upper().encode() + b"\x00\x00")],
        "digits": [("A", b"\x00\x00\x00\x01x\x00" + re.sub(r"\D", "", phone).encode() + b"\x00")],
        "hex": [("D", b"\\x" + card.encode().hex().encode())],
        "base64": [("D", base64.b64encode(card.encode()))],
        "int4": [("D", b"\x00\x01" + struct.pack("!i", 4) + struct.pack("!i", int(nid)))],
        "int8": [("D", b"\x00\x01" + struct.pack("!i", 8) + struct.pack("!q", int(digits)))],
    }
    for what, msgs in found.items():
        assert truth.leaks(msgs), what
    masked = [("D", f"[email] ************{card[-4:]} national_id:0f1e2d3c4b5a6978 [phone]".encode())]
    assert not truth.leaks(masked)


def test_report_sessions_the_gateway_closed() -> None:
    """Not a check: the routes that ended in a session the gateway closed (no leak, but the client lost its
    session), shown in pytest's warnings summary."""
    for route, why in CLOSED.items():
        warnings.warn(f"session closed by the gateway: {route}: {why}", stacklevel=1)


def test_a_masked_column_renamed_outside_the_gateway_stays_masked_after_a_restart(tmp_path, pg, truth) -> None:  # noqa: ANN001
    """The identities of masked columns are kept in the store: a column renamed straight on the database
    (no session of the gateway sees the DDL) is still masked by the gateway started again afterwards."""
    gw = make_gateway(tmp_path / "restart", pg, tail_toml=MASKING)
    gw.start()
    attnum = card_attnum(pg)
    try:
        with psycopg.connect(gw.dsn(gw.credential()), autocommit=True) as conn:  # alice: the catalog is read
            assert conn.execute("select card_number from customers where id = 1").fetchone()[0] != \
                truth.values["card_number"][0]
        gw.stop()
        with psycopg.connect(pg.dsn(database="shop"), autocommit=True) as conn:
            conn.execute("alter table customers rename column card_number to wr_renamed")
        gw.start()
        with psycopg.connect(gw.dsn(gw.credential()), autocommit=True) as conn:
            shown = [r[0] for r in conn.execute("select wr_renamed from customers order by id").fetchall()]
        clear = set(truth.values["card_number"])
        assert shown and not clear & set(shown), "a renamed masked column came back in clear after a restart"
    finally:
        gw.stop()
        restore_card_number(pg, attnum)
