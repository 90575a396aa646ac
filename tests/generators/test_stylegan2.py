import pytest
import torch

from expander.generators.reference import grouped_convolutions, grouped_modulated_conv
from expander.generators.stylegan2 import Discriminator, Generator, ModulatedConv2d, StyleGAN2Config

from ..conftest import tiny_config


@pytest.mark.parametrize("upsample,demodulate,kernel", [(False, True, 3), (True, True, 3), (False, False, 1)])
def test_modulated_conv_matches_grouped_reference(upsample, demodulate, kernel):
    layer = ModulatedConv2d(6, 5, kernel, style_dim=8, demodulate=demodulate, upsample=upsample)
    x, style = torch.randn(3, 6, 8, 8), torch.randn(3, 8)
    torch.testing.assert_close(layer(x, style), grouped_modulated_conv(layer, x, style), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_generator_shapes_and_w_plus(resolution):
    G = Generator(tiny_config(resolution))
    z = torch.randn(2, 32)
    w = G.mapping(z)
    image = G.synthesis(w)
    assert image.shape == (2, 3, resolution, resolution)
    w_plus = w.unsqueeze(1).repeat(1, G.n_latent, 1)
    torch.testing.assert_close(G.synthesis(w_plus), image)
    assert Discriminator(tiny_config(resolution))(image).shape == (2, 1)


def test_rosinality_key_layout():
    keys = set(Generator(tiny_config()).state_dict())
    for key in ["style.1.weight", "style.2.bias", "input.input", "conv1.conv.weight", "conv1.conv.modulation.weight",
                "conv1.noise.weight", "conv1.activate.bias", "to_rgb1.conv.weight", "to_rgb1.bias", "convs.0.conv.blur.kernel",
                "convs.1.conv.weight", "to_rgbs.0.upsample.kernel", "noises.noise_0", "noises.noise_4"]:
        assert key in keys, key
    assert not any("w_avg" in k for k in keys)  # kept outside, as rosinality's latent_avg
    d_keys = set(Discriminator(tiny_config()).state_dict())
    for key in ["convs.0.0.weight", "convs.0.1.bias", "convs.1.conv1.0.weight", "convs.1.conv2.0.kernel", "convs.1.skip.1.weight",
                "final_conv.0.weight", "final_linear.0.weight", "final_linear.1.bias"]:
        assert key in d_keys, key


def test_const_noise_is_deterministic_and_truncation_pulls_to_mean(tiny_generator):
    z = torch.randn(4, 32)
    torch.testing.assert_close(tiny_generator(z), tiny_generator(z))
    w = tiny_generator.mapping(z, truncation_psi=0.0)
    torch.testing.assert_close(w, tiny_generator.w_avg.expand_as(w))


def test_synthesis_parameters_exclude_mapping(tiny_generator):
    names = {id(p) for p in tiny_generator.style.parameters()}
    assert all(id(p) not in names for p in tiny_generator.synthesis_parameters())
    assert len(tiny_generator.synthesis_parameters()) + len(list(tiny_generator.style.parameters())) == len(list(tiny_generator.parameters()))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        StyleGAN2Config(resolution=48)
    with pytest.raises(ValueError, match="no width"):
        StyleGAN2Config(resolution=32, channels={4: 8, 8: 8})
    with pytest.raises(ValueError, match="unknown StyleGAN2Config keys"):
        StyleGAN2Config.from_dict({"resolution": 16, "bogus": 1})
    # values of the wrong kind in a hand-edited config.json: named, not a TypeError deep in the model
    for change, message in [
        ({"resolution": "big"}, "resolution must be a positive integer"),
        ({"style_dim": 8.5}, "style_dim must be a positive integer"),
        ({"n_mlp": True}, "n_mlp must be a positive integer"),
        ({"lr_mlp": "fast"}, "lr_mlp must be a positive number"),
        ({"channels": [8, 8]}, "channels must be a mapping"),
        ({"channels": {"4": "wide"}}, "channels must map resolutions to integer widths"),
        ({"blur_kernel": "1331"}, "blur_kernel must be a list of integers"),
        ({"blur_kernel": [1, 3.5, 3, 1]}, "blur_kernel must be a list of integers"),
    ]:
        with pytest.raises(ValueError, match=message):
            StyleGAN2Config.from_dict({"resolution": 16, **change})


def test_whole_generator_matches_grouped_reference(tiny_generator):
    z = torch.randn(3, 32)
    ours = tiny_generator(z)
    with grouped_convolutions(tiny_generator):
        reference = tiny_generator(z)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    # The patch is undone on exit: every layer runs its own forward again.
    assert all("forward" not in vars(m) for m in tiny_generator.modules() if isinstance(m, ModulatedConv2d))


def test_minibatch_stddev_uses_equal_groups_for_any_batch():
    torch.manual_seed(0)
    discriminator = Discriminator(tiny_config()).eval()
    images = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        six = discriminator(images)  # groups of 3: 4 does not divide 6
        discriminator.stddev_group = 3
        assert torch.equal(six, discriminator(images))
        discriminator.stddev_group = 1  # the old fallback: one per-sample constant, far from the trained feature
        assert not torch.allclose(six, discriminator(images), atol=1e-3)


def test_an_explicit_noise_list_must_cover_every_layer(tiny_generator):
    w = torch.randn(2, tiny_generator.config.style_dim)
    with pytest.raises(ValueError, match="one entry .* per noise layer"):
        tiny_generator.synthesis(w, noise=tiny_generator.noise_buffers()[:3])
    assert tiny_generator.synthesis(w, noise=[None] * tiny_generator.config.num_noise_layers).shape == (2, 3, 16, 16)
