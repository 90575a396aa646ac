"""The textbook StyleGAN2 modulated convolution (per-sample weights, one grouped convolution).

Not used for sampling or training: it is the yardstick that tests check our shared-convolution
form against, and that ``benchmarks/throughput.py`` times it against.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from .stylegan2 import Generator, ModulatedConv2d


def grouped_modulated_conv(layer: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Same result as ``layer(x, style)``; x: (B, C_in, H, W), style: (B, style_dim)."""
    batch = x.shape[0]
    k, c_in, c_out = layer.kernel_size, layer.in_channels, layer.out_channels
    weight = layer.scale * layer.weight * layer.modulation(style).view(batch, 1, c_in, 1, 1)  # (B, O, I, k, k)
    if layer.demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(batch, c_out, 1, 1, 1)
    x = x.reshape(1, batch * c_in, *x.shape[2:])
    if layer.upsample:
        weight = weight.transpose(1, 2).reshape(batch * c_in, c_out, k, k)
        out = F.conv_transpose2d(x, weight, stride=2, groups=batch)
        return layer.blur(out.view(batch, c_out, *out.shape[2:]))
    out = F.conv2d(x, weight.reshape(batch * c_out, c_in, k, k), padding=layer.padding, groups=batch)
    return out.view(batch, c_out, *out.shape[2:])


@contextlib.contextmanager
def grouped_convolutions(generator: Generator) -> Iterator[Generator]:
    """Temporarily run every modulated conv of ``generator`` through the grouped reference."""
    layers = [m for m in generator.modules() if isinstance(m, ModulatedConv2d)]
    for layer in layers:
        layer.forward = grouped_modulated_conv.__get__(layer)  # bound method on this instance only
    try:
        yield generator
    finally:
        for layer in layers:
            del layer.forward
