"""Differential: the gateway's reading of a statement against what the real PostgreSQL runs.

Generated statements (hypothesis, from a grammar of PostgreSQL's lexical forms: every quoting form,
nested comments, numbers, parameters, attempts to hide a second statement) and a fixed list of hard
cases are decoded as the gateway decodes client bytes (wardgate.sql.encoding), classified
(wardgate.sql.classify) and given tag predictions (wardgate.sql.tags), then sent as one simple Query,
in the matching client_encoding, to a real server inside BEGIN ... ROLLBACK over a raw socket. What
the server says it ran must be what was classified:

- text the classifier cannot parse is rejected by the server too, with nothing run;
- otherwise the server completes no more statements than were classified (all of them when nothing
  fails), each CommandComplete tag is one predicted for the statement at its position, each DML or
  DROP it reports is among the classified kinds, and every DDL command an event trigger reports
  (ddl_command_start, sql_drop) is one of the statements run.

The server may reject what the classifier accepts (a newer parser: 0x1F, 1_000 and a vertical tab are
PostgreSQL 16 syntax): that direction is safe and allowed. A catalogue of every statement form, run
by the superuser, holds the tag predictions to what the server sends for each. The differentials this
suite found are kept as examples, each marked FOUND with what it was.
WARDGATE_DIFF_EXAMPLES sets the number of generated examples (300; `make soak` runs many more).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast.parser import parse_sql_json

from wardgate.engines.postgres import codec
from wardgate.engines.postgres.scram import MECHANISM, ScramClient
from wardgate.localpg import LocalPostgres
from wardgate.sql.classify import classify
from wardgate.sql.encoding import decode
from wardgate.sql.tags import expected_tag, matches, tag_key

EXAMPLES = int(os.environ.get("WARDGATE_DIFF_EXAMPLES", "300"))
DB = "wardgate_diff"
DDL_NOTICE = "wardgate-diff-ddl:"
ENCODINGS = ("UTF8", "LATIN1", "SQL_ASCII")
PYCODEC = {"UTF8": "utf-8", "LATIN1": "latin-1", "SQL_ASCII": "ascii"}

# The scratch objects, owned by trustuser, that the generated statements read, write, alter and drop.
SCRATCH = """
CREATE TABLE diff_t (id int, v text);
INSERT INTO diff_t VALUES (1, 'a'), (2, 'b');
CREATE TABLE diff_drop (a int);
CREATE VIEW diff_v AS SELECT * FROM diff_t;
CREATE SCHEMA diff_s;
CREATE FUNCTION diff_f(text) RETURNS text LANGUAGE sql AS 'select $1';
CREATE PROCEDURE diff_proc() LANGUAGE sql AS 'select 1';
"""
# Says which DDL the server ran, for every command that fires event triggers.
EVENT_TRIGGERS = f"""
CREATE FUNCTION diff_ddl() RETURNS event_trigger LANGUAGE plpgsql AS
  $$ BEGIN RAISE NOTICE '{DDL_NOTICE}%', tg_tag; END $$;
