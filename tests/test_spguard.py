"""SP-Guard's defining properties on the tiny model: exactness of the shortcuts, Eq. 6 and Eq. 8."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from spguard import SPGuard
from spguard.attention import ConceptAttention
from spguard.ops import reference

from .helpers import STEPS, components, gen, ours

# Prompts whose harmfulness against CONCEPT under the tiny random model is positive for some rows and
# negative for others (asserted below, so the tests keep meaning what they say).
MIXED = ["a red cat", "blood knife", "a photo of a dog", "peaceful garden"]
CONCEPT = "blue sky"
TIGHT = 1e-5


def run(prompts, method, seed=0, **kwargs):
    generators = [gen(seed + k) for k in range(len(prompts))]
    kwargs.setdefault("num_inference_steps", STEPS)
    return ours()(prompts, method=method, generator=generators, output_type="np", **kwargs)


def test_lambda_zero_equals_cfg():
    np.testing.assert_allclose(run(MIXED, SPGuard(lambda_max=0, t_p=3, concepts=CONCEPT)).images, run(MIXED, "cfg").images, atol=TIGHT)


def test_dropping_concept_rows_after_phase1_is_exact():
    method = SPGuard(t_p=3, concepts=CONCEPT)
    dropped = run(MIXED, method)
    harmfulness = np.array([r.harmfulness for r in dropped.reports])
    assert (harmfulness <= 0).any() and (harmfulness > 0).any(), harmfulness
    # A threshold of -inf keeps every concept row in the batch throughout (P+ = 0 gives mu = 0).
    kept = run(MIXED, SPGuard(t_p=3, concepts=CONCEPT, harmfulness_threshold=float("-inf")))
    np.testing.assert_allclose(dropped.images, kept.images, atol=TIGHT)
    assert [r.guided for r in dropped.reports] == list(harmfulness > 0)
    assert all(r.guided for r in kept.reports)


def test_benign_rows_equal_cfg_and_harmful_rows_are_guided():
    spg = run(MIXED, SPGuard(t_p=3, concepts=CONCEPT))
    plain = run(MIXED, "cfg")
    for k, r in enumerate(spg.reports):
        if r.guided:
            assert np.abs(spg.images[k] - plain.images[k]).max() > 1e-4
            assert r.guided_steps == list(range(3, STEPS)) and len(r.mask_coverage) == STEPS - 3
        else:
            np.testing.assert_allclose(spg.images[k], plain.images[k], atol=TIGHT)
            assert r.guided_steps == [] and r.mask_coverage == []


@pytest.mark.parametrize("mask", ["noise", "attention", "aligned"])
def test_mixed_batch_rows_equal_each_row_alone(mask):
    method = SPGuard(t_p=3, mask=mask, concepts=CONCEPT)
    batch = run(MIXED, method)
    for k, prompt in enumerate(MIXED):
        alone = run([prompt], method, seed=k)
        np.testing.assert_allclose(batch.images[k], alone.images[0], atol=TIGHT)
        assert batch.reports[k].harmfulness == pytest.approx(alone.reports[0].harmfulness, abs=1e-5)


def record_unet_outputs(outputs: list):
    """A step callback that keeps each step's UNet output on [null, prompt, concept rows]."""
    def callback(pipe, i, t, tensors):
        outputs.append(tensors["unet_output"].clone())
        return {}
    return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["unet_output"])


