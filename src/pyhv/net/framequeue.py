"""A bounded, thread-safe queue of frames that refuses (and counts) what does not fit.

A network link never stores frames without bound. The back ends' I/O threads `put`
frames that arrived from the peer, the device that feeds the guest `get`s them when the
guest has posted receive buffers. When the guest is not receiving, the queue fills up to
`max_frames` frames or `max_bytes` bytes, whichever comes first, and `put` refuses every
later frame (counted in `dropped`) until the guest takes some; the back end then stops
reading its peer (pyhv.net.backend).

Invariants: `len(q) <= max_frames` and `q.bytes <= max_bytes` at all times; frames come
out in the order they went in; `put` and `get` never block.
"""

from __future__ import annotations

import threading
from collections import deque

MAX_FRAMES = 512
MAX_BYTES = 4 << 20


class FrameQueue:
    def __init__(self, max_frames: int = MAX_FRAMES, max_bytes: int = MAX_BYTES) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._q: deque[bytes] = deque()
        self._lock = threading.Lock()
        self.bytes = 0
        self.dropped = 0

    def put(self, frame: bytes) -> tuple[bool, bool]:
        """Queue `frame`: (accepted, the queue was empty before)."""
        with self._lock:
            if len(self._q) >= self.max_frames or self.bytes + len(frame) > self.max_bytes:
                self.dropped += 1
                return False, False
            was_empty = not self._q
            self._q.append(frame)
            self.bytes += len(frame)
            return True, was_empty

    def get(self) -> bytes | None:
        """The oldest frame, or None."""
        with self._lock:
            if not self._q:
                return None
            frame = self._q.popleft()
            self.bytes -= len(frame)
            return frame

    def peek_len(self) -> int | None:
        """The size of the oldest frame (so a device can check its buffers fit), or None."""
        with self._lock:
            return len(self._q[0]) if self._q else None

    def clear(self) -> None:
        with self._lock:
            self._q.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._q)
