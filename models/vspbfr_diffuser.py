"""VSPBFR code diffuser: 4 TACC blocks and the 4-step x0-parameterised DDPM in W+ space.

Network (official ``Code_diffuser``, keys ``att_mapper.{0..3}.*``), per block, with x the current
code (B,L,D), c the LQ W+ code and tau = t/T appended as an extra channel ([c;tau], D+1):

* ``PixelNorm`` over dim 1, i.e. over the L = 18 *layers* (a quirk of applying rosinality's
  PixelNorm to a (B,18,512) tensor; kept because the weights were trained with it);
* layer attention: K = W_k x, V = W_v x, Q = W_q [c;tau]; softmax(K Q^T / sqrt(18)) over the last
  axis (B,L,L), h = scores V;
* channel attention (``attention_layer``): q = W_q' x, k = W_k' [c;tau], v = W_v' x;
  softmax(k^T q / sqrt(D)) over dim 1 (B,D,D), out = LayerNorm(v scores) (no affine);
* h = LayerNorm(h + out) (no affine); gamma = Sigmoid(MLP_g([c;tau])), beta = ScaledLReLU(MLP_b);
  output h * (1 + gamma) + beta. The MLPs are Linear(D+1,D), LayerNorm(D) (affine),
  ScaledLeakyReLU(0.2), Linear(D,D) -> keys ``gamma_.{0,1,3}``, ``beta_.{0,1,3}``.

Sampler (official ``My_DDPM``, inference branch): betas = linspace(sqrt(0.1), sqrt(0.99), 4)^2,
start from N(0, I), at every step the network predicts x0 and x_{t-1} is the posterior mean only
(no noise is re-injected, no clipping). At t = 0 the posterior mean equals the predicted x0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .stylegan2_ops import PixelNorm, ScaledLeakyReLU, randn_like_shape

ARCHITECTURE = "vspbfr_code_diffuser"


@dataclass(frozen=True)
class CodeDiffuserConfig:
    """Code diffuser hyperparameters; defaults are the released model's."""

    dim: int = 512  # W width
    blocks: int = 4  # TACC blocks
    timesteps: int = 4  # DDPM steps T (also the divisor of t in the time channel)
    beta_start: float = 0.1
    beta_end: float = 0.99
    attention_layers: int = 18  # the official layer attention divides by sqrt(18), hard-coded

    def __post_init__(self):
        for name in ("dim", "blocks", "timesteps", "attention_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CodeDiffuserConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def beta_schedule(timesteps: int, start: float, end: float) -> torch.Tensor:
    """Latent-diffusion 'linear' schedule: linspace on sqrt(beta), squared (float64)."""
    return torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2


def _mlp(dim: int, last: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim + 1, dim), nn.LayerNorm(dim), ScaledLeakyReLU(0.2), nn.Linear(dim, dim), last
    )


class ChannelAttention(nn.Module):
    """The (D x D) channel branch (official ``spatial_attention``), keys q/k/v_matrix."""

    def __init__(self, dim: int):
        super().__init__()
        self.q_matrix = nn.Linear(dim, dim, bias=False)
        self.k_matrix = nn.Linear(dim + 1, dim, bias=False)
        self.v_matrix = nn.Linear(dim, dim, bias=False)
        self.dim = dim

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        q, v = self.q_matrix(x), self.v_matrix(x)
        k = self.k_matrix(cond).transpose(1, 2)  # (B,D,L)
        scores = F.softmax(torch.matmul(k, q) / math.sqrt(self.dim), dim=1)  # (B,D,D), over dim 1
        return F.layer_norm(torch.matmul(v, scores), (self.dim,))