# None: Eq. 6's uniform mean; else step_weights (one more than t_p: the extra one is never read).
@pytest.mark.parametrize("step_weights", [None, (3.0, 0.0, 1.0, 0.5, 9.0)])
def test_harmfulness_equals_hand_computation(step_weights):
    outputs = []
    concepts = ["a knife", "blood", "a peaceful garden"]
    t_p, batch = 4, len(MIXED)
    weights = step_weights or (1.0,) * t_p
    method = SPGuard(t_p=t_p, concepts=concepts, step_weights=step_weights)
    out = ours()(MIXED, method=method, num_inference_steps=6, seed=0, output_type="latent",
                 **record_unet_outputs(outputs))
    sims = torch.zeros(batch, len(concepts))
    for noise, w in zip(outputs[:t_p], weights):
        e_u, e_p = noise[:batch], noise[batch : 2 * batch]
        e_s = noise[2 * batch :].view(batch, len(concepts), *noise.shape[1:])
        for j in range(len(concepts)):
            sims[:, j] += w * F.cosine_similarity((e_p - e_u).flatten(1), (e_s[:, j] - e_u).flatten(1), dim=1)
    expected, argmax = (sims / sum(weights[:t_p])).max(1)
    for k, r in enumerate(out.reports):
        assert r.harmfulness == pytest.approx(expected[k].item(), abs=1e-5)
        assert r.concept == concepts[argmax[k]]
    # Phase 2 evaluates one concept row per guided sample, none for the others.
    guided = sum(r.guided for r in out.reports)
    assert [o.shape[0] for o in outputs] == [batch * (2 + len(concepts))] * t_p + [2 * batch + guided] * 2


def test_without_harmfulness_scaling_every_guided_prompt_gets_lambda():
    # Strength lambda(i) * P+ (Eq. 7) against lambda(i) alone: with a constant lambda (the step schedule,
    # never dropping), the unscaled run at lambda_max equals the scaled run at lambda_max / P, per prompt.
    constant = dict(t_p=3, concepts=CONCEPT, schedule="step", t_drop=STEPS)
    unscaled = run(MIXED, SPGuard(lambda_max=2.0, scale_by_harmfulness=False, **constant))
    scaled = run(MIXED, SPGuard(lambda_max=2.0, **constant))
    guided = [k for k, r in enumerate(unscaled.reports) if r.guided]
    assert guided and all(0 < unscaled.reports[k].harmfulness < 1 for k in guided)
    for k in guided:
        p = unscaled.reports[k].harmfulness
        alone = run([MIXED[k]], SPGuard(lambda_max=2.0 / p, **constant), seed=k)
        np.testing.assert_allclose(unscaled.images[k], alone.images[0], atol=1e-4)
        assert np.abs(unscaled.images[k] - scaled.images[k]).max() > 1e-3
    with pytest.raises(ValueError, match="scale_by_harmfulness"):
        SPGuard(scale_by_harmfulness="no")


def step_recorder(steps: list):
    def callback(pipe, i, t, tensors):
        steps.append(i)
        return {}
    return dict(callback_on_step_end=callback)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm-multistep", "euler-ancestral"])
def test_guiding_from_before_t_p_equals_phase2_from_that_step(scheduler):
    # With one concept, every prompt guided and lambda unscaled by P, the only difference between phase 2
    # from step 2 and phase 2 from step 2 after going back from t_p = 5 is the detour, which the loop must
    # undo exactly: latents, a multistep scheduler's past outputs, a stochastic scheduler's generators.
    # (The noise mask: the aligned mask also uses what the detour saw, test_aligned_region_...below.)
    schedulers = {"dpm-multistep": DPMSolverMultistepScheduler, "euler-ancestral": EulerAncestralDiscreteScheduler}
    def pipe():
        p = ours()
        if scheduler in schedulers:
            p.scheduler = schedulers[scheduler].from_config(p.scheduler.config)
        return p
    every = dict(concepts=CONCEPT, harmfulness_threshold=float("-inf"), scale_by_harmfulness=False, mask="noise")
    steps = []
    back = pipe()(MIXED, method=SPGuard(t_p=5, guide_from=2, **every), generator=[gen(k) for k in range(4)],
                  num_inference_steps=STEPS, output_type="np", **step_recorder(steps))
    direct = pipe()(MIXED, method=SPGuard(t_p=2, **every), generator=[gen(k) for k in range(4)],
                    num_inference_steps=STEPS, output_type="np")
    np.testing.assert_allclose(back.images, direct.images, atol=TIGHT)
    assert steps == [0, 1, 2, 3, 4] + list(range(2, STEPS))
    assert all(r.guided_steps == list(range(2, STEPS)) for r in back.reports)
    assert np.abs(back.images - run(MIXED, "cfg").images).max() > 1e-3  # the guidance did something


