"""StyleGAN2 generator and discriminator in pure PyTorch.

Parameter and buffer names follow rosinality's ``stylegan2-pytorch`` exactly (``style.1.weight``,
``input.input``, ``conv1.conv.modulation.weight``, ``convs.N...``, ``to_rgbs.N...``,
``noises.noise_N``), so a rosinality ``g_ema`` / ``d`` state dict loads with ``strict=True``.

Layout:

* ``Generator.style`` is the :class:`MappingNetwork` (z -> w), a module of its own that also tracks
  the mean w (``w_avg``).
* Every other child of :class:`Generator` is the synthesis network (w or w+ -> image), run by
  :meth:`Generator.synthesis`; :meth:`Generator.synthesis_parameters` lists its parameters, which are
  the only ones domain expansion trains.

The modulated convolution is computed as "scale the input, one shared convolution, scale the
output" instead of a grouped convolution with per-sample weights. The two are mathematically
identical (the test suite checks this against a grouped-convolution reference); the shared form is
several times faster on CPU and needs no custom kernels. Up/down-sampling with the FIR blur filter is
a pure-PyTorch ``upfirdn2d``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# rosinality's channel table for channel_multiplier=2 is {64: 512, 128: 256, ...}; it is the base
# table below scaled by channel_multiplier for resolutions >= 64.
_ROSINALITY_BASE_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}


# Upper bounds of a config's sizes, far beyond every released StyleGAN2 (widths 512, style_dim 512, 8 layers).
MAX_SIZES = {"resolution": 1024, "style_dim": 4096, "n_mlp": 64, "channel_multiplier": 8, "channels": 4096}


@dataclass
class StyleGAN2Config:
    """Architecture of a StyleGAN2 generator (and its discriminator).

    ``channels`` overrides the rosinality channel table (resolution -> width); use it for tiny test
    models and for the portraits world. JSON round-trips it with string keys, which is accepted.
    """

    resolution: int = 256  # output side in pixels, a power of two in [16, 1024]
    style_dim: int = 512  # dimension of z and w
    n_mlp: int = 8  # depth of the mapping network
    channel_multiplier: int = 2  # rosinality's width knob for resolutions >= 64
    channels: Optional[dict] = None  # explicit {resolution: width}, overrides the table
    lr_mlp: float = 0.01  # equalized-lr multiplier of the mapping network
    blur_kernel: Sequence[int] = field(default_factory=lambda: [1, 3, 3, 1])

    def __post_init__(self) -> None:
        for key in ("resolution", "style_dim", "n_mlp", "channel_multiplier"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
            if value > MAX_SIZES[key]:  # a corrupt config would otherwise allocate tens of GB before any check
                raise ValueError(f"{key} must be at most {MAX_SIZES[key]} (beyond any StyleGAN2), got {value}")
        if isinstance(self.lr_mlp, bool) or not isinstance(self.lr_mlp, (int, float)) or not 0 < self.lr_mlp < math.inf:
            raise ValueError(f"lr_mlp must be a positive number, got {self.lr_mlp!r}")
        if self.channels is not None and not isinstance(self.channels, dict):
            raise ValueError(f"channels must be a mapping {{resolution: width}}, got {self.channels!r}")
        if isinstance(self.blur_kernel, (str, bytes)) or not isinstance(self.blur_kernel, Sequence):
            raise ValueError(f"blur_kernel must be a list of integers, got {self.blur_kernel!r}")
        if self.resolution < 16 or self.resolution > 1024 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two between 16 and 1024, got {self.resolution}")
        if self.channels is not None:
            try:
                self.channels = {int(k): int(v) for k, v in self.channels.items()}
            except (TypeError, ValueError):
                raise ValueError(f"channels must map resolutions to integer widths, got {self.channels!r}") from None
            missing = [2**i for i in range(2, self.log_size + 1) if 2**i not in self.channels]
            if missing:
                raise ValueError(f"channels has no width for resolutions {missing}")
            bad = {k: v for k, v in self.channels.items() if not 1 <= v <= MAX_SIZES["channels"]}
            if bad:
                raise ValueError(f"channels widths must be from 1 to {MAX_SIZES['channels']}, got {bad}")
        if not all(isinstance(k, (int, float)) and not isinstance(k, bool) and float(k).is_integer() for k in self.blur_kernel):
            raise ValueError(f"blur_kernel must be a list of integers, got {self.blur_kernel!r}")
        self.blur_kernel = [int(k) for k in self.blur_kernel]
        if not self.blur_kernel or min(self.blur_kernel) < 0 or sum(self.blur_kernel) == 0:  # the kernel is divided by its sum
            raise ValueError(f"blur_kernel must be non-negative integers with a positive sum, got {self.blur_kernel}")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.resolution))

    @property
    def n_latent(self) -> int:
        """Number of style vectors in w+ (one per modulated layer, to_rgb layers share)."""
        return self.log_size * 2 - 2

    @property
    def num_noise_layers(self) -> int:
        return (self.log_size - 2) * 2 + 1

    def channel(self, resolution: int) -> int:
        if self.channels is not None:
            return self.channels[resolution]
        width = _ROSINALITY_BASE_CHANNELS[resolution]
        return width * self.channel_multiplier if resolution >= 64 else width

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["channels"] is not None:
            data["channels"] = {str(k): v for k, v in data["channels"].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "StyleGAN2Config":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown StyleGAN2Config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch building blocks
# --------------------------------------------------------------------------------------------------


def make_kernel(taps: Sequence[int]) -> torch.Tensor:
    """Separable FIR filter from 1-D taps, normalised to sum to one. Returns (k, k)."""
    kernel = torch.tensor(taps, dtype=torch.float32)
    if kernel.ndim == 1:
        kernel = kernel[None, :] * kernel[:, None]
    return kernel / kernel.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter, downsample (NVIDIA's upfirdn2d semantics).

    x: (B, C, H, W); kernel: (k, k). Output side: (H * up + pad0 + pad1 - k) // down + 1.
    """
    batch, channels, height, width = x.shape
    if up > 1:
        # (B, C, H, 1, W, 1) padded to (B, C, H, up, W, up) puts up-1 zeros after every pixel.
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    pad0, pad1 = pad
    x = F.pad(x, [max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)])
    if pad0 < 0 or pad1 < 0:
        h, w = x.shape[-2:]
        x = x[:, :, max(-pad0, 0) : h - max(-pad1, 0), max(-pad0, 0) : w - max(-pad1, 0)]
    # conv2d is cross-correlation; flipping gives a true convolution with the FIR kernel.
    weight = torch.flip(kernel, [0, 1]).to(x.dtype)[None, None].repeat(channels, 1, 1, 1)
    x = F.conv2d(x, weight, groups=channels)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def fused_leaky_relu(x: torch.Tensor, bias: Optional[torch.Tensor], negative_slope: float = 0.2, scale: float = 2**0.5) -> torch.Tensor:
    """Bias add + leaky ReLU + gain sqrt(2), rosinality's FusedLeakyReLU without the CUDA kernel."""
    if bias is not None:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        x = x + bias.view(shape)
    return F.leaky_relu(x, negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


NOISE_MODES = ("const", "random", "none")  # Generator.synthesis: stored buffers, fresh noise, no noise


def check_noise_mode(noise_mode: str) -> None:
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be 'const', 'random' or 'none', got {noise_mode!r}")


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip branch."""

    def __init__(self, blur_kernel: Sequence[int], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(blur_kernel) * factor**2)
        pad = self.kernel.shape[0] - factor
        self.pad = ((pad + 1) // 2 + factor - 1, pad // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, blur_kernel: Sequence[int], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        kernel = make_kernel(blur_kernel)
        if upsample_factor > 1:
            kernel = kernel * upsample_factor**2
        self.register_buffer("kernel", kernel)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv2d with equalized learning rate (weights stored at unit variance, scaled at run time)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0, activation: Optional[str] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation == "fused_lrelu":
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias=bias)


class ModulatedConv2d(nn.Module):
    """Style-modulated, optionally demodulated convolution (StyleGAN2 Fig. 2c)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int, demodulate: bool = True, upsample: bool = False, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        if upsample:
            factor = 2
            pad = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((pad + 1) // 2 + factor - 1, pad // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        # bias_init=1 so a fresh layer starts unmodulated.
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W); style: (B, style_dim) -> (B, C_out, H', W')."""
        batch = x.shape[0]
        weight = self.scale * self.weight[0]  # (C_out, C_in, k, k)
        style = self.modulation(style)  # (B, C_in)
        x = x * style.reshape(batch, self.in_channels, 1, 1)
        if self.upsample:
            # conv_transpose2d wants (C_in, C_out, k, k).
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2, padding=0)
            x = self.blur(x)
        else:
            x = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # ||W * s||_2 over (C_in, k, k) for every sample and output channel: (B, C_out).
            squared_norm = (style.square() @ weight.square().sum((2, 3)).t())
            x = x * torch.rsqrt(squared_norm + 1e-8).reshape(batch, self.out_channels, 1, 1)
        return x


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        return image + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int, upsample: bool = False, blur_kernel: Sequence[int] = (1, 3, 3, 1), demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim, upsample=upsample, blur_kernel=blur_kernel, demodulate=demodulate)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, style_dim: int, upsample: bool = True, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


class MappingNetwork(nn.Sequential):
    """z (B, style_dim) -> w (B, style_dim). Index 0 is PixelNorm so the linears are ``style.1..N``.

    ``w_avg`` (the mean w used for truncation and as the pinned value of repurposed coordinates) is a
    non-persistent buffer: rosinality keeps it outside the state dict as ``latent_avg``, and so do
    our checkpoints, so the state dict stays key-for-key identical to rosinality's.
    """

    def __init__(self, style_dim: int, n_mlp: int, lr_mlp: float):
        layers = [PixelNorm()] + [EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu") for _ in range(n_mlp)]
        super().__init__(*layers)
        self.register_buffer("w_avg", torch.zeros(style_dim), persistent=False)

    @torch.no_grad()
    def update_w_avg(self, n_samples: int = 4096, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Recompute ``w_avg`` as the mean of ``n_samples`` mapped z (seeded through ``generator``)."""
        z = torch.randn(n_samples, self.w_avg.shape[0], generator=generator).to(self.w_avg.device)
        self.w_avg.copy_(self(z).mean(0))
        return self.w_avg


class Generator(nn.Module):
    """StyleGAN2 generator (rosinality layout). ``style`` is the mapping network; the rest is synthesis."""

    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        style_dim, blur_kernel = config.style_dim, config.blur_kernel
        self.style = MappingNetwork(style_dim, config.n_mlp, config.lr_mlp)

        self.input = ConstantInput(config.channel(4))
        self.conv1 = StyledConv(config.channel(4), config.channel(4), 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(config.channel(4), style_dim, upsample=False)

        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty; kept because rosinality's module has it
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(config.num_noise_layers):
            side = 2 ** ((layer_idx + 5) // 2)
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, side, side))

        in_channels = config.channel(4)
        for log_res in range(3, config.log_size + 1):
            out_channels = config.channel(2**log_res)
            self.convs.append(StyledConv(in_channels, out_channels, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channels, out_channels, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channels, style_dim, blur_kernel=blur_kernel))
            in_channels = out_channels

    # ---- properties ------------------------------------------------------------------------------

    @property
    def style_dim(self) -> int:
        return self.config.style_dim

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def w_avg(self) -> torch.Tensor:
        return self.style.w_avg

    def synthesis_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter except the mapping network's."""
        return [p for name, p in self.named_parameters() if not name.startswith("style.")]

    def style_affine_weights(self) -> dict[str, torch.Tensor]:
        """The style affine (modulation) weights of the convolution layers, rosinality's choice for SeFA.

        Returns {parameter name: (C_in, style_dim)}; every to_rgb modulation is excluded (rosinality's
        ``closed_form_factorization.py`` drops those of ``to_rgbs`` but keeps ``to_rgb1``'s, so its basis
        of an imported model differs slightly from this one).
        """
        return {
            name: p.detach()
            for name, p in self.named_parameters()
            if "modulation" in name and name.endswith("weight") and "to_rgb" not in name
        }

    # ---- mapping / synthesis -----------------------------------------------------------------------

    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """z (B, style_dim) -> w (B, style_dim), optionally truncated towards ``w_avg``."""
        w = self.style(z)
        if truncation_psi != 1.0:
            w = self.w_avg.lerp(w, truncation_psi)
        return w

    def noise_buffers(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.config.num_noise_layers)]

    def synthesis(self, w: torch.Tensor, noise_mode: str = "const", noise: Optional[list[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """w (B, style_dim) or w+ (B, n_latent, style_dim) -> image (B, 3, R, R) in about [-1, 1].

        noise_mode: "const" uses the stored noise buffers (deterministic), "random" draws fresh
        noise, "none" disables it. An explicit ``noise`` list wins over ``noise_mode``.
        """
        if w.ndim == 2:
            w = w.unsqueeze(1).expand(-1, self.n_latent, -1)
        if w.ndim != 3 or w.shape[1] != self.n_latent or w.shape[2] != self.style_dim:
            raise ValueError(f"expected w of shape (B, {self.style_dim}) or (B, {self.n_latent}, {self.style_dim}), got {tuple(w.shape)}")
        if noise is None:
            check_noise_mode(noise_mode)
            if noise_mode == "const":
                noise = self.noise_buffers()
            elif noise_mode == "random":
                noise = [None] * self.config.num_noise_layers
            else:  # "none"
                noise = [torch.zeros_like(n) for n in self.noise_buffers()]
        elif len(noise) != self.config.num_noise_layers:  # zip below would silently stop at a lower resolution
            raise ValueError(f"noise needs one entry (a tensor or None) per noise layer: {self.config.num_noise_layers}, got {len(noise)}")

        out = self.input(w.shape[0])
        out = self.conv1(out, w[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, w[:, 1])
        latent_idx = 1
        for up_conv, conv, noise_up, noise_conv, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs):
            out = up_conv(out, w[:, latent_idx], noise=noise_up)
            out = conv(out, w[:, latent_idx + 1], noise=noise_conv)
            skip = to_rgb(out, w[:, latent_idx + 2], skip)
            latent_idx += 2
        return skip

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "const") -> torch.Tensor:
        """z (B, style_dim) -> image (B, 3, R, R)."""
        return self.synthesis(self.mapping(z, truncation_psi), noise_mode=noise_mode)


# --------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------


class ConvLayer(nn.Sequential):
    """[Blur] + EqualConv2d + [FusedLeakyReLU], rosinality's indices (``0.kernel``, ``1.weight``, ``2.bias``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool = False, blur_kernel: Sequence[int] = (1, 3, 3, 1), bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            factor = 2
            pad = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((pad + 1) // 2, pad // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channels, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, activate=False, bias=False, blur_kernel=blur_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator (rosinality layout): image (B, 3, R, R) -> logit (B, 1)."""

    def __init__(self, config: StyleGAN2Config, stddev_group: int = 4):
        super().__init__()
        self.config = config
        convs: list[nn.Module] = [ConvLayer(3, config.channel(config.resolution), 1)]
        in_channels = config.channel(config.resolution)
        for log_res in range(config.log_size, 2, -1):
            out_channels = config.channel(2 ** (log_res - 1))
            convs.append(ResBlock(in_channels, out_channels, config.blur_kernel))
            in_channels = out_channels
        self.convs = nn.Sequential(*convs)
        self.stddev_group = stddev_group
        self.stddev_feat = 1
        self.final_conv = ConvLayer(in_channels + 1, config.channel(4), 3)
        self.final_linear = nn.Sequential(
            EqualLinear(config.channel(4) * 4 * 4, config.channel(4), activation="fused_lrelu"),
            EqualLinear(config.channel(4), 1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.convs(image)  # (B, C, 4, 4)
        batch, channels, height, width = out.shape
        # Minibatch-stddev needs equal groups: the largest group size <= stddev_group that divides the
        # batch (a batch of 6 uses groups of 3, not a per-sample constant the discriminator never saw).
        group = next(g for g in range(min(batch, self.stddev_group), 0, -1) if batch % g == 0)
        # Per-group standard deviation over the batch, averaged to one extra feature map.
        stddev = out.view(group, -1, self.stddev_feat, channels // self.stddev_feat, height, width)
        stddev = torch.sqrt(stddev.var(0, unbiased=False) + 1e-8)
        stddev = stddev.mean([2, 3, 4], keepdim=True).squeeze(2)
        stddev = stddev.repeat(group, 1, height, width)
        out = self.final_conv(torch.cat([out, stddev], 1))
        return self.final_linear(out.view(batch, -1))
