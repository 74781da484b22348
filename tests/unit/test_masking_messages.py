"""Masking of ErrorResponse, NoticeResponse and NotificationResponse bodies (wardgate/masking/messages.py).

The bodies are what PostgreSQL (15 and 16 send the same) answered the statements named above each one,
over the shop demo data (wardgate/demo/shop.sql), byte for byte.
"""

from __future__ import annotations

import random
import time

import pytest

from wardgate.engines.postgres import codec
from wardgate.masking.messages import mask_message, mask_notification, mask_report
from wardgate.masking.plan import MaskingPolicy, parse_rules

DETECTORS = {"name": "pii", "detectors": ["email", "card", "ssn", "phone", "iban", "ip"]}
COLUMN_RULES = [{"name": "cards", "columns": ["card_number"], "strategy": "partial"},
                {"name": "ids", "columns": ["national_id"], "strategy": "hash"}]


def policy(*rules: dict) -> MaskingPolicy:
    return MaskingPolicy(parse_rules(list(rules)), b"salt")


CONTENT = policy(DETECTORS)  # content detectors only
COLUMNS = policy(*COLUMN_RULES, DETECTORS)  # column rules and detectors
COLUMNS_ONLY = policy(*COLUMN_RULES)
NONE = policy()

# select email::int from customers order by id limit 1
CAST = (b'SERROR\x00VERROR\x00C22P02\x00Minvalid input syntax for type integer: "customer1@example.com"\x00'
        b'Fnumutils.c\x00L232\x00Rpg_strtoint32\x00\x00')
# insert into customers (name, email) select name, email from customers where id = 1
UNIQUE = (b'SERROR\x00VERROR\x00C23505\x00Mduplicate key value violates unique constraint "customers_email_key"\x00'
          b'DKey (email)=(customer1@example.com) already exists.\x00spublic\x00tcustomers\x00ncustomers_email_key\x00'
          b'Fnbtinsert.c\x00L664\x00R_bt_check_unique\x00\x00')
# update customers set name = null where id = 1
NOT_NULL = (b'SERROR\x00VERROR\x00C23502\x00Mnull value in column "name" of relation "customers" violates not-null '
            b'constraint\x00DFailing row contains (1, null, customer1@example.com, +1-555-1001, 4111 1111 1111 0001, '
            b'100007919, 2026-12-01 18:27:44.527108+00).\x00spublic\x00tcustomers\x00cname\x00FexecMain.c\x00L2023\x00'
            b'RExecConstraints\x00\x00')
# insert into orders (customer_id, total_cents) values (9999, 1)
FOREIGN_KEY = (b'SERROR\x00VERROR\x00C23503\x00Minsert or update on table "orders" violates foreign key constraint '
               b'"orders_customer_id_fkey"\x00DKey (customer_id)=(9999) is not present in table "customers".\x00'
               b'spublic\x00torders\x00norders_customer_id_fkey\x00Fri_triggers.c\x00L2596\x00Rri_ReportViolation\x00\x00')
# insert into v values ('x@example.com', -1), v a view `with check option`
CHECK_OPTION = (b'SERROR\x00VERROR\x00C44000\x00Mnew row violates check option for view "v"\x00'
                b'DFailing row contains (x@example.com, -1).\x00FexecMain.c\x00L2183\x00RExecWithCheckOptions\x00\x00')
# insert into p values ('customer1@example.com'), p partitioned by list with no partition for it
PARTITION = (b'SERROR\x00VERROR\x00C23514\x00Mno partition of relation "p" found for row\x00'
             b'DPartition key of the failing row contains (k) = (customer1@example.com).\x00spublic\x00tp\x00'
             b'FexecPartition.c\x00L328\x00RExecFindPartition\x00\x00')
# select (national_id || '}')::json from customers where id = 1
JSON = (b'SERROR\x00VERROR\x00C22P02\x00Minvalid input syntax for type json\x00DExpected end of input, but found "}".\x00'
        b'WJSON data, line 1: 100007919}\x00Fjsonfuncs.c\x00L627\x00Rjson_ereport_error\x00\x00')
# select (national_id || '<')::xml from customers where id = 1
XML = (b'SERROR\x00VERROR\x00C2200N\x00Minvalid XML content\x00Dline 1: StartTag: invalid element name\n100007919<\n'
       b'          ^\x00Fxml.c\x00L1771\x00Rxml_ereport\x00\x00')
# select (national_id || '0000000000')::int from customers where id = 1
OUT_OF_RANGE = (b'SERROR\x00VERROR\x00C22003\x00Mvalue "1000079190000000000" is out of range for type integer\x00'
                b'Fnumutils.c\x00L226\x00Rpg_strtoint32\x00\x00')
