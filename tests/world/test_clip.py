"""The world CLIP: Hub-style loading, tokenizer/pooling consistency, encoders, training loop, quality.

Quality checks load the shipped weights (``expander/world/weights/clip``) and use loose thresholds
(the report of the training run has the exact numbers), so they are not flaky.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from expander.world import clip as world_clip
from expander.world import renderer
from expander.world.clip import (
    EOS_ID,
    WORLD_CLIP_DIR,
    WORLD_CLIPS,
    WORLD_TEMPLATES,
    check_vocabulary,
    clip_pixel_values,
    contrastive_loss,
    encode_images,
    encode_text,
    load_clip,
    load_world_clip,
)

pytestmark = pytest.mark.skipif(not (WORLD_CLIP_DIR / "model.safetensors").exists(), reason="world CLIP weights not trained yet")


@pytest.fixture(scope="module", params=sorted(WORLD_CLIPS))
def world_folder(request):
    """Each shipped world CLIP (the NADA ensemble's members) passes the same checks."""
    folder = WORLD_CLIPS[request.param]
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"{request.param} weights not trained yet")
    return folder


@pytest.fixture(scope="module")
def world(world_folder):
    return load_world_clip(world_folder)


def test_loads_through_the_generic_hub_path(world, world_folder):
    from transformers import CLIPModel

    model, tokenizer = world
    assert isinstance(model, CLIPModel) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # Exactly what a real user's `load_clip("openai/clip-vit-base-patch32")` does, on the folder.
    generic, generic_tokenizer = load_clip(str(world_folder))
    for (name, a), (_, b) in zip(model.state_dict().items(), generic.state_dict().items()):
        assert torch.equal(a, b), name
    assert generic_tokenizer("a photo of a zombie")["input_ids"] == tokenizer("a photo of a zombie")["input_ids"]
    # Only inference files are shipped (resumable training state lives elsewhere).
    assert not list(world_folder.glob("state*"))


def test_guidance_encoder_reads_size_and_normalisation():
    from expander.guidance.clip import OPENAI_MEAN, ClipEncoder

    encoder = ClipEncoder.from_pretrained(str(WORLD_CLIP_DIR))
    assert encoder.image_size == 64
    assert tuple(encoder.image_mean) == pytest.approx(OPENAI_MEAN)


