"""Guardrail rules from the config: a rule that could never match is refused, not silently kept."""

from __future__ import annotations

import pytest

from wardgate.policy.guardrails import parse_rules


def test_statement_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown statement kinds 'TruncateStmt' \\(use 'truncate'\\?\\)"):
        parse_rules([{"name": "x", "kinds": ["TruncateStmt"]}])
    with pytest.raises(ValueError, match="unknown statement kinds 'drop tables'"):
        parse_rules([{"name": "x", "kinds": ["drop tables"]}])
    rule = parse_rules([{"name": "x", "kinds": ["truncate", "alter_system", "create_role", "grant", "copy_to"]}])[0]
    assert rule.kinds == ("truncate", "alter_system", "create_role", "grant", "copy_to")


def test_the_new_conditions_are_accepted_and_named_when_nothing_is_given() -> None:
    rule = parse_rules([{"name": "x", "binds_function": True, "privileges": True, "destructive_alter": True}])[0]
    assert rule.binds_function and rule.privileges and rule.destructive_alter
    with pytest.raises(ValueError, match="role_switch, binds_function, privileges or destructive_alter"):
        parse_rules([{"name": "x", "message": "nothing"}])
    with pytest.raises(ValueError, match="unknown keys \\['binds_functions'\\]"):
        parse_rules([{"name": "x", "binds_functions": True}])


def test_the_preset_has_its_rules_in_order() -> None:
    names = [r.name for r in parse_rules([{"preset": "standard", "groups": ["dev"]}])]
    assert names == ["standard:dangerous-functions", "standard:destructive-ddl", "standard:unconditional-writes",
                     "standard:role-switch", "standard:opaque-code", "standard:server-code",
                     "standard:function-binding", "standard:privileges"]