# select ('1e400' || national_id)::float8 from customers where id = 1
FLOAT_RANGE = (b'SERROR\x00VERROR\x00C22003\x00M"1e400100007919" is out of range for type double precision\x00'
               b'Ffloat.c\x00L476\x00Rfloat8in_internal_opt_error\x00\x00')
# set work_mem = 'x@example.com'
PARAMETER = (b'SERROR\x00VERROR\x00C22023\x00Minvalid value for parameter "work_mem": "x@example.com"\x00Fguc.c\x00'
             b'L7422\x00Rparse_and_validate_value\x00\x00')
# select ('{' || email)::text[] from customers where id = 1
ARRAY = (b'SERROR\x00VERROR\x00C22P02\x00Mmalformed array literal: "{customer1@example.com"\x00DUnexpected end of input.\x00'
         b'Farrayfuncs.c\x00L492\x00RArrayCount\x00\x00')
# do $$ begin raise notice 'n %', (select email from customers where id=1); end $$
NOTICE = (b'SNOTICE\x00VNOTICE\x00C00000\x00Mn customer1@example.com\x00WPL/pgSQL function inline_code_block line 1 at '
          b'RAISE\x00Fpl_exec.c\x00L3891\x00Rexec_stmt_raise\x00\x00')
# select 1/0
DIVISION = b'SERROR\x00VERROR\x00C22012\x00Mdivision by zero\x00Fint.c\x00L869\x00Rint4div\x00\x00'
# listen x; select pg_notify('x', email) from customers where id = 1 (from backend 26043)
NOTIFY = b'\x00\x00e\xbbx\x00customer1@example.com\x00'

REAL = [CAST, UNIQUE, NOT_NULL, FOREIGN_KEY, CHECK_OPTION, PARTITION, JSON, XML, OUT_OF_RANGE, FLOAT_RANGE, PARAMETER,
        ARRAY, NOTICE, DIVISION]


def fields(body: bytes) -> list[tuple[str, str]]:
    """The fields in order (codec.parse_error_fields keys them by letter and so hides the order)."""
    out, pos = [], 0
    while body[pos] != 0:
        value, pos2 = codec.read_cstr(body, pos + 1)
        out.append((chr(body[pos]), value.decode()))
        pos = pos2
    assert pos == len(body) - 1, "a body ends with its one terminating NUL"
    return out


def masked(body: bytes, masking: MaskingPolicy) -> dict[str, str]:
    new = mask_report(body, masking)
    assert new is not None
    fields(new)  # a valid body
    return codec.parse_error_fields(new)


def test_a_cast_quotes_the_value_masked_by_content_and_by_column_rules() -> None:
    assert masked(CAST, CONTENT)["M"] == 'invalid input syntax for type integer: "[email]"'
    assert masked(CAST, COLUMNS_ONLY)["M"] == 'invalid input syntax for type integer: "[masked]"'
    assert masked(CAST, COLUMNS)["M"] == 'invalid input syntax for type integer: "[masked]"'
    # everything else as it was, in its order
    assert [f for f in fields(mask_report(CAST, CONTENT)) if f[0] != "M"] == [f for f in fields(CAST) if f[0] != "M"]


def test_unique_violation_detail_masked_by_content_or_dropped_under_column_rules() -> None:
    assert masked(UNIQUE, CONTENT)["D"] == "Key (email)=([email]) already exists."
    got = fields(mask_report(UNIQUE, COLUMNS))
    assert [k for k, _ in got] == ["S", "V", "C", "M", "s", "t", "n", "F", "L", "R"]  # D gone, order kept
    assert dict(got)["n"] == "customers_email_key" and "@" not in repr(got)


def test_failing_row_detail_is_dropped_under_column_rules() -> None:
    for masking in (COLUMNS, COLUMNS_ONLY):
        out = masked(NOT_NULL, masking)
        assert "D" not in out and out["M"] == codec.parse_error_fields(NOT_NULL)["M"]
        assert out["c"] == "name" and out["t"] == "customers"
    # the detectors alone see what they recognise; a national id of bare digits is the column rules' to mask
    content = masked(NOT_NULL, CONTENT)["D"]
    assert "[email]" in content and "[phone]" in content and "@" not in content


@pytest.mark.parametrize("body", [FOREIGN_KEY, CHECK_OPTION, PARTITION, JSON, XML], ids=["fk", "check-option", "partition", "json", "xml"])
def test_details_that_quote_stored_values_are_dropped_under_column_rules(body: bytes) -> None:
    assert "D" in codec.parse_error_fields(body)
    out = masked(body, COLUMNS_ONLY)
    assert "D" not in out and "100007919" not in repr(out) and "@" not in repr(out) and "9999" not in repr(out)