def test_tokenizer_and_text_config_agree_on_special_tokens(world):
    model, tokenizer = world
    text = model.config.text_config
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3)
    assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (0, 2, EOS_ID)
    assert text.eos_token_id != 2  # 2 selects transformers' legacy argmax-of-ids pooling
    assert text.vocab_size == len(tokenizer)
    ids = tokenizer("A Portrait of a person.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    # Long prompts are truncated to the position table and still end with <eos>.
    long = tokenizer(["a person with " + " and ".join(["glasses"] * 40)], truncation=True)["input_ids"][0]
    assert len(long) == text.max_position_embeddings and long[-1] == tokenizer.eos_token_id


def test_pooled_text_output_is_the_eos_state(world):
    model, tokenizer = world
    prompts = ["a zombie", "a portrait of a person with glasses and a golden crown", "a sketch of a face"]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    eos = (tokens["input_ids"] == tokenizer.eos_token_id).int().argmax(1)  # (N,)
    assert len(set(eos.tolist())) == len(prompts)  # different lengths: padding follows <eos>
    expected = out.last_hidden_state[torch.arange(len(prompts)), eos]
    torch.testing.assert_close(out.pooler_output, expected)


def test_every_caption_and_template_is_in_vocabulary(world):
    _, tokenizer = world
    labels = torch.rand(256, len(renderer.ATTRIBUTES), generator=torch.Generator().manual_seed(5)) < 0.2
    rng = torch.Generator().manual_seed(6)
    texts = renderer.caption(labels, rng) + world_clip.compose_captions(labels, rng)
    texts += [t.format(world_clip.attribute_prompt(a, p)) for t in WORLD_TEMPLATES for a, ps in renderer.ATTRIBUTE_PHRASES.items() for p in ps]
    assert [t for t in texts if check_vocabulary(tokenizer, t)] == []


def test_out_of_vocabulary_words_warn_and_are_listed(world):
    model, tokenizer = world
    assert check_vocabulary(tokenizer, "A portrait of a person with a Jetpack and wings.") == ["jetpack", "wings"]
    with pytest.warns(UserWarning, match=r"jetpack.*wings"):
        encode_text(model, tokenizer, ["a portrait of a person with a jetpack", "wings"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_text(model, tokenizer, ["a photo of a portrait of a person with glasses."])


def test_subword_tokenizers_have_no_out_of_vocabulary_words():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(unk_token="<unk>")), unk_token="<unk>")
    assert check_vocabulary(bpe, "anything at all") == []


def test_real_clip_tokenizer_knows_words_it_has_pieces_for(tiny_sd_dir):
    """CLIP's BPE stores whole words as 'photo</w>' and its unknown token is in the vocabulary: a
    word missing as one entry is still encoded, so it must not be reported as unknown."""
    from transformers import AutoTokenizer

    from expander.guidance.clip import out_of_vocabulary  # what ClipEncoder.encode_text warns with

    tokenizer = AutoTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")
    assert tokenizer.unk_token_id is not None
    assert out_of_vocabulary(tokenizer, "A photo of a person with a hat.") == []


def test_encoders_are_deterministic_and_normalised(world):
    model, tokenizer = world
    prompts = ["a portrait of a person", "a zombie wearing a hat"]
    t1, t2 = encode_text(model, tokenizer, prompts), encode_text(model, tokenizer, prompts)
    images = renderer.sample_portraits(3, 0, attributes=["glasses"]).images
    i1, i2 = encode_images(model, images), encode_images(model, images)
    assert t1.shape == (2, 128) and i1.shape == (3, 128)
    assert torch.equal(t1, t2) and torch.equal(i1, i2)
    torch.testing.assert_close(i1.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(t1.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("size", [64, 32])
def test_gradients_flow_from_image_embeddings_to_pixels(world, size):
    model, tokenizer = world
    images = renderer.sample_portraits(2, 1).images
    images = torch.nn.functional.interpolate(images, size=size, mode="area").requires_grad_(True)
    direction = encode_text(model, tokenizer, ["a zombie"]) - encode_text(model, tokenizer, ["a portrait of a person"])
    (1 - (encode_images(model, images) @ direction.t())).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_clip_pixel_values_normalises_and_resizes():
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = clip_pixel_values(images, 64, mean, std)
    expected = ((images + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, expected)
    assert clip_pixel_values(images, 224, mean, std).shape == (2, 3, 224, 224)


def test_contrastive_loss_treats_equal_attribute_sets_as_positives():
    labels = torch.tensor([[0, 0], [0, 0], [1, 0], [0, 1]], dtype=torch.bool)
    same = (labels[:, None] == labels[None]).all(-1).float()
    # Logits that score every equal-label pair high are (near) optimal; swapping two classes is not.
    good = contrastive_loss(20 * same, labels)
    bad = contrastive_loss(20 * same[[2, 3, 0, 1]], labels)
    assert good < 0.75 and bad > good + 5  # optimum is log(2)/2 ~ 0.35: the two source rows share mass


def test_training_resumes_exactly(tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = world_clip.ClipTrainingConfig(steps=2, batch_size=4, warmup=1, save_every=1)
    straight = world_clip.train_world_clip(tmp_path / "a", config=config, progress=False)

    # Second run: crash on the second batch (after the step-1 checkpoint), then resume.
    calls = {"n": 0}
    original = world_clip.sample_training_batch

    def crashing(n, rng, *options):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(n, rng, *options)

    monkeypatch.setattr(world_clip, "sample_training_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        world_clip.train_world_clip(tmp_path / "b", config=config, progress=False)
    monkeypatch.setattr(world_clip, "sample_training_batch", original)
    resumed = world_clip.train_world_clip(tmp_path / "b", config=config, progress=False)

    a, _ = load_clip(str(straight))
    b, _ = load_clip(str(resumed))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_hard_negatives_move_one_attribute_and_drop_it_from_the_caption():
    rng = torch.Generator().manual_seed(0)
    labels = torch.zeros(6, len(renderer.ATTRIBUTES), dtype=torch.bool)
    crown, pop_art = renderer.ATTRIBUTES.index("crown"), renderer.ATTRIBUTES.index("pop_art")
    labels[:4, crown] = True
    labels[4, pop_art] = True  # a whole-image style has no place to be moved from
    factors = renderer.sample_factors(6, 0)
    images = renderer.render(factors, labels)

    moved_images, moved_labels = world_clip._misplace_some(images, factors, labels, rng, share=1.0)
    assert not moved_labels[:4, crown].any() and moved_labels[4, pop_art]  # the crown is no longer named
    assert torch.equal(moved_images[4:], images[4:])  # nothing to move: untouched
    without = renderer.render(factors[:4], moved_labels[:4])
    for image, plain, original in zip(moved_images[:4], without, images[:4]):
        assert not torch.equal(image, plain) and not torch.equal(image, original)  # the crown is drawn, elsewhere
    assert world_clip.sample_training_batch(8, rng, misplaced_share=0.5)[0].shape == (8, 3, 64, 64)

    before = rng.get_state()
    assert world_clip._misplace_some(images, factors, labels, rng, share=0.0)[1] is labels
    assert torch.equal(rng.get_state(), before)  # share 0 reproduces the first CLIPs' data stream


def test_move_attribute_moves_exactly_the_changed_pixels():
    without = torch.zeros(1, 3, 8, 8)
    with_attribute = without.clone()
    with_attribute[0, :, 1, 2] = 1.0  # a one-pixel attribute at row 1, column 2
    moved, area = renderer.move_attribute(without, with_attribute, rows=[3], cols=[-1])
    expected = without.clone()
    expected[0, :, 4, 1] = 1.0
    assert torch.equal(moved, expected) and area.tolist() == [1 / 64]


def test_retrieval_and_paraphrase_consistency(world):
    model, tokenizer = world
    metrics = world_clip.evaluate_world_clip(model, tokenizer, per_class=16)
    report = world_clip.format_metrics(metrics)
    assert metrics["retrieval_mean"] >= 0.8, report
    # Shipped model: 15 of 18 classes at >= 95%; elf/cat ears (thin, low-contrast shapes) lag behind.
    assert sum(acc >= 0.75 for acc in metrics["retrieval_accuracy"].values()) >= 14, report
    assert metrics["paraphrase_within"] > metrics["paraphrase_between"] + 0.1
    assert metrics["paraphrase_fraction"] >= 15 / 17, world_clip.format_metrics(metrics)


@pytest.mark.parametrize("what, seed, misplaced_share, name", [("clip", 0, 0.0, "world"), ("clip-b", 1, 0.0, "world-b"), ("clip-c", 24680, 0.15, "world-c")])
def test_world_build_trains_each_ensemble_member_with_its_own_recipe_into_its_own_folder(what, seed, misplaced_share, name, tmp_path, monkeypatch):
    from expander.world import build as world_build

    calls = {}
    monkeypatch.setattr(world_clip, "train_world_clip", lambda out, resume, config: calls.update(out=out, config=config) or tmp_path / "model")
    monkeypatch.setattr(world_clip, "load_world_clip", lambda folder: (None, None))
    monkeypatch.setattr(world_clip, "evaluate_world_clip", lambda model, tokenizer: {"retrieval_mean": 1.0})
    monkeypatch.setattr(world_clip, "export_world_clip", lambda model_dir, dest, metrics: calls.update(metrics=metrics) or dest)
    assert world_build.build(what, steps=3, runs=tmp_path) == WORLD_CLIPS[name]
    assert calls["out"] == tmp_path / f"world-{what}"
    assert (calls["config"].steps, calls["config"].seed, calls["config"].misplaced_share) == (3, seed, misplaced_share)
    assert calls["metrics"]["training"]["misplaced_share"] == misplaced_share  # how the shipped weights were made, next to them


def test_every_shipped_world_clip_has_weights_and_a_build_recipe():
    from expander.world.build import WORLD_CLIP_RECIPES

    for name in WORLD_CLIPS:
        assert (WORLD_CLIPS[name] / "model.safetensors").is_file(), name
        assert WORLD_CLIPS[name].name == WORLD_CLIP_RECIPES[name].part  # `expander world build --what PART` writes this folder
    # clip-c's metrics record the recipe it was trained with; build must reproduce it
    training = json.loads((WORLD_CLIPS["world-c"] / "metrics.json").read_text())["training"]
    recipe = WORLD_CLIP_RECIPES["world-c"]
    assert (training["seed"], training["misplaced_share"]) == (recipe.seed, recipe.misplaced_share)


def test_export_replaces_files_whole_so_running_readers_keep_the_old_weights(tmp_path):
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
    for version in ("old", "new"):
        (tmp_path / version).mkdir()
        for name in names:
            (tmp_path / version / name).write_text(f"{version} {name}")
    dest = tmp_path / "shipped"
    world_clip.export_world_clip(tmp_path / "old", dest)
    with open(dest / "model.safetensors") as reader:  # a job that has the old weights open (or mapped)
        world_clip.export_world_clip(tmp_path / "new", dest, metrics={"retrieval_mean": 1.0})
        assert reader.read() == "old model.safetensors"
    assert all((dest / name).read_text() == f"new {name}" for name in names)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*names, "metrics.json"])  # no temporary files left
