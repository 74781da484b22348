"""Access rules: deny by default, groups, patterns, verbs, time windows."""

from __future__ import annotations

import datetime as dt

import pytest

from wardgate.config import ConfigError, load
from wardgate.domain import Identity
from wardgate.policy.access import AccessPolicy, AccessRule, parse_hours
from wardgate.policy.guardrails import standard_rules

ALICE = Identity("alice", ("dev",))
MON_10 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)  # a Monday
SAT_10 = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)


def test_no_rules_no_access() -> None:
    d = AccessPolicy([]).check(ALICE, "shop", "connect", MON_10)
    assert not d.allowed and "no access rule allows it" in d.reason


def test_groups_patterns_and_verbs() -> None:
    policy = AccessPolicy([AccessRule("r", ("dev",), ("shop", "analytics_*"), ("connect",))])
    assert policy.check(ALICE, "shop", "connect", MON_10).allowed
    assert policy.check(ALICE, "analytics_eu", "connect", MON_10).allowed
    assert not policy.check(ALICE, "billing", "connect", MON_10).allowed
    assert not policy.check(ALICE, "shop", "exec", MON_10).allowed
    assert not policy.check(Identity("bob", ("ops",)), "shop", "connect", MON_10).allowed


def test_agent_uses_the_persons_groups() -> None:
    policy = AccessPolicy([AccessRule("r", ("dev",), ("shop",))])
    assert policy.check(Identity("alice", ("dev",), "agent", "claude-code"), "shop", "connect", MON_10).allowed


def test_time_windows() -> None:
    rule = AccessRule("office", ("dev",), ("shop",), hours=parse_hours("08:00-18:00"), days=("mon", "tue", "wed", "thu", "fri"))
    policy = AccessPolicy([rule])
    assert policy.check(ALICE, "shop", "connect", MON_10).allowed
    assert not policy.check(ALICE, "shop", "connect", MON_10.replace(hour=19)).allowed
    assert not policy.check(ALICE, "shop", "connect", SAT_10).allowed
    night = AccessPolicy([AccessRule("night", ("dev",), ("shop",), hours=parse_hours("22:00-06:00"))])
    assert night.check(ALICE, "shop", "connect", MON_10.replace(hour=23)).allowed
    assert night.check(ALICE, "shop", "connect", MON_10.replace(hour=5)).allowed
    assert not night.check(ALICE, "shop", "connect", MON_10).allowed


def test_rules_from_config(tmp_path) -> None:
    (tmp_path / "w.toml").write_text('[[access]]\nname = "devs"\ngroups = ["dev"]\nconnections = ["shop"]\nhours = "08:00-18:00"\n')
    settings = load(tmp_path / "w.toml", env={})
    assert settings.access[0].name == "devs" and settings.access[0].hours == (480, 1080)
    (tmp_path / "bad.toml").write_text('[[access]]\ngroups = ["dev"]\nconnections = ["shop"]\nverbs = ["drop"]\n')
    with pytest.raises(ConfigError, match="verbs are"):
        load(tmp_path / "bad.toml", env={})


def test_guardrail_cache_key_keeps_what_decides() -> None:
    from wardgate.policy.guardrails import Rule, StatementPolicy, standard_rules
    from wardgate.sql.classify import template_key

    # PostgreSQL's own normalisation: constants, as its parser found them, become placeholders
    assert template_key("select * from t where id = 42 and x = 1.5") == "select * from t where id = $1 and x = $2"
    assert template_key("select * from t2 where a = $3") is None  # a parameter: exact text only
    assert template_key('select * from "secret 1"') == 'select * from "secret 1"'
    assert template_key("select U&'\\0027'") == "select $1"  # a digit inside a string is not a number
    policy = StatementPolicy(standard_rules({}) + [Rule("r", relations=("secret 1",))])
    assert policy.decide("delete from t where id = 1").action == "allow"
    assert policy.decide("delete from t where true").action == "deny"  # TRUE is not a number
    assert policy.decide('select * from "secret 2"').action == "allow"
    assert policy.decide('select * from "secret 1"').action == "deny"
    # a dollar-quote tag of non-word characters ends where PostgreSQL ends it: the DROP is seen
    assert policy.decide("select $€1$ $€2$::text || ' $€1$; drop table t; --'").action == "deny"
    assert policy.decide("select U&'\\0027'").action == "allow"  # valid SQL, read as it is


def test_policy_file_included(tmp_path) -> None:
    (tmp_path / "policy.toml").write_text(
        '[[guardrails]]\npreset = "standard"\n[[masking]]\ncolumns = ["email"]\n[[access]]\ngroups = ["dev"]\nconnections = ["*"]\n'
    )
    (tmp_path / "w.toml").write_text('include = ["policy.toml"]\n[[access]]\ngroups = ["ops"]\nconnections = ["shop"]\n')
    s = load(tmp_path / "w.toml", env={})
    assert len(s.access) == 2 and len(s.guardrails) == len(standard_rules({})) and s.masking[0].columns == ("email",)
    (tmp_path / "bad.toml").write_text('include = ["w2.toml"]\n')
    (tmp_path / "w2.toml").write_text('[gateway]\nlisten = "1.2.3.4:5"\n')
    with pytest.raises(ConfigError, match="may be included"):
        load(tmp_path / "bad.toml", env={})
