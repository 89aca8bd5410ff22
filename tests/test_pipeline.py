"""The engine against diffusers' own pipelines on the same tiny weights, and its general contracts."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

import spguard
from spguard import SLD, SafeDiffusionPipeline, SPGuard
from spguard.loading import ModelLoadError
from spguard.testing import SD_SCHEDULE

from .helpers import STEPS, components, diffusers_pipe, gen, ours

PROMPTS = ["a red cat", "a photo of a dog with a knife"]
TIGHT = 1e-5  # fp32 on the same weights: only batch-composition effects of the UNet kernels remain


def test_cfg_equals_diffusers_stable_diffusion():
    expected = diffusers_pipe()(PROMPTS, num_inference_steps=STEPS, generator=gen(0), output_type="np").images
    got = ours()(PROMPTS, num_inference_steps=STEPS, generator=gen(0), output_type="np", method="cfg").images
    np.testing.assert_allclose(got, expected, atol=TIGHT)


def test_negative_prompt_equals_diffusers():
    kwargs = dict(num_inference_steps=STEPS, generator=gen(1), output_type="np")
    expected = diffusers_pipe()(PROMPTS, negative_prompt=["blood", "a knife"], **kwargs).images
    got = ours()(PROMPTS, method=spguard.NegativePrompt("blood"), **{**kwargs, "generator": gen(1)}).images
    np.testing.assert_allclose(got[0], expected[0], atol=TIGHT)
    got = ours()(PROMPTS, negative_prompt=["blood", "a knife"], method="cfg", **{**kwargs, "generator": gen(1)})
    np.testing.assert_allclose(got.images, expected, atol=TIGHT)


def test_sld_concept_is_diffusers_default():
    assert diffusers_pipe(safe=True)._safety_text_concept == spguard.SLD_CONCEPT


@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_sld_presets_equal_diffusers_safe_pipeline(preset):
    steps = 18  # past SLD-weak's 15 warm-up steps, so every preset guides
    config = getattr(SafetyConfig, preset.upper())
    expected = diffusers_pipe(safe=True)(
        PROMPTS, num_inference_steps=steps, generator=gen(2), output_type="np", **config).images
    got = ours()(PROMPTS, num_inference_steps=steps, generator=gen(2), output_type="np", method=SLD(preset)).images
    np.testing.assert_allclose(got, expected, atol=TIGHT)
    # The guidance did something: SLD differs from plain CFG.
    plain = ours()(PROMPTS, num_inference_steps=steps, generator=gen(2), output_type="np", method="cfg").images
    assert np.abs(got - plain).max() > 1e-3


@pytest.mark.parametrize(
    "scheduler_class",
    [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
     PNDMScheduler],
)
def test_any_scheduler_matches_diffusers(scheduler_class):
    scheduler = scheduler_class(**SD_SCHEDULE)
    expected = diffusers_pipe(scheduler=scheduler)(
        PROMPTS, num_inference_steps=STEPS, generator=gen(3), output_type="np").images
    pipe = SafeDiffusionPipeline.from_components(**{**components(), "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    got = pipe(PROMPTS, num_inference_steps=STEPS, generator=gen(3), output_type="np", method="cfg").images
    np.testing.assert_allclose(got, expected, atol=TIGHT)
    # SP-Guard runs on every scheduler too, and differs from CFG only where it guides.
    guided = pipe(PROMPTS, num_inference_steps=STEPS, generator=gen(3), output_type="np",
                  method=SPGuard(t_p=3)).images
    assert np.isfinite(guided).all()


def test_from_pretrained_of_saved_folder_equals_components(tmp_path):
    diffusers_pipe().save_pretrained(tmp_path)
    loaded = SafeDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=STEPS, output_type="np", method=SPGuard(t_p=3))
    np.testing.assert_array_equal(loaded(PROMPTS, seed=4, **kwargs).images, ours()(PROMPTS, seed=4, **kwargs).images)


def test_from_pretrained_reads_model_defaults(tmp_path):
    diffusers_pipe().save_pretrained(tmp_path)
    defaults = {"concepts": ["a knife", "blood"], "guidance_scale": 3.0, "spguard": {"t_p": 2}}
    (tmp_path / "spguard.json").write_text(json.dumps(defaults))
    pipe = SafeDiffusionPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS, num_inference_steps=4, seed=0, output_type="latent", method="spguard")
    assert all(r.guided_steps in ([], [2, 3]) for r in out.reports)
    assert {r.concept for r in out.reports} <= {"a knife", "blood"}
    explicit = ours()(PROMPTS, num_inference_steps=4, seed=0, output_type="latent", guidance_scale=3.0,
                      method=SPGuard(t_p=2, concepts=["a knife", "blood"]))
    torch.testing.assert_close(out.images, explicit.images, rtol=0, atol=TIGHT)


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        SafeDiffusionPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        SafeDiffusionPipeline.from_pretrained(tmp_path)


def test_from_pipe_shares_components():
    pipe = diffusers_pipe()
    safe = SafeDiffusionPipeline.from_pipe(pipe)
    assert safe.unet is pipe.unet and safe.text_encoder is pipe.text_encoder


def test_reproducible_for_a_seed_and_output_types():
    pipe = ours()
    a = pipe(PROMPTS, num_inference_steps=4, seed=7, output_type="np").images
    b = pipe(PROMPTS, num_inference_steps=4, seed=7, output_type="np").images
    np.testing.assert_array_equal(a, b)
    pil = pipe(PROMPTS, num_inference_steps=4, seed=7, output_type="pil").images
    assert pil[0].size == (32, 32)
    np.testing.assert_array_equal(np.asarray(pil[0]), (a[0] * 255).round().astype("uint8"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(dtype):
    kwargs = dict(num_inference_steps=4, output_type="np", method=SPGuard(t_p=2))
    reference = ours()(PROMPTS, seed=5, **kwargs).images
    pipe = SafeDiffusionPipeline.from_components(**components(1)).to(dtype=dtype)
    try:
        pipe.set_progress_bar_config(disable=True)
        low = pipe(PROMPTS, seed=5, **kwargs)
    finally:
        pipe.to(dtype=torch.float32)
    fp32 = SafeDiffusionPipeline.from_components(**components(1))
    fp32.set_progress_bar_config(disable=True)
    reference = fp32(PROMPTS, seed=5, **kwargs).images
    assert low.images.dtype == np.float32
    assert np.abs(low.images - reference).mean() < 0.02


def test_bad_arguments():
    pipe = ours()
    with pytest.raises(ValueError, match="no prompts"):
        pipe([], num_inference_steps=2)
    with pytest.raises(ValueError, match="must be an integer from 1"):
        pipe("a cat", num_inference_steps=0)
    with pytest.raises(ValueError, match="unknown method"):
        pipe("a cat", method="nope")
    with pytest.raises(ValueError, match="q must lie"):
        SPGuard(q=1.0)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("a cat", height=33, num_inference_steps=1)
    with pytest.raises(ValueError, match="either generator or seed"):
        pipe("a cat", seed=1, generator=gen(1), num_inference_steps=1)


def test_long_prompt_is_truncated_with_a_warning(caplog):
    long_prompt = " ".join(["cat"] * 200)
    out = ours()(long_prompt, num_inference_steps=1, seed=0, output_type="latent", method="cfg")
    assert out.images.shape[0] == 1
    assert "truncated" in caplog.text


def test_step_callback_sees_every_step_with_the_tensors_it_asked_for():
    pipe, seen = ours(), []

    def callback(p, i, t, tensors):
        assert p is pipe
        seen.append((i, t, sorted(tensors), tensors["guidance_mask"].clone(), tensors["latents"].clone()))
        return {}

    out = pipe(PROMPTS, num_inference_steps=6, seed=0, output_type="latent", method=SPGuard(t_p=2, concepts="blood"),
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "guidance_mask"])
    assert [s[0] for s in seen] == list(range(6))
    assert [int(s[1]) for s in seen] == pipe.scheduler.timesteps.tolist()
    assert all(s[2] == ["guidance_mask", "latents"] for s in seen)
    torch.testing.assert_close(seen[-1][4], out.images, rtol=0, atol=0)
    assert all((s[3] == 0).all() for s in seen[:2])  # phase 1 does not guide
    for b, report in enumerate(out.reports):  # phase 2: the mask the reports summarise
        coverage = [(s[3][b] > 0).float().mean().item() for s in seen[2:]]
        assert coverage == pytest.approx(report.mask_coverage if report.guided else [0.0] * 4)
    assert any(r.guided for r in out.reports)


def test_step_callback_may_replace_the_latents():
    def zero_last(p, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 3 else {}

    out = ours()("a red cat", num_inference_steps=4, seed=0, output_type="latent", method="cfg",
                 callback_on_step_end=zero_last)
    assert (out.images == 0).all()


def test_interrupt_stops_the_loop_after_the_step():
    pipe, steps, latents = ours(), [], []

    def stop_at_2(p, i, t, tensors):
        steps.append(i)
        latents.append(tensors["latents"].clone())
        p.interrupt = i == 2
        return {}

    method = SPGuard(t_p=2, concepts="blood", harmfulness_threshold=float("-inf"))
    out = pipe(PROMPTS, num_inference_steps=8, seed=0, output_type="latent", method=method,
               callback_on_step_end=stop_at_2)
    assert steps == [0, 1, 2]
    torch.testing.assert_close(out.images, latents[-1], rtol=0, atol=0)
    assert all(r.guided_steps == [2] and len(r.mask_coverage) == 1 for r in out.reports)
    # The next call starts afresh and runs every step.
    again = pipe(PROMPTS, num_inference_steps=8, seed=0, output_type="latent", method=method)
    assert all(r.guided_steps == list(range(2, 8)) for r in again.reports)


def test_step_callback_rejects_unknown_tensor_names():
    with pytest.raises(ValueError, match="guidance_mask"):  # CFG offers no mask: the error lists what it has
        ours()("a red cat", num_inference_steps=1, method="cfg", callback_on_step_end=lambda *a: {},
               callback_on_step_end_tensor_inputs=["guidance_mask"])


def test_sampling_loop_names_no_method():
    import ast
    import inspect
    import textwrap

    from spguard import methods

    tree = ast.parse(textwrap.dedent(inspect.getsource(SafeDiffusionPipeline.__call__)))
    body = tree.body[0].body
    names = {n.id for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    names |= {n.attr for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Attribute)}
    strings = {n.value for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Constant)}
    assert not names & {"CFG", "NegativePrompt", "SLD", "SPGuard", "ConceptAttention"}
    assert not strings & (set(methods.METHOD_NAMES) | {"sld", "attention", "noise"})
    assert "isinstance" not in names or all(  # isinstance only on the prompt
        ast.unparse(c.args[0]) == "prompt" for stmt in body for c in ast.walk(stmt)
        if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "isinstance")


@pytest.mark.parametrize("preset", ["weak", "max"])
def test_reports_name_the_sld_preset(preset):
    out = ours()("a red cat", num_inference_steps=1, seed=0, output_type="latent", method=f"sld-{preset}")
    assert out.reports[0].method == f"sld-{preset}"
    assert SLD(preset).name == f"sld-{preset}"


def test_negative_method_takes_the_given_negative_prompt():
    kwargs = dict(num_inference_steps=STEPS, output_type="np")
    expected = diffusers_pipe()(PROMPTS, negative_prompt=["blood", "a knife"], generator=gen(1), **kwargs).images
    got = ours()(PROMPTS, method="negative", negative_prompt=["blood", "a knife"], generator=gen(1), **kwargs)
    np.testing.assert_allclose(got.images, expected, atol=TIGHT)
    with pytest.raises(ValueError, match="already carries its text"):
        ours()(PROMPTS, method=spguard.NegativePrompt("gore"), negative_prompt="blood", **kwargs)
