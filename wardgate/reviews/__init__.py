"""Reviews: a statement that a guardrail with `action = "review"` holds waits for people to approve it.

A review binds the requester (the person; an agent acting for them is recorded beside), the
connection, the exact statement and parameters (with their SHA-256), the policy version and an
expiry. Approvers are the groups the rule names (the admins when it names none); each approval
comes from a different person, never the requester; a rejection needs a reason. After approval the
requester runs the stored input, once. Every step is stored with who and when, and recorded as a
security event.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from ..domain import Identity
from ..metrics import STATS
from ..policy.guardrails import Decision
from ..recording.views import iso
from ..store import NotFound
from ..store import models as m
from .notify import Notifier

if TYPE_CHECKING:
    from ..app import Gateway

log = logging.getLogger("wardgate.reviews")

FINAL = ("rejected", "revoked", "executed", "expired")



def _approver(uid: str | None, name: str) -> str:
    """Who took a step: the identity's uid (a step from before uids were kept: its name then)."""
    return uid if uid else f"name:{name}"


def approvals(steps: list[m.ReviewDecision]) -> int:
    """How many identities have approved: one approver counts once, whatever names they went by."""
    return len({_approver(s.by_id, s.by) for s in steps if s.decision == "approve"})

class ReviewError(Exception):
    """A step the caller may not take; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def input_hash(connection: str, statement: str, params: list[str | None]) -> str:
    canonical = json.dumps([connection, statement, params], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class Reviews:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = gateway.store
        self.settings = gateway.settings.reviews
        self.refresh_policy_version()
        self._changed: dict[str, asyncio.Event] = {}
        self.notifier = Notifier(self.settings)
        self._pending_notes: set[asyncio.Task[None]] = set()

    def refresh_policy_version(self) -> None:
        """An approval holds for the guardrails it was given under: a changed policy asks again."""
        self.policy_version = hashlib.sha256(repr(self.gateway.settings.guardrails).encode()).hexdigest()[:16]

    def url(self, review_id: str) -> str:
        base = self.settings.url or f"http://{self.gateway.settings.gateway.http_listen}"
        return f"{base.rstrip('/')}/api/reviews/{review_id}"

    def _event(self, kind: str, outcome: str, who: Identity | None, review_id: str, detail: str = "") -> None:
        self.gateway.record_event(kind, outcome, user=who.user if who else None, agent=who.agent if who else None,
                                  source=f"review:{review_id}", detail=detail or None)

    def _wake(self, review_id: str) -> None:
        event = self._changed.pop(review_id, None)
        if event is not None:
            event.set()

    wake = _wake  # a change to this review, heard from another replica (store/bus.py)

    def wake_all(self) -> None:
        for review_id in list(self._changed):
            self._wake(review_id)

    # -- request

    async def request(self, caller: Identity, connection: str, statement: str, params: list[str | None],
                      decision: Decision, addr: str | None = None) -> dict[str, Any]:
        review = await asyncio.to_thread(self._create, caller, connection, statement, params, decision)
        who = ", ".join(review.approvers) if review.approvers else "the admins"
        return {
            "status": "pending_approval", "review_id": review.id, "review_url": self.url(review.id),
            "connection": connection, "rules": review.rules, "approvers": review.approvers,
            "min_approvals": review.min_approvals, "expires_at": iso(review.expires_at),
            "next": f"ask {who} to approve review {review.id}; wait with GET /api/reviews/{review.id}/wait?timeout=60 "
                    f"(or `wardgate reviews wait {review.id}`), then run it with POST /api/reviews/{review.id}/execute",
        }

    def _create(self, caller: Identity, connection: str, statement: str, params: list[str | None],
                decision: Decision) -> m.Review:
        asking = [mt for mt in decision.enforced if mt.action == "review"]
        approvers = sorted({g for mt in asking for g in mt.approvers})
        need = max([mt.min_approvals for mt in asking] or [1])
        now = time.time()
        review = m.Review(
            id=uuid.uuid4().hex, kind="statement", status="pending", requester=caller.user, requester_id=caller.uid,
            agent=caller.agent, agent_id=caller.agent_id, connection=connection, statement=statement, params=list(params), sha256=input_hash(connection, statement, params),
            policy_version=self.policy_version, rules=[mt.public() for mt in asking], approvers=approvers,
            min_approvals=need, created_at=now, expires_at=now + self.settings.ttl_seconds,
        )
        self.store.create_review(review)
        self._event("review.requested", "ok", caller, review.id,
                    f"{connection}: {', '.join(mt.rule for mt in asking)}; sha256 {review.sha256}")
        self.notifier.send("review.requested", self.view(review, []))
        return review

    async def request_access(self, caller: Identity, connection: str, duration: float, reason: str) -> dict[str, Any]:
        """Ask for a just-in-time grant: `connection` for `duration` seconds from approval."""
        rule = self.gateway.gatekeeper.access.grant_rule(caller, connection)
        if rule is None:
            raise ReviewError(f"no access rule lets {caller.display} ask for a grant on {connection!r}", 403)
        if not reason.strip():
            raise ReviewError("say why you need access (--reason); approvers see it", 422)
        if not 0 < duration <= rule.max_duration:
            raise ReviewError(f"a grant on {connection!r} lasts at most {int(rule.max_duration)} seconds "
                              f"(access rule {rule.name!r})", 422)
        now = time.time()
        text = f"access to {connection} for {int(duration)}s"
        review = m.Review(
            id=uuid.uuid4().hex, kind="access", status="pending", requester=caller.user, requester_id=caller.uid,
            agent=caller.agent, connection=connection, statement=text, params=[], sha256=input_hash(connection, text, []),
            policy_version=self.policy_version, rules=[{"rule": rule.name, "action": "review", "reason": "just-in-time access",
                                                        "message": "", "shadow": False}],
            approvers=list(rule.approvers), min_approvals=rule.min_approvals, created_at=now,
            expires_at=now + self.settings.ttl_seconds, duration=duration, reason=reason,
        )
        await asyncio.to_thread(self.store.create_review, review)
        self._event("grant.requested", "ok", caller, review.id, f"{text}: {reason}")
        self.notifier.send("review.requested", self.view(review, []))
        return {
            "status": "pending_approval", "review_id": review.id, "review_url": self.url(review.id), "connection": connection,
            "approvers": review.approvers, "min_approvals": review.min_approvals, "expires_at": iso(review.expires_at),
            "next": f"ask {', '.join(review.approvers)} to approve review {review.id}; the window of {int(duration)}s starts "
                    f"at approval; then `wardgate connect {connection}` or issue a credential",
        }

    def native(self, caller: Identity, connection: str, statement: str, decision: Decision,
               session_id: str) -> str | None:
        """For a native session: None to run `statement` now (an approved review of exactly this text, by
        this person, on this connection, used up by this run), else the refusal that names the review.

        Runs on the event loop: reviews are rare, and these are two small queries."""
        now = time.time()
        sha = input_hash(connection, statement, [])
        review_id = self.store.claim_approved(caller.uid, caller.agent, connection, sha, self.policy_version, now,
                                              agent_id=caller.agent_id)
        if review_id is not None:
            self.store.set_review_session(review_id, session_id)
            self._event("review.executed", "ok", caller, review_id, f"{connection}: native session {session_id}")
            self.gateway.loop.call_soon(self._wake, review_id)
            self._notify_later("review.executed", review_id)
            return None
        review = self.store.pending_review(caller.uid, caller.agent, connection, sha, now, agent_id=caller.agent_id) or \
            self._create(caller, connection, statement, [], decision)
        rule = review.rules[0] if review.rules else {"rule": "?", "reason": ""}
        who = ", ".join(review.approvers) if review.approvers else "an admin"
        return (f"needs review by rule {rule['rule']}: {rule['reason']}. Review {review.id} is waiting for {who} "
                f"({self.url(review.id)}); run this exact statement again once it is approved")

    # -- reading

    def view(self, review: m.Review, steps: list[m.ReviewDecision]) -> dict[str, Any]:
        status = review.status
        now = time.time()
        if (status == "pending" or (status == "approved" and review.kind == "statement")) and review.expires_at <= now:
            status = "expired"
        grant = {}
        if review.kind == "access":
            grant = {"duration_seconds": review.duration, "reason": review.reason,
                     "window_end": iso(review.window_end) if review.window_end else None,
                     "active": status == "approved" and (review.window_end or 0) > now}
        return {**grant,
            "id": review.id, "kind": review.kind, "status": status, "requester": review.requester, "agent": review.agent,
            "connection": review.connection, "statement": review.statement, "params": review.params,
            "sha256": review.sha256, "policy_version": review.policy_version, "rules": review.rules,
            "approvers": review.approvers, "min_approvals": review.min_approvals,
            "approvals": approvals(steps),
            "created_at": iso(review.created_at), "expires_at": iso(review.expires_at),
            "decided_at": iso(review.decided_at) if review.decided_at else None,
            "executed_at": iso(review.executed_at) if review.executed_at else None,
            "session_id": review.session_id, "url": self.url(review.id),
            "history": [{"by": s.by, "decision": s.decision, "reason": s.reason, "at": iso(s.at)} for s in steps],
        }

    def may_see(self, caller: Identity, review: m.Review) -> bool:
        return (caller.owns(review.requester_id) or self._may_approve(caller, review)
                or self.gateway.gatekeeper.can_read_all(caller))

    def _may_approve(self, caller: Identity, review: m.Review) -> bool:
        if caller.agent or caller.kind != "user" or not caller.uid:
            return False  # an agent never approves, not even for its person; nor does a service account
        if review.approvers:
            return bool(set(caller.groups) & set(review.approvers))
        return "admin" in self.gateway.gatekeeper.roles(caller)

    async def get(self, caller: Identity, review_id: str) -> dict[str, Any]:
        try:
            review, steps = await asyncio.to_thread(self.store.get_review, review_id)
        except NotFound:
            raise ReviewError(f"no review {review_id!r}", 404) from None
        if not self.may_see(caller, review):
            raise ReviewError(f"no review {review_id!r}", 404)  # do not confirm it exists
        return self.view(review, steps)

    async def list(self, caller: Identity, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        reviews = await asyncio.to_thread(self.store.list_reviews, status=status if status != "expired" else None,
                                          limit=min(limit, 1000))
        out = [self.view(r, []) for r in reviews if self.may_see(caller, r)]
        return [v for v in out if status is None or v["status"] == status]

    async def wait(self, caller: Identity, review_id: str, timeout: float) -> dict[str, Any]:
        """The review as soon as its status moves on from `pending` (or now, if it has), or after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            event = self._changed.setdefault(review_id, asyncio.Event())
            view = await self.get(caller, review_id)
            if view["status"] != "pending":
                return {**view, "timed_out": False}
            left = deadline - time.monotonic()
            if left <= 0:
                return {**view, "timed_out": True}
            # Changes wake the waiters: in this process, and from other replicas over the store's event
            # channel. Without that channel (or while it reconnects) look again each second.
            recheck = 30.0 if self.gateway.bus.listening else 1.0
            try:
                await asyncio.wait_for(event.wait(), min(left, recheck))
            except TimeoutError:
                pass

    # -- decisions

    async def decide(self, caller: Identity, review_id: str, decision: str, reason: str | None = None) -> dict[str, Any]:
        if decision not in ("approve", "reject", "revoke"):
            raise ReviewError("decision must be approve, reject or revoke", 422)
        try:
            review, steps = await asyncio.to_thread(self.store.get_review, review_id)
        except NotFound:
            raise ReviewError(f"no review {review_id!r}", 404) from None
        now = time.time()
        if not self._may_approve(caller, review):
            self._event(f"review.{decision}", "denied", caller, review_id, "not an approver of this review")
            if not self.may_see(caller, review):
                raise ReviewError(f"no review {review_id!r}", 404)
            groups = ", ".join(review.approvers) or "admin role"
            raise ReviewError(f"only members of {groups} may {decision} this review (and never an agent)", 403)
        if caller.uid == review.requester_id or (review.requester_id is None and caller.user == review.requester):
            self._event(f"review.{decision}", "denied", caller, review_id, "self-approval")
            raise ReviewError("you cannot decide your own review; another approver must", 403)
        if review.status in ("pending", "approved") and review.expires_at <= now:
            raise ReviewError(f"review {review_id} has expired; the requester may ask again", 409)
        if decision == "approve":
            if review.status != "pending":
                raise ReviewError(f"review {review_id} is {review.status}, not pending", 409)
            if _approver(caller.uid, caller.user) in {_approver(s.by_id, s.by) for s in steps if s.decision == "approve"}:
                raise ReviewError("you have approved this review already; it needs another approver", 409)
            new_status = "approved" if approvals(steps) + 1 >= review.min_approvals else None
            extra = {"window_end": now + (review.duration or 0)} if review.kind == "access" and new_status else {}
            ok = await asyncio.to_thread(self.store.decide_review, review_id, caller.user, "approve", reason, new_status,
                                         ("pending",), now, by_id=caller.uid or None, **extra)
        elif decision == "reject":
            if not reason:
                raise ReviewError("a rejection needs a reason, for the requester", 422)
            ok = await asyncio.to_thread(self.store.decide_review, review_id, caller.user, "reject", reason, "rejected",
                                         ("pending",), now, by_id=caller.uid or None)
        else:
            ok = await asyncio.to_thread(self.store.decide_review, review_id, caller.user, "revoke", reason, "revoked",
                                         ("pending", "approved"), now, by_id=caller.uid or None)
        if not ok:
            current, _ = await asyncio.to_thread(self.store.get_review, review_id)
            raise ReviewError(f"review {review_id} is {current.status} now; nothing was changed", 409)
        self._event(f"review.{decision}", "ok", caller, review_id, reason or "")
        if review.status == "pending" and (decision == "reject" or (decision == "approve" and new_status)):
            STATS.review_latency.observe(now - review.created_at)
        if review.kind == "access" and decision == "revoke" and review.status == "approved" and review.decided_at:
            # The grant ends now: credentials issued under it are revoked, which ends their live sessions.
            ended = await asyncio.to_thread(self.store.revoke_credentials_since, review.requester_id or "", review.connection,
                                            review.decided_at)
            if ended:
                self._event("credential.revoke", "ok", caller, review_id, f"grant revoked: {', '.join(ended)}")
        self._wake(review_id)
        view = await self.get(caller, review_id)
        step = {"approve": "review.approved" if view["status"] == "approved" else "review.approval",
                "reject": "review.rejected", "revoke": "review.revoked"}[decision]
        self.notifier.send(step, view)
        return view

    async def execute(self, caller: Identity, review_id: str, *, wait: float | None = None,
                      addr: str | None = None) -> dict[str, Any]:
        """Run the stored, approved input of a review, once, for its requester."""
        try:
            review, _ = await asyncio.to_thread(self.store.get_review, review_id)
        except NotFound:
            raise ReviewError(f"no review {review_id!r}", 404) from None
        if review.kind != "statement":
            raise ReviewError("an access review is not executed: once approved, it grants a window on the connection", 409)
        if not caller.owns(review.requester_id) or review.agent != caller.agent or \
                (review.agent_id is not None and caller.agent_id is not None and review.agent_id != caller.agent_id):
            self._event("review.execute", "denied", caller, review_id, "not the requester")
            by = f"{review.requester} through {review.agent}" if review.agent else review.requester
            raise ReviewError(f"only who asked for this review ({by}) may run it", 403)
        if review.policy_version != self.policy_version:
            self._event("review.execute", "denied", caller, review_id, "the policy changed since the request")
            raise ReviewError("the guardrails changed since this review was requested; run the statement again "
                              "to ask for a new review", 409)
        if review.sha256 != input_hash(review.connection, review.statement, review.params):
            self._event("review.execute", "denied", caller, review_id, "stored input does not match its hash")
            raise ReviewError("the stored statement does not match its hash; it will not run", 409)
        if not await asyncio.to_thread(self.store.claim_review, review_id, caller.uid, caller.agent, time.time(),
                                       caller.agent_id):
            current, _ = await asyncio.to_thread(self.store.get_review, review_id)
            status = current.status
            if status in ("pending", "approved") and current.expires_at <= time.time():
                status = "expired"
            self._event("review.execute", "denied", caller, review_id, f"review is {status}")
            raise ReviewError(f"review {review_id} is {status}; only an approved review runs, once", 409)
        self._event("review.executed", "ok", caller, review_id, f"{review.connection}: sha256 {review.sha256}")
        self._wake(review_id)
        envelope = await self.gateway.exec.run(caller, review.connection, review.statement,
                                               review.params or None, wait=wait, addr=addr, review_id=review_id)
        if envelope.get("session_id"):
            await asyncio.to_thread(self.store.set_review_session, review_id, envelope["session_id"])
        self._notify_later("review.executed", review_id)
        return {**envelope, "review_id": review_id}

    def _notify_later(self, kind: str, review_id: str) -> None:
        if self.notifier.enabled:
            async def send() -> None:
                review, steps = await asyncio.to_thread(self.store.get_review, review_id)
                self.notifier.send(kind, self.view(review, steps))
            task = self.gateway.loop.create_task(send())
            self._pending_notes.add(task)
            task.add_done_callback(self._pending_notes.discard)

    async def expire(self) -> None:
        """Mark reviews past their expiry, with a record of each."""
        ids = await asyncio.to_thread(self.store.expire_reviews, time.time())
        for review_id in ids:
            self._event("review.expired", "ok", None, review_id)
            self._wake(review_id)

    async def run(self, interval: float = 30.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire()
            except Exception:  # noqa: BLE001 - the store may be down for a moment
                log.exception("cannot expire reviews")
