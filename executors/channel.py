"""A one-writer, many-reader message ring in shared memory: how steps reach the ranks.

A decode step on a GPU takes a few milliseconds; a ``multiprocessing.Queue`` hop (feeder thread,
pipe, wake-up) costs a sizeable part of that on each of the two legs (driver -> ranks, reporting
rank -> driver). Here the writer copies the message into a slot of a file mapped by every process
and bumps the slot's sequence number; readers poll that number (busy for ``spin_s``, then with
short sleeps), so a hop costs a memory copy and a poll.

Layout of the mapping (``K`` slots of ``capacity`` bytes, ``n`` readers)::

    [acks: n x u64]  [slot 0: seq u64 | len i64 | payload]  ...  [slot K-1: ...]

Message ``m`` (1-based) goes to slot ``(m - 1) % K``; the writer first waits until every reader's
ack is ``>= m - K`` (the slot's previous message has been read by all), writes the payload and
length, then the sequence number ``m`` last (x86 stores are seen in order). A reader waits for
``seq == m``, copies the payload out and sets its ack to ``m``. ``len = -1`` is the end marker
(``recv`` returns None). A message larger than a slot (a step carrying images: 8 448x448 images are
19 MB of bf16 pixels) goes to a side file ``<path>.<m>`` beside the mapping, in the same shared
memory, and the slot says so (``len = -3``): readers read the file, and the writer removes it once
every reader has acked ``m`` (at its next send, or ``unlink``). Only if that file cannot be written
(shared memory full) does ``len = -2`` say the message travels by the fallback the caller names (a
queue: a pipe, which cost a step of 8 such images about 50 ms on an H200 host, against a few ms here).

Waits call ``check()`` every ``CHECK_S`` seconds, so a caller can stop waiting on a dead peer.
A waiting process polls without pause for a while, then sleeps between polls with a doubling
sleep (``Polling``), so idle ranks, and CPU ranks sharing few cores, do not burn them.
"""

from __future__ import annotations

import contextlib
import glob
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

CHECK_S = 0.2
SLEEP_S, MAX_SLEEP_S = 20e-6, 2e-3
END, OVERFLOW, SIDE_FILE = -1, -2, -3
DEFAULT_CAPACITY = 8 << 20
_SLOT = struct.Struct("<Qq")  # seq, len


@dataclass(frozen=True)
class ChannelSpec:
    """What a process needs to map a channel (picklable)."""

    path: str
    readers: int
    slots: int = 2
    capacity: int = DEFAULT_CAPACITY

    def size(self) -> int:
        return self.readers * 8 + self.slots * (_SLOT.size + self.capacity)


@dataclass(frozen=True)
class Polling:
    """How a waiting process polls: without pause for ``spin_s``, then sleeping between polls,
    the sleep doubling from SLEEP_S up to ``max_sleep_s``."""

    spin_s: float = 0.0
    max_sleep_s: float = MAX_SLEEP_S

    @staticmethod
    def for_device(cuda: bool) -> "Polling":
        """GPU processes answer within microseconds (a decode step is milliseconds); CPU ranks
        share few cores with the ranks doing the work, so they back off at once."""
        return Polling(0.02, 1e-4) if cuda else Polling()


class Backoff:
    def __init__(self, polling: Polling):
        self.t0, self.polling, self.sleep = time.perf_counter(), polling, SLEEP_S

    def pause(self) -> None:
        if time.perf_counter() - self.t0 > self.polling.spin_s:
            time.sleep(self.sleep)
            self.sleep = min(2 * self.sleep, self.polling.max_sleep_s)


