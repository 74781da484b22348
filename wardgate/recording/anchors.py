"""Anchors: copies of the chain's signed head kept outside the store.

Whoever can write the store can delete the last events together with their checkpoints and set the
stored head back; the chain that remains is whole. A signed checkpoint kept elsewhere catches that:
`audit verify --anchor` checks that the store's chain still reaches it, with the same hash. The
recorder keeps one in a head file beside the journal (`HEAD_FILE`), rewritten whenever the chain
grows, and each audit sink receives the checkpoint that covers what it was just sent. The
checkpoint is signed, so an anchor cannot be forged without the gateway's key; it can only be
replaced by an older genuine one, which is why the sinks' copies (out of the gateway host's reach)
are the ones that count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

HEAD_FILE = "audit-head.json"
ACTION = "audit.checkpoint"


def checkpoint_view(cp: Any) -> dict[str, Any]:
    """A checkpoint row as anchors hold it."""
    get = cp.get if isinstance(cp, dict) else (lambda k: getattr(cp, k))
    return {"seq": get("seq"), "hash": get("hash"), "at": get("at"), "signature": get("signature"), "key_id": get("key_id")}


def write_head(path: Path, cp: dict[str, Any], *, sync: bool = True) -> None:
    """Replace the head file with `cp`, whole or not at all (written beside it, then renamed); with
    `sync`, on disk before this returns."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (json.dumps(checkpoint_view(cp)) + "\n").encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _checkpoint_in(obj: Any) -> dict[str, Any] | None:
    """The checkpoint an anchor line holds: a head file's, a file sink's line, a webhook body's, or an
    exported checkpoint."""
    if not isinstance(obj, dict):
        return None
    if {"seq", "hash", "signature"} <= obj.keys():
        return obj
    for inner in (obj.get("checkpoint"), (obj.get("wardgate") or {}).get("checkpoint")):
        if isinstance(inner, dict) and {"seq", "hash", "signature"} <= inner.keys():
            return inner
    return None


def read_anchors(path: Path) -> list[dict[str, Any]]:
    """Every signed checkpoint in `path` (a head file, a file sink's JSON lines, saved webhook bodies,
    or syslog lines: the JSON after the header), one per seq, oldest first: each is checked, since a
    store rewritten and then grown would match only the newest. Raises ValueError if it holds none."""
    found: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if "signature" not in line:
                continue
            start = line.find("{")
            try:
                cp = _checkpoint_in(json.loads(line[start:])) if start >= 0 else None
                seq = int(cp["seq"]) if cp is not None else None
            except (ValueError, TypeError):
                continue
            if cp is not None and seq is not None:
                found.setdefault(seq, cp)  # a seq seen twice with two hashes: the first is what was sent first
    if not found:
        raise ValueError(f"{path} holds no signed audit checkpoint")
    return [found[seq] for seq in sorted(found)]


def read_anchor(path: Path) -> dict[str, Any]:
    """The newest signed checkpoint in `path` (see read_anchors)."""
    return read_anchors(path)[-1]