def test_guiding_from_before_t_p_leaves_unguided_prompts_as_cfg_draws_them():
    method = SPGuard(t_p=4, guide_from=1, concepts=CONCEPT)
    steps = []
    out = run(MIXED, method, **step_recorder(steps))
    plain, paper = run(MIXED, "cfg"), run(MIXED, SPGuard(t_p=4, concepts=CONCEPT))
    guided = [r.guided for r in out.reports]
    assert any(guided) and not all(guided), guided
    assert steps == [0, 1, 2, 3] + list(range(1, STEPS))
    for k, r in enumerate(out.reports):
        assert r.harmfulness == pytest.approx(paper.reports[k].harmfulness, abs=1e-6)  # P is still Eq. 6 at t_p
        if r.guided:
            assert r.guided_steps == list(range(1, STEPS)) and len(r.mask_coverage) == STEPS - 1
            assert np.abs(out.images[k] - paper.images[k]).max() > 1e-4
        else:
            np.testing.assert_allclose(out.images[k], plain.images[k], atol=TIGHT)
    # A batch with no guided prompt never goes back; guide_from = t_p is the paper's timing.
    benign = [p for p, g in zip(MIXED, guided) if not g]
    steps.clear()
    run(benign, method, **step_recorder(steps))
    assert steps == list(range(STEPS))
    for paper_timing in (4, 5):  # guide_from at or above t_p
        np.testing.assert_array_equal(run(MIXED, SPGuard(t_p=4, guide_from=paper_timing, concepts=CONCEPT)).images,
                                      paper.images)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="guide_from"):
            SPGuard(t_p=4, guide_from=bad)


def test_noise_mask_selects_exactly_above_the_q_quantile():
    torch.manual_seed(0)
    e_u, e_p, e_s = torch.randn(3, 2, 4, 7, 9).unbind(0)
    q = 0.9
    _, weight = reference.phase2_step(e_u, e_p, e_s, torch.ones(2), 7.5, q)
    for b in range(2):
        magnitude = (e_s[b] - e_u[b]).abs().numpy()
        eta = np.quantile(magnitude, q, method="lower")  # sorted[floor(q (n-1))], docs/design.md, "The quantile"
        np.testing.assert_array_equal(weight[b].numpy() > 0, magnitude > eta)
    assert (weight[weight > 0] >= 1).all() and (weight <= 2).all()  # M = 1 + |psi| inside R


def test_aligned_mask_selects_where_the_prompt_draws_the_concept():
    # Per pixel: rows 0-1, the largest concept directions, which the prompt opposes (a benign object the
    # concept would repaint); rows 2-3, as large, where the prompt barely draws (background the concept text
    # would fill); rows 4-5, smaller, where the prompt draws what the concept would; elsewhere orthogonal.
    torch.manual_seed(0)
    B, C, H, W = 2, 4, 6, 8
    e_u = torch.randn(B, C, H, W)
    d_s = F.normalize(torch.randn(B, C, H, W), dim=1)  # |d_s| 1 per pixel ...
    d_s[:, :, :4] *= 3  # ... and 3 on rows 0-3
    d_p = torch.randn(B, C, H, W)
    d_p -= (d_p * d_s).sum(1, keepdim=True) / d_s.square().sum(1, keepdim=True) * d_s  # orthogonal to d_s
    d_p[:, :, :2] = -d_s[:, :, :2]
    d_p[:, :, 2:4] = 0.05 * d_s[:, :, 2:4]
    d_p[:, :, 4:] = 2 * d_s[:, :, 4:]
    e_p, e_s = e_u + d_p, e_u + d_s
    q = 0.665  # 16 of the 48 pixels above the quantile (docs/design.md, "The quantile"): rows 4-5
    scores = reference.aligned_scores(e_u, e_p, e_s)
    _, weight = reference.phase2_step(e_u, e_p, e_s, torch.ones(B), 7.5, q, scores)
    for b in range(B):
        dp, ds = d_p[b].numpy(), d_s[b].numpy()
        expected = np.maximum((dp * ds).sum(0), 0)
        np.testing.assert_allclose(scores[b].view(H, W).numpy(), expected, rtol=1e-5, atol=1e-5)
        eta = np.quantile(expected, q, method="lower")
        region = weight[b].numpy() > 0
        assert (region == (expected > eta)[None]).all()  # the same pixels on every channel
        assert not region[:, :4].any() and region[:, 4:].all()
    # The paper's noise mask, on |d_s| alone, covers the opposed rows and the background more.
    _, noise_weight = reference.phase2_step(e_u, e_p, e_s, torch.ones(B), 7.5, q)
    assert (noise_weight[:, :, :4] > 0).float().mean() > (noise_weight[:, :, 4:] > 0).float().mean()


