"""Shared fixtures: tiny random models, seeded, CPU only, no network."""

from __future__ import annotations

import json
import os
import string

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


@pytest.fixture(autouse=True)
def _private_expander_home(tmp_path_factory, monkeypatch):
    # The user registry lives in $EXPANDER_HOME (default ~/.cache/expander): a test must neither read
    # the developer's registered models (a user entry can shadow a built-in name) nor write there.
    monkeypatch.setenv("EXPANDER_HOME", str(tmp_path_factory.mktemp("expander_home")))


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


TINY_SD_RESOLUTION = 16  # the tiny VAE downsamples by 2: 16x16 images -> 8x8 latents, the UNet's sample_size
TINY_SD_TEXT_POSITIONS = 16


def _write_clip_tokenizer(folder) -> None:
    """A tiny BPE CLIPTokenizer in SD's on-disk layout (vocab.json + merges.txt + tokenizer_config.json).

    Characters and end-of-word characters cover any lowercase prompt; one merge shows merges are read.
    """
    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["sk"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\ns k\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": TINY_SD_TEXT_POSITIONS, **special}))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Random vae/unet/text_encoder/tokenizer/scheduler saved like a StableDiffusionPipeline repo."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny") / "sd"
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, sample_size=TINY_SD_RESOLUTION,
    ).save_pretrained(root / "vae")
    _write_clip_tokenizer(root / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=55, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=TINY_SD_TEXT_POSITIONS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    CLIPTextModel(text_config).save_pretrained(root / "text_encoder")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root