def test_json_context_quotes_the_input() -> None:
    assert masked(JSON, COLUMNS_ONLY)["W"] == "JSON data, line 1: [masked]"
    assert mask_report(JSON, CONTENT) is None  # nothing the detectors know


def test_quoted_value_of_data_exceptions() -> None:
    assert masked(OUT_OF_RANGE, COLUMNS_ONLY)["M"] == 'value "[masked]" is out of range for type integer'
    assert masked(FLOAT_RANGE, COLUMNS_ONLY)["M"] == '"[masked]" is out of range for type double precision'
    assert masked(PARAMETER, COLUMNS_ONLY)["M"] == 'invalid value for parameter "work_mem": "[masked]"'
    assert masked(PARAMETER, CONTENT)["M"] == 'invalid value for parameter "work_mem": "[email]"'
    out = masked(ARRAY, COLUMNS_ONLY)
    assert out["M"] == 'malformed array literal: "[masked]"' and "D" not in out


@pytest.mark.parametrize(("message", "expected"), [
    # PostgreSQL doubles no quote inside the value: it runs to the last quote
    ('invalid input syntax for type integer: "a"b"c"', 'invalid input syntax for type integer: "[masked]"'),
    ('invalid input syntax for type integer: "a: "b"', 'invalid input syntax for type integer: "[masked]"'),
    # a ': ' inside the value quoted first is not the one that introduces it
    ('value "x: "y" is out of range for type integer', 'value "[masked]" is out of range for type integer'),
    ('value "x: y" is out of range for type integer', 'value "[masked]" is out of range for type integer'),
    ('invalid input syntax for type integer: "unclosed', 'invalid input syntax for type integer: "[masked]"'),
    # quoted names only, the rest unquoted: nothing to mask
    ('invalid byte sequence for encoding "UTF8": 0x00', None),
    ("value too long for type character varying(5)", None),
])
def test_quoted_value_edges(message: str, expected: str | None) -> None:
    body = codec.error_response("22P02", message)[5:]
    new = mask_report(body, COLUMNS_ONLY)
    assert (None if new is None else codec.parse_error_fields(new)["M"]) == expected


def test_other_classes_keep_their_message_under_column_rules() -> None:
    body = codec.error_response("42703", 'column "x" does not exist')[5:]
    assert mask_report(body, COLUMNS_ONLY) is None
    body = codec.error_response("P0001", "n 100007919")[5:]  # a message of the statement's own making
    assert mask_report(body, COLUMNS_ONLY) is None


def test_notice_and_every_field_that_can_carry_a_value() -> None:
    out = masked(NOTICE, CONTENT)
    assert out["M"] == "n [email]" and out["W"].startswith("PL/pgSQL function") and out["S"] == "NOTICE"
    body = (b"SERROR\x00CXX000\x00Ma@b.example\x00Dc@d.example\x00He@f.example\x00Wg@h.example\x00qi@j.example\x00"
            b"Zk@l.example\x00cm@n.example\x00tname@x.example\x00\x00")
    out = fields(mask_report(body, CONTENT))
    assert out == [("S", "ERROR"), ("C", "XX000"), ("M", "[email]"), ("D", "[email]"), ("H", "[email]"), ("W", "[email]"),
                   ("q", "[email]"), ("Z", "[email]"),  # a field type this gateway does not know may carry one too
                   ("c", "m@n.example"), ("t", "name@x.example")]  # names of things are left as they are


def test_nothing_changes_is_none() -> None:
    for masking in (CONTENT, COLUMNS, COLUMNS_ONLY, NONE):
        assert mask_report(DIVISION, masking) is None
        assert mask_message(ord("E"), DIVISION, masking) is None
    assert mask_report(FOREIGN_KEY, CONTENT) is None
    for body in REAL:
        assert mask_report(body, NONE) is None
    assert mask_report(b"not even a body", NONE) is None  # without rules a body is not read
    assert mask_notification(b"\x00\x00\x00\x01ch\x00hello\x00", CONTENT) is None


def test_notification_payload() -> None:
    new = mask_notification(NOTIFY, CONTENT)
    assert new == b"\x00\x00e\xbbx\x00[email]\x00"
    assert mask_notification(NOTIFY, COLUMNS_ONLY) is None  # a payload names no column
    assert mask_notification(NOTIFY, NONE) is None
    whole = mask_message(ord("A"), NOTIFY, COLUMNS)
    assert whole == codec.message(b"A", new)


