"""The Gatekeeper: the one decision every door asks before acting for an identity."""

from __future__ import annotations

import datetime as dt

from ..config import Settings
from ..domain import Identity
from .access import AccessDecision, AccessPolicy


class Gatekeeper:
    def __init__(self, settings: Settings) -> None:
        self.access = AccessPolicy(list(settings.access))

    def authorize(self, identity: Identity, connection: str, verb: str, now: dt.datetime | None = None) -> AccessDecision:
        """May `identity` use `connection` for `verb` (connect, exec)? Deny unless a rule allows it."""
        return self.access.check(identity, connection, verb, now)
