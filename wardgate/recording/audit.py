"""The tamper-evident audit log: a hash chain over security events, with signed checkpoints.

Each event gets the next sequence number and `hash = SHA-256(prev_hash + "\\n" + canonical(event))`,
where the canonical form is the event's fields as JSON with sorted keys. Checkpoints sign
`"<seq>:<hash>"` of the chain head with the gateway's Ed25519 key, so the head cannot be rewound
or rewritten without the key. `verify` walks the whole chain and names the first broken event.

Sans-IO: the store feeds rows in and persists what comes out.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
FIELDS = ("id", "at", "kind", "outcome", "user_name", "agent", "source", "client_addr", "detail")


_canonical_json = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


def canonical(event: dict[str, Any]) -> bytes:
    return _canonical_json({k: event.get(k) for k in FIELDS}).encode("utf-8")


_compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
STATEMENTS_PER_EVENT = 200


def statement_digest(text: str, params: list[Any] | None) -> str:
    """What the chain holds of an allowed statement: 128 bits of the SHA-256 of its text and bound values."""
    data = text.encode("utf-8") if params is None else text.encode("utf-8") + b"\x00" + _compact_json(params).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:32]


def link(prev_hash: str, event: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + canonical(event)).hexdigest()


def chain(events: list[dict[str, Any]], head_seq: int, head_hash: str) -> tuple[int, str]:
    """Give `events` (in order) their seq, prev_hash and hash after the head; return the new head."""
    for e in events:
        head_seq += 1
        e["seq"], e["prev_hash"] = head_seq, head_hash
        head_hash = e["hash"] = link(head_hash, e)
    return head_seq, head_hash


class Signer:
    """The Ed25519 key that signs checkpoints. Every replica of a gateway shares one: it lives in the
    store, encrypted with the secret key (see Store.signer); a PEM file from an older single gateway
    (`<data_dir>/audit-ed25519.pem`) is adopted into the store once."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.key_id = hashlib.sha256(self.public_pem.encode()).hexdigest()[:16]

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> Signer:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the audit signing key is not an Ed25519 key")
        return cls(key)

    def pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def sign(self, seq: int, head_hash: str) -> str:
        return base64.b64encode(self.key.sign(f"{seq}:{head_hash}".encode())).decode()


@dataclass
class Verdict:
    ok: bool
    events: int
    checkpoints: int
    head_seq: int
    problem: str | None = None
    event_id: str | None = None
    seq: int | None = None
    statements: int = 0  # recorded statements checked against the digests the chain holds
    rows: int = 0  # recorded statement rows checked against their seals (recording/seals.py)
    anchor: int | None = None  # which anchor a finding is about (its index among those given)
    findings: list[dict[str, Any]] = field(default_factory=list)  # each row that does not match its seals
    findings_total: int = 0

    def public(self) -> dict[str, Any]:
        return {"ok": self.ok, "events": self.events, "checkpoints": self.checkpoints, "head_seq": self.head_seq,
                "statements": self.statements, "rows": self.rows, "anchor": self.anchor, "problem": self.problem,
                "event_id": self.event_id, "seq": self.seq, "findings": self.findings,
                "findings_total": self.findings_total}


def check_signature(public: Ed25519PublicKey, checkpoint: dict[str, Any]) -> bool:
    try:
        public.verify(base64.b64decode(checkpoint["signature"]), f"{checkpoint['seq']}:{checkpoint['hash']}".encode())
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return True


def verify(events: Iterable[dict[str, Any]], checkpoints: list[dict[str, Any]], head: tuple[int, str] | None,
           public_pem: str, anchors: list[dict[str, Any]] | None = None) -> Verdict:
    """Check the chain in seq order, every checkpoint's signature and place, and the recorded head; with
    `anchors`, signed checkpoints kept outside the store, also that the chain still holds each. A
    finding about an anchor gives its index in `Verdict.anchor`."""
    public = serialization.load_pem_public_key(public_pem.encode())
    assert isinstance(public, Ed25519PublicKey)
    by_seq = {}
    for c in checkpoints:
        if not check_signature(public, c):
            return Verdict(False, 0, len(checkpoints), 0, f"checkpoint at seq {c['seq']} has an invalid signature",
                           seq=c["seq"])
        by_seq[c["seq"]] = c["hash"]
    anchors = anchors or []
    wanted: dict[int, str | None] = {}
    for i, a in enumerate(anchors):
        if not check_signature(public, a):
            return Verdict(False, 0, len(checkpoints), 0, "the anchor's checkpoint is not signed with this gateway's "
                           "audit key (it was edited, or it is another gateway's)", anchor=i)
        wanted[int(a["seq"])] = None
    expected_seq, prev, n = 1, GENESIS, 0
    for e in events:
        n += 1
        if not isinstance(e["seq"], int):
            return Verdict(False, n, len(checkpoints), expected_seq - 1, f"an event without a place in the chain "
                           f"(seq {e['seq']!r}) was added to the store", e["id"], None)
        if e["seq"] != expected_seq:
            missing = "missing" if e["seq"] > expected_seq else "repeated or out of order"
            return Verdict(False, n, len(checkpoints), expected_seq - 1,
                           f"event seq {expected_seq} is {missing} (found seq {e['seq']} next)", e["id"], e["seq"])
        if e["prev_hash"] != prev:
            return Verdict(False, n, len(checkpoints), e["seq"], "the event does not follow the one before it "
                           "(an event before it was removed, added or reordered)", e["id"], e["seq"])
        if link(prev, e) != e["hash"]:
            return Verdict(False, n, len(checkpoints), e["seq"], "the event's content was changed after it was recorded",
                           e["id"], e["seq"])
        if e["seq"] in by_seq and by_seq[e["seq"]] != e["hash"]:
            return Verdict(False, n, len(checkpoints), e["seq"], "the chain differs from the signed checkpoint here",
                           e["id"], e["seq"])
        if e["seq"] in wanted:
            wanted[e["seq"]] = e["hash"]
        prev = e["hash"]
        expected_seq += 1
    last = expected_seq - 1
    beyond = [s for s in by_seq if s > last]
    if beyond:
        return Verdict(False, n, len(checkpoints), last,
                       f"a signed checkpoint covers seq {max(beyond)}, but the log ends at seq {last}: events were removed")
    if last and last not in by_seq:
        # Every append signs the head it makes, in the same transaction: a head without a signature is
        # one the store was given (events rewritten from some point on, and the checkpoints after it deleted).
        covered = max((s for s in by_seq if s < last), default=0)
        return Verdict(False, n, len(checkpoints), last,
                       f"the log's last event (seq {last}) is not covered by a signed checkpoint (the last one is at seq "
                       f"{covered}): the events after it were added or rewritten, and checkpoints removed", seq=covered + 1)
    for i, a in enumerate(anchors):
        seq, found = int(a["seq"]), wanted[int(a["seq"])]
        if found != a["hash"]:
            problem = (f"the anchor holds a signed checkpoint at seq {seq}, but the log ends at seq {last}: events "
                       "were removed, with their checkpoints" if found is None else
                       f"the chain at seq {seq} differs from the anchor's signed checkpoint: it was rewritten")
            return Verdict(False, n, len(checkpoints), last, problem, seq=seq, anchor=i)
    if head is not None and (head[0] != last or (last and head[1] != prev)):
        return Verdict(False, n, len(checkpoints), last,
                       f"the recorded head (seq {head[0]}) does not match the log's end (seq {last})")
    return Verdict(True, n, len(checkpoints), last, anchor=None)
