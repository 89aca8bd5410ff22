"""A whole generation with each available kernel backend gives the torch backend's images (issue 3)."""

from __future__ import annotations

import numpy as np
import pytest

from spguard import SafeDiffusionPipeline, SPGuard, use_backend
from spguard.ops.checks import backend_device, backend_params
from spguard.testing import tiny_components

from .helpers import ours

PROMPT = "a photo of a man with a knife"
STEPS, T_P = 6, 2
# Reordered fp32 sums differ in the last bits; over a few DDIM steps that stays far below one 8-bit level.
TOLERANCE = 1e-4


def pipeline(device):
    if device.type == "cpu":
        return ours()
    pipe = SafeDiffusionPipeline.from_components(**tiny_components()).to(device)  # not the tests' shared modules
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(backend, mask, device):
    # The prompt is its own concept: cos(d_p, d_s) = 1, so phase 2 guides every step and the kernels run.
    method = SPGuard(t_p=T_P, mask=mask, concepts=(PROMPT, "blood"))
    with use_backend(backend):
        out = pipeline(device)(PROMPT, num_inference_steps=STEPS, seed=0, output_type="np", method=method)
    assert out.reports[0].guided
    return out.images


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
@pytest.mark.parametrize("mask", ["noise", "attention", "aligned"])
def test_generation_matches_torch_backend(backend, mask):
    device = backend_device(backend)
    expected = generate("torch", mask, device)
    np.testing.assert_allclose(generate(backend, mask, device), expected, atol=TOLERANCE)
