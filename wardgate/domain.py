"""Plain data shared by every door: who is acting."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is for. `user` is always the accountable human or service account (service
    accounts are named `svc:<name>`); when an AI agent acts for a person, `agent` names it and
    `user`/`groups` are the person's. `uid` is the stable id of that user in the store: ownership is
    decided on it, never on the name, which a later user may hold. Empty until the store resolved it.
    `subject`: for a token, the claim that keys the person at the provider."""

    user: str
    groups: tuple[str, ...] = ()
    kind: str = "user"  # user, service or agent
    agent: str | None = None
    source: str = "local"  # local, oidc:<provider>, apikey:<id>
    expires_at: float | None = None
    uid: str = ""
    subject: str | None = None

    def owns(self, uid: str | None) -> bool:
        """Whether a record of the identity `uid` is this identity's (never when either is unknown)."""
        return bool(self.uid) and uid == self.uid

    @property
    def agent_id(self) -> str | None:
        """Which agent this is, beyond its name: the API key it holds, or the provider whose token named
        it. Two keys given the same agent name are two agents. None: no agent, or one known by its name
        only (a native session's, by the credential it was issued)."""
        if not self.agent:
            return None
        if self.source.startswith("apikey:"):
            return self.source
        return f"{self.source}#{self.agent}" if self.source.startswith("oidc:") else None

    @property
    def display(self) -> str:
        return f"{self.agent} acting for {self.user}" if self.agent else self.user

    def public(self) -> dict[str, object]:
        return {
            "user": self.user, "groups": list(self.groups), "kind": self.kind, "agent": self.agent,
            "source": self.source, "expires_at": self.expires_at, "uid": self.uid,
        }
