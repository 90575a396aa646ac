"""One place to load the world's frozen models (each built once and passed to whoever needs it)."""

from __future__ import annotations


def load_world_perceptual():
    """LPIPS-compatible distance network trained in the world (``lpips.LPIPS`` call signature)."""
    from .perceptual import load_world_perceptual as load

    return load()


def load_world_clip():
    """(CLIPModel, tokenizer) of the world, through the same code path as a Hub CLIP."""
    from .clip import load_world_clip as load

    return load()


def load_world_classifier():
    """The evaluation classifier (never a training signal)."""
    from .classifier import load_world_classifier as load

    return load()
