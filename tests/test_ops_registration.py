"""Registration of the fused ops: opcheck, backend choice and fallback, torch.compile, GPU-only checks."""

from __future__ import annotations

import pytest
import torch

from spguard import ops
from spguard.ops import cases, reference
from spguard.ops.checks import backend_device, backend_params, interpreted, select_backend

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def small_args(device="cpu", dtype=torch.float32):
    e_u, e_p, e_s = cases.latent_triplet(2, 4, 5, 6, dtype=dtype, device=device)
    strength = cases.strength(2, device=device)
    attention = cases.attention_map(2, 30, device=device)
    q, k, mask = cases.attention_inputs(2, 2, 30, 7, 16, dtype=dtype, device=device)
    return {
        "phase1_step": (e_u, e_p, e_s[:, None], 7.5),
        "phase2_step": (e_u, e_p, e_s, strength, 7.5, 0.9, attention),
        "phase2_step/noise": (e_u, e_p, e_s, strength, 7.5, 0.9, None),
        "cross_attention_aggregate": (q, k, mask),
    }


OP_SUFFIX = {"cpp": "", "cuda": "", "triton": "_triton"}


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
@pytest.mark.parametrize("case", list(small_args()))
def test_opcheck(backend, case):
    op = getattr(torch.ops.spguard, case.split("/")[0] + OP_SUFFIX[backend])
    tests = OPCHECK_TESTS
    if interpreted(backend):
        # AOT dispatch traces a triton_op into its kernel launch, which the interpreter cannot run on
        # fake tensors; on a GPU the launch becomes a graph node and the check runs.
        tests = tuple(t for t in tests if t != "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, small_args(backend_device(backend))[case], test_utils=tests)


def test_backends_lists_every_backend_with_a_reason():
    info = ops.backends()
    assert [b.name for b in info] == list(ops.BACKENDS)
    assert info[0].available and all(b.detail for b in info)


def test_auto_and_fallback(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("SPGUARD_BACKEND", "auto")
    expected = "cpp" if any(b.name == "cpp" and b.available for b in ops.backends()) else "torch"
    assert ops.resolve_backend(cpu, torch.float32) == expected
    assert ops.resolve_backend(cpu, torch.float64) == "torch"  # kernels take fp32/fp16/bf16 only
    monkeypatch.setenv("SPGUARD_BACKEND", "cuda")
    assert ops.resolve_backend(cpu, torch.float32) == "torch"  # cannot take CPU tensors
    monkeypatch.setenv("SPGUARD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown spguard backend"):
        ops.resolve_backend(cpu, torch.float32)


def test_mixed_dtypes_take_the_reference(monkeypatch):
    e_u, e_p, e_s = cases.latent_triplet(1, 4, 5, 6)
    out = ops.phase2_step(e_u.half(), e_p, e_s, torch.ones(1), 7.5, 0.9)
    torch.testing.assert_close(out[0], reference.phase2_step(e_u.half(), e_p, e_s, torch.ones(1), 7.5, 0.9)[0])


def guidance_step(e_u, e_p, e_s, strength, attention):
    """A sampling step's guidance as the engine runs it: phase-1 statistics, then the phase-2 output."""
    _, dot, sq_p, sq_s = ops.phase1_step(e_u, e_p, e_s[:, None], 7.5)
    eps, weight = ops.phase2_step(e_u, e_p, e_s, strength * (dot[:, 0] > 0), 7.5, 0.9, attention)
    return eps, weight, sq_p, sq_s


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_compile_fullgraph_on_cpu(backend, monkeypatch):
    select_backend(monkeypatch, backend)
    torch._dynamo.reset()
    args = small_args()["phase2_step"]
    inputs = (*args[:4], args[6])
    compiled = torch.compile(guidance_step, fullgraph=True)
    for got, want in zip(compiled(*inputs), guidance_step(*inputs)):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_step_never_syncs_and_graph_captures(backend, monkeypatch):
    device = select_backend(monkeypatch, backend)
    e_u, e_p, e_s = cases.latent_triplet(2, 4, 64, 64, device=device)
    strength = cases.strength(2, device=device)
    attention = cases.attention_map(2, 64 * 64, device=device)
    guidance_step(e_u, e_p, e_s, strength, attention)  # warm up (kernel compilation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        guidance_step(e_u, e_p, e_s, strength, attention)
        guidance_step(e_u, e_p, e_s, strength, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch._dynamo.reset()
    compiled = torch.compile(guidance_step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        got = compiled(e_u, e_p, e_s, strength, attention)
    for g, w in zip(got, guidance_step(e_u, e_p, e_s, strength, attention)):
        torch.testing.assert_close(g, w)