@pytest.mark.parametrize("guide_from", [None, 2])
def test_aligned_region_ranks_the_scores_summed_over_the_guided_steps(guide_from):
    # The guider's aligned region at step i is the top share of aligned_scores summed over the guided steps
    # so far (docs/design.md, "The aligned mask"). Guiding from before t_p, the sum starts from phase 1's
    # scores over steps guide_from .. t_p - 1, the chosen concept's minus the other concepts' mean. Checked
    # against numpy sums of the reference scores, with two concepts.
    from spguard.methods import Concepts, Text

    torch.manual_seed(0)
    B, N, C, H, W, steps, t_p, q = 3, 2, 4, 6, 8, 7, 4, 0.75
    concepts = Concepts(("c", "d"), Text(torch.zeros(N, 3, 8), torch.ones(N, 3, dtype=torch.bool)))
    method = SPGuard(mask="aligned", t_p=t_p, q=q, guide_from=guide_from, harmfulness_threshold=float("-inf"))
    guider = method.start(B, steps, 7.5, concepts)
    start = t_p if guide_from is None else guide_from
    lookahead = np.zeros((B, N, H * W))
    for i in range(t_p):  # phase 1: every concept's row
        e_u, e_p, e_s = torch.randn(B, C, H, W), torch.randn(B, C, H, W), torch.randn(B, N, C, H, W)
        guider.guide(i, e_u, e_p, e_s.flatten(0, 1))
        if i >= start:
            for j in range(N):
                lookahead[:, j] += reference.aligned_scores(e_u, e_p, e_s[:, j]).numpy()
    assert guider.rewind() == (None if guide_from is None else guide_from)
    chosen = guider.concept.numpy()
    total = lookahead[np.arange(B), chosen] - lookahead[np.arange(B), 1 - chosen]  # minus the other's mean (N = 2)
    if guide_from is not None:
        assert np.abs(total).max() > 0
    regions_differ = False
    for i in range(start, steps):  # phase 2: the chosen concept's row
        e_u, e_p, e_s = torch.randn(B, C, H, W), torch.randn(B, C, H, W), torch.randn(B, C, H, W)
        guider.guide(i, e_u, e_p, e_s)
        step_scores = reference.aligned_scores(e_u, e_p, e_s).numpy()
        total += step_scores
        region = guider.state("guidance_mask")[:, 0].flatten(1).numpy() > 0
        for b in range(B):
            np.testing.assert_array_equal(region[b], total[b] > np.quantile(total[b], q, method="lower"))
            regions_differ |= not np.array_equal(
                region[b], step_scores[b] > np.quantile(step_scores[b], q, method="lower"))
    assert regions_differ  # the running sum chose other pixels than the step's own scores would


def test_concept_specific_scores_subtract_the_other_concepts_mean():
    scores = torch.tensor([[[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]]])  # (B=1, N=3, L=2)
    expected = torch.tensor([[[-1.5, 3.0], [1.5, -3.0], [0.0, 0.0]]])
    torch.testing.assert_close(reference.concept_specific(scores), expected)
    one = torch.randn(2, 1, 5)
    torch.testing.assert_close(reference.concept_specific(one), one)


def test_attention_capture_leaves_unet_output_unchanged():
    parts = components()
    unet, embeds = parts["unet"], torch.randn(5, 77, 32)
    x, t = torch.randn(5, 4, 16, 16), torch.tensor(500)
    expected = unet(x, t, encoder_hidden_states=embeds).sample
    token_mask = torch.zeros(2, 77, dtype=torch.bool)
    token_mask[:, 1:4] = True
    processors = dict(unet.attn_processors)
    with ConceptAttention(unet, first_row=3) as capture:
        capture.begin(token_mask, (16, 16))
        got = unet(x, t, encoder_hidden_states=embeds).sample
        attention = capture.take()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert attention.shape == (2, 256)
    assert ((attention >= 0) & (attention <= 1 + 1e-6)).all()  # a share of softmax mass
    assert unet.attn_processors == processors
    assert not any(m._forward_hooks for m in unet.modules())  # the hooks are gone


