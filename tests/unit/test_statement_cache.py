"""The statement cache shares a decision only between texts that PostgreSQL reads alike.

Generated statements use every lexical form that decides where a token ends (dollar quotes with
non-ASCII tags, E'' and U&'' strings with UESCAPE, nested comments, quoted identifiers holding digits,
numbers with exponents and underscores, parameters). The property: two texts with one cache key have
one classification, and a policy that saw one first decides the other as a fresh policy would.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wardgate.policy.guardrails import StatementPolicy, standard_rules
from wardgate.sql.classify import classify, template_key

EXAMPLES = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_tag = st.text(alphabet=st.sampled_from(list("aZ_é€1२$\u0663") + ["\U0001d7d8"]), max_size=3)
_body = st.lists(st.sampled_from(list("ab 1;'\\\"$-*/\n€") + ["drop table t; --"]), max_size=8).map("".join)


@st.composite
def dollar(draw) -> str:
    tag = draw(_tag).replace("$", "")
    return f"${tag}${draw(_body).replace(f'${tag}$', '')}${tag}$"


def _quoted(body: str) -> str:
    return "'" + body.replace("'", "''") + "'"


constant = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.sampled_from(["1.5", "1e3", "1.5e-3", ".5", "1_000", "0x1F", "0o17", "0b101", "1__0", "123abc", "00"]),
    st.booleans().map(str),
    st.just("null"),
    _body.map(_quoted),
    _body.map(lambda b: "E" + _quoted(b)),
    st.sampled_from(["E'\\''", "E'\\\\'", "E'\\x41'", "E'\\u0041'", "E'\\047'"]),
    st.sampled_from(["U&'\\0027'", "U&'d\\0061t\\+000061'", "U&'d!0061t' UESCAPE '!'", "U&'\\0027' UESCAPE '\\'"]),
    dollar(),
    st.sampled_from(["B'101'", "X'1F'", "interval '1' day", "date '2024-01-01'"]),
)
name = st.sampled_from(["t", "t1", '"t 1"', '"1"', '"a;b"', 'U&"d\\0061t"', 'U&"t!0031" UESCAPE \'!\'', "pg_catalog.t",
                        "é", '"$1"', "customers", "secret"])
comment = st.sampled_from(["", " /* c */ ", " /* a /* nested */ b */ ", " -- line\n", " /* ' */ ", " /* $$ */ "])
param = st.integers(1, 12).map(lambda n: f"${n}")
value = st.one_of(constant, param, name)
op = st.sampled_from(["=", "<>", "+", "||", "<", "AND", "OR"])


FORMS = [
    "select {0}{c}{op} {1}",
    "select {0} from {n} where x {op} {1}",
    "delete from {n} where {0} {op} {1}",
    "delete from {n} where {0}",
    "update {n} set x = {0} where {1}",
    "insert into {n} values ({0}, {1}){c}",
    "set standard_conforming_strings = {0}",
    "set role {0}",
    "select {0}; drop table {n}",
    "select {0}{c}; select {1}",
    "select pg_terminate_backend({0})",
    "copy {n} to {0}",
    "start transaction read {2}",
    "merge into {n} using s on {0} when matched then delete",
    "select {0}::float({1})",
    "create table {n} as select {0}",
]


def _fill(draw, form: str, values) -> str:
    v = [draw(values) for _ in range(2)] + [draw(st.sampled_from(["write", "only", "committed"]))]
    return form.format(*v, c=draw(comment), n=draw(name), op=draw(op))


@st.composite
def statement(draw) -> str:
    return _fill(draw, draw(st.sampled_from(FORMS)), value)


@st.composite
def two_fillings(draw) -> tuple[str, str]:
    """Two statements of one form whose holes hold constants (the same names and operators, mostly)."""
    form = draw(st.sampled_from(FORMS))
    return _fill(draw, form, constant), _fill(draw, form, constant)


@given(st.one_of(two_fillings(), st.tuples(statement(), statement())))
@EXAMPLES
def test_one_template_one_classification(pair: tuple[str, str]) -> None:
    """Same key => same classification, whenever the first was cached under the key they share."""
    a, b = pair
    ka, kb = template_key(a), template_key(b)
    if ka is None or ka != kb:
        return
    ca, cb = classify(a), classify(b)
    if ca.value_dependent or cb.value_dependent:
        return  # kept under its exact text only
    assert ca == cb, (a, b)


@given(st.lists(statement(), min_size=2, max_size=6))
@EXAMPLES
def test_a_cached_decision_is_the_fresh_one(texts: list[str]) -> None:
    """A policy that decided other statements first decides each as a fresh policy does."""
    rules = standard_rules({})
    shared = StatementPolicy(rules)
    for text in texts:
        cached = shared.decide(text)
        fresh = StatementPolicy(rules).decide(text)
        assert cached.action == fresh.action, text
        assert cached.classification == fresh.classification, text


@given(statement())
@EXAMPLES
def test_the_key_comes_from_postgresqls_parser(text: str) -> None:
    """A text with a template has the parser's constants, and nothing else, replaced."""
    key = template_key(text)
    if key is None:
        return
    assert "$" not in text
    assert classify(text).error is None
    assert classify(text).statements == classify(key).statements or classify(key).error is not None


def test_what_the_old_number_key_got_wrong() -> None:
    """Digits after a non-word character in a dollar tag, and digits inside strings, are not numbers."""
    dollar_tags = "select $€1$ $€2$::text || ' $€1$; drop table t; --'"
    assert template_key(dollar_tags) is None  # a `$`: exact text
    c = classify(dollar_tags)
    assert c.statements == 2 and "drop" in c.kinds
    assert classify("select U&'\\0027'").error is None
    assert StatementPolicy(standard_rules({})).decide("select U&'\\0027'").action == "allow"


def test_constants_that_decide_are_not_shared() -> None:
    policy = StatementPolicy(standard_rules({}))
    assert policy.decide("set standard_conforming_strings = on").classification.value_dependent
    assert policy.decide("delete from t where true").action == "deny"
    assert policy.decide("delete from t where false").action == "allow"
    assert policy.decide("select 1").classification.value_dependent is False