def test_mask_message_frames_the_body() -> None:
    whole = mask_message(ord("E"), CAST, CONTENT)
    reader = codec.MessageReader()
    reader.feed(whole)
    mtype, body = reader.next()
    assert mtype == ord("E") and body == mask_report(CAST, CONTENT) and len(reader) == 0
    notice = mask_message(ord("N"), NOTICE, CONTENT)
    assert notice[:1] == b"N" and b"[email]" in notice
    assert mask_message(ord("D"), CAST, CONTENT) is None  # not a message this module reads


def test_strategies_and_patterns() -> None:
    hashed = policy({"name": "pii", "detectors": ["email"], "strategy": "hash"})
    assert masked(CAST, hashed)["M"].startswith('invalid input syntax for type integer: "email:')
    nulled = policy({"name": "pii", "detectors": ["email"], "strategy": "null"})
    assert masked(CAST, nulled)["M"] == 'invalid input syntax for type integer: "[email]"'
    custom = policy({"name": "emp", "patterns": {"employee_id": "EMP-[0-9]{6}"}})
    body = codec.error_response("22P02", 'invalid input syntax for type integer: "EMP-123456"')[5:]
    assert masked(body, custom)["M"] == 'invalid input syntax for type integer: "[employee_id]"'


def test_latin1_session_keeps_its_other_characters() -> None:
    body = codec.error_response("P0001", "café x@y.example")[5:].replace("café".encode(), "café".encode("latin-1"))
    new = mask_report(body, CONTENT, "latin-1")
    assert codec.read_cstr(new, new.index(b"M") + 1)[0] == "café [email]".encode("latin-1")
    notify = b"\x00\x00\x00\x01ch\x00" + "né x@y.example".encode("latin-1") + b"\x00"
    assert mask_notification(notify, CONTENT, "latin-1") == b"\x00\x00\x00\x01ch\x00" + "né [email]".encode("latin-1") + b"\x00"


def test_invalid_utf8_is_replaced_only_where_rewritten() -> None:
    body = b"SERROR\x00C22P02\x00Mbad \xff x@y.example\x00D\xfe kept\x00\x00"
    new = mask_report(body, CONTENT)
    assert new == b"SERROR\x00C22P02\x00Mbad \xef\xbf\xbd [email]\x00D\xfe kept\x00\x00"


# Malformed bodies raise codec.ProtocolViolation (never another exception, never pass unread): a real
# server never sends one, and bytes that cannot be read cannot be masked.

@pytest.mark.parametrize("body", REAL, ids=range(len(REAL)))
def test_every_truncation_is_a_protocol_violation(body: bytes) -> None:
    for cut in range(len(body)):
        with pytest.raises(codec.ProtocolViolation):
            mask_report(body[:cut], COLUMNS)
    with pytest.raises(codec.ProtocolViolation):
        mask_report(body + b"x", COLUMNS)  # bytes after the terminator


def test_malformed_notifications() -> None:
    for cut in range(len(NOTIFY)):
        with pytest.raises(codec.ProtocolViolation):
            mask_notification(NOTIFY[:cut], CONTENT)
    with pytest.raises(codec.ProtocolViolation):
        mask_notification(NOTIFY + b"x\x00", CONTENT)
    with pytest.raises(codec.ProtocolViolation):
        mask_message(ord("A"), b"\x00\x00", CONTENT)


def test_random_bodies_are_masked_validly_or_refused() -> None:
    rng = random.Random(1616)
    alphabet = b'\x00\x00\x00SCMDWqtZ22P023"": @.x9 '
    for _ in range(3000):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        if rng.random() < 0.5:
            body = b"C22P02\x00" + body
        for masking in (CONTENT, COLUMNS):
            try:
                new = mask_report(body, masking)
            except codec.ProtocolViolation:
                continue
            if new is not None:
                fields(new)
                assert new != body


def test_large_bodies_take_linear_time() -> None:
    # quotes and ': ' by the hundred thousand (what _mask_quoted walks), in every field that may be rewritten;
    # one value for the detectors (their own cost grows with the number of values found: detectors.find)
    value = '"x: ' * 200_000 + "a@b.example"
    body = codec.error_response("22P02", "invalid input syntax for type integer: " + value, detail=value, hint=value)[5:]
    body = body[:-1] + b"W" + value.encode() + b"\x00\x00"
    t0 = time.perf_counter()
    for masking in (CONTENT, COLUMNS, COLUMNS_ONLY):
        assert mask_report(body, masking) is not None
    inside = codec.error_response("22003", 'value "' + "x: " * 300_000 + '" is out of range for type integer')[5:]
    assert codec.parse_error_fields(mask_report(inside, COLUMNS_ONLY))["M"] == 'value "[masked]" is out of range for type integer'
    notify = b"\x00\x00\x00\x01ch\x00" + value.encode() + b"\x00"
    assert mask_notification(notify, CONTENT) is not None
    assert time.perf_counter() - t0 < 5
