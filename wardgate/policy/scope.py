"""Who and where a rule applies: connections (globs), groups ("*" for everyone), except_groups."""

from __future__ import annotations

import fnmatch

from ..domain import Identity


def in_scope(identity: Identity, connection: str, connections: tuple[str, ...], groups: tuple[str, ...],
             except_groups: tuple[str, ...]) -> bool:
    if not any(fnmatch.fnmatchcase(connection, c) for c in connections):
        return False
    mine = set(identity.groups)
    if mine & set(except_groups):
        return False
    return "*" in groups or bool(mine & set(groups))
