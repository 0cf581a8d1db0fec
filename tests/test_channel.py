"""The shared-memory step channel: order, ring reuse, overflow, end marker, a full ring, and a
message crossing processes."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from executors.channel import Channel, ChannelSpec


@pytest.fixture
def spec():
    s = Channel.create(readers=2, slots=2, capacity=64)
    yield s
    Channel.unlink(s)


def test_messages_reach_every_reader_in_order_through_a_reused_ring(spec: ChannelSpec) -> None:
    w, r0, r1 = Channel(spec), Channel(spec, reader=0), Channel(spec, reader=1)
    got0, got1 = [], []
    for i in range(7):  # more messages than slots: each slot is reused once both readers acked it
        assert w.send(f"step {i}".encode())
        got0.append(r0.recv())
        if i % 2:  # reader 1 lags by up to two messages, the ring's depth
            got1 += [r1.recv(), r1.recv()]
    got1.append(r1.recv())
    assert got0 == got1 == [f"step {i}".encode() for i in range(7)]
    assert r0.poll() == (False, None)


def test_a_full_ring_times_out_and_writes_nothing(spec: ChannelSpec) -> None:
    w, r0, r1 = Channel(spec), Channel(spec, reader=0), Channel(spec, reader=1)
    w.send(b"a")
    w.send(b"b")
    r0.recv()  # reader 1 has read nothing: slot 0 is still its
    with pytest.raises(TimeoutError):
        w.send(b"c", timeout=0.01)
    assert r1.recv() == b"a" and w.send(b"c") and r0.recv() == b"b" and r0.recv() == b"c"


def test_large_messages_travel_by_side_files_removed_once_read(spec: ChannelSpec) -> None:
    w, r0, r1 = Channel(spec), Channel(spec, reader=0), Channel(spec, reader=1)
    big = [bytes([i]) * (1000 + i) for i in range(5)]  # each larger than a 64-byte slot
    side = lambda m: Path(f"{spec.path}.{m}")  # noqa: E731
    for i, b in enumerate(big):
        assert w.send(b) is True and side(i + 1).exists()
        assert r0.recv(overflow=lambda: pytest.fail("no fallback")) == b
        assert r1.recv() == b
    assert side(5).exists() and not side(3).exists()  # read by both: removed at a later send
    w.send(b"small")
    assert not side(5).exists() and r0.recv() == b"small"
    w.send(big[0])
    Channel.unlink(spec)  # the creator's unlink removes the mapping and any side file left
    assert not side(7).exists() and not Path(spec.path).exists()


def test_overflow_when_the_side_file_cannot_be_written_and_end_marker(spec: ChannelSpec, monkeypatch) -> None:
    w, r0 = Channel(spec), Channel(spec, reader=0)
    monkeypatch.setattr(w, "_side", lambda m: str(Path(spec.path).parent / "no-such-dir" / str(m)))
    big = b"x" * 65
    assert w.send(big) is False  # shared memory unusable: the caller sends it by its fallback
    assert r0.recv(overflow=lambda: big) == big
    w.send(None)
    assert r0.recv() is None


def _echo(spec: ChannelSpec, back: ChannelSpec) -> None:
    inp, out = Channel(spec, reader=0), Channel(back)
    while (m := inp.recv()) is not None:
        out.send(m[::-1])


def test_messages_cross_processes() -> None:
    there, back = Channel.create(readers=1), Channel.create(readers=1)
    try:
        p = mp.get_context("spawn").Process(target=_echo, args=(there, back))
        p.start()
        w, r = Channel(there), Channel(back, reader=0)
        for i in range(50):
            w.send(b"abc%d" % i)
            assert r.recv() == (b"abc%d" % i)[::-1]
        big = bytes(range(256)) * (9 << 12)  # 9 MiB: over a default slot, both ways by side file
        assert w.send(big) and r.recv() == big[::-1]
        w.send(None)
        p.join(timeout=30)
        assert p.exitcode == 0
    finally:
        Channel.unlink(there)
        Channel.unlink(back)


def test_large_slots_are_reserved_or_fall_back_to_default_slots(monkeypatch) -> None:
    import os

    from executors.channel import DEFAULT_CAPACITY

    big = Channel.create(readers=1, capacity=DEFAULT_CAPACITY + 4096)
    try:  # reserved at once: the file holds its slots' blocks
        assert big.capacity == DEFAULT_CAPACITY + 4096 and os.stat(big.path).st_blocks * 512 >= big.size()
    finally:
        Channel.unlink(big)

    def full(*_a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    small = Channel.create(readers=1, capacity=DEFAULT_CAPACITY + 4096)
    try:  # no room for the large slots: default ones, larger messages by side file
        assert small.capacity == DEFAULT_CAPACITY and os.path.getsize(small.path) == small.size()
        w, r = Channel(small), Channel(small, reader=0)
        assert w.send([b"a" * 10, memoryview(b"b" * (DEFAULT_CAPACITY))]) and r.recv() == b"a" * 10 + b"b" * DEFAULT_CAPACITY
    finally:
        Channel.unlink(small)