def test_mask_snapshots_and_report_json():
    out = run(MIXED, SPGuard(t_p=3, concepts=CONCEPT), report_masks=True)
    for r in out.reports:
        r.to_json()
        if r.guided:
            steps = list(r.mask_snapshots)
            assert steps[0] == 3 and steps[-1] == STEPS - 1
            assert np.array(r.mask_snapshots[3]).shape == (16, 16)


def reference_attention_map(unet, first_row, token_mask, size, call):
    """Eq.-free oracle of the capture: each cross-attention layer's own q and k (recorded by hooks of this
    test), reduced by the torch reference, resized to the latent grid, averaged over layers."""
    seen, handles = [], []
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            record = {"heads": module.heads}
            seen.append(record)
            handles += [module.to_q.register_forward_hook(lambda m, i, o, r=record: r.setdefault("q", o)),
                        module.to_k.register_forward_hook(lambda m, i, o, r=record: r.setdefault("k", o))]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    maps = []
    for r in seen:
        q, k = (r[x][first_row:].unflatten(-1, (r["heads"], -1)).transpose(1, 2) for x in ("q", "k"))
        a = reference.cross_attention_aggregate(q, k, token_mask)
        side = int(round((a.shape[1] * size[1] / size[0]) ** 0.5))
        grid = (a.shape[1] // side, side)
        maps.append(F.interpolate(a.view(-1, 1, *grid), size=size, mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(maps).mean(0).flatten(1)


def test_attention_capture_equals_reference_of_the_layers_own_q_and_k():
    parts = components()
    unet, embeds = parts["unet"], torch.randn(5, 77, 32)
    x, t = torch.randn(5, 4, 16, 16), torch.tensor(500)
    token_mask = torch.zeros(2, 77, dtype=torch.bool)
    token_mask[0, 1:4] = token_mask[1, 2:9] = True
    with ConceptAttention(unet, first_row=3) as capture:
        capture.begin(token_mask, (16, 16))
        unet(x, t, encoder_hidden_states=embeds)
        got = capture.take()
    expected = reference_attention_map(unet, 3, token_mask, (16, 16),
                                       lambda: unet(x, t, encoder_hidden_states=embeds))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class CountingProcessor(AttnProcessor2_0):
    """A user's own processor: diffusers' SDPA, counting its calls."""

    calls = 0

    def __call__(self, *args, **kwargs):
        CountingProcessor.calls += 1
        return super().__call__(*args, **kwargs)


def test_attention_mask_keeps_a_users_processor_installed_and_running():
    method = SPGuard(t_p=3, mask="attention", concepts=CONCEPT)
    before = run(MIXED, method)
    assert any(r.guided for r in before.reports)
    unet = ours().unet  # the UNet run() samples with
    original = dict(unet.attn_processors)
    users = {name: CountingProcessor() for name in original}
    unet.set_attn_processor(dict(users))
    CountingProcessor.calls = 0
    try:
        after = run(MIXED, method)
        assert CountingProcessor.calls == STEPS * len(users)  # every layer, every step, phase 2 included
        assert all(unet.attn_processors[name] is proc for name, proc in users.items())
    finally:
        unet.set_attn_processor(original)
    np.testing.assert_allclose(after.images, before.images, atol=TIGHT)
    assert [r.mask_coverage for r in after.reports] == [r.mask_coverage for r in before.reports]


def test_attention_layers_string_is_one_name():
    assert SPGuard(attention_layers="up").attention_layers == ("up",)
    unet = components()["unet"]
    capture = ConceptAttention(unet, SPGuard(attention_layers="up_blocks").attention_layers)
    assert capture.modules and all(name.startswith("up_blocks") for name, _ in capture.modules)
