"""Decisions: who may reach which connection and how. Pure functions over data; no I/O."""

from __future__ import annotations

import dataclasses
import re
from typing import Any


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in ("masked_columns",) and not callable(getattr(value, f.name))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def snapshot(settings: Any) -> dict[str, Any]:
    """The policy in force, as plain data for change records: rules, roles and connections of the
    config file (a connection's password never: only whether one is set)."""
    connections = [{**_plain(c), "password": "set" if c.password else None} for c in settings.connections]
    return {"access": _plain(settings.access), "guardrails": _plain(settings.guardrails),
            "masking": _plain(settings.masking), "roles": _plain(settings.roles), "connections": connections,
            "identity_providers": _plain(settings.identity_providers)}
