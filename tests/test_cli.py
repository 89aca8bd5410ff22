"""`spguard generate` end to end on the tiny model, and its one-line errors for bad input."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from spguard import SLD, NegativePrompt, SPGuard
from spguard.cli import UsageError, _method, main

from .helpers import ours


def test_generate_end_to_end(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\nblood knife\n")
    out = tmp_path / "out"
    rc = main(["generate", "a photo of a dog", "--prompts", str(prompts), "--model", "tiny", "--steps", "4",
               "--t-p", "2", "--seed", "3", "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    report = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in report] == ["a photo of a dog", "a red cat", "blood knife"]
    assert [r["seed"] for r in report] == [3, 4, 5]
    # Each PNG is what the library draws for that prompt and seed.
    expected = ours()(["a red cat"], seed=[4], num_inference_steps=4, method=SPGuard(t_p=2)).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / report[1]["image"])), np.asarray(expected))
    assert "wrote 3 images" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["x", "--model", "/no/such/folder"], "model folder not found"),
        (["x", "--method", "nope"], "unknown method"),
        (["x", "--steps", "0"], "steps must be at least 1"),
        (["x", "--q", "1.5", "--model", "tiny"], "q must lie in (0, 1)"),
        (["x", "--q", "0", "--model", "tiny"], "q must lie in (0, 1)"),
        ([], "no prompts given"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, message):
    result = subprocess.run([sys.executable, "-m", "spguard.cli", "generate", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("spguard: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.stderr


def test_empty_prompt_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert main(["generate", "--prompts", str(empty), "--model", "tiny"]) == 2


def test_spguard_parameters_default_to_the_model_folder(tmp_path):
    (tmp_path / "spguard.json").write_text(json.dumps({"spguard": {"t_p": 4, "q": 0.8, "harmfulness_threshold": 0.1}}))
    args = argparse.Namespace(method="spguard", lambda_max=None, q=None, t_p=6, mask=None, schedule=None,
                              t_drop=None, harmfulness_threshold=None, scale_by_harmfulness=None, concept=None)
    # given flags win over the model's
    assert _method(args, str(tmp_path)) == SPGuard(t_p=6, q=0.8, harmfulness_threshold=0.1)
    args.harmfulness_threshold, args.t_drop = 0.2, 8
    assert _method(args, str(tmp_path)) == SPGuard(t_p=6, q=0.8, harmfulness_threshold=0.2, t_drop=8)
    args.scale_by_harmfulness = False
    assert _method(args, str(tmp_path)).scale_by_harmfulness is False


def test_step_weights_come_from_the_model_folder_and_uniform_restores_eq6(tmp_path):
    (tmp_path / "spguard.json").write_text(json.dumps({"spguard": {"t_p": 3, "step_weights": [2.0, 1.0, 0.5]}}))
    assert _method(method_args(), str(tmp_path)) == SPGuard(t_p=3, step_weights=(2.0, 1.0, 0.5))
    assert _method(method_args(step_weights="uniform"), str(tmp_path)) == SPGuard(t_p=3)
    assert _method(method_args(step_weights=(1.0, 3.0, 3.0)), str(tmp_path)).step_weights == (1.0, 3.0, 3.0)
    result = subprocess.run([sys.executable, "-m", "spguard.cli", "generate", "x", "--step-weights", "1,x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "expected 'uniform' or comma-separated numbers, got '1,x'" in result.stderr


def method_args(**given):
    defaults = dict(method="spguard", lambda_max=None, q=None, t_p=None, mask=None, schedule=None, t_drop=None,
                    harmfulness_threshold=None, scale_by_harmfulness=None, concept=None, negative_prompt=None)
    return argparse.Namespace(**{**defaults, **given})


@pytest.mark.parametrize("name", ["SPGuard", "SPGUARD", "spguard"])
def test_method_name_in_any_case_keeps_the_model_defaults_and_flags(tmp_path, name):
    (tmp_path / "spguard.json").write_text(json.dumps({"spguard": {"t_p": 4, "q": 0.8}}))
    assert _method(method_args(method=name, mask="attention"), str(tmp_path)) == SPGuard(t_p=4, q=0.8,
                                                                                          mask="attention")


def test_concept_means_what_each_method_makes_of_it():
    concepts = ["blood", "a knife"]
    assert _method(method_args(method="negative", concept=concepts), "tiny") == NegativePrompt("blood, a knife")
    assert _method(method_args(method="Negative", negative_prompt="gore"), "tiny") == NegativePrompt("gore")
    assert _method(method_args(method="sld-max", concept=concepts), "tiny") == SLD("max", concept="blood, a knife")
    assert _method(method_args(concept=concepts), "tiny").concepts == ("blood", "a knife")
    with pytest.raises(UsageError, match="no meaning with --method cfg"):
        _method(method_args(method="cfg", concept=concepts), "tiny")
    with pytest.raises(UsageError, match="give one"):
        _method(method_args(method="negative", concept=concepts, negative_prompt="gore"), "tiny")


def test_generate_height_width_and_negative_prompt(tmp_path):
    out = tmp_path / "out"
    rc = main(["generate", "a red cat", "--model", "tiny", "--method", "CFG", "--steps", "3", "--height", "16",
               "--width", "24", "--negative-prompt", "blood", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "reports.jsonl").read_text().splitlines()[0])
    image = np.asarray(Image.open(out / report["image"]))
    expected = ours()(["a red cat"], seed=[0], num_inference_steps=3, method="cfg", height=16, width=24,
                      negative_prompt="blood").images[0]
    assert image.shape == (16, 24, 3)
    np.testing.assert_array_equal(image, np.asarray(expected))


def test_bench_safety_takes_the_generate_spguard_flags_and_sets_each_rows_mask():
    from spguard.methods import spguard_knobs
    from spguard.world.safety_bench import build_method, parse_args

    knobs = spguard_knobs(parse_args(["--lambda-max", "0.5", "--no-scale-by-harmfulness"]))
    assert "mask" not in knobs and knobs["q"] is None
    assert build_method("spguard-noise", {"t_p": 4, "mask": "aligned"}, knobs) == SPGuard(
        t_p=4, lambda_max=0.5, scale_by_harmfulness=False, mask="noise")
