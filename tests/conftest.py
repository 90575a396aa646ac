"""Shared fixtures: tiny random models, seeded, CPU only, no network."""

from __future__ import annotations

import os

import pytest
import torch

# No test may touch the network: the Hub client must answer from local files or fail.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from expander.generators.stylegan2 import Discriminator, Generator, StyleGAN2Config  # noqa: E402

TINY_CHANNELS = {4: 16, 8: 16, 16: 8}


def tiny_config(resolution: int = 16, style_dim: int = 32) -> StyleGAN2Config:
    channels = {2**i: TINY_CHANNELS.get(2**i, 8) for i in range(2, resolution.bit_length())}
    return StyleGAN2Config(resolution=resolution, style_dim=style_dim, n_mlp=2, channels=channels)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_generator() -> Generator:
    torch.manual_seed(0)
    G = Generator(tiny_config()).eval()
    # Random weights give tiny modulation weights a realistic spread; the mean w is seeded.
    G.style.update_w_avg(1024, generator=torch.Generator().manual_seed(0))
    return G


@pytest.fixture
def tiny_discriminator() -> Discriminator:
    torch.manual_seed(1)
    return Discriminator(tiny_config())
