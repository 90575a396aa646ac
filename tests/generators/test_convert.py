"""Checkpoint import: rosinality ``.pt`` (weights_only) and NVIDIA ``.pkl`` (restricted unpickling).

No real checkpoint is downloaded. The rosinality files are written from our own tiny models in the
original layout. The NVIDIA pickles are built here: fake ``torch_utils.persistence`` and ``dnnlib``
modules are put in ``sys.modules`` only while pickling, and the "persistent" modules pickle
exactly as NVIDIA's do (``_reconstruct_persistent_obj(meta)`` with the module source inside). The
conversion is then checked against a small reference forward pass written in NVIDIA's own
parameterisation (gains, upfirdn2d padding, weight flip convention) below.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import logging
import math
import os
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from expander.generators.convert import (
    PickledModule,
    PickleNotAllowedError,
    TensorFlowPickleError,
    UnsafePickleError,
    convert_nvidia_discriminator_state_dict,
    convert_nvidia_state_dict,
    infer_config,
    load_nvidia_pickle,
    load_rosinality_checkpoint,
    read_nvidia_pickle,
)
from expander.generators.stylegan2 import Discriminator, Generator, make_kernel, upfirdn2d

from ..conftest import tiny_config


class RunsShellCommand:
    """A payload that, if unpickled by a plain unpickler, would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ==================================================================================================
# rosinality .pt
# ==================================================================================================


def _rosinality_models():
    torch.manual_seed(0)
    G = Generator(tiny_config()).eval()
    torch.manual_seed(1)
    D = Discriminator(tiny_config())
    # Non-trivial noise strengths and biases so the comparison sees every tensor.
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise.weight") or name.endswith("bias"):
                p.normal_(0, 0.3)
    w_avg = torch.randn(G.style_dim)
    return G, D, w_avg


def _save_rosinality(path: Path, G, D=None, latent_avg=None, args=None, **extra) -> Path:
    ckpt = {"g_ema": G.state_dict(), "g": G.state_dict()}
    if D is not None:
        ckpt["d"] = D.state_dict()
    if latent_avg is not None:
        ckpt["latent_avg"] = latent_avg
    if args is not None:
        ckpt["args"] = args
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("with_args", [False, True])
def test_rosinality_checkpoint_loads_identically(tmp_path, with_args):
    G, D, w_avg = _rosinality_models()
    # Real rosinality train.py checkpoints carry the argparse.Namespace of the run.
    args = argparse.Namespace(size=16, latent=32, n_mlp=2, channel_multiplier=2, r1=10.0, path="data/lmdb") if with_args else None
    path = _save_rosinality(tmp_path / "ckpt.pt", G, D, latent_avg=w_avg, args=args)

    G2, D2 = load_rosinality_checkpoint(path)

    assert G2.config.resolution == 16 and G2.config.style_dim == 32 and G2.config.n_mlp == 2
    assert G2.config.channels == {4: 16, 8: 16, 16: 8}
    ref, got = G.state_dict(), G2.state_dict()
    assert list(ref) == list(got)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    torch.testing.assert_close(G2.w_avg, w_avg, rtol=0, atol=0)
    z = torch.randn(3, 32)
    assert torch.equal(G.synthesis(G.mapping(z)), G2.synthesis(G2.mapping(z)))

    assert D2 is not None
    for key, value in D.state_dict().items():
        assert torch.equal(value, D2.state_dict()[key]), key
    image = torch.randn(4, 3, 16, 16)
    assert torch.equal(D(image), D2(image))


