"""Brute-force lockout: failed sign-ins counted per key (a client address and the name it tries), and
after a few of them, every further attempt is refused unchecked until a lock runs out; each new lock is
twice as long as the last. A success clears the key. Sans-IO: the clock is passed in."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    last: float = 0.0
    until: float = 0.0


class Throttle:
    def __init__(self, free: int = 5, first_lock: float = 1.0, max_lock: float = 900.0, forget_after: float = 900.0,
                 max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.first_lock, self.max_lock, self.forget_after = free, first_lock, max_lock, forget_after
        self.max_keys, self.clock = max_keys, clock
        self._keys: OrderedDict[Hashable, _State] = OrderedDict()
        self._lock = threading.Lock()  # the API checks from worker threads

    def wait(self, key: Hashable) -> float:
        """Seconds until `key` may try again (0: now)."""
        with self._lock:
            state = self._keys.get(key)
            return max(0.0, state.until - self.clock()) if state is not None else 0.0

    def failed(self, key: Hashable) -> float:
        """Count a failure of `key`; the lock it now has, in seconds (0: none yet)."""
        now = self.clock()
        with self._lock:
            state = self._keys.pop(key, None)
            if state is None or now - max(state.last, state.until) > self.forget_after:
                state = _State()
            state.failures += 1
            state.last = now
            over = state.failures - self.free
            if over >= 0:
                state.until = now + min(self.max_lock, self.first_lock * 2 ** min(over, 30))
            self._keys[key] = state  # most recent last: the oldest go first when there are too many
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            return max(0.0, state.until - now)

    def succeeded(self, key: Hashable) -> None:
        with self._lock:
            self._keys.pop(key, None)


def lockout_message(wait: float) -> str:
    return f"too many failed sign-ins from this address; try again in {max(1, round(wait + 0.5))} s"
