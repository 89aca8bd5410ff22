"""Token grounding (spguard.world.grounding): targets from rendered scenes, the loss, and the recorder
against diffusers' own attention processor."""

import numpy as np
import pytest
import torch

from spguard.world import benign_object, render, render_batch, unsafe_object, world_tokenizer
from spguard.world.grounding import GroundingAttention, grounding_loss, grounding_targets
from spguard.world.model import MAX_TOKENS, ModelSize, build_unet
from spguard.world.scene import IMAGE_SIZE, Scene

CIRCLE, KNIFE = benign_object("red", "circle", "left"), unsafe_object("knife", "right")


def targets_of(scenes, captions):
    rng = np.random.default_rng(0)
    masks = [render(s, rng)[1] for s in scenes]
    return masks, grounding_targets(scenes, captions, masks, world_tokenizer(), MAX_TOKENS)


def test_targets_point_at_each_named_objects_words_and_mask():
    scene = Scene((CIRCLE, KNIFE))
    caption = "a red circle on the left and a knife on the right"
    masks, (rows, tokens, objects) = targets_of([scene], [caption])
    words = world_tokenizer().convert_ids_to_tokens(
        world_tokenizer()(caption, padding="max_length", max_length=MAX_TOKENS).input_ids)
    assert rows.tolist() == [0, 0]
    assert [[w.removesuffix("</w>") for w, t in zip(words, row) if t] for row in tokens] == [["red", "circle"], ["knife"]]
    assert torch.equal(objects[:, 0].bool(), torch.from_numpy(masks[0]))


def test_targets_skip_unnamed_ambiguous_and_dropped_captions():
    twins = Scene((CIRCLE, benign_object("red", "circle", "right"), KNIFE))
    _, (rows, tokens, _) = targets_of([twins, Scene((CIRCLE, KNIFE))], ["a red circle and a knife", ""])
    # Two red circles: neither is grounded; the knife is. The empty (dropped) caption names nothing.
    assert rows.tolist() == [0] and tokens[0].sum() == 1
    _, (rows, _, _) = targets_of([Scene((CIRCLE, KNIFE))], ["a knife on the right"])
    assert rows.tolist() == [0]  # the circle is in the image but not in the caption


def test_training_batch_masks_are_the_rendered_objects():
    from spguard.world import PALETTE

    batch = render_batch(np.random.default_rng(7), 8)
    for image, scene, masks in zip(batch.images, batch.scenes, batch.masks):
        assert masks.shape == (len(scene.objects), IMAGE_SIZE, IMAGE_SIZE)
        for obj, mask in zip(scene.objects, masks):
            assert mask.any() and (image[mask] == PALETTE[obj.colour]).all()


def test_loss_is_zero_inside_the_mask_and_the_outside_share_squared_when_uniform():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1  # a quarter of the 4x4 grid
    inside = mask.flatten(1).clone()  # the object's tokens get attention only at the object's queries
    assert grounding_loss([inside], mask).item() == 0
    uniform = torch.full((1, 16), 0.25, requires_grad=True)  # every query gives them a quarter of its attention
    loss = grounding_loss([uniform], mask)
    assert loss.item() == pytest.approx((1 - 0.25) ** 2)
    loss.backward()
    assert uniform.grad[0, ~mask.flatten().bool()].gt(0).all()  # attention outside the object is penalised
    assert grounding_loss([uniform], torch.zeros(0, 1, 1, 1)).item() == 0  # no object named


def test_capture_keeps_the_unets_output_and_maps_each_layer_for_the_chosen_rows():
    torch.manual_seed(0)
    unet = build_unet(ModelSize(unet_channels=(8, 16, 32), text_width=16, attention_heads=2)).eval()
    x, t, text = torch.randn(2, unet.config.in_channels, 16, 16), torch.tensor([10, 500]), torch.randn(2, MAX_TOKENS, 16)
    expected = unet(x, t, encoder_hidden_states=text).sample
    capture = GroundingAttention(unet)
    first, rest = torch.zeros(MAX_TOKENS), torch.ones(MAX_TOKENS)
    first[:3], rest[:3] = 1, 0
    capture.begin(torch.tensor([1, 0, 1]), torch.stack([first, first, rest]))
    got = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected)
    maps = capture.take()
    n_layers = sum(1 for m in unet.modules() if getattr(m, "is_cross_attention", False))
    assert len(maps) == n_layers and capture.take() == []
    assert {m.shape for m in maps} == {(3, 8 * 8), (3, 4 * 4)}
    for m in maps:
        torch.testing.assert_close(m[0] + m[2], torch.ones(m.shape[1]))  # complementary tokens of one row: all of it
        assert not torch.allclose(m[0], m[1])  # rows 1 and 0 of the batch differ
    maps[0].sum().backward()  # the loss reaches the query and key projections
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if "attn2.to_k" in n)
    unet(x, t, encoder_hidden_states=text)
    assert capture.take() == []  # nothing captured until the next begin


def test_training_with_the_attention_loss_logs_it(tmp_path):
    from spguard.world import train

    tiny = ["--unet-channels", "8,16", "--text-width", "16", "--text-layers", "1", "--attention-heads", "2",
            "--batch-size", "4", "--threads", "1", "--eval-every", "0", "--gate-prompts", "0"]
    threads = torch.get_num_threads()
    try:
        assert train.main(["--out", str(tmp_path), "--steps", "2", "--attention-loss", "0.1", *tiny]) == 0
    finally:  # the trainer sets the process's thread count, which later tests' float sums depend on
        torch.set_num_threads(threads)
    header, row = (tmp_path / "loss.csv").read_text().splitlines()[:2]
    assert header.split(",")[-1] == "grounding_loss" and 0 < float(row.split(",")[-1]) <= 1
