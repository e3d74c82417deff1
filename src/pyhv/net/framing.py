"""Ethernet frame limits, and the length-prefixed framing of stream sockets.

Stream back ends (QEMU's `-netdev stream` and `-netdev socket,listen=|connect=`, passt's
`--socket`/`--fd` mode) carry frames over a byte stream, each one preceded by its length
as a 4-byte big-endian unsigned integer and nothing else: no padding, no checksum.
Datagram back ends carry one frame per datagram and need no framing.

Limits (every back end applies the same):
- MAX_FRAME = 65550 bytes: a 64 KiB payload plus the 14-byte Ethernet header, what a
  guest with a 65535-byte MTU can send (65549) with a byte to spare. Every size up to it
  is carried unchanged.
- MIN_FRAME = 14 bytes: an Ethernet header. Anything shorter cannot be a frame.
Frames outside the limits are never delivered: a peer's are dropped and counted
(`oversize`, `runts`), a local sender's are refused by `NetBackend.send`.

`Deframer` turns a stream of arbitrary chunks back into frames. Invariants:
- it never raises on any input, and its memory is bounded: it holds at most one
  partial frame (MAX_FRAME + 4 bytes), whatever the peer sends;
- an oversize frame is skipped without being buffered (its length says how far), so the
  stream stays in step and the frames after it arrive intact;
- frames come out in order, each exactly as it was sent.
"""

from __future__ import annotations

import struct

MAX_FRAME = 65550
MIN_FRAME = 14
HEADER = struct.Struct("!I")        # the length prefix: 4 bytes, big-endian


def frame_header(length: int) -> bytes:
    """The 4-byte prefix a stream peer expects before a frame of `length` bytes."""
    return HEADER.pack(length)


def encode(frame: bytes) -> bytes:
    """One frame as it travels on a stream (for tests and tools; the back ends send the
    header and the frame without joining them)."""
    return HEADER.pack(len(frame)) + frame


class Deframer:
    """Length-prefixed stream -> frames, with bad frames dropped and counted."""

    def __init__(self, max_frame: int = MAX_FRAME, min_frame: int = MIN_FRAME) -> None:
        self.max_frame = max_frame
        self.min_frame = min_frame
        self._buf = bytearray()     # a partial header or a partial frame, never more
        self._need = -1             # length of the frame being collected; -1: header next
        self._skip = 0              # bytes of an oversize frame still to throw away
        self.frames = 0             # delivered
        self.oversize = 0           # dropped: longer than max_frame
        self.runts = 0              # dropped: shorter than min_frame

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not complete yet (at most max_frame + 4)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take the next chunk of the stream; return the frames it completed."""
        out: list[bytes] = []
        view = memoryview(data).cast("B")
        pos = 0
        end = len(view)
        buf = self._buf
        while pos < end:
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
                continue
            if self._need < 0:
                if not buf and end - pos >= 4:
                    length = HEADER.unpack_from(view, pos)[0]
                    pos += 4
                else:
                    take = min(4 - len(buf), end - pos)
                    buf += view[pos:pos + take]
                    pos += take
                    if len(buf) < 4:
                        break
                    length = HEADER.unpack_from(buf)[0]
                    buf.clear()
                if length > self.max_frame:
                    self.oversize += 1
                    self._skip = length
                    continue
                self._need = length
            # collecting a frame of self._need bytes
            if not buf and end - pos >= self._need:
                frame = bytes(view[pos:pos + self._need])
                pos += self._need
            else:
                take = min(self._need - len(buf), end - pos)
                buf += view[pos:pos + take]
                pos += take
                if len(buf) < self._need:
                    break
                frame = bytes(buf)
                buf.clear()
            self._need = -1
            if len(frame) < self.min_frame:
                self.runts += 1
            else:
                self.frames += 1
                out.append(frame)
        return out

    def reset(self) -> None:
        """Forget a partial frame (the stream was closed; a new one starts clean)."""
        self._buf.clear()
        self._need = -1
        self._skip = 0
