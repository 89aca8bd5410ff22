"""Registration of the fused ops: opcheck, the dispatcher's choice (auto and named backends), torch.compile,
GPU-only checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spguard import ops, use_backend
from spguard.ops import cases, reference
from spguard.ops.checks import backend_device, backend_params, interpreted

ROOT = Path(__file__).resolve().parents[1]
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


def test_the_checkouts_kernels_folder_hands_top_level_imports_to_the_installed_kernels(tmp_path):
    """From a checkout's root, `import kernels` (Hugging Face's package, which transformers 5.25 on depends on and
    imports) finds this repository's Triton folder first. The folder must hand the import over to the installed
    package, here a stand-in placed right after the root on sys.path, and must not register the triton ops a
    second time: that destroys the operators spguard.ops holds, and a later call reads freed memory."""
    pytest.importorskip("triton")
    installed = tmp_path / "kernels"
    installed.mkdir()
    (installed / "__init__.py").write_text("INSTALLED = True\n")
    script = """
import importlib, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from torch._library.custom_ops import OPDEFS
import spguard.ops
before = {name: op for name, op in OPDEFS.items() if name.startswith("spguard::") and name.endswith("_triton")}
top = importlib.import_module("kernels")
assert getattr(top, "INSTALLED", False), top.__file__
assert sys.modules["kernels"] is top
assert len(before) == 3 and all(OPDEFS[name] is op for name, op in before.items()), "registered twice"
"""
    run = subprocess.run([sys.executable, "-c", script, str(ROOT), str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr


def test_backends_lists_every_backend_with_a_reason():
    info = ops.backends()
    assert [b.name for b in info] == list(ops.BACKENDS)
    assert info[0].available and all(b.detail for b in info)


def kernel_refusals():
    """Inputs the reference takes and the kernels do not, per op, with the kernels' reason."""
    e_u, e_p, e_s = cases.latent_triplet(3, 4, 5, 6)
    strength = cases.strength(3)
    q, k, mask = cases.attention_inputs(2, 2, 9, 7, 16)
    return [
        ("cross_attention_aggregate", (q.double(), k.double(), mask), "float64"),
        ("cross_attention_aggregate", (q.half(), k, mask), "different dtypes"),
        ("cross_attention_aggregate", (q, k[:1], mask[:1]), "disagree"),  # k and mask broadcast over the batch
        ("cross_attention_aggregate", (q, k[:, :, :0], mask[:, :0]), "at least one head, token"),
        ("phase1_step", (e_u.double(), e_p.double(), e_s.double()[:, None], 7.5), "float64"),
        ("phase1_step", (e_u, e_p.half(), e_s[:, None], 7.5), "different dtypes"),
        ("phase2_step", (e_u.half(), e_p, e_s, strength, 7.5, 0.9, None), "different dtypes"),
        ("phase2_step", (e_u, e_p, e_s, strength[:1], 7.5, 0.9, None), "one value per sample"),  # broadcast
    ]


@pytest.mark.parametrize("index", range(len(kernel_refusals())))
def test_auto_never_fails_where_the_reference_works(index):
    op, args, _ = kernel_refusals()[index]
    with use_backend("auto"):
        assert ops.backend_for(op, *args) == "torch"
        got = getattr(ops, op)(*args)
    want = getattr(reference, op)(*args)
    for g, w in zip(*((got, want) if isinstance(got, tuple) else ((got,), (want,)))):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
@pytest.mark.parametrize("index", range(len(kernel_refusals())))
def test_a_named_backend_that_cannot_take_the_inputs_fails_with_the_reason(backend, index):
    op, args, reason = kernel_refusals()[index]
    if not {b.name: b for b in ops.backends()}[backend].available:
        reason = "the backend is not available"
    elif backend_device(backend).type != "cpu":  # the inputs are CPU tensors
        reason = "it takes cuda tensors, not cpu"
    with use_backend(backend), pytest.raises(ValueError) as raised:
        getattr(ops, op)(*args)
    message = str(raised.value)
    assert "\n" not in message and f"backend {backend!r} cannot run {op}" in message and reason in message


def test_auto_takes_the_fastest_backend_that_fits():
    q, k, mask = cases.attention_inputs(2, 2, 9, 7, 16)
    cpp = next(b for b in ops.backends() if b.name == "cpp").available
    with use_backend("auto"):
        assert ops.backend_for("cross_attention_aggregate", q, k, mask) == ("cpp" if cpp else "torch")
        assert ops.backend_for("cross_attention_aggregate", q.bfloat16(), k.bfloat16(), mask) == (
            "cpp" if cpp else "torch")


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_a_kernel_limit_refuses_only_its_backend(backend, select_backend):
    device = select_backend(backend)
    q, k, mask = cases.attention_inputs(1, 1, 3, 5, 320, device=device)  # wider heads than Triton's tile
    with pytest.raises(ValueError, match="head_dim 320 exceeds the Triton kernel's 256"):
        ops.cross_attention_aggregate(q, k, mask)
    with use_backend("auto"):
        torch.testing.assert_close(ops.cross_attention_aggregate(q, k, mask),
                                   reference.cross_attention_aggregate(q, k, mask))


def test_use_backend_nests_and_rejects_unknown_names():
    before = ops.selected_backend()
    with use_backend("torch"):
        with use_backend("CPP"):
            assert ops.selected_backend() == "cpp"
        assert ops.selected_backend() == "torch"
    assert ops.selected_backend() == before
    with pytest.raises(ValueError, match="unknown spguard backend 'nonsense'; choose from auto, torch"):
        with use_backend("nonsense"):
            pass


def test_spguard_backend_is_read_once_at_import():
    code = ("import os, spguard.ops as o; os.environ['SPGUARD_BACKEND'] = 'cpp'; print(o.selected_backend())")
    env = dict(os.environ, SPGUARD_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


def guidance_step(e_u, e_p, e_s, strength, attention):
    """A sampling step's guidance as the engine runs it: phase-1 statistics, then the phase-2 output."""
    _, dot, sq_p, sq_s = ops.phase1_step(e_u, e_p, e_s[:, None], 7.5)
    eps, weight = ops.phase2_step(e_u, e_p, e_s, strength * (dot[:, 0] > 0), 7.5, 0.9, attention)
    return eps, weight, sq_p, sq_s


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params("cpp"))
def test_compile_fullgraph_on_cpu(backend, select_backend):
    select_backend(backend)
    torch._dynamo.reset()
    args = small_args()["phase2_step"]
    inputs = (*args[:4], args[6])
    compiled = torch.compile(guidance_step, fullgraph=True)
    for got, want in zip(compiled(*inputs), guidance_step(*inputs)):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_step_never_syncs_and_graph_captures(backend, select_backend):
    device = select_backend(backend)
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
