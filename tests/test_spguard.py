"""SP-Guard's defining properties on the tiny model: exactness of the shortcuts, Eq. 6 and Eq. 8."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("mask", ["noise", "attention"])
def test_mixed_batch_rows_equal_each_row_alone(mask):
    method = SPGuard(t_p=3, mask=mask, concepts=CONCEPT)
    batch = run(MIXED, method)
    for k, prompt in enumerate(MIXED):
        alone = run([prompt], method, seed=k)
        np.testing.assert_allclose(batch.images[k], alone.images[0], atol=TIGHT)
        assert batch.reports[k].harmfulness == pytest.approx(alone.reports[0].harmfulness, abs=1e-5)


class Recorder(torch.nn.Module):
    """Wraps the UNet and records each call's noise estimates."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.outputs = unet, []

    def forward(self, *args, **kwargs):
        out = self.unet(*args, **kwargs)
        self.outputs.append(out.sample.clone())
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)


def test_harmfulness_equals_hand_computation():
    pipe = ours()
    recorder = Recorder(components()["unet"])
    pipe.unet = recorder
    concepts = ["a knife", "blood", "a peaceful garden"]
    t_p, batch = 4, len(MIXED)
    out = pipe(MIXED, method=SPGuard(t_p=t_p, concepts=concepts), num_inference_steps=6, seed=0,
               output_type="latent")
    sims = torch.zeros(batch, len(concepts))
    for noise in recorder.outputs[:t_p]:
        e_u, e_p = noise[:batch], noise[batch : 2 * batch]
        e_s = noise[2 * batch :].view(batch, len(concepts), *noise.shape[1:])
        for j in range(len(concepts)):
            sims[:, j] += F.cosine_similarity((e_p - e_u).flatten(1), (e_s[:, j] - e_u).flatten(1), dim=1)
    expected, argmax = (sims / t_p).max(1)
    for k, r in enumerate(out.reports):
        assert r.harmfulness == pytest.approx(expected[k].item(), abs=1e-5)
        assert r.concept == concepts[argmax[k]]
    # Phase 2 evaluates one concept row per guided sample, none for the others.
    guided = sum(r.guided for r in out.reports)
    assert [o.shape[0] for o in recorder.outputs] == [batch * (2 + len(concepts))] * t_p + [2 * batch + guided] * 2


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


def test_attention_capture_leaves_unet_output_unchanged():
    parts = components()
    unet, embeds = parts["unet"], torch.randn(5, 77, 32)
    x, t = torch.randn(5, 4, 16, 16), torch.tensor(500)
    expected = unet(x, t, encoder_hidden_states=embeds).sample
    token_mask = torch.zeros(2, 77, dtype=torch.bool)
    token_mask[:, 1:4] = True
    with ConceptAttention(unet) as capture:
        capture.begin(3, token_mask, (16, 16))
        got = unet(x, t, encoder_hidden_states=embeds).sample
        attention = capture.end()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert attention.shape == (2, 256)
    assert ((attention >= 0) & (attention <= 1 + 1e-6)).all()  # a share of softmax mass
    assert all(type(p).__name__ != "_Processor" for p in unet.attn_processors.values())


def test_mask_snapshots_and_report_json():
    out = run(MIXED, SPGuard(t_p=3, concepts=CONCEPT), report_masks=True)
    for r in out.reports:
        r.to_json()
        if r.guided:
            steps = list(r.mask_snapshots)
            assert steps[0] == 3 and steps[-1] == STEPS - 1
            assert np.array(r.mask_snapshots[3]).shape == (16, 16)
