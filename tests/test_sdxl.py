"""SDXL: the engine against diffusers' StableDiffusionXLPipeline on the same tiny random weights, and
SP-Guard's and SLD's invariants on SDXL's conditioning (two text encoders, pooled embeddings, time ids)."""

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from spguard import SLD, NegativePrompt, SafeDiffusionPipeline, SPGuard
from spguard.attention import ConceptAttention
from spguard.cli import main
from spguard.testing import SDXL_SCHEDULE, tiny_sdxl_components

from .helpers import gen
from .test_spguard import reference_attention_map

PROMPTS = ["a red cat", "a photo of a dog with a knife"]
MIXED = ["a red cat", "blood knife", "a photo of a dog", "peaceful garden"]
CONCEPT = "sky"
STEPS = 6
TIGHT = 1e-5


@functools.lru_cache(maxsize=None)
def components() -> dict:
    return tiny_sdxl_components()


def diffusers_sdxl(scheduler=None) -> StableDiffusionXLPipeline:
    parts = {**components(), **({} if scheduler is None else {"scheduler": scheduler})}
    pipe = StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(scheduler=None) -> SafeDiffusionPipeline:
    pipe = SafeDiffusionPipeline.from_pipe(diffusers_sdxl(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(prompts, method, seed=0, zeros=True, **kwargs):
    """`zeros`: SDXL base's force_zeros_for_empty_prompt. Under these random weights it makes every prompt's
    harmfulness near 1 (any text is far from the zero embedding), so tests that need benign rows turn it off."""
    pipe = ours()
    pipe.force_zeros_for_empty_prompt = zeros
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(prompts, method=method, generator=[gen(seed + k) for k in range(len(prompts))], output_type="np",
                **kwargs)


@pytest.mark.parametrize("scheduler_class", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_cfg_and_negative_prompt_equal_diffusers_sdxl(scheduler_class):
    scheduler = scheduler_class(**SDXL_SCHEDULE)
    kwargs = dict(num_inference_steps=STEPS, output_type="np", guidance_scale=6.0)
    expected = diffusers_sdxl(scheduler)(PROMPTS, generator=gen(0), **kwargs).images
    got = ours(scheduler)(PROMPTS, generator=gen(0), method="cfg", **kwargs)
    np.testing.assert_allclose(got.images, expected, atol=TIGHT)
    expected = diffusers_sdxl(scheduler)(PROMPTS, negative_prompt=["blood", "a knife"], generator=gen(1),
                                         **kwargs).images
    got = ours(scheduler)(PROMPTS, negative_prompt=["blood", "a knife"], generator=gen(1), method="cfg", **kwargs)
    np.testing.assert_allclose(got.images, expected, atol=TIGHT)
    got = ours(scheduler)(PROMPTS, generator=gen(1), method=NegativePrompt("blood"), **kwargs).images
    expected = diffusers_sdxl(scheduler)(PROMPTS, negative_prompt="blood", generator=gen(1), **kwargs).images
    np.testing.assert_allclose(got, expected, atol=TIGHT)


def test_defaults_and_micro_conditioning_equal_diffusers_sdxl():
    kwargs = dict(num_inference_steps=3, output_type="np", original_size=(64, 48), target_size=(24, 40),
                  crops_coords_top_left=(4, 8), height=24, width=40)
    expected = diffusers_sdxl()(PROMPTS[0], generator=gen(2), **kwargs).images
    got = ours()(PROMPTS[0], generator=gen(2), method="cfg", **kwargs).images
    assert got.shape == (1, 24, 40, 3)
    np.testing.assert_allclose(got, expected, atol=TIGHT)
    # The default size and guidance scale are diffusers' (sample size x VAE factor; 5.0).
    expected = diffusers_sdxl()(PROMPTS[0], generator=gen(3), num_inference_steps=2, output_type="np").images
    got = ours()(PROMPTS[0], generator=gen(3), num_inference_steps=2, output_type="np", method="cfg").images
    np.testing.assert_allclose(got, expected, atol=TIGHT)


def test_spguard_lambda_zero_equals_cfg():
    spg = run(MIXED, SPGuard(lambda_max=0, t_p=2, concepts=CONCEPT))
    np.testing.assert_allclose(spg.images, run(MIXED, "cfg").images, atol=TIGHT)


@pytest.mark.parametrize("mask", ["noise", "attention"])
def test_dropping_concept_rows_after_phase1_is_exact(mask):
    dropped = run(MIXED, SPGuard(t_p=2, mask=mask, concepts=CONCEPT), zeros=False)
    harmfulness = np.array([r.harmfulness for r in dropped.reports])
    assert (harmfulness <= 0).any() and (harmfulness > 0).any(), harmfulness
    kept = run(MIXED, SPGuard(t_p=2, mask=mask, concepts=CONCEPT, harmfulness_threshold=float("-inf")), zeros=False)
    np.testing.assert_allclose(dropped.images, kept.images, atol=TIGHT)
    plain = run(MIXED, "cfg", zeros=False)
    for k, r in enumerate(dropped.reports):
        if r.guided:
            assert np.abs(dropped.images[k] - plain.images[k]).max() > 1e-4
        else:
            np.testing.assert_allclose(dropped.images[k], plain.images[k], atol=TIGHT)


@pytest.mark.parametrize("mask", ["noise", "attention"])
def test_mixed_batch_rows_equal_each_row_alone(mask):
    method = SPGuard(t_p=2, mask=mask, concepts=[CONCEPT, "blood"])
    batch = run(MIXED, method, zeros=False)
    for k, prompt in enumerate(MIXED):
        alone = run([prompt], method, seed=k, zeros=False)
        np.testing.assert_allclose(batch.images[k], alone.images[0], atol=TIGHT)
        assert batch.reports[k].harmfulness == pytest.approx(alone.reports[0].harmfulness, abs=1e-5)
        assert batch.reports[k].concept == alone.reports[0].concept


@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_sld_with_its_warmup_at_the_last_step_equals_cfg(preset):
    warmup = SLD.PRESETS[preset][0]
    steps = max(warmup, 1)  # the warm-up ends at or past the last step: SLD never subtracts its term
    plain = run(PROMPTS, "cfg", num_inference_steps=steps)
    sld = run(PROMPTS, SLD(preset), num_inference_steps=steps)
    if warmup >= steps:
        np.testing.assert_allclose(sld.images, plain.images, atol=TIGHT)
    else:  # SLD-max guides from step 0: it must differ, the test is not vacuous
        assert np.abs(sld.images - plain.images).max() > 1e-4
    assert sld.reports[0].method == f"sld-{preset}"


def test_attention_capture_on_sdxl_blocks_equals_reference_of_the_layers_q_and_k():
    unet = components()["unet"]
    layers = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    assert any(".transformer_blocks.1." in n for n in layers)  # several transformer layers per block
    torch.manual_seed(0)
    x, t = torch.randn(5, 4, 16, 16), torch.tensor(500)
    kwargs = dict(encoder_hidden_states=torch.randn(5, 77, 64),
                  added_cond_kwargs={"text_embeds": torch.randn(5, 32), "time_ids": torch.randn(5, 6)})
    token_mask = torch.zeros(2, 77, dtype=torch.bool)
    token_mask[0, 1:4] = token_mask[1, 2:9] = True
    with ConceptAttention(unet, first_row=3) as capture:
        capture.begin(token_mask, (16, 16))
        unet(x, t, **kwargs)
        got = capture.take()
    expected = reference_attention_map(unet, 3, token_mask, (16, 16), lambda: unet(x, t, **kwargs))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_concept_rows_carry_their_own_pooled_embeddings():
    pipe, outputs = ours(), []
    pipe.unet.register_forward_pre_hook(lambda m, a, k: outputs.append(k["added_cond_kwargs"]["text_embeds"]),
                                        with_kwargs=True)
    try:
        pipe("a red cat", method=SPGuard(t_p=1, concepts=["blood", "blue sky"]), num_inference_steps=1, seed=0)
    finally:
        pipe.unet._forward_pre_hooks.clear()
    pooled = outputs[0]
    assert pooled.shape[0] == 4  # [null, prompt, two concepts]
    assert (pooled[0] == 0).all()  # force_zeros_for_empty_prompt
    concepts = pipe._encode(["blood", "blue sky"]).pooled
    torch.testing.assert_close(pooled[2:], concepts)


def test_from_pretrained_of_saved_sdxl_folder_equals_from_pipe(tmp_path):
    diffusers_sdxl().save_pretrained(tmp_path)
    loaded = SafeDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder_2 is not None and loaded.force_zeros_for_empty_prompt
    kwargs = dict(num_inference_steps=3, output_type="np", method=SPGuard(t_p=2, mask="attention"), seed=4)
    np.testing.assert_allclose(loaded(PROMPTS, **kwargs).images, ours()(PROMPTS, **kwargs).images, atol=TIGHT)


def test_cli_generates_from_a_saved_sdxl_folder(tmp_path):
    model = tmp_path / "sdxl"
    diffusers_sdxl().save_pretrained(model)
    out = tmp_path / "out"
    rc = main(["generate", "a red cat", "blood knife", "--model", str(model), "--steps", "3", "--t-p", "2",
               "--mask", "attention", "--concept", "sky", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    expected = ours()(["a red cat", "blood knife"], seed=[0, 1], num_inference_steps=3,
                      method=SPGuard(t_p=2, mask="attention", concepts="sky"))
    for report, exp in zip(reports, expected.reports):
        assert report["harmfulness"] == pytest.approx(exp.harmfulness, abs=1e-5)
    for report, image in zip(reports, expected.images):
        np.testing.assert_array_equal(np.asarray(Image.open(out / report["image"])), np.asarray(image))
