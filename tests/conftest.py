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
    torch.set_num_threads(1)  # tiny models: threads only add overhead, and oversubscribe a busy machine


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


TINY_VOCAB = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "an", "photo", "portrait", "picture", "image", "of", "person", "zombie", "sketch", "with", "glasses"]


@pytest.fixture
def tiny_clip_dir(tmp_path):
    """A random transformers CLIPModel + word-level tokenizer saved like a Hub repo (nothing downloaded)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(TINY_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8,
    )
    torch.manual_seed(0)
    folder = tmp_path / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder
