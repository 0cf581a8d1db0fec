"""What travels between the driver and the ranks pickles compactly and round-trips exactly."""

from __future__ import annotations

import pickle

import pytest
import torch

from executors.batch import ImageJob, MicroBatch
from executors.worker import from_bytes, to_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_image_job_pixels_round_trip_bit_exact(dtype):
    px = torch.randn(64, 24).to(dtype)
    job = ImageJob(7, px, [(1, 8, 8)], None)
    back = from_bytes(to_bytes(job))
    assert back.pixels.dtype == dtype and back.pixels.shape == px.shape
    assert torch.equal(back.pixels.view(torch.uint8), px.view(torch.uint8))
    assert (back.req, back.grid, back.encoder) == (7, [(1, 8, 8)], None)
    back.pixels.view(torch.uint8).add_(1)  # writable (a read-only buffer would warn or fail here)


def test_image_job_without_pixels_and_non_contiguous_pixels():
    assert from_bytes(to_bytes(ImageJob(1, None, [(1, 2, 2)], 3))) == ImageJob(1, None, [(1, 2, 2)], 3)
    px = torch.randn(24, 64).bfloat16().t()  # a transposed view pickles as its values
    assert torch.equal(from_bytes(to_bytes(ImageJob(1, px, [(1, 8, 8)]))).pixels, px)


def test_image_job_pickles_without_torch_serialization():
    """No ``torch.save`` zip/legacy stream inside: the pixels' bytes appear once, as numpy's buffer."""
    px = torch.randn(256, 64).bfloat16()
    blob = pickle.dumps(ImageJob(1, px, [(1, 16, 16)]), protocol=5)
    assert b"_load_from_bytes" not in blob and b"numpy" in blob
    assert len(blob) < px.numel() * 2 + 1024


def test_microbatch_with_image_jobs_round_trips():
    z = torch.zeros(2, dtype=torch.long)
    mb = MicroBatch("tp", z, z, z, z, z, z, z, z, z, images=[ImageJob(0, torch.ones(4, 3).bfloat16(), [(1, 2, 2)])])
    back = from_bytes(to_bytes(mb))
    assert torch.equal(back.images[0].pixels, mb.images[0].pixels) and back.images[0].pixels.dtype == torch.bfloat16


def test_frame_buffers_are_aligned_and_written_in_place():
    """Out-of-band buffers start at multiples of 64 bytes; a frame sent as parts reads back equal."""
    import numpy as np

    from executors.channel import Channel
    from executors.worker import to_frame

    obj = {"a": np.arange(7, dtype=np.int64), "b": np.ones(3, dtype=np.int16), "px": torch.randn(5, 3).bfloat16()}
    frame = to_frame(ImageJob(1, obj["px"], [(1, 2, 2)]))
    assert len(frame) == 4  # header, pickle, padding, the pixels
    msg = bytearray(b"".join(to_frame(obj)))
    base = np.frombuffer(msg, np.uint8).ctypes.data  # offsets within the frame
    back = from_bytes(msg)
    assert all((v.ctypes.data - base) % 64 == 0 for k, v in back.items() if k != "px") and back["b"].flags.writeable
    assert np.shares_memory(back["a"], np.frombuffer(msg, np.uint8))  # views of the message, not copies
    spec = Channel.create(readers=1)
    try:
        w, r = Channel(spec), Channel(spec, reader=0)
        w.send(frame)
        got_msg = r.recv()
        got = from_bytes(got_msg)
        assert torch.equal(got.pixels, obj["px"])
        assert (got.pixels.data_ptr() - np.frombuffer(got_msg, np.uint8).ctypes.data) % 64 == 0
    finally:
        Channel.unlink(spec)


def test_a_vision_plans_step_slots_hold_a_step_full_of_image_tokens():
    from types import SimpleNamespace

    from executors.channel import DEFAULT_CAPACITY
    from executors.config import model_args
    from executors.engine import Engine
    from tests.tiny.helpers import config, make_plan

    for name in ("llama", "qwen2_vl"):
        plan, a = make_plan(name, max_batch_tokens=16), model_args(config(name))
        cap = Engine._step_capacity(SimpleNamespace(args=a, plan=plan, pixel_dtype=torch.float32))
        extra = 0 if a.vision is None else 16 * a.vision.merge**2 * a.vision.patch_dim * 4
        assert cap == DEFAULT_CAPACITY + extra and (extra > 0) == (name == "qwen2_vl")