CREATE EVENT TRIGGER diff_start ON ddl_command_start EXECUTE FUNCTION diff_ddl();
CREATE EVENT TRIGGER diff_drop ON sql_drop EXECUTE FUNCTION diff_ddl();
"""


@dataclass
class Outcome:
    """What the server did with one Query message."""

    tags: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (SQLSTATE, message)
    unplaced: list[str] = field(default_factory=list)  # SQLSTATEs of errors that point at no text (no position, no context)
    ddl: list[str] = field(default_factory=list)  # tg_tag of each event trigger firing
    rows: list[list[str | None]] = field(default_factory=list)
    empty: bool = False  # EmptyQueryResponse
    status: str = "I"  # the transaction status of the ReadyForQuery that ended it


class Wire:
    """A raw protocol session (trustuser by trust, or a user with a SCRAM password): every message is seen."""

    def __init__(self, port: int, user: str = "trustuser", password: str | None = None) -> None:
        self.encoding = "UTF8"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = codec.MessageReader(1 << 26)
        self.sock.sendall(codec.startup_message({"user": user, "database": DB, "client_encoding": "UTF8"}))
        mtype, body = self._read()
        if password is not None and mtype == "R" and body[:4] == b"\x00\x00\x00\x0a":
            scram = ScramClient(password)
            self.sock.sendall(codec.sasl_initial_response(MECHANISM, scram.client_first()))
            mtype, body = self._read()
            self.sock.sendall(codec.password_message(scram.server_first(body[4:])))
            mtype, body = self._read()  # SASLFinal
            mtype, body = self._read()
        assert mtype == "R" and body[:4] == b"\x00\x00\x00\x00", (mtype, body)
        self._until_ready()

    def _read(self) -> tuple[str, bytes]:
        while True:
            msg = self.reader.next()
            if msg is not None:
                return chr(msg[0]), msg[1]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.reader.feed(data)

    def _until_ready(self) -> Outcome:
        out = Outcome()
        while True:
            mtype, body = self._read()
            if mtype == "C":
                out.tags.append(body.rstrip(b"\x00").decode("ascii", "replace"))
            elif mtype == "E":
                fields = codec.parse_error_fields(body)
                out.errors.append((fields.get("C", ""), fields.get("M", "")))
                if not {"P", "p", "W"} & fields.keys():
                    out.unplaced.append(fields.get("C", ""))
            elif mtype == "N":
                text = codec.parse_error_fields(body).get("M", "")
                if text.startswith(DDL_NOTICE):
                    out.ddl.append(text.removeprefix(DDL_NOTICE))
            elif mtype == "D":
                out.rows.append(codec.data_row_values(body))
            elif mtype == "I":
                out.empty = True
            elif mtype == "G":  # COPY FROM STDIN: send no rows
                self.sock.sendall(codec.message(b"c"))
            elif mtype == "Z":
                out.status = body.decode()
                return out

    def query(self, raw: bytes) -> Outcome:
        self.sock.sendall(codec.message(b"Q", raw + b"\x00"))
        return self._until_ready()

    def ok(self, sql: str) -> Outcome:
        out = self.query(sql.encode())
        assert not out.errors, (sql, out.errors)
        return out

    def close(self) -> None:
        self.sock.close()


def setup_database(pg: LocalPostgres) -> None:
    pg.psql(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    pg.psql(f'CREATE DATABASE "{DB}" OWNER trustuser')
    pg.psql(EVENT_TRIGGERS, database=DB)
    pg.psql("SET ROLE trustuser;" + SCRATCH, database=DB)


class Server:
    """The server side of the differential: one session, each text run inside BEGIN ... ROLLBACK."""

    def __init__(self, pg: LocalPostgres) -> None:
        self.pg = pg
        self.wire = Wire(pg.port)
        self.resets = 0

    def run(self, raw: bytes, encoding: str) -> Outcome:
        try:
            return self._run(raw, encoding)
        except (ConnectionError, OSError):
            self.wire.close()
            self.wire = Wire(self.pg.port)
            raise

    def _run(self, raw: bytes, encoding: str) -> Outcome:
        if self.wire.encoding != encoding:
            self.wire.ok(f"SET client_encoding = '{encoding}'")
            self.wire.encoding = encoding
        self.wire.ok("BEGIN")
        out = self.wire.query(raw)
        ended = out.status == "I"
        self.wire.query(b"ROLLBACK")
        if b"prepare" in raw.lower():
            self.wire.query(b"DEALLOCATE ALL")  # prepared statements outlive the transaction
        if ended:  # the text ended the transaction (a COMMIT exposed by a mutation): start clean
            self.reset()
        return out

    def reset(self) -> None:
        self.resets += 1
        self.wire.close()
        setup_database(self.pg)
        self.wire = Wire(self.pg.port)

    def close(self) -> None:
        self.wire.close()


@pytest.fixture(scope="module")
def server(pg: LocalPostgres):  # noqa: ANN201
    setup_database(pg)
    srv = Server(pg)
    yield srv
    srv.close()
    pg.psql(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')


# -- the property


# The event trigger's tg_tag of a statement where it is not its CommandComplete tag.
def _event_tags(stmt: dict) -> frozenset[str]:
    body = stmt.get("SelectStmt")
    return frozenset({"SELECT INTO"}) if isinstance(body, dict) and body.get("intoClause") else frozenset()


_KIND_OF_TAG = {"INSERT": "insert", "UPDATE": "update", "DELETE": "delete", "MERGE": "merge", "TRUNCATE TABLE": "truncate"}


def differential(raw: bytes, encoding: str, out: Outcome) -> str | None:
    """Why the server's account of `raw` differs from the gateway's reading of it; None when it does not."""
    try:
        text = decode(raw, encoding)
    except (UnicodeDecodeError, ValueError):
        return None  # the gateway refuses these bytes: nothing reaches the server
    cl = classify(text)
    if cl.error:
        if out.tags or out.ddl or not out.errors:
            return f"the classifier cannot parse it ({cl.error}) but the server ran {out.tags or 'it'}"
        return None
    # 22021 with no position or context, before anything ran: the server found the message's bytes invalid
    # in the client encoding (inside a literal or a function body it points at the text; 22P05, a result
    # character LATIN1 cannot show, is about output)
    if "22021" in out.unplaced and not out.tags and not out.ddl:
        return f"the gateway decoded bytes the server rejects as {encoding}: {out.errors}"
    stmts = [s["stmt"] for s in json.loads(parse_sql_json(text))["stmts"]]
    if len(stmts) != cl.statements:
        return f"classify counts {cl.statements} statements, the parse tree holds {len(stmts)}"
    if len(out.tags) > cl.statements:
        return f"the server completed {len(out.tags)} statements {out.tags}, the classifier read {cl.statements}"
    if not out.errors and len(out.tags) != cl.statements:
        return f"the server completed {out.tags} without an error, the classifier read {cl.statements} statements"
    if cl.statements == 0 and not out.errors and not out.empty:
        return "no statement was classified but the server did not answer EmptyQueryResponse"
    expected = [expected_tag(s) for s in stmts]
    for i, tag in enumerate(out.tags):
        if not matches(expected[i], tag):
            return f"statement {i + 1} completed as {tag!r}, predicted {sorted(expected[i] or ())}"
        key = tag_key(tag)
        kind = _KIND_OF_TAG.get(key) or ("drop" if key.startswith("DROP ") else None)
        if kind and expected[i] is not None and not any(k.startswith(kind) for k in cl.kinds):
            return f"the server ran {tag!r}, the classified kinds are {sorted(cl.kinds)}"
    ran = stmts[: len(out.tags) + 1]  # the statements completed, and the one that failed (its DDL may have started)
    if any(e is None for e in expected[: len(ran)]):
        return None  # EXECUTE may run any DDL
    allowed = frozenset().union(*(e for e in expected[: len(ran)] if e), *(_event_tags(s) for s in ran))
    stray = [t for t in out.ddl if t not in allowed]
    if stray:
        return f"the event trigger saw {stray}, none of the classified statements {sorted(allowed)}"
    return None


def report(raw: bytes, encoding: str, out: Outcome, why: str) -> str:
    try:
        text = decode(raw, encoding)
        cl = classify(text)
        reading = f"classified: {cl.statements} statements, kinds {sorted(cl.kinds)}, error {cl.error!r}"
    except (UnicodeDecodeError, ValueError) as exc:
        text, reading = "?", f"refused by decode: {exc}"
    return (f"{why}\n  text: {text!r}\n  bytes ({encoding}): {raw.hex()}\n  {reading}\n"
            f"  server: tags {out.tags}, errors {out.errors}, ddl {out.ddl}, empty {out.empty}")


def check(server: Server, raw: bytes, encoding: str) -> None:
    out = server.run(raw, encoding)
    why = differential(raw, encoding, out)
    assert why is None, report(raw, encoding, out, why)


# -- the grammar

PAYLOADS = ["; drop table diff_drop; --", "'; drop table diff_drop; --", "$$; drop table diff_drop; $$",
            "*/ drop table diff_drop; /*", "\\'; drop table diff_drop; --", "\"; drop table diff_drop; --",
            "\n; drop table diff_drop;\n", "$a$; truncate diff_t; $a$", "E'\\'; delete from diff_t; --"]
ASCII = "abcxyz019 _-+*/<>=~!@#%^&|`?.,:;()[]{}'\"$\\\n\t"
ALPHABET = {"SQL_ASCII": ASCII, "LATIN1": ASCII + "éßÿÀç\xa0¿\x85", "UTF8": ASCII + "éß€中😀\xa0\x85\u2028Ω"}
TAG_CHARS = {"SQL_ASCII": ["", "_", "a1", "x_y", "q"], "LATIN1": ["", "_", "a1", "é", "ä_1", "ß"],
             "UTF8": ["", "_", "a1", "é", "€1", "€2", "中", "ä_1"]}


def seldom(draw, odds: int) -> bool:  # noqa: ANN001
    """True about once in `odds` + 1 draws (a middle value: hypothesis favours the ends of a range)."""
    return draw(st.integers(0, odds)) == odds // 2


@st.composite
def mostly(draw, common: list[str], rare: list[str], odds: int = 7) -> str:  # noqa: ANN001
    """One of `common`, or about once in `odds` + 1 draws one of `rare` (forms that make the text an error)."""
    return draw(st.sampled_from(rare if seldom(draw, odds) else common))


# separators between tokens: whitespace, comments (nested, and holding would-be statements), and rarely a
# vertical tab (whitespace since PostgreSQL 16 only)
SEPARATORS = mostly([" ", " ", " ", "\n", "\t", "\r\n", "\f", " /* c */ ", "/**/", " /* a /* b */ c */ ", " -- c\n",
                     " /* ; drop table diff_drop; */ ", " -- ; drop table diff_drop;\n",
                     " /* /* */ ; drop table diff_drop; */ ", "\r-- x\r"], ["\x0b"], odds=150)
# numbers; the rare ones are PostgreSQL 16 syntax, trailing junk, and parameters no simple query has
NUMBERS = mostly(["1", "42", "007", "1.5", ".5", "5.", "1e3", "1.5E-2", "1.e5", "00.5e+2"],
                 ["0x1F", "0o17", "0b101", "1_000", "123abc", "1e", "0x", "$1", "$2a"], odds=12)
BIT_STRINGS = mostly(["B'101'", "X'1F'", "b'1'", "x'ff'", "B''"], ["B'2'", "X'G'"], odds=20)


def content(encoding: str) -> st.SearchStrategy[str]:
    return st.lists(st.one_of(st.sampled_from(PAYLOADS), st.text(ALPHABET[encoding], max_size=6)), max_size=4).map("".join)


@st.composite
def plain_string(draw, encoding: str) -> str:  # noqa: ANN001
    return "'" + draw(content(encoding)).replace("'", "''") + "'"


@st.composite
def e_string(draw, encoding: str) -> str:  # noqa: ANN001
    """E'...': quotes and backslashes written by every escape that means them, and other escapes."""
    out = []
    for ch in draw(content(encoding)):
        if ch == "'":
            out.append(draw(st.sampled_from(["\\'", "''", "\\047", "\\x27", "\\u0027"])))
        elif ch == "\\":
            out.append(draw(st.sampled_from(["\\\\", "\\134", "\\x5c", "\\u005C"])))
        else:
            out.append(ch)
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(st.sampled_from(["\\n", "\\t", "\\b", "\\x41", "\\101", "\\u00e9", "\\U0001F600", "\\q", "\\\n"])))
    if seldom(draw, 15):  # an escape that makes it an error: NUL, a lone surrogate, invalid UTF-8, too few digits
        out.insert(draw(st.integers(0, len(out))), draw(st.sampled_from(["\\0", "\\uD83D", "\\xff", "\\u12"])))
    return draw(st.sampled_from(["E'", "e'"])) + "".join(out) + "'"


@st.composite
def u_string(draw, encoding: str, quote: str = "'") -> str:  # noqa: ANN001
    """U&'...' (or U&"..." identifiers), with backslash escapes or a UESCAPE character of its own."""
    esc = draw(st.sampled_from(["\\", "\\", "!", "#", "~", "%"]))
    out = []
    for ch in draw(content(encoding)) or "x":
        if ch == esc:
            out.append(esc + esc)
        elif ch == quote:
            out.append(draw(st.sampled_from([quote + quote, f"{esc}{ord(quote):04X}"])))
        elif draw(st.integers(0, 3)) == 0 and ch != "\n":
            code = ord(ch)
            out.append(f"{esc}{code:04x}" if code < 0x10000 and draw(st.booleans()) else f"{esc}+{code:06X}")
        else:
            out.append(ch)
    if seldom(draw, 7):
        out.append(draw(mostly([f"{esc}D83D{esc}DE00", f"{esc}00e9", f"{esc}+000041"],
                               [f"{esc}0000", f"{esc}D83D", f"{esc}12", f"{esc}+110000"])))
    text = draw(st.sampled_from(["U&", "u&"])) + quote + "".join(out) + quote
    if esc != "\\":
        text += draw(st.sampled_from([" UESCAPE ", " uescape ", "\nUESCAPE/**/"])) + f"'{esc}'"
    return text


@st.composite
def dollar_string(draw, encoding: str) -> str:  # noqa: ANN001
    """$tag$...$tag$, with tags of letters, digits, underscores and non-ASCII letters; bodies holding other quotes."""
    tag = draw(st.sampled_from(TAG_CHARS[encoding]))
    other = draw(st.sampled_from([t for t in TAG_CHARS[encoding] if t != tag]))
    body = draw(content(encoding))
    if draw(st.booleans()):  # a dollar quote of another tag inside: text, not a quote, here
        body += f"${other}${draw(content(encoding))}${other}$"
    close = f"${tag}$"
    while (body + close).find(close) < len(body):  # the body may not close the quote early
        at = (body + close).find(close)
        body = body[: at + 1] + " " + body[at + 1 :]
    return close + body + close


def literal(encoding: str) -> st.SearchStrategy[str]:
    return st.one_of(plain_string(encoding), e_string(encoding), u_string(encoding), dollar_string(encoding))


@st.composite
def expression(draw, encoding: str) -> str:  # noqa: ANN001
    """A text-valued expression built of literals, numbers, bit strings and comments."""
    sep = SEPARATORS
    form = draw(st.integers(0, 7))
    lit = draw(literal(encoding))
    if form == 0:
        return lit
    if form == 1:
        return f"{lit}{draw(sep)}||{draw(sep)}{draw(literal(encoding))}"
    if form == 2:  # string continuation: adjacent literals separated by a newline
        return f"{lit}\n{draw(plain_string(encoding))}" if lit[0] in "'Ee" else lit
    if form == 3:
        return f"({draw(NUMBERS)})::text"
    if form == 4:
        return draw(BIT_STRINGS) + "::text"
    if form == 5:
        return f"upper({lit}){draw(sep)}::{draw(sep)}text"
    if form == 6:  # an operator whose characters run into a comment start
        return f"(1 -/**/- 2{draw(st.sampled_from(['', '--x' + chr(10), '/*x*/']))})::text || {lit}"
    return f"diff_f({lit})"


@st.composite
def identifier(draw, encoding: str, fresh: bool = False) -> str:  # noqa: ANN001
    """A column alias, or with `fresh` a name for a new scratch object, in every identifier form."""
    n = draw(st.integers(0, 3))
    form = draw(st.integers(0, 3))
    if form == 0:
        return f"diff_n{n}" if fresh else "c"
    if form == 1:
        inner = (f"diff;n{n}--" if fresh else draw(content(encoding))[:20]) or "c"
        return '"' + inner.replace('"', '""') + '"'
    if form == 2:
        return f'U&"diff\\005Fn{n}"' if fresh else draw(u_string(encoding, quote='"'))
    letters = {"SQL_ASCII": "abc_", "LATIN1": "éßÿ_", "UTF8": "é€中_"}[encoding]
    return "diff_" + draw(st.text(letters, min_size=1, max_size=4)) + str(n)


@st.composite
def statement(draw, encoding: str) -> list[str]:  # noqa: ANN001
    """One statement of a known kind (or a short run of related ones), keywords in a random case."""
    e = lambda: draw(expression(encoding))  # noqa: E731
    lit = lambda: draw(literal(encoding))  # noqa: E731
    alias = lambda: draw(identifier(encoding))  # noqa: E731
    fresh = lambda: draw(identifier(encoding, fresh=True))  # noqa: E731
    i = lambda: draw(st.sampled_from(["1", "2", "3", "(1)", "1::int", "'2'"]))  # noqa: E731
    forms = [
        lambda: [f"select {e()} as {alias()}"],
        lambda: [f"select {e()}, {i()} from diff_t where v <> {e()}"],
        lambda: [f"values ({e()}, {i()})"],
        lambda: [f"with w as (select {e()} as c) select c from w"],
        lambda: [f"select {e()} into temp {fresh()}"],
        lambda: [f"explain select {e()}"],
        lambda: [f"insert into diff_t (id, v) values ({i()}, {e()})"],
        lambda: [f"insert into diff_t select {i()}, {e()} returning v"],
        lambda: [f"update diff_t set v = {e()} where id = {i()}"],
        lambda: [f"delete from diff_t where v = {e()}"],
        lambda: [f"merge into diff_t d using (select {i()} as id, {e()} as v) s on d.id = s.id "
                 "when matched then update set v = s.v when not matched then insert values (s.id, s.v)"],
        lambda: [f"create table {fresh()} (a int, b text default {e()})"],
        lambda: [f"create table {fresh()} as select {e()} as c"],
        lambda: [f"create temp view {fresh()} as select {e()} as c"],
        lambda: [f"create function {fresh()}() returns text language sql as {draw(dollar_body(encoding, 'select ' + e()))}"],
        lambda: [f"do {draw(dollar_body(encoding, 'begin perform ' + e() + '; end'))}"],
        lambda: ["drop table diff_drop"],
        lambda: [f"drop table if exists {fresh()}"],
        lambda: [f"alter table diff_t add column {fresh()} text default {e()}"],
        lambda: ["alter table diff_drop set schema diff_s"],
        lambda: [f"alter view diff_v rename to {fresh()}"],
        lambda: [f"alter table diff_v rename to {fresh()}"],
        lambda: ["alter function diff_f(text) owner to trustuser"],
        lambda: [f"comment on table diff_t is {lit()}"],
        lambda: ["create index on diff_t (v)"],
        lambda: [f"create schema {fresh()}"],
        lambda: ["grant select on diff_t to public"],
        lambda: ["revoke select on diff_t from public"],
        lambda: ["truncate diff_drop"],
        lambda: [f"set wardgate.x = {lit()}", "show wardgate.x"],
        lambda: [f"set local application_name = {lit()}"],
        lambda: ["reset wardgate.x"],
        lambda: ["show work_mem"],
        lambda: ["set transaction isolation level read committed"],
        lambda: ["savepoint sp", f"select {e()}", "rollback to sp", "release sp"],
        lambda: ["begin"],
        lambda: [f"declare dc cursor for select {e()}", "fetch 1 from dc", "move 1 in dc", "close dc"],
        lambda: ["close all"],
        lambda: [f"prepare dp as select {e()}", "execute dp", "deallocate dp"],
        lambda: ["listen diff_ch", f"notify diff_ch, {lit()}", "unlisten *"],
        lambda: ["lock table diff_t in access share mode"],
        lambda: [f"copy (select {e()}) to stdout"],
        lambda: ["call diff_proc()"],
        lambda: ["analyze diff_t"],
        lambda: ["discard plans"],
    ]
    parts = draw(st.sampled_from(forms))()
    case = draw(st.sampled_from([str, str.upper, str.title]))
    return [_recase(p, case) for p in parts]


@st.composite
def dollar_body(draw, encoding: str, body: str) -> str:  # noqa: ANN001
    """`body` as a dollar-quoted function body, under a tag the body does not hold."""
    tags = [t for t in TAG_CHARS[encoding] if f"${t}$" not in body + "$"]
    tag = draw(st.sampled_from(tags or ["wardgate_body"]))
    return f"${tag}$ {body} ${tag}$"


_KEYWORDS = frozenset("select from where values with as into temp explain insert returning update set delete merge "
                      "using on when matched then not create table default view function returns text language do "
                      "drop if exists alter add column schema rename to owner comment is index grant revoke public "
                      "truncate show local reset transaction isolation level read committed savepoint rollback "
                      "release begin declare cursor for fetch move in close all prepare execute deallocate listen "
                      "notify unlisten lock access share mode copy stdout call analyze discard plans".split())


def _recase(sql: str, case) -> str:  # noqa: ANN001
    """Keywords of a template in another case (the generated literals and names are left as they are)."""
    if case is str:
        return sql
    out, word = [], ""
    for ch in sql + " ":
        if ch.isascii() and ch.isalpha():
            word += ch
            continue
        out.append(case(word) if word in _KEYWORDS else word)
        word = ""
        out.append(ch)
    return "".join(out)[:-1]


@st.composite
def query_text(draw, encoding: str) -> str:  # noqa: ANN001
    """One to four statements separated by semicolons, comments and empty statements; sometimes mutated."""
    stmts = [s for group in draw(st.lists(statement(encoding), min_size=1, max_size=3)) for s in group]
    seps = st.sampled_from([";", "; ", ";\n", " ;;", "/*;*/;", ";-- ;\n", ";\r"])
    text = draw(st.sampled_from(["", " ", "\n", "/* lead */ "]))
    for n, s in enumerate(stmts):
        text += s + (draw(seps) if n < len(stmts) - 1 else draw(st.sampled_from(["", ";", "; -- end", ";;"])))
    if draw(st.integers(0, 4)) == 0:  # a mutation: one quote, backslash, comment or semicolon more or less
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()) and at < len(text):
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + draw(st.sampled_from(["'", '"', "$", "\\", "/*", "*/", "--", ";", "$a$", "E'", "U&'"])) + text[at:]
    return text


@st.composite
def texts(draw) -> tuple[str, str]:  # noqa: ANN001
    encoding = draw(st.sampled_from(ENCODINGS))
    return draw(query_text(encoding)), encoding


BYTE_FRAGMENTS = [b"select ", b"'", b"''", b"\\", b"$", b"$a$", b";", b" drop table diff_drop", b"--", b"/*", b"*/", b"E'",
                  b"U&'", b"\n", b" 1", b"\xe2\x82\xac", b"\xc3\xa9", b"\x80", b"\x85", b"\xa0", b"\xc3", b"\xff", b"\xed\xa0\x80",
                  b"\xc0\xa7", b"\xf4\x90\x80\x80", b"\x81\\", b"\xe2\x82", b"\xf0\x9f\x98\x80"]


@st.composite
def byte_texts(draw) -> tuple[bytes, str]:  # noqa: ANN001
    """Raw bytes, as a client may send them in its client_encoding (decode refuses what it cannot read)."""
    parts = draw(st.lists(st.one_of(st.sampled_from(BYTE_FRAGMENTS), st.binary(min_size=1, max_size=2)), max_size=10))
    raw = b"select " + b"".join(parts).replace(b"\x00", b"")
    return raw, draw(st.sampled_from(ENCODINGS))


PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# a generous guard for long soak runs; the default run takes seconds
LONG = pytest.mark.timeout(max(120, EXAMPLES // 5))


@LONG
@PROPERTY
@given(texts())
def test_generated_statements(server: Server, case: tuple[str, str]) -> None:
    text, encoding = case
    check(server, text.encode(PYCODEC[encoding]), encoding)


@LONG
@PROPERTY
@given(byte_texts())
def test_generated_bytes(server: Server, case: tuple[bytes, str]) -> None:
    raw, encoding = case
    check(server, raw, encoding)


# -- the fixed hard cases

HARD = [
    # a dollar quote whose tag holds non-ASCII letters; its body and a plain string around it
    ("select $€1$ $€2$::text || ' $€1$; drop table diff_drop; --'", "UTF8"),
    ("select $€1$ x $€1$ || ' $€1$; drop table diff_drop; --'", "UTF8"),
    ("select $é$ ' $é$ || $_$ ; drop table diff_drop; $_$", "LATIN1"),
    ("select $a$ $b$ $a$, $b$ $a$ $b$", "UTF8"),
    ("select $a$x$a$$a$", "UTF8"),
    ("select 1 as x$a$; select $a$;$a$", "UTF8"),  # `$` continues an identifier
    ("do $d$ begin perform $x$; drop table diff_drop; $x$; end $d$", "UTF8"),
    ("create function diff_g() returns text language sql as $f$ select $€$;$€$::text $f$; select diff_g()", "UTF8"),
    ("set wardgate.x = $$'; drop table diff_drop; --$$; show wardgate.x", "UTF8"),
    # unicode escapes that spell a quote
    ("select U&'\\0027'", "UTF8"),
    ("select U&'\\0027'; drop table diff_drop; --'", "UTF8"),
    ("select U&'d!0027!!' UESCAPE '!' || '; drop table diff_drop; --'", "UTF8"),
    ("comment on table diff_t is U&'\\0027; drop table diff_drop; --'", "UTF8"),
    ("select U&'\\D83D\\DE00', U&'\\+01F600'", "UTF8"),
    ("select U&'\\0000'", "UTF8"),
    ("drop table U&\"diff\\005Fdrop\"", "UTF8"),
    # backslashes in E'' strings, and in plain strings (literal characters, standard_conforming_strings on)
    ("select E'\\\\'';", "UTF8"),
    ("select E'\\\\''; drop table diff_drop; --'", "UTF8"),
    ("select E'\\''; drop table diff_drop; --'", "UTF8"),
    ("select 'a\\'; drop table diff_drop; --'", "UTF8"),
    ("select E'\\u00e9\\x27' || e'\\047; drop table diff_drop; --'", "UTF8"),
    ("select E'\\400'", "UTF8"),
    # FOUND: a high surrogate escape followed by a non-ASCII character. The server answers 42601 "invalid
    # Unicode surrogate pair"; libpg_query's message quotes the first byte of the character only, pglast
    # failed to decode that message, and classify() raised UnicodeDecodeError instead of returning an error.
    ("select E'\\uD83Dé'", "UTF8"),
    ("select E'\\uD83D\x85'", "LATIN1"),
    ("select E'a'\n'b\\''; drop table diff_drop; --'", "UTF8"),
    ("select 'a'\n'b'", "UTF8"),
    ("select 'a' 'b'", "UTF8"),
    ("select 'a' /* */ 'b'", "UTF8"),
    ("select 'a'--\n'b'", "UTF8"),
    # comments
    ("select /* /* */ ; drop table diff_drop; */ 1", "UTF8"),
    ("select /* /* */ */ 1; drop table diff_drop", "UTF8"),
    ("select 1 --/*\n; drop table diff_drop", "UTF8"),
    ("select 1 -/**/- 2", "UTF8"),
    ("select 1 /* unterminated ; drop table diff_drop", "UTF8"),
    ("select 1 -- \r drop table diff_drop", "UTF8"),
    ("select 1 -- \x0b drop table diff_drop", "UTF8"),
    # quoted identifiers holding digits, semicolons and quotes
    ("select 1 as \"1;\"\"--\", 2 as \"é;'\"", "LATIN1"),
    ("select 1 as \"\"", "UTF8"),
    # numbers: exponents, PostgreSQL 16 forms (rejected by an older server), trailing junk (rejected by all)
    ("select 1e3, 1.5E-2, .5, 5., 1.e5", "UTF8"),
    ("select 0x1F", "UTF8"), ("select 0o17, 0b101", "UTF8"), ("select 1_000", "UTF8"),
    ("select 123abc", "UTF8"), ("select 1e", "UTF8"), ("select 0x; drop table diff_drop", "UTF8"),
    ("select 1 \x0b; drop table diff_drop", "UTF8"),
    # parameters in a simple query
    ("select $1", "UTF8"), ("select 1; select $1; drop table diff_drop", "UTF8"), ("select $1a", "UTF8"),
    # non-ASCII in each encoding
    ("select '€; drop table diff_drop; --' as é€", "UTF8"),
    ("select 'ÿ\x85; drop table diff_drop; --' as ß", "LATIN1"),
    ("select '\u2028; drop table diff_drop; --'", "UTF8"),
    # a setting that changes how strings are read takes effect from the next message only: this one is
    # parsed whole before the SET runs, by the server as by the classifier
    ("set standard_conforming_strings = off; select 'a\\'; drop table diff_drop; --'", "UTF8"),
    ("set backslash_quote = on; select 'a\\'';", "UTF8"),
    # nothing at all
    ("", "UTF8"), ("-- only a comment", "UTF8"), (";;", "UTF8"), ("/* */", "LATIN1"),
]
# The classifier's grammar is newer than the server's: it refuses what an older server accepts (safe, the
# gateway says no; SYSTEM_USER is a reserved word since PostgreSQL 16).
REFUSED_BY_NEWER_GRAMMAR = ["create table system_user (a int)"]
HARD_BYTES = [
    (b"select '\xe2\x82\xac'", "SQL_ASCII"),  # UTF-8 sent as SQL_ASCII: the server validates it as UTF-8
    (b"select '\x80'; drop table diff_drop", "SQL_ASCII"),
    (b"select '\x80\\'; drop table diff_drop; --'", "LATIN1"),
    (b"select '\xe2\x82'; drop table diff_drop", "UTF8"),
    (b"select '\xed\xa0\x80'", "UTF8"),
    (b"select $\xe9$ x $\xe9$", "LATIN1"),
    (b"select 1 as \xe9\x85", "LATIN1"),
]


@pytest.mark.parametrize(("text", "encoding"), HARD, ids=[repr(t)[:50] for t, _ in HARD])
def test_hard_cases(server: Server, text: str, encoding: str) -> None:
    check(server, text.encode(PYCODEC[encoding]), encoding)


@pytest.mark.parametrize(("raw", "encoding"), HARD_BYTES, ids=[repr(b)[:50] for b, _ in HARD_BYTES])
def test_hard_bytes(server: Server, raw: bytes, encoding: str) -> None:
    check(server, raw, encoding)


def server_version(server: Server) -> int:
    return int(server.run(b"show server_version_num", "UTF8").rows[0][0])


@pytest.mark.parametrize("text", REFUSED_BY_NEWER_GRAMMAR)
def test_a_newer_grammar_refuses(server: Server, text: str) -> None:
    out = server.run(text.encode(), "UTF8")
    assert classify(text).error
    if server_version(server) < 160000:
        assert out.tags and not out.errors  # the server would have run it: a refusal, not a misreading
    else:
        assert not out.tags and out.errors


# FOUND: the gateway's parser (PostgreSQL 18's grammar) reads words that
# became SQL syntax in PostgreSQL 16 and 17 differently from an older server. On PostgreSQL 15:
# - `select json_value('a', 'b')` calls a user-defined function json_value(text, text) (the server returns
#   'a'); the classifier reads a JSON_VALUE expression, with no function call, so classify().functions is
#   empty: a rule naming that function never sees it. The same holds for json_exists, json_query,
#   json_scalar, json_serialize and merge_action.
# - `select * from system_user` reads a table named system_user; the classifier reads a call of the
#   SYSTEM_USER function (functions {'pg_catalog.system_user'}, reads empty): a rule on that table never sees it.
# Same tags on both sides, so the CommandComplete tripwire cannot see it either. The classification now
# names both readings: the SQL/JSON and MERGE words as functions, SYSTEM_USER also as a relation read.
SKEW_SETUP = """
CREATE FUNCTION json_value(text, text) RETURNS text LANGUAGE sql AS 'select $1';
CREATE FUNCTION merge_action() RETURNS text LANGUAGE sql AS 'select ''user function''::text';
CREATE TABLE "system_user" (secret text);
INSERT INTO "system_user" VALUES ('row');
"""
SKEW = [
    ("select json_value('a', 'b')", "a", "functions", "json_value"),
    ("select merge_action()", "user function", "functions", "merge_action"),
    ("select * from system_user", "row", "reads", "system_user"),
]


@pytest.mark.parametrize(("text", "user_result", "facet", "name"), SKEW, ids=[t for t, *_ in SKEW])
def test_words_a_newer_grammar_reads_otherwise(server: Server, text: str, user_result: str, facet: str, name: str) -> None:
    """When the server ran the user's object, the classification names it."""
    server.pg.psql("SET ROLE trustuser;" + SKEW_SETUP, database=DB)
    try:
        out = server.run(text.encode(), "UTF8")
    finally:
        server.pg.psql('DROP FUNCTION json_value(text, text); DROP FUNCTION merge_action(); DROP TABLE "system_user"',
                       database=DB)
    ran_users_object = out.rows == [[user_result]]
    named = {n.rsplit(".", 1)[-1] for n in getattr(classify(text), facet)}
    assert not ran_users_object or name in named, (
        f"the server ran the user's {name} ({out.rows}); classify().{facet} = {sorted(named)}")


