"""VSPBFR code-diffuser sampling with a configurable number of steps and per-step progress.

The released code diffuser was trained for T = 4 timesteps, and the official test runs all of them:
start from N(0, I), at each t the network predicts x0 and the next code is the DDPM posterior mean
of q(x_{t-1} | x_t, x0) (no noise re-injected, no clipping). With ``steps == T`` this loop is
exactly :meth:`CodeDiffuser.sample`. Fewer steps keep an evenly spaced subset of the timesteps,
always the noisiest (T-1) and, with two or more steps, t = 0, and use the posterior between kept
timesteps ("respacing"): for t > s with cumulative products a_t, a_s,

    mean = sqrt(a_s) (1 - a_t/a_s) / (1 - a_t) * x0 + sqrt(a_t/a_s) (1 - a_s) / (1 - a_t) * x_t,

and a_s = 1 after the last kept step, so the final code is the last predicted x0. More steps than T
are refused: the network only knows the time inputs t/T for t < T.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..models.stylegan2_ops import randn_like_shape
from ..models.vspbfr_diffuser import CodeDiffuser, beta_schedule


def kept_timesteps(timesteps: int, steps: int) -> list[int]:
    """Timesteps visited by a ``steps``-step sampler over a ``timesteps``-step schedule, descending."""
    if not 1 <= steps <= timesteps:
        raise ValueError(
            f"steps must be between 1 and the diffuser's {timesteps} training timesteps, got {steps}"
        )
    if steps == 1:
        return [timesteps - 1]
    return sorted({int(round(t)) for t in np.linspace(0, timesteps - 1, steps)}, reverse=True)


def posterior_coefficients(alphas_cumprod: torch.Tensor, kept: list[int]) -> list[tuple[float, float]]:
    """(coef_x0, coef_xt) of the posterior mean for each kept timestep (float64 maths)."""
    acp = alphas_cumprod.double()
    coefs = []
    for j, t in enumerate(kept):
        a_t = float(acp[t])
        a_s = float(acp[kept[j + 1]]) if j + 1 < len(kept) else 1.0
        coefs.append(
            (
                a_s**0.5 * (1.0 - a_t / a_s) / (1.0 - a_t),
                (a_t / a_s) ** 0.5 * (1.0 - a_s) / (1.0 - a_t),
            )
        )
    return coefs


def schedule_of(diffuser: CodeDiffuser) -> torch.Tensor:
    """Cumulative alpha products from the diffuser's config, in float64 whatever the module dtype."""
    cfg = diffuser.config
    return torch.cumprod(1.0 - beta_schedule(cfg.timesteps, cfg.beta_start, cfg.beta_end), 0)


def sample_codes(
    diffuser: CodeDiffuser,
    cond: torch.Tensor,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Every code of one sampling run [x_start, ..., x_0] (steps + 1 codes) for LQ codes ``cond``."""
    steps = diffuser.config.timesteps if steps is None else steps
    kept = kept_timesteps(diffuser.config.timesteps, steps)
    x = randn_like_shape(cond.shape, cond, generator) if start is None else start.to(cond)
    if x.shape != cond.shape:
        raise ValueError(f"start must have the shape of cond {tuple(cond.shape)}, got {tuple(x.shape)}")
    codes = [x]
    coefs = posterior_coefficients(schedule_of(diffuser), kept)
    for j, (t, (c_x0, c_xt)) in enumerate(zip(kept, coefs, strict=True)):
        t_batch = torch.full((cond.shape[0],), t, device=cond.device, dtype=torch.long)
        x = c_x0 * diffuser(x, cond, t_batch) + c_xt * x
        codes.append(x)
        if on_step is not None:
            on_step(j)
    return codes
