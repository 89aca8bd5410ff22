"""Loading a model folder: never the network, and one line naming the folder or file for anything wrong."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from transformers import CLIPTextModel

from spguard import SafeDiffusionPipeline
from spguard.cli import main
from spguard.testing import _clip_config

from .helpers import components, diffusers_pipe

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE")
NETWORK_STATUS = 99  # the guarded subprocess's exit status when anything tried the network
# A process whose sockets and hub client fail loudly (and uncatchably) if called, then the CLI.
GUARDED_CLI = f"""
import os, socket, sys
import huggingface_hub, huggingface_hub.file_download

def refuse(*args, **kwargs):
    sys.stderr.write("NETWORK ACCESS ATTEMPTED\\n")
    os._exit({NETWORK_STATUS})

socket.socket.connect = socket.getaddrinfo = socket.create_connection = refuse
for module in (huggingface_hub, huggingface_hub.file_download):
    for name in ("hf_hub_download", "snapshot_download", "model_info", "get_hf_file_metadata"):
        if hasattr(module, name):
            setattr(module, name, refuse)
huggingface_hub.HfApi.model_info = refuse
from spguard.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    diffusers_pipe().save_pretrained(folder)
    return folder


@pytest.fixture
def model(saved_model, tmp_path):
    """A fresh copy of the saved tiny model, to break."""
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    return folder


@pytest.fixture
def no_network(monkeypatch):
    """The hub's offline variables unset and every socket connection recorded and refused."""
    import huggingface_hub.constants

    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("network access attempted")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def wider_text_encoder(model):
    shutil.rmtree(model / "text_encoder")
    CLIPTextModel(_clip_config(components()["tokenizer"], hidden_size=64, layers=1)).save_pretrained(
        model / "text_encoder")


BREAKAGES = {
    "truncated unet weights": (lambda m: truncate(m / "unet" / "diffusion_pytorch_model.safetensors"),
                               "unet/diffusion_pytorch_model.safetensors: truncated or corrupt weights"),
    "corrupt vae weights": (lambda m: (m / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100),
                            "vae/diffusion_pytorch_model.safetensors: truncated or corrupt weights"),
    "missing vae": (lambda m: shutil.rmtree(m / "vae"),
                    "vae: missing: model_index.json names a diffusers.AutoencoderKL"),
    "vae is a file": (lambda m: (shutil.rmtree(m / "vae"), (m / "vae").write_text("x")), "vae: not a folder"),
    "no unet weights": (lambda m: os.remove(m / "unet" / "diffusion_pytorch_model.safetensors"),
                        "unet: cannot load the diffusers.UNet2DConditionModel: Error no file named"),
    "no scheduler config": (lambda m: os.remove(m / "scheduler" / "scheduler_config.json"),
                            "scheduler: cannot load the diffusers.DDIMScheduler"),
    "no tokenizer files": (lambda m: [os.remove(f) for f in (m / "tokenizer").iterdir()],
                           "tokenizer: no tokenizer files"),
    "unknown class": (lambda m: edit_json(m / "model_index.json", unet=["diffusers", "UNet9000"]),
                      "model_index.json: unet is diffusers.UNet9000, but diffusers has no such loadable class"),
    "foreign library": (lambda m: edit_json(m / "model_index.json", vae=["os", "system"]),
                        "vae is os.system, but components can only come from diffusers, transformers, spguard"),
    "component missing from index": (lambda m: edit_json(m / "model_index.json", unet=[None, None]),
                                     "model_index.json: names no unet"),
    "index not JSON": (lambda m: (m / "model_index.json").write_text("{"), "model_index.json: not valid JSON"),
    "unet config of another shape": (lambda m: edit_json(m / "unet" / "config.json", cross_attention_dim=64),
                                     "unet: cannot load the diffusers.UNet2DConditionModel: its weights have other "
                                     "shapes than its config.json describes"),
    "text encoder of another model": (wider_text_encoder,
                                      "the unet attends to text of width 32 but the text encoders give 64"),
    "vae of other latents": (lambda m: edit_json(m / "vae" / "config.json", latent_channels=8),
                             "vae: cannot load the diffusers.AutoencoderKL: its weights have other shapes"),
    "spguard.json not JSON": (lambda m: (m / "spguard.json").write_text("{'a': 1}"), "spguard.json: not readable JSON"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_model_folder_is_one_line_exit_2_and_no_network(model, no_network, capfd, breakage):
    breaking, message = BREAKAGES[breakage]
    breaking(model)
    capfd.readouterr()  # what breaking it printed
    out = model.parent / "out"
    assert main(["generate", "a cat", "--model", str(model), "--steps", "1", "--no-progress", "--out", str(out)]) == 2
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("spguard: error: ") and message in lines[0], lines[0]
    assert str(model) in lines[0]
    assert not no_network
    assert not out.exists()  # a model that cannot be loaded fails before the output folder is touched


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_weights_is_one_line(model, capfd):
    (model / "unet" / "diffusion_pytorch_model.safetensors").chmod(0)
    assert main(["generate", "a cat", "--model", str(model), "--no-progress"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Permission denied" in err


@pytest.mark.parametrize("breakage", ["missing vae", "truncated unet weights"])
def test_cli_never_touches_the_network(model, tmp_path, breakage):
    """In a fresh process with the offline variables unset and an empty hub cache, a guard on sockets
    and on the hub client would end the process with NETWORK_STATUS if anything tried to download."""
    BREAKAGES[breakage][0](model)
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    result = subprocess.run([sys.executable, "-c", GUARDED_CLI, "generate", "a cat", "--model", str(model),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert "NETWORK ACCESS ATTEMPTED" not in result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert BREAKAGES[breakage][1] in result.stderr and "Traceback" not in result.stderr


def test_good_folder_loads_without_warnings(saved_model, no_network, capfd):
    pipe = SafeDiffusionPipeline.from_pretrained(saved_model)
    assert pipe.unet.config.cross_attention_dim == 32
    assert capfd.readouterr().err == ""  # no "low cpu memory usage" advice, no progress bars
    assert not no_network