def test_the_differential_sees_a_misreading(server: Server) -> None:
    """The check itself: a server answer that is not the classification is reported."""
    raw = b"select 1; /* ; */ drop table diff_drop"
    out = server.run(raw, "UTF8")
    assert differential(raw, "UTF8", out) is None and out.tags == ["SELECT 1", "DROP TABLE"]
    assert "DROP TABLE" in out.ddl
    assert differential(raw, "UTF8", Outcome(tags=["SELECT 1", "SELECT 1", "DROP TABLE"], status="T"))
    assert differential(b"select 1", "UTF8", Outcome(tags=["DROP TABLE"], status="T"))
    assert differential(b"select 1", "UTF8", Outcome(tags=["SELECT 1"], ddl=["DROP TABLE"], status="T"))
    assert differential(b"select 'x", "UTF8", Outcome(tags=["SELECT 1"], status="T"))
    assert differential(b"select 1; select 2", "UTF8", Outcome(tags=["SELECT 1"], status="T"))


# -- every statement form against the real server: the prediction never refuses what it legitimately sends

# Run by the superuser, each as its own Query, in order, inside one transaction that is rolled back.
CATALOGUE = """
create table cat_t (a int primary key, b text)
insert into cat_t values (1, 'x'), (2, 'y')
update cat_t set b = 'z' where a = 1
delete from cat_t where a = 2
merge into cat_t t using (select 3 as a) s on t.a = s.a when not matched then insert values (s.a, 'm')
select 1
values (1), (2)
table cat_t
select * from cat_t for update
with d as (delete from cat_t where a = 3 returning *) select * from d
select 1 as a into cat_into
create table cat_ctas as select 1 as a
create table cat_nodata as select 1 as a with no data
create table if not exists cat_ctas as select 1 as a
create temp table cat_tmp (a int) on commit drop
create materialized view cat_mv as select 1 as a
create materialized view cat_mv2 as select 1 as a with no data
refresh materialized view cat_mv
alter materialized view cat_mv rename to cat_mv3
create view cat_v as select * from cat_t
alter view cat_v rename column a to aa
alter table cat_v rename to cat_v2
alter view cat_v2 owner to trustuser
alter view cat_v2 alter column b set default 'd'
create rule cat_r as on insert to cat_v2 do instead nothing
insert into cat_v2 values (5, 'z')
alter rule cat_r on cat_v2 rename to cat_r2
drop rule cat_r2 on cat_v2
create index cat_i on cat_t (b)
alter index cat_i rename to cat_i2
reindex index cat_i2
cluster cat_t using cat_t_pkey
drop index cat_i2
create sequence cat_s
alter sequence cat_s restart
alter sequence cat_s owner to trustuser
alter table cat_s rename to cat_s2
drop sequence cat_s2
create schema cat_sc
alter schema cat_sc rename to cat_sc2
alter table cat_t set schema cat_sc2
alter table cat_sc2.cat_t set schema public
alter table cat_t add column c int
alter table cat_t rename column c to d
alter table cat_t rename constraint cat_t_pkey to cat_pk
alter table cat_t owner to trustuser
alter table all in tablespace pg_default owned by trustuser set tablespace pg_default
create type cat_ty as (a int)
alter type cat_ty add attribute b int
alter type cat_ty rename attribute b to c
alter type cat_ty owner to trustuser
create type cat_en as enum ('a')
alter type cat_en add value 'b'
create type cat_rg as range (subtype = int4)
create domain cat_d as int
alter domain cat_d set default 1
alter domain cat_d rename to cat_d2
drop domain cat_d2
create function cat_f() returns int language sql as 'select 1'
alter function cat_f() immutable
alter function cat_f() rename to cat_f2
alter routine cat_f2() owner to trustuser
drop function cat_f2
create procedure cat_p() language sql as 'select 1'
call cat_p()
alter procedure cat_p() rename to cat_p2
drop procedure cat_p2
create aggregate cat_agg (int) (sfunc = int4pl, stype = int)
alter aggregate cat_agg(int) rename to cat_agg2
drop aggregate cat_agg2(int)
create operator === (leftarg = int, rightarg = int, function = int4eq)
alter operator === (int, int) owner to trustuser
drop operator === (int, int)
create function cat_tf() returns trigger language plpgsql as $$ begin return new; end $$
create trigger cat_tr before insert on cat_t for each row execute function cat_tf()
alter trigger cat_tr on cat_t rename to cat_tr2
drop trigger cat_tr2 on cat_t
create policy cat_pol on cat_t using (true)
alter policy cat_pol on cat_t rename to cat_pol2
drop policy cat_pol2 on cat_t
create statistics cat_st on a, b from cat_t
alter statistics cat_st set statistics 10
drop statistics cat_st
create collation cat_co (locale = 'C')
alter collation cat_co rename to cat_co2
drop collation cat_co2
create text search dictionary cat_dict (template = simple)
alter text search dictionary cat_dict (stopwords = english)
drop text search dictionary cat_dict
create text search configuration cat_cfg (parser = default)
alter text search configuration cat_cfg add mapping for word with simple
drop text search configuration cat_cfg
create type cat_ty2 as (x int)
create cast (cat_ty2 as text) with inout
drop cast (cat_ty2 as text)
create conversion cat_conv for 'LATIN1' to 'UTF8' from iso8859_1_to_utf8
drop conversion cat_conv
create operator family cat_opf using btree
alter operator family cat_opf using btree rename to cat_opf2
drop operator family cat_opf2 using btree
create operator class cat_opc for type int4 using hash as operator 1 =, function 1 hashint4(int4)
drop operator class cat_opc using hash
create access method cat_am type table handler heap_tableam_handler
drop access method cat_am
create extension if not exists plpgsql
alter extension plpgsql update
create foreign data wrapper cat_fdw
alter foreign data wrapper cat_fdw options (add x '1')
create server cat_srv foreign data wrapper cat_fdw
alter server cat_srv options (add y '1')
create user mapping for current_user server cat_srv
alter user mapping for current_user server cat_srv options (add z '1')
create foreign table cat_ft (a int) server cat_srv
alter foreign table cat_ft add column b int
drop foreign table cat_ft
drop user mapping for current_user server cat_srv
drop server cat_srv
drop foreign data wrapper cat_fdw
create publication cat_pub
alter publication cat_pub add table cat_t
drop publication cat_pub
create language cat_lang handler plpgsql_call_handler
drop language cat_lang
create event trigger cat_et on ddl_command_start execute function diff_ddl()
alter event trigger cat_et disable
alter event trigger cat_et rename to cat_et2
drop event trigger cat_et2
create role cat_role
alter role cat_role login
alter user cat_role rename to cat_role2
alter group cat_role2 add user trustuser
create user cat_u
create group cat_g
grant cat_role2 to cat_u
revoke cat_role2 from cat_u
alter role cat_u set work_mem = '1MB'
grant select on cat_t to cat_u
revoke select on cat_t from cat_u
alter default privileges grant select on tables to cat_u
alter default privileges revoke select on tables from cat_u
reassign owned by cat_u to postgres
drop owned by cat_u
drop user cat_u
drop group cat_g
drop role cat_role2
comment on table cat_t is 'x'
select lo_create(4242)
alter large object 4242 owner to trustuser
alter database wardgate_diff set work_mem = '1MB'
alter database wardgate_diff reset work_mem
alter tablespace pg_default set (seq_page_cost = 1)
alter tablespace pg_default reset (seq_page_cost)
lock table cat_t in access share mode
analyze cat_t
set work_mem = '2MB'
set local work_mem = '3MB'
set time zone 'UTC'
set transaction isolation level read committed
set session characteristics as transaction isolation level read committed
reset work_mem
set constraints all deferred
show work_mem
show all
declare cat_c cursor for select 1
fetch 1 from cat_c
move 0 in cat_c
close cat_c
close all
prepare cat_pp as select 1
execute cat_pp
prepare cat_pi (int) as insert into cat_t values ($1, 'p')
execute cat_pi (7)
deallocate cat_pp
deallocate all
savepoint cat_sp
release cat_sp
savepoint cat_sp2
rollback to cat_sp2
begin
start transaction
listen cat_ch
notify cat_ch, 'x'
unlisten cat_ch
unlisten *
do $$ begin perform 1; end $$
copy cat_t to stdout
copy (select 1) to stdout
copy cat_t from stdin
explain select 1
explain analyze select 1
discard plans
discard sequences
discard temp
checkpoint
load 'plpgsql'
truncate cat_t
drop materialized view cat_mv3
drop view cat_v2
drop table cat_t cascade
drop schema cat_sc2
"""
# Statements that cannot run inside a transaction block, or that end one, each in a Query of its own.
OUTSIDE = """
vacuum (analyze) diff_t
create index concurrently cat_ci on diff_t (id)
reindex index concurrently cat_ci
drop index concurrently cat_ci
create database cat_db
alter database cat_db rename to cat_db2
drop database cat_db2
alter system set work_mem = '4MB'
alter system reset work_mem
discard all
cluster
commit
rollback
prepare transaction 'cat_x'
begin
select 1/0
commit
begin
select 1/0
prepare transaction 'cat_y'
"""


