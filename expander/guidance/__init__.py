"""Frozen guidance models (CLIP, diffusion teachers, perceptual distances): built once and passed in."""