@pytest.mark.parametrize("content", [b"hello world, not a checkpoint" * 4, b"PK\x03\x04" + b"\x00" * 40])
def test_corrupt_checkpoint_files_get_one_clear_error(tmp_path, content):
    # the unpickler trips on garbage with KeyError/IndexError/struct.error: still a ValueError that says what to do
    (tmp_path / "broken.pt").write_bytes(content)
    with pytest.raises(ValueError, match="could not read it as a PyTorch checkpoint .*re-download"):
        load_rosinality_checkpoint(tmp_path / "broken.pt")
    torch.save({"g_ema": {"w": torch.zeros(64)}}, tmp_path / "whole.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:60])
    with pytest.raises(ValueError, match="could not read it as a PyTorch checkpoint"):
        load_rosinality_checkpoint(tmp_path / "truncated.pt")


def test_truncated_safetensors_file_gets_one_clear_error(tmp_path):
    # torch.load hands *.safetensors to the safetensors reader, whose SafetensorError is neither a ValueError nor an OSError
    G, _, _ = _rosinality_models()
    safetensors.torch.save_file(G.state_dict(), tmp_path / "whole.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:-100])
    (tmp_path / "tiny.safetensors").write_bytes(b"\x08\x00")
    for name in ("cut.safetensors", "tiny.safetensors"):
        with pytest.raises(ValueError, match=rf"{name}: could not read it as a safetensors file \(SafetensorError: .*download it again") as caught:
            load_rosinality_checkpoint(tmp_path / name)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_bare_generator_state_dict_is_named_with_the_fix(tmp_path, suffix):
    G, _, w_avg = _rosinality_models()
    path = tmp_path / f"g_ema{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(G.state_dict(), path)
    else:
        torch.save(G.state_dict(), path)
    with pytest.raises(ValueError, match=r"bare generator state dict .*under the key g_ema.*torch\.save\(\{'g_ema': ") as caught:
        load_rosinality_checkpoint(path)
    message = str(caught.value)
    assert f"({len(G.state_dict()) - 5} more)" in message and "to_rgbs.1.conv.weight" not in message  # a few keys, not all of them
    # the advice works: the wrapped file imports
    wrapped = tmp_path / "g_ema-g_ema.pt"
    assert str(wrapped) in message
    read = safetensors.torch.load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    torch.save({"g_ema": read, "latent_avg": w_avg}, wrapped)
    G2, _ = load_rosinality_checkpoint(wrapped)
    assert all(torch.equal(value, G2.state_dict()[key]) for key, value in G.state_dict().items())


def test_a_file_of_other_tensors_names_only_a_few_of_its_keys(tmp_path):
    safetensors.torch.save_file({f"layer{i:03d}.weight": torch.zeros(1) for i in range(300)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"not a rosinality StyleGAN2 checkpoint: expected keys g_ema.*found \['layer000\.weight', .*\(292 more\)\]$") as caught:
        load_rosinality_checkpoint(tmp_path / "other.safetensors")
    assert "layer299" not in str(caught.value) and "bare generator" not in str(caught.value)


@pytest.mark.parametrize("key, value, problem", [
    ("convs.0.conv.weight", float("nan"), "NaN"),
    ("style.2.bias", float("inf"), "infinite"),
])
def test_non_finite_weights_are_refused_naming_file_and_key(tmp_path, key, value, problem):
    G, D, w_avg = _rosinality_models()
    state = G.state_dict()
    state[key] = state[key].clone().view(-1).index_fill(0, torch.tensor([1]), value).view_as(state[key])
    torch.save({"g_ema": state, "d": D.state_dict(), "latent_avg": w_avg}, tmp_path / "diverged.pt")
    with pytest.raises(ValueError, match=rf"diverged\.pt: g_ema: {re.escape(key)} contains {problem} values.*nothing was written"):
        load_rosinality_checkpoint(tmp_path / "diverged.pt")

    d_state = D.state_dict()
    d_state["final_linear.1.bias"] = torch.full_like(d_state["final_linear.1.bias"], float("nan"))
    torch.save({"g_ema": G.state_dict(), "d": d_state, "latent_avg": w_avg}, tmp_path / "bad-d.pt")
    with pytest.raises(ValueError, match=r"bad-d\.pt: d \(discriminator\): final_linear\.1\.bias contains NaN"):
        load_rosinality_checkpoint(tmp_path / "bad-d.pt")

    torch.save({"g_ema": G.state_dict(), "latent_avg": torch.full_like(w_avg, float("nan"))}, tmp_path / "bad-avg.pt")
    with pytest.raises(ValueError, match=r"bad-avg\.pt: the mean w \(latent_avg\) contains NaN"):
        load_rosinality_checkpoint(tmp_path / "bad-avg.pt")


def test_integer_weights_are_refused_naming_file_and_key(tmp_path):
    G, _, w_avg = _rosinality_models()
    state = G.state_dict()
    state["to_rgb1.bias"] = torch.zeros_like(state["to_rgb1.bias"], dtype=torch.int8)
    torch.save({"g_ema": state, "latent_avg": w_avg}, tmp_path / "quantised.pt")
    with pytest.raises(ValueError, match=r"quantised\.pt: g_ema: to_rgb1\.bias is a int8 tensor, not floating point, so this file holds something other than StyleGAN2 weights"):
        load_rosinality_checkpoint(tmp_path / "quantised.pt")


def test_import_of_nan_weights_fails_before_writing_anything(tmp_path):
    from expander.cli import main

    G, _, w_avg = _rosinality_models()
    state = G.state_dict()
    state["conv1.conv.weight"] = torch.full_like(state["conv1.conv.weight"], float("nan"))
    torch.save({"g_ema": state, "latent_avg": w_avg}, tmp_path / "diverged.pt")
    result = CliRunner().invoke(main, ["import", str(tmp_path / "diverged.pt"), "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code != 0 and "diverged.pt: g_ema: conv1.conv.weight contains NaN" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_infer_config_reads_any_widths():
    config = tiny_config(resolution=32)
    config.channels = {4: 12, 8: 10, 16: 6, 32: 4}
    inferred = infer_config(Generator(config).state_dict())
    assert (inferred.resolution, inferred.style_dim, inferred.n_mlp, inferred.channels) == (32, 32, 2, config.channels)


def test_rosinality_without_latent_avg_estimates_it_seeded(tmp_path, caplog):
    G, _, _ = _rosinality_models()
    path = _save_rosinality(tmp_path / "no-avg.pt", G)
    with caplog.at_level(logging.WARNING, logger="expander.generators.convert"):
        G1, D1 = load_rosinality_checkpoint(path)
    assert D1 is None
    assert "no mean w" in caplog.text
    G2, _ = load_rosinality_checkpoint(path)
    assert torch.equal(G1.w_avg, G2.w_avg) and G1.w_avg.abs().sum() > 0  # seeded: reproducible
    expected = G.style(torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))).mean(0)
    torch.testing.assert_close(G1.w_avg, expected)


def test_rosinality_missing_key_is_named(tmp_path):
    G, _, w_avg = _rosinality_models()
    state = G.state_dict()
    del state["convs.2.noise.weight"]
    torch.save({"g_ema": state, "latent_avg": w_avg}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing keys: convs\.2\.noise\.weight"):
        load_rosinality_checkpoint(tmp_path / "missing.pt")


def test_rosinality_unexpected_key_is_named(tmp_path):
    G, _, w_avg = _rosinality_models()
    state = G.state_dict()
    state["convs.1.extra.weight"] = torch.zeros(3)
    torch.save({"g_ema": state, "latent_avg": w_avg}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected keys: convs\.1\.extra\.weight"):
        load_rosinality_checkpoint(tmp_path / "extra.pt")


def test_rosinality_explicit_config_mismatch_names_shapes(tmp_path):
    G, _, w_avg = _rosinality_models()
    path = _save_rosinality(tmp_path / "ckpt.pt", G, latent_avg=w_avg)
    wrong = tiny_config()
    wrong.channels = {4: 16, 8: 16, 16: 4}
    with pytest.raises(ValueError, match=r"shape mismatches: .*to_rgbs\.1\.conv\.weight"):
        load_rosinality_checkpoint(path, config=wrong)


def test_rosinality_file_with_code_is_refused(tmp_path):
    G, _, w_avg = _rosinality_models()
    marker = tmp_path / "pwned"
    path = _save_rosinality(tmp_path / "evil.pt", G, latent_avg=w_avg, extra=RunsShellCommand(marker))
    with pytest.raises(UnsafePickleError, match=r"pickled Python objects beyond tensors \((posix|nt)\.system\); expander never unpickles arbitrary code"):
        load_rosinality_checkpoint(path)
    assert not marker.exists()


def test_rosinality_not_a_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not a rosinality StyleGAN2 checkpoint: expected keys g_ema.*found \['state_dict'\]"):
        load_rosinality_checkpoint(tmp_path / "other.pt")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="found a Tensor"):
        load_rosinality_checkpoint(tmp_path / "tensor.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_rosinality_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError):
        load_rosinality_checkpoint(tmp_path / "garbage.pt")


# ==================================================================================================
# NVIDIA .pkl: a fake pickle in NVIDIA's exact format
# ==================================================================================================

FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(source, module.__dict__)  # defines functions whose __module__ is `name`, so pickle finds them
    return module


@contextlib.contextmanager
def fake_nvidia_modules():
    """``torch_utils.persistence`` / ``dnnlib.util`` just long enough to pickle, then removed again."""
    assert not any(name in sys.modules for name in FAKE_MODULES)
    persistence = _module("torch_utils.persistence", "def _reconstruct_persistent_obj(meta):\n    raise RuntimeError('never called')\n")
    util = _module("dnnlib.util", "class EasyDict(dict):\n    pass\n")
    torch_utils, dnnlib = types.ModuleType("torch_utils"), types.ModuleType("dnnlib")
    torch_utils.persistence, dnnlib.util, dnnlib.EasyDict = persistence, util, util.EasyDict
    sys.modules.update({"torch_utils": torch_utils, "torch_utils.persistence": persistence, "dnnlib": dnnlib, "dnnlib.util": util})
    try:
        yield types.SimpleNamespace(reconstruct=persistence._reconstruct_persistent_obj, EasyDict=util.EasyDict)
    finally:
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)


class Persistent(torch.nn.Module):
    """A module that pickles like ``torch_utils.persistence.persistent_class``'s decorator.

    ``__reduce__`` returns ``(_reconstruct_persistent_obj, (meta,), None)`` with ``meta`` holding the
    class name, the defining module's source (here a command that must never run) and the state.
    """

    module_src = "import os\nos.system('touch /tmp/expander-should-never-exist')\n"

    def __init__(self, class_name: str, **init_kwargs):
        super().__init__()
        self._nv_class_name = class_name
        self._init_args = ()
        self._init_kwargs = init_kwargs

    def __reduce__(self):
        state = dict(self.__dict__)
        class_name = state.pop("_nv_class_name")
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name, state=state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,), None)


FILTER = make_kernel([1, 3, 3, 1])  # what NVIDIA's upfirdn2d.setup_filter([1,3,3,1]) stores


def nv_fc(in_features, out_features, activation="linear", lr_multiplier=1.0, bias_init=0.0):
    layer = Persistent("FullyConnectedLayer", in_features=in_features, out_features=out_features, activation=activation, lr_multiplier=lr_multiplier, bias_init=bias_init)
    layer.activation = activation
    layer.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
    layer.bias = torch.nn.Parameter(torch.full([out_features], float(bias_init)) + 0.2 * torch.randn(out_features))
    layer.weight_gain = np.float64(lr_multiplier / np.sqrt(in_features))  # numpy scalars, as in NVIDIA's code
    layer.bias_gain = lr_multiplier
    return layer


def nv_conv(in_channels, out_channels, kernel_size, bias=True, activation="linear", down=1):
    layer = Persistent("Conv2dLayer", in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, bias=bias, activation=activation, down=down)
    layer.activation, layer.up, layer.down, layer.conv_clamp = activation, 1, down, None
    layer.register_buffer("resample_filter", FILTER.clone())
    layer.padding = kernel_size // 2
    layer.weight_gain = np.float64(1 / np.sqrt(in_channels * kernel_size**2))
    layer.act_gain = np.float64(np.sqrt(2) if activation == "lrelu" else 1.0)
    layer.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
    layer.bias = torch.nn.Parameter(0.2 * torch.randn(out_channels)) if bias else None
    return layer


def nv_synthesis_layer(in_channels, out_channels, w_dim, resolution, up=1):
    layer = Persistent("SynthesisLayer", in_channels=in_channels, out_channels=out_channels, w_dim=w_dim, resolution=resolution, up=up)
    layer.resolution, layer.up, layer.use_noise, layer.activation, layer.conv_clamp = resolution, up, True, "lrelu", None
    layer.register_buffer("resample_filter", FILTER.clone())
    layer.padding = 1
    layer.act_gain = np.float64(np.sqrt(2))
    layer.affine = nv_fc(w_dim, in_channels, bias_init=1)
    layer.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
    layer.register_buffer("noise_const", torch.randn(resolution, resolution))
    layer.noise_strength = torch.nn.Parameter(0.5 * torch.randn([]))
    layer.bias = torch.nn.Parameter(0.2 * torch.randn(out_channels))
    return layer


def nv_torgb(in_channels, w_dim):
    layer = Persistent("ToRGBLayer", in_channels=in_channels, out_channels=3, w_dim=w_dim)
    layer.conv_clamp = None
    layer.affine = nv_fc(w_dim, in_channels, bias_init=1)
    layer.weight = torch.nn.Parameter(torch.randn(3, in_channels, 1, 1))
    layer.bias = torch.nn.Parameter(0.2 * torch.randn(3))
    layer.weight_gain = np.float64(1 / np.sqrt(in_channels))
    return layer


def nv_generator(easydict, channels, w_dim=32, num_layers=2, lr_multiplier=0.01):
    resolution = max(channels)
    G = Persistent("Generator", z_dim=w_dim, c_dim=0, w_dim=w_dim, img_resolution=resolution, img_channels=3,
                   mapping_kwargs=easydict(num_layers=num_layers, lr_multiplier=lr_multiplier), synthesis_kwargs=easydict(channel_base=512, channel_max=16))
    G.z_dim, G.c_dim, G.w_dim, G.img_resolution, G.img_channels = w_dim, 0, w_dim, resolution, 3
    synthesis = Persistent("SynthesisNetwork", w_dim=w_dim, img_resolution=resolution, img_channels=3)
    synthesis.block_resolutions = sorted(channels)
    for res in sorted(channels):
        block = Persistent("SynthesisBlock", resolution=res, architecture="skip")
        block.architecture, block.resolution = "skip", res
        block.register_buffer("resample_filter", FILTER.clone())
        if res == 4:
            block.const = torch.nn.Parameter(torch.randn(channels[4], 4, 4))
        else:
            block.conv0 = nv_synthesis_layer(channels[res // 2], channels[res], w_dim, res, up=2)
        block.conv1 = nv_synthesis_layer(channels[res], channels[res], w_dim, res)
        block.torgb = nv_torgb(channels[res], w_dim)
        setattr(synthesis, f"b{res}", block)
    mapping = Persistent("MappingNetwork", z_dim=w_dim, c_dim=0, w_dim=w_dim, num_ws=2 * int(math.log2(resolution)) - 2, num_layers=num_layers, lr_multiplier=lr_multiplier)
    mapping.num_layers = num_layers
    for i in range(num_layers):
        setattr(mapping, f"fc{i}", nv_fc(w_dim, w_dim, activation="lrelu", lr_multiplier=lr_multiplier))
    mapping.register_buffer("w_avg", torch.randn(w_dim))
    G.synthesis, G.mapping = synthesis, mapping
    return G


def nv_discriminator(channels, group_size=4):
    resolution = max(channels)
    D = Persistent("Discriminator", c_dim=0, img_resolution=resolution, img_channels=3)
    D.c_dim = 0
    for res in sorted(channels, reverse=True)[:-1]:
        block = Persistent("DiscriminatorBlock", resolution=res, architecture="resnet")
        block.architecture = "resnet"
        block.register_buffer("resample_filter", FILTER.clone())
        if res == resolution:
            block.fromrgb = nv_conv(3, channels[res], 1, activation="lrelu")
        block.conv0 = nv_conv(channels[res], channels[res], 3, activation="lrelu")
        block.conv1 = nv_conv(channels[res], channels[res // 2], 3, activation="lrelu", down=2)
        block.skip = nv_conv(channels[res], channels[res // 2], 1, bias=False, down=2)
        setattr(D, f"b{res}", block)
    epilogue = Persistent("DiscriminatorEpilogue", in_channels=channels[4], cmap_dim=0, resolution=4)
    epilogue.mbstd = Persistent("MinibatchStdLayer", group_size=group_size, num_channels=1)
    epilogue.mbstd.group_size, epilogue.mbstd.num_channels = group_size, 1
    epilogue.conv = nv_conv(channels[4] + 1, channels[4], 3, activation="lrelu")
    epilogue.fc = nv_fc(channels[4] * 16, channels[4], activation="lrelu")
    epilogue.out = nv_fc(channels[4], 1)
    D.b4 = epilogue
    return D


TINY = {4: 16, 8: 16, 16: 8}


def write_fake_nvidia_pickle(path: Path, protocol: int = pickle.DEFAULT_PROTOCOL, d_channels=None, **overrides):
    """Build G/D/G_ema in NVIDIA's layout, pickle them as training_loop.py does; return the live modules."""
    with fake_nvidia_modules() as fake:
        torch.manual_seed(0)
        G_ema = nv_generator(fake.EasyDict, TINY)
        G = nv_generator(fake.EasyDict, TINY)
        D = nv_discriminator(d_channels or TINY)
        data = {"G": G, "D": D, "G_ema": G_ema, "augment_pipe": None,
                "training_set_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "ffhq.zip", "use_labels": False, "xflip": True}}
        data.update(overrides)
        with open(path, "wb") as handle:
            pickle.dump(data, handle, protocol=protocol)
    return G_ema, D


# --------------------------------------------------------------------------------------------------
# Reference forward pass in NVIDIA's parameterisation (stylegan2-ada-pytorch training/networks.py with
# fused_modconv=True and conv2d_resample's generic path; no clamping, fp32)
# --------------------------------------------------------------------------------------------------


def ref_fc(layer, x):
    x = x @ (layer.weight * float(layer.weight_gain)).t() + layer.bias * float(layer.bias_gain)
    return F.leaky_relu(x, 0.2) * math.sqrt(2) if layer.activation == "lrelu" else x


def ref_mapping(G, z):
    x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()  # normalize_2nd_moment
    for i in range(G.mapping.num_layers):
        x = ref_fc(getattr(G.mapping, f"fc{i}"), x)
    return x


def ref_modulated_conv(x, weight, styles, demodulate, up=1):
    """Per-sample weights (no weight gain: demodulation cancels it), as NVIDIA's modulated_conv2d."""
    out = []
    for b in range(x.shape[0]):
        w = weight * styles[b].reshape(1, -1, 1, 1)
        if demodulate:
            w = w * (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).rsqrt()
        xb = x[b : b + 1]
        if up == 2:
            # conv2d_resample, generic path: zero-insert + FIR with gain up**2, padding
            # [1 + (4+2-1)//2, 1 + (4-2)//2] = [3, 2], then flip_weight=False = a true convolution.
            xb = upfirdn2d(xb, FILTER * 4, up=2, pad=(3, 2))
            out.append(F.conv2d(xb, w.flip([2, 3])))
        else:
            out.append(F.conv2d(xb, w, padding=w.shape[-1] // 2))
    return torch.cat(out)


def ref_synthesis_layer(layer, x, w):
    x = ref_modulated_conv(x, layer.weight, ref_fc(layer.affine, w), demodulate=True, up=layer.up)
    x = x + layer.noise_const * layer.noise_strength  # noise_mode='const'
    return F.leaky_relu(x + layer.bias.reshape(1, -1, 1, 1), 0.2) * math.sqrt(2)


def ref_torgb(layer, x, w):
    styles = ref_fc(layer.affine, w) * float(layer.weight_gain)
    return ref_modulated_conv(x, layer.weight, styles, demodulate=False) + layer.bias.reshape(1, -1, 1, 1)


def ref_synthesis(G, ws):
    x = img = None
    w_idx = 0
    for res in G.synthesis.block_resolutions:
        block = getattr(G.synthesis, f"b{res}")
        if res == 4:
            x = block.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
            x = ref_synthesis_layer(block.conv1, x, ws[:, w_idx])
            img = ref_torgb(block.torgb, x, ws[:, w_idx + 1])
            w_idx += 1
        else:
            x = ref_synthesis_layer(block.conv0, x, ws[:, w_idx])
            x = ref_synthesis_layer(block.conv1, x, ws[:, w_idx + 1])
            img = upfirdn2d(img, FILTER * 4, up=2, pad=(2, 1)) + ref_torgb(block.torgb, x, ws[:, w_idx + 2])  # upsample2d
            w_idx += 2
    return img


def ref_conv_layer(layer, x, gain=1.0):
    """Conv2dLayer through conv2d_resample's generic path (pad, correlate, then FIR + decimate)."""
    w = layer.weight * float(layer.weight_gain)
    k = w.shape[-1]
    if layer.down == 2:
        pad = k // 2 + 1  # padding + (4 - 2 + 1) // 2 on both sides
        x = F.conv2d(F.pad(x, [pad] * 4), w)
        x = upfirdn2d(x, FILTER, down=2)
    else:
        x = F.conv2d(x, w, padding=k // 2)
    if layer.bias is not None:
        x = x + layer.bias.reshape(1, -1, 1, 1)
    if layer.activation == "lrelu":
        x = F.leaky_relu(x, 0.2)
    return x * float(layer.act_gain) * gain


def ref_discriminator(D, img):
    x = None
    for res in sorted((int(name[1:]) for name, _ in D.named_children() if name != "b4"), reverse=True):
        block = getattr(D, f"b{res}")
        if x is None:
            x = ref_conv_layer(block.fromrgb, img)
        y = ref_conv_layer(block.skip, x, gain=math.sqrt(0.5))
        x = ref_conv_layer(block.conv1, ref_conv_layer(block.conv0, x), gain=math.sqrt(0.5))
        x = y + x
    n, c, h, w = x.shape
    group = min(D.b4.mbstd.group_size, n)
    y = x.reshape(group, -1, 1, c, h, w)
    y = ((y - y.mean(dim=0)).square().mean(dim=0) + 1e-8).sqrt().mean(dim=[2, 3, 4])
    x = torch.cat([x, y.reshape(-1, 1, 1, 1).repeat(group, 1, h, w)], dim=1)
    x = ref_conv_layer(D.b4.conv, x)
    return ref_fc(D.b4.out, ref_fc(D.b4.fc, x.flatten(1)))


# --------------------------------------------------------------------------------------------------
# NVIDIA tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_nvidia_pickle_converts_to_the_same_generator(tmp_path, protocol):
    nv_G, nv_D = write_fake_nvidia_pickle(tmp_path / "network.pkl", protocol=protocol)
    assert not any(name in sys.modules for name in FAKE_MODULES)  # loading must not need them

    G, D = load_nvidia_pickle(tmp_path / "network.pkl", allow_pickle=True)

    assert G.config.resolution == 16 and G.config.style_dim == 32 and G.config.n_mlp == 2
    assert G.config.channels == TINY and G.config.lr_mlp == pytest.approx(0.01)
    torch.testing.assert_close(G.w_avg, nv_G.mapping.w_avg)
    with torch.no_grad():
        z = torch.randn(3, 32)
        torch.testing.assert_close(G.mapping(z), ref_mapping(nv_G, z), rtol=1e-4, atol=1e-4)
        ws = torch.randn(3, G.n_latent, 32)  # w+ checks the per-layer style order too
        expected = ref_synthesis(nv_G, ws)
        torch.testing.assert_close(G.synthesis(ws, noise_mode="const"), expected, rtol=1e-4, atol=1e-4)
        assert expected.abs().mean() > 0.1  # a real image, not a degenerate zero

        assert D is not None
        image = torch.randn(4, 3, 16, 16)
        torch.testing.assert_close(D(image), ref_discriminator(nv_D, image), rtol=1e-4, atol=1e-4)
    assert not Path("/tmp/expander-should-never-exist").exists()  # module_src was never executed


def test_upsampling_conv_needs_no_weight_flip(tmp_path):
    """The numerical test above would catch a flipped up-conv weight (so 'no flip' is proven, not assumed)."""
    nv_G, _ = write_fake_nvidia_pickle(tmp_path / "network.pkl")
    G, _ = load_nvidia_pickle(tmp_path / "network.pkl", allow_pickle=True)
    ws = torch.randn(2, G.n_latent, 32)
    with torch.no_grad():
        for up_conv in G.convs[::2]:
            up_conv.conv.weight.copy_(up_conv.conv.weight.flip([3, 4]))
        assert (G.synthesis(ws) - ref_synthesis(nv_G, ws)).abs().max() > 1e-2


def test_nvidia_state_dict_tree_and_keys(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    torch.manual_seed(3)
    linear = torch.nn.Linear(2, 3)
    write_fake_nvidia_pickle(tmp_path / "network.pkl", views={"base": base, "view": base[1:, 2::2].t()},
                             array=np.arange(6, dtype=np.float32).reshape(2, 3), plain_module=linear)
    data = read_nvidia_pickle(tmp_path / "network.pkl", allow_pickle=True)
    # Storage offsets and strides survive the restricted tensor rebuild.
    assert torch.equal(data["views"]["view"], base[1:, 2::2].t()) and torch.equal(data["views"]["base"], base)
    np.testing.assert_array_equal(data["array"], np.arange(6, dtype=np.float32).reshape(2, 3))
    # A plain torch.nn module becomes a stand-in that only records its state.
    assert isinstance(data["plain_module"], PickledModule) and data["plain_module"].class_name == "torch.nn.modules.linear.Linear"
    assert torch.equal(data["plain_module"].state_dict()["weight"], linear.weight.detach())
    assert isinstance(data["G_ema"], PickledModule) and data["G_ema"].class_name == "Generator"
    assert data["augment_pipe"] is None and data["training_set_kwargs"]["path"] == "ffhq.zip"
    mapping_kwargs = data["G_ema"].init_kwargs()["mapping_kwargs"]
    assert isinstance(mapping_kwargs, dict) and mapping_kwargs["num_layers"] == 2  # dnnlib.EasyDict -> dict
    sd = data["G_ema"].state_dict()
    for key in ["mapping.fc0.weight", "mapping.w_avg", "synthesis.b4.const", "synthesis.b4.conv1.affine.weight",
                "synthesis.b4.conv1.noise_const", "synthesis.b4.conv1.noise_strength", "synthesis.b8.conv0.weight",
                "synthesis.b16.torgb.bias", "synthesis.b8.resample_filter"]:
        assert key in sd, key

    rosinality, latent_avg, config = convert_nvidia_state_dict(sd)
    assert set(rosinality) == set(Generator(config).state_dict())
    assert torch.equal(rosinality["noises.noise_3"][0, 0], sd["synthesis.b16.conv0.noise_const"])
    assert torch.equal(rosinality["convs.3.noise.weight"], sd["synthesis.b16.conv1.noise_strength"].reshape(1))
    assert torch.equal(rosinality["input.input"][0], sd["synthesis.b4.const"])
    assert torch.equal(latent_avg, sd["mapping.w_avg"])

    with pytest.raises(ValueError, match=r"missing keys: synthesis\.b8\.conv1\.affine\.bias"):
        convert_nvidia_state_dict({k: v for k, v in sd.items() if k != "synthesis.b8.conv1.affine.bias"})
    with pytest.raises(ValueError, match=r"unexpected keys: synthesis\.b8\.conv1\.extra"):
        convert_nvidia_state_dict({**sd, "synthesis.b8.conv1.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="StyleGAN3"):
        convert_nvidia_state_dict({**sd, "synthesis.input.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="conditional"):
        convert_nvidia_state_dict({**sd, "mapping.embed.weight": torch.zeros(1)})

    d_sd = data["D"].state_dict()
    with pytest.raises(ValueError, match=r"missing keys: b8\.skip\.weight"):
        convert_nvidia_discriminator_state_dict({k: v for k, v in d_sd.items() if k != "b8.skip.weight"}, config)


def test_nvidia_discriminator_with_other_widths_is_dropped(tmp_path, caplog):
    write_fake_nvidia_pickle(tmp_path / "network.pkl", d_channels={4: 8, 8: 8, 16: 8})
    with caplog.at_level(logging.WARNING, logger="expander.generators.convert"):
        G, D = load_nvidia_pickle(tmp_path / "network.pkl", allow_pickle=True)
    assert D is None and "discriminator not imported" in caplog.text
    assert G.config.channels == TINY


def test_nvidia_pickle_needs_opt_in_and_reads_nothing_without_it(tmp_path):
    # The opt-in is checked before the file is even looked at: a missing file gives the same error.
    with pytest.raises(PickleNotAllowedError, match="allow_pickle=True"):
        load_nvidia_pickle(tmp_path / "does-not-exist.pkl")
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"G_ema": RunsShellCommand(marker)}))
    with pytest.raises(PickleNotAllowedError, match="--allow-pickle"):
        load_nvidia_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_nvidia_pickle(tmp_path / "does-not-exist.pkl", allow_pickle=True)


def test_nvidia_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"G_ema": RunsShellCommand(marker)}))
    with pytest.raises(UnsafePickleError, match=rf"refused to unpickle the global {os.system.__module__}\.system"):
        load_nvidia_pickle(tmp_path / "evil.pkl", allow_pickle=True)
    assert not marker.exists()
    assert issubclass(UnsafePickleError, ValueError)  # the CLI reports ValueErrors cleanly


def test_nvidia_pickle_with_code_in_a_tensor_storage_is_refused(tmp_path):
    """Storages arrive as torch.storage._load_from_bytes(bytes), whose real body is torch.load(weights_only=False)."""
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"storage": RunsShellCommand(marker)}, payload)

    class FakeStorage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (payload.getvalue(),))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"G_ema": FakeStorage()}))
    with pytest.raises(UnsafePickleError, match="storage"):
        read_nvidia_pickle(tmp_path / "evil.pkl", allow_pickle=True)
    assert not marker.exists()


def test_nvidia_pickle_cannot_reach_other_persistence_functions_or_set_state_on_globals(tmp_path):
    with fake_nvidia_modules():
        persistence = sys.modules["torch_utils.persistence"]
        exec("def _src_to_module(src):\n    raise RuntimeError('never called')\n", persistence.__dict__)

        class ExecsSource:
            def __reduce__(self):
                return (persistence._src_to_module, ("import os",))

        data = pickle.dumps({"G_ema": ExecsSource()})
    (tmp_path / "src.pkl").write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"torch_utils\.persistence\._src_to_module"):
        read_nvidia_pickle(tmp_path / "src.pkl", allow_pickle=True)

    # GLOBAL collections.OrderedDict, then BUILD with a state: would setattr on the class itself.
    (tmp_path / "build.pkl").write_bytes(b"\x80\x02ccollections\nOrderedDict\n}X\x03\x00\x00\x00fooK\x01sb.")
    with pytest.raises(UnsafePickleError, match="BUILD"):
        read_nvidia_pickle(tmp_path / "build.pkl", allow_pickle=True)
    assert not hasattr(collections.OrderedDict, "foo")

    (tmp_path / "objects.pkl").write_bytes(pickle.dumps({"G_ema": np.array([1, "x"], dtype=object)}))
    with pytest.raises(UnsafePickleError, match="object dtypes"):
        read_nvidia_pickle(tmp_path / "objects.pkl", allow_pickle=True)


def test_nvidia_pickle_without_g_ema(tmp_path):
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"model": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"not an NVIDIA StyleGAN2 pickle: expected keys G_ema.*found \['model'\]"):
        load_nvidia_pickle(tmp_path / "other.pkl", allow_pickle=True)
    (tmp_path / "truncated.pkl").write_bytes(pickle.dumps({"G_ema": torch.zeros(2)})[:20])
    with pytest.raises(ValueError, match="could not read it as a pickle"):
        load_nvidia_pickle(tmp_path / "truncated.pkl", allow_pickle=True)


def _tensorflow_stylegan2_pickle(protocol: int) -> bytes:
    """Pickles like the official NVlabs/stylegan2 networks: (G, D, Gs), each a dnnlib.tflib.network.Network."""
    network = _module("dnnlib.tflib.network", "class Network:\n    def __getstate__(self):\n        return {'version': 4, 'name': self.name, 'build_module_src': 'import os'}\n")
    tflib, dnnlib = types.ModuleType("dnnlib.tflib"), types.ModuleType("dnnlib")
    dnnlib.tflib, tflib.network = tflib, network
    assert not any(name in sys.modules for name in ("dnnlib", "dnnlib.tflib", "dnnlib.tflib.network"))
    sys.modules.update({"dnnlib": dnnlib, "dnnlib.tflib": tflib, "dnnlib.tflib.network": network})
    try:
        nets = []
        for name in ("G", "D", "Gs"):
            nets.append(network.Network())
            nets[-1].name = name
        return pickle.dumps(tuple(nets), protocol=protocol)
    finally:
        for name in ("dnnlib.tflib.network", "dnnlib.tflib", "dnnlib"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("protocol", [2, 3, pickle.HIGHEST_PROTOCOL])  # the released files are protocol 3 (Python 3.6)
def test_tensorflow_stylegan2_pickle_says_how_to_convert_it(tmp_path, protocol):
    """Unreadable, but not a security matter: the error must say how to convert the file, not warn about code."""
    (tmp_path / "stylegan2-ffhq-config-f.pkl").write_bytes(_tensorflow_stylegan2_pickle(protocol))
    with pytest.raises(TensorFlowPickleError, match=r"stylegan2-ffhq-config-f\.pkl: this is an official NVIDIA TensorFlow StyleGAN2 pickle \(it names dnnlib\.tflib\.network\.Network\)") as caught:
        load_nvidia_pickle(tmp_path / "stylegan2-ffhq-config-f.pkl", allow_pickle=True)
    message = str(caught.value)
    assert "convert_weight.py" in message and "legacy.py" in message and "never imports or runs code" not in message
    assert not isinstance(caught.value, UnsafePickleError) and isinstance(caught.value, ValueError)  # the CLI reports ValueErrors cleanly


def test_tensorflow_stylegan2_pickle_under_a_pt_name_gets_the_same_advice(tmp_path):
    # read with torch.load(weights_only=True), which refuses the global: say what the file is, not "code in the file"
    (tmp_path / "stylegan2-ffhq-config-f.pt").write_bytes(_tensorflow_stylegan2_pickle(3))
    with pytest.raises(TensorFlowPickleError, match="pt: this is an official NVIDIA TensorFlow StyleGAN2 pickle.*convert_weight.py"):
        load_rosinality_checkpoint(tmp_path / "stylegan2-ffhq-config-f.pt")


class _DtypeWithState:
    """Pickles as numpy.dtype(spec) followed by BUILD with ``state``."""

    def __init__(self, spec, state):
        self.spec, self.state = spec, state

    def __reduce__(self):
        return (np.dtype, (self.spec, False, True), self.state)


@pytest.mark.parametrize("spec, state, message", [
    # fields at an offset of 2**40: reading such an array would segfault
    ("f8", (3, "|", None, ("a",), {"a": (np.dtype("f8"), 2**40)}, 8, 1, 0), "plain dtype"),
    ("f8", (3, "<", None, None, None, -1, -1, 63), "plain dtype"),  # flags that claim Python objects
    ("V8", None, "refused numpy dtype 'V8'"),
])
def test_nvidia_pickle_cannot_give_numpy_dtypes_fields_or_objects(tmp_path, spec, state, message):
    (tmp_path / "dtype.pkl").write_bytes(pickle.dumps({"G_ema": _DtypeWithState(spec, state)}, protocol=2))
    with pytest.raises(UnsafePickleError, match=message):
        read_nvidia_pickle(tmp_path / "dtype.pkl", allow_pickle=True)


def test_pickled_module_settings_are_scalars():
    module = PickledModule("training.networks.MappingNetwork", {"c_dim": np.int64(3), "w_avg_beta": np.float32(0.5), "layers": np.zeros(3)})
    assert module.attribute("c_dim") == 3 and type(module.attribute("c_dim")) is int
    assert module.attribute("w_avg_beta") == 0.5 and module.attribute("missing", 7) == 7
    with pytest.raises(ValueError, match="stores layers as a ndarray.*not a StyleGAN2 pickle"):
        module.attribute("layers")


def test_a_file_that_is_not_a_checkpoint_is_not_called_a_pickle_with_code(tmp_path):
    (tmp_path / "ffhq.pt").write_text("<html><body>Google Drive: virus scan warning</body></html>")  # a saved download page
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint.*Unsupported operand") as caught:
        load_rosinality_checkpoint(tmp_path / "ffhq.pt")
    assert not isinstance(caught.value, UnsafePickleError) and "weights_only` set to `False" not in str(caught.value)


def test_a_pt_file_that_builds_objects_with_inst_is_called_code_not_corrupt(tmp_path):
    (tmp_path / "inst.pt").write_bytes(b'(ios\nsystem\nS"true"\n.')  # protocol 0: INST os.system("true")
    with pytest.raises(UnsafePickleError, match=r"beyond tensors \(the INST opcode\)"):
        load_rosinality_checkpoint(tmp_path / "inst.pt")
