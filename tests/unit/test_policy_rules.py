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
