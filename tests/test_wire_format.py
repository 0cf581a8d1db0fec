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
