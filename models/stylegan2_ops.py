"""StyleGAN2 building blocks in pure PyTorch, with the parameter names of rosinality's port.

The official VSPBFR / e4e code JIT-compiles CUDA kernels (``fused_bias_act``, ``upfirdn2d``) and
cannot run on CPU. These are plain-torch equivalents: ``upfirdn2d`` follows the definition
(zero-insertion upsampling, padding where negative pads crop, a true 2-D convolution with the FIR
kernel, decimation) and the fused activation is ``leaky_relu(x + b, 0.2) * sqrt(2)``.
Equalised-learning-rate layers keep the unscaled weight as the parameter and apply the scale at
run time, so state dicts load unchanged from the official checkpoints. Every layer that draws noise
takes an optional ``torch.Generator`` so results are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLUR_KERNEL = (1, 3, 3, 1)
SQRT2 = math.sqrt(2.0)


def make_kernel(k: Sequence[float]) -> torch.Tensor:
    """2-D FIR kernel from 1-D taps (outer product), normalised to sum 1."""
    k = torch.tensor(k, dtype=torch.float32)
    if k.dim() == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative = crop), convolve with ``kernel``, keep every ``down``-th pixel.

    ``pad`` is (p0, p1) for both axes or (x0, x1, y0, y1). Same result as rosinality's upfirdn2d.
    """
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    px0, px1, py0, py1 = (int(p) for p in pad)
    b, c, h, w = x.shape
    out = x.reshape(b * c, 1, h, w)
    if up > 1:
        # Each input pixel is followed by up-1 zeros on both axes (also after the last one).
        out = F.pad(out.reshape(b * c, 1, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1])
        out = out.reshape(b * c, 1, h * up, w * up)
    out = F.pad(out, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    out = out[
        ...,
        max(-py0, 0) : out.shape[-2] - max(-py1, 0),
        max(-px0, 0) : out.shape[-1] - max(-px1, 0),
    ]
    # conv2d is a correlation; flipping the kernel makes it the convolution of the FIR definition.
    weight = torch.flip(kernel, [0, 1]).to(out)[None, None]
    out = F.conv2d(out, weight)[..., ::down, ::down]
    return out.reshape(b, c, out.shape[-2], out.shape[-1])


def fused_leaky_relu(
    x: torch.Tensor, bias: torch.Tensor | None = None, negative_slope: float = 0.2, scale: float = SQRT2
) -> torch.Tensor:
    """``leaky_relu(x + bias, 0.2) * sqrt(2)`` with the bias broadcast over channel dim 1."""
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.dim() - 2)))
    return F.leaky_relu(x, negative_slope) * scale