class Channel:
    """One end of a ring: ``send`` (the writer) or ``recv`` (reader ``reader``)."""

    def __init__(self, spec: ChannelSpec, reader: int | None = None, polling: Polling = Polling()):
        self.spec, self.reader, self.polling = spec, reader, polling
        fd = os.open(spec.path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, spec.size())
        finally:
            os.close(fd)
        self.count = 0  # messages sent (writer) or received (reader)
        self.side_files: list[int] = []  # writer: messages whose side file may still be unread

    @staticmethod
    def create(readers: int, **kw) -> ChannelSpec:
        """A new zeroed mapping in shared memory (``/dev/shm`` where it exists); the creator
        removes it with ``unlink``. Slots larger than ``DEFAULT_CAPACITY`` (a plan with images asks
        for room for a step's pixels) are reserved at once (``posix_fallocate``): written again
        and again, their pages are allocated once, where a fresh side file pays for its pages at
        every step (19 MB: ~30 ms on an H200 host); if the memory cannot be reserved the channel
        gets default slots, and larger messages go by side file."""
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="shiftplan-ch-", dir=where)
        spec = ChannelSpec(path, readers, **kw)
        try:
            if spec.capacity > DEFAULT_CAPACITY:
                try:
                    os.posix_fallocate(fd, 0, spec.size())
                except (OSError, AttributeError):  # full, or no fallocate here
                    spec = ChannelSpec(path, readers, spec.slots, DEFAULT_CAPACITY)
            os.ftruncate(fd, spec.size())
        finally:
            os.close(fd)
        return spec

    @staticmethod
    def unlink(spec: ChannelSpec) -> None:
        """Remove the mapping and any side file still there."""
        for path in [spec.path] + glob.glob(glob.escape(spec.path) + ".*"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _side(self, m: int) -> str:
        return f"{self.spec.path}.{m}"

    def _write_side(self, m: int, parts: list) -> bool:
        """Message ``m`` into its side file; False (nothing left behind) if it cannot be written."""
        try:
            with open(self._side(m), "wb") as f:
                for p in parts:
                    f.write(p)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self._side(m))
            return False
        self.side_files.append(m)
        return True

    def _drop_read_side_files(self, acked: int) -> None:
        """Remove the side files of messages every reader has read (``acked``: the lowest ack)."""
        while self.side_files and self.side_files[0] <= acked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._side(self.side_files.pop(0)))

    def close(self) -> None:
        self.mm.close()

    def _slot(self, m: int) -> int:
        s = self.spec
        return s.readers * 8 + ((m - 1) % s.slots) * (_SLOT.size + s.capacity)

    def _wait(self, ready: Callable[[], bool], check: Callable[[], None] | None, timeout: float | None) -> bool:
        t0 = last = time.perf_counter()
        backoff = Backoff(self.polling)
        while not ready():
            backoff.pause()
            now = time.perf_counter()
            if check is not None and now - last > CHECK_S:
                check()
                last = now
            if timeout is not None and now - t0 > timeout:
                return False
        return True

    def send(self, payload: bytes | list | None, check: Callable[[], None] | None = None,
             timeout: float | None = None) -> bool:
        """Write one message (None: the end marker; a list: its parts one after the other, each
        copied once, ``executors.worker.to_frame``). Returns False when the payload is larger than
        a slot and its side file could not be written (an overflow marker was written instead: send
        the payload by the fallback). Raises
        TimeoutError when ``timeout`` seconds pass before the slot is free (nothing written)."""
        m = self.count + 1
        floor = m - self.spec.slots
        n = self.spec.readers
        if floor > 0 and not self._wait(
                lambda: min(struct.unpack_from(f"<{n}Q", self.mm, 0)) >= floor, check, timeout):
            raise TimeoutError(f"channel slot still unread after {timeout} s")
        if self.side_files:
            self._drop_read_side_files(min(struct.unpack_from(f"<{n}Q", self.mm, 0)))
        off = self._slot(m)
        parts = [] if payload is None else [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
        size = sum(memoryview(p).nbytes for p in parts)
        if payload is None:
            length = END
        elif size > self.spec.capacity:
            length = SIDE_FILE if self._write_side(m, parts) else OVERFLOW
        else:
            length, pos = size, off + _SLOT.size
            for p in parts:
                v = memoryview(p).cast("B")
                self.mm[pos: pos + v.nbytes] = v
                pos += v.nbytes
        struct.pack_into("<q", self.mm, off + 8, length)
        struct.pack_into("<Q", self.mm, off, m)  # last: readers see the payload once they see m
        self.count = m
        return length != OVERFLOW

    def recv(self, check: Callable[[], None] | None = None, overflow: Callable[[], bytes] | None = None) -> bytes | None:
        """The next message (None at the end marker); an overflowed one is fetched by ``overflow()``."""
        m = self.count + 1
        off = self._slot(m)
        self._wait(lambda: struct.unpack_from("<Q", self.mm, off)[0] == m, check, None)
        return self._take(m, off, overflow)

    def poll(self, overflow: Callable[[], bytes] | None = None) -> tuple[bool, bytes | None]:
        """``(True, message)`` if the next message is there, else ``(False, None)``; no waiting."""
        m = self.count + 1
        off = self._slot(m)
        if struct.unpack_from("<Q", self.mm, off)[0] != m:
            return False, None
        return True, self._take(m, off, overflow)

    def _take(self, m: int, off: int, overflow: Callable[[], bytes] | None) -> bytes | bytearray | None:
        """The message in slot ``off`` (one copy, into a writable bytearray), then ack it."""
        (length,) = struct.unpack_from("<q", self.mm, off + 8)
        if length == END:
            out = None
        elif length == OVERFLOW:
            if overflow is None:
                raise RuntimeError("message larger than the channel's slots and no fallback given")
            out = overflow()
        elif length == SIDE_FILE:
            with open(self._side(m), "rb") as f:
                out = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(out)
        else:
            out = bytearray(length)
            with memoryview(self.mm) as view:
                out[:] = view[off + _SLOT.size: off + _SLOT.size + length]
        struct.pack_into("<Q", self.mm, self.reader * 8, m)
        self.count = m
        return out