class TACCBlock(nn.Module):
    """One time-aware conditional block (see the module docstring)."""

    def __init__(self, dim: int, attention_layers: int = 18):
        super().__init__()
        self.pixelnorm = PixelNorm(dim=1)
        self.q_matrix = nn.Linear(dim + 1, dim, bias=False)
        self.k_matrix = nn.Linear(dim, dim, bias=False)
        self.v_matrix = nn.Linear(dim, dim, bias=False)
        self.gamma_ = _mlp(dim, nn.Sigmoid())
        self.beta_ = _mlp(dim, ScaledLeakyReLU(0.2))
        self.attention_layer = ChannelAttention(dim)
        self.dim, self.denom = dim, math.sqrt(attention_layers)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x`` (B,L,D) current code, ``cond`` (B,L,D+1) = [LQ code; t/T]."""
        x = self.pixelnorm(x)
        k, v = self.k_matrix(x), self.v_matrix(x)
        q = self.q_matrix(cond).transpose(1, 2)  # (B,D,L)
        h = torch.matmul(F.softmax(torch.matmul(k, q) / self.denom, dim=-1), v)
        h = F.layer_norm(h + self.attention_layer(x, cond), (self.dim,))
        return h * (1.0 + self.gamma_(cond)) + self.beta_(cond)


class DiffusionResult(NamedTuple):
    """Final code x_0 and, if asked, every code [x_T, x_{T-1}, ..., x_0]."""

    code: torch.Tensor
    intermediates: list[torch.Tensor]


class CodeDiffuser(nn.Module):
    """Denoiser ``forward(x, cond, t)`` -> predicted x0, plus the DDPM ``sample`` loop."""

    def __init__(self, config: CodeDiffuserConfig | None = None):
        super().__init__()
        cfg = self.config = config or CodeDiffuserConfig()
        self.att_mapper = nn.ModuleList(TACCBlock(cfg.dim, cfg.attention_layers) for _ in range(cfg.blocks))
        betas = beta_schedule(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        alphas = 1.0 - betas
        acp = torch.cumprod(alphas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        # Schedules are derived from the config: not part of the state dict (official keys only).
        sched = {
            "betas": betas,
            "alphas_cumprod": acp,
            "posterior_mean_coef1": betas * acp_prev.sqrt() / (1.0 - acp),
            "posterior_mean_coef2": (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
        }
        for name, value in sched.items():
            self.register_buffer(name, value.float(), persistent=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict x0 from the noisy code ``x`` (B,L,D), LQ code ``cond`` (B,L,D) and steps ``t`` (B,)."""
        if x.dim() != 3 or x.shape != cond.shape or x.shape[-1] != self.config.dim:
            raise ValueError(
                f"x and cond must both be [B,L,{self.config.dim}], got {tuple(x.shape)} and {tuple(cond.shape)}"
            )
        tau = (t.to(x).reshape(-1, 1, 1) / self.config.timesteps).expand(x.shape[0], x.shape[1], 1)
        c = torch.cat([cond, tau], dim=-1)
        for block in self.att_mapper:
            x = block(x, c)
        return x

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward diffusion sqrt(acp_t) x0 + sqrt(1 - acp_t) noise (for training)."""
        acp = self.alphas_cumprod.to(x0)[t].reshape(-1, 1, 1)
        return acp.sqrt() * x0 + (1 - acp).sqrt() * noise

    def sample(
        self,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        start: torch.Tensor | None = None,
        return_intermediates: bool = False,
    ) -> DiffusionResult:
        """Run the T posterior-mean steps from ``start`` (default: N(0,I) from ``generator``)."""
        x = randn_like_shape(cond.shape, cond, generator) if start is None else start.to(cond)
        if x.shape != cond.shape:
            raise ValueError(f"start must have the shape of cond {tuple(cond.shape)}, got {tuple(x.shape)}")
        steps = [x] if return_intermediates else []
        c1, c2 = self.posterior_mean_coef1.to(cond), self.posterior_mean_coef2.to(cond)
        for i in reversed(range(self.config.timesteps)):
            t = torch.full((cond.shape[0],), i, device=cond.device, dtype=torch.long)
            x = c1[i] * self(x, cond, t) + c2[i] * x
            if return_intermediates:
                steps.append(x)
        return DiffusionResult(x, steps)