def test_every_statement_form_tags_as_predicted(server: Server) -> None:
    wire = Wire(server.pg.port, "postgres", server.pg.password)
    try:
        wire.ok("BEGIN")
        for sql in CATALOGUE.strip().splitlines():
            out = wire.query(sql.encode())
            assert not out.errors, (sql, out.errors)
            stmt = json.loads(parse_sql_json(sql))["stmts"][0]["stmt"]
            assert expected_tag(stmt) is not None or "ExecuteStmt" in stmt, sql
            why = differential(sql.encode(), "UTF8", out)
            assert why is None, report(sql.encode(), "UTF8", out, why)
        wire.ok("ROLLBACK")
        tags = []
        for sql in OUTSIDE.strip().splitlines():
            out = wire.query(sql.encode())
            assert not out.errors or sql == "select 1/0", (sql, out.errors)
            why = differential(sql.encode(), "UTF8", out)
            assert why is None, report(sql.encode(), "UTF8", out, why)
            tags.append(out.tags)
        # COMMIT and PREPARE TRANSACTION of a failed transaction say ROLLBACK; outside one, PREPARE TRANSACTION too
        assert tags[-1] == tags[-4] == tags[-7] == ["ROLLBACK"] and tags[-9] == ["COMMIT"], tags[-9:]
    finally:
        wire.query(b"ROLLBACK")
        wire.close()