def randn_like_shape(
    shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard normal tensor on ``like``'s device/dtype, drawn from ``generator`` (on its own device)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype).to(like.device)


def channel_table(multiplier: int = 2, divisor: int = 1) -> dict[int, int]:
    """StyleGAN2 feature channels per resolution; ``divisor`` shrinks every width (tiny test models)."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * multiplier, 128: 128 * multiplier}
    base.update({256: 64 * multiplier, 512: 32 * multiplier, 1024: 16 * multiplier})
    return {res: max(ch // divisor, 1) for res, ch in base.items()}


class PixelNorm(nn.Module):
    """x / sqrt(mean(x^2 over ``dim``) + 1e-8); dim 1 as in rosinality (also on (B,18,512) codes)."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=self.dim, keepdim=True) + 1e-8)


class FusedLeakyReLU(nn.Module):
    """Per-channel bias then scaled leaky ReLU; parameter ``bias``."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class ScaledLeakyReLU(nn.Module):
    """leaky_relu(x, slope) * sqrt(2), no parameters."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope) * SQRT2


class EqualConv2d(nn.Module):
    """Conv with N(0,1) weights scaled by 1/sqrt(fan_in) at run time; optional dilation."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, bias=True, dilation=1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding, self.dilation)


class EqualLinear(nn.Module):
    """Linear with run-time scale and learning-rate multiplier; optional fused leaky ReLU."""

    def __init__(self, in_dim, out_dim, bias=True, bias_init=0.0, lr_mul=1.0, activation=None):
        super().__init__()
        if activation not in (None, "fused_lrelu"):
            raise ValueError(f"activation must be None or 'fused_lrelu', got {activation!r}")
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias)


class Blur(nn.Module):
    """FIR low-pass with the given padding; kernel kept as a (persistent) buffer like the original."""

    def __init__(self, kernel=BLUR_KERNEL, pad=(0, 0), upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor**2)
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """x2 FIR upsampling (used on the RGB skip path)."""

    def __init__(self, kernel=BLUR_KERNEL, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor**2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Style-modulated conv (weight (1,out,in,k,k)), optional demodulation, x2 up/down or dilation.

    With ``own_modulation=False`` there is no ``modulation`` layer and ``forward`` takes the already
    modulated per-channel style (B, in): the SMART layers share one modulation across branches.
    """

    def __init__(
        self,
        in_ch,
        out_ch,
        kernel_size,
        style_dim,
        demodulate=True,
        upsample=False,
        downsample=False,
        blur_kernel=BLUR_KERNEL,
        dilation=1,
        own_modulation=True,
    ):
        super().__init__()
        if (upsample or downsample) and dilation != 1:
            raise ValueError(f"dilation must be 1 with up/downsampling, got {dilation}")
        self.in_ch, self.out_ch, self.kernel_size = in_ch, out_ch, kernel_size
        self.upsample, self.downsample, self.demodulate, self.dilation = (
            upsample,
            downsample,
            demodulate,
            dilation,
        )
        taps = len(blur_kernel)
        if upsample:
            p = (taps - 2) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)
        elif downsample:
            p = (taps - 2) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.padding = dilation * (kernel_size - 1) // 2
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        if own_modulation:
            self.modulation = EqualLinear(style_dim, in_ch, bias_init=1)
        else:
            self.modulation = None

    def sample_weights(self, style: torch.Tensor) -> torch.Tensor:
        """Per-sample conv weights (B,out,in,k,k): scaled, modulated by ``style``, demodulated if enabled."""
        s = self.modulation(style) if self.modulation is not None else style
        weight = self.scale * self.weight * s.view(-1, 1, self.in_ch, 1, 1)
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
            weight = weight * demod.view(-1, self.out_ch, 1, 1, 1)
        return weight

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel_size
        weight = self.sample_weights(style)
        if self.upsample:
            # Transposed conv groups need (in, out) per sample.
            weight = weight.transpose(1, 2).reshape(b * c, self.out_ch, k, k)
            out = F.conv_transpose2d(x.reshape(1, b * c, h, w), weight, stride=2, groups=b)
            return self.blur(out.reshape(b, self.out_ch, out.shape[-2], out.shape[-1]))
        weight = weight.reshape(b * self.out_ch, c, k, k)
        if self.downsample:
            x = self.blur(x)
            out = F.conv2d(x.reshape(1, b * c, x.shape[-2], x.shape[-1]), weight, stride=2, groups=b)
        else:
            out = F.conv2d(
                x.reshape(1, b * c, h, w), weight, padding=self.padding, dilation=self.dilation, groups=b
            )
        return out.reshape(b, self.out_ch, out.shape[-2], out.shape[-1])


class NoiseInjection(nn.Module):
    """x + weight * noise, with noise (B,1,H,W) drawn from ``generator`` when not given."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise=None, generator: torch.Generator | None = None) -> torch.Tensor:
        if noise is None:
            noise = randn_like_shape((x.shape[0], 1, x.shape[2], x.shape[3]), x, generator)
        return x + self.weight * noise


class ConstantInput(nn.Module):
    """Learned 4x4 input of the StyleGAN2 synthesis network; parameter ``input``."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):
    """Modulated conv (optionally x2 up or down) -> noise -> fused leaky ReLU."""

    def __init__(
        self, in_ch, out_ch, kernel_size, style_dim, upsample=False, downsample=False, demodulate=True
    ):
        super().__init__()
        self.conv = ModulatedConv2d(
            in_ch, out_ch, kernel_size, style_dim, demodulate, upsample=upsample, downsample=downsample
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x, style, noise=None, generator=None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise, generator))


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB (no demodulation) + bias, adding the upsampled previous RGB skip."""

    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample(BLUR_KERNEL)
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConvLayer(nn.Sequential):
    """[Blur] + EqualConv2d (bias only without activation) + FusedLeakyReLU: keys ``0.weight``, ``1.bias``."""

    def __init__(self, in_ch, out_ch, kernel_size, downsample=False, bias=True, activate=True):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(BLUR_KERNEL) - 2) + (kernel_size - 1)
            layers.append(Blur(BLUR_KERNEL, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_ch, out_ch, kernel_size, stride, padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_ch, bias=bias))
        super().__init__(*layers)


class ResolutionLadder:
    """Mixin for configs with ``size``, ``channel_multiplier`` and ``channel_divisor`` fields."""

    @property
    def channels(self) -> dict[int, int]:
        """Feature channels per resolution."""
        return channel_table(self.channel_multiplier, self.channel_divisor)

    @property
    def log_size(self) -> int:
        """log2 of the image size."""
        return int(math.log2(self.size))

    @property
    def n_latent(self) -> int:
        """Number of per-layer latents (18 at 1024, 16 at 512)."""
        return self.log_size * 2 - 2
