"""VSPBFR trainers on the generic loop: stage 1 code diffuser, stage 2 restoration network.

Stage 1 (official ``code_diffuser_train.py``): the e4e encoder and StyleGAN2 decoder are frozen.
The LQ W+ code c is noised to t = T-1 (q_sample), all T posterior-mean steps are unrolled with
gradients, and the predicted code w0 is trained with L1(w0, e4e(HQ)) + 0.1 LPIPS + 0.1 ID on
StyleGAN2(w0) average-pooled to the training size (gradients flow through the frozen decoder).

Stage 2 (official ``restoration_train.py``): e4e, the code diffuser (sampled from noise, as at
inference) and the StyleGAN2 decoder are frozen and run in ``collate``; the restoration network is
trained with the non-saturating GAN loss + 0.5 LPIPS (summed over the batch) + 0.1 ID, no pixel loss.
The discriminator is the loop's auxiliary network: logistic loss every step, R1 (gamma 10) every
16th step with weight gamma/2 * 16, and Adam lr * c, betas ** c with c = 16/17.

Random draws (diffusion start noise, StyleGAN2 noise, the restoration net's z and layer noise) come
from generators seeded by the batch's items and the step, not from the global RNG, so an
interrupted run resumes bit-exactly on any device (only the restoration net's dropout uses the
global RNG, which the loop restores on CPU).

Differences from the official scripts, forced by the shared loop: the generator steps before the
discriminator (officially after), the discriminator sees the generator step's output (officially a
second forward with fresh noise), and on R1 steps the logistic and R1 terms share one Adam step
(officially two consecutive steps).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..inference.vspbfr_loading import check_compatible
from ..models.checkpoint import read_checkpoint
from ..models.stylegan2_ops import randn_like_shape
from ..models.vspbfr_checkpoints import (
    OFFICIAL_ALLOWED_GLOBALS,
    load_code_diffuser,
    load_restoration_net,
    save_code_diffuser,
    save_restoration_net,
)
from ..models.vspbfr_diffuser import CodeDiffuser, CodeDiffuserConfig
from ..models.vspbfr_discriminator import (
    DiscriminatorConfig,
    VSPBFRDiscriminator,
    discriminator_from_state_dict,
)
from ..models.vspbfr_restore import RestorationConfig, RestorationNet
from .loop import TrainConfig
from .vspbfr_common import VAL_CHUNK, VSPBFRTaskBase, VSPBFRTaskConfig, generator_on, need_file, to_unit
from .vspbfr_data import STAGE1_SETTINGS, batch_seed, stack
from .vspbfr_losses import d_logistic_loss, g_nonsaturating_loss, lazy_adam_settings, r1_penalty

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class CodeDiffuserTaskConfig(VSPBFRTaskConfig):
    """Stage 1 settings; defaults are the official ones."""

    size: int = 256  # official --size default (the README command does not override it)
    diffuser: dict = dataclasses.field(default_factory=dict)  # CodeDiffuserConfig overrides
    init_diffuser: str | None = None  # start from a code diffuser file (official or PriorFace)
    latent_weight: float = 1.0


@dataclasses.dataclass(kw_only=True)
class RestorationTaskConfig(VSPBFRTaskConfig):
    """Stage 2 settings; defaults are the official ones."""

    code_diffuser: str  # code_diffuser.pt (official) or its PriorFace safetensors; frozen
    model: dict = dataclasses.field(default_factory=dict)  # RestorationConfig overrides (not size)
    discriminator: dict = dataclasses.field(default_factory=dict)  # DiscriminatorConfig overrides
    init_from: str | None = None  # restoration_net.pt: its 'g' (and 'd') start the run; or our safetensors
    lpips_weight: float = 0.5
    lpips_sum: bool = True  # official: LPIPS summed over the batch, not averaged
    gan_weight: float = 1.0
    mixing: float = 0.5  # style-mixing probability of the restoration net's z
    r1_weight: float = 10.0  # gamma
    r1_every: int = 16  # lazy R1 interval (discriminator steps)
    d_lr: float = 0.002  # discriminator base lr before the lazy adjustment
    d_betas: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.99])


def step_generator(batch: dict, step: int, device: torch.device) -> torch.Generator:
    """Generator of one training step's draws: seeded by the batch's items and the step (resume-exact)."""
    return generator_on(device, (batch["seed"] * 31 + step + 1) % 2**63)


def _pool(image: torch.Tensor, size: int) -> torch.Tensor:
    # Official face_pool: AdaptiveAvgPool2d to the training size (1024 -> 256 or 512).
    return image if image.shape[-1] == size else F.adaptive_avg_pool2d(image, (size, size))


class CodeDiffuserTask(VSPBFRTaskBase):
    """Stage 1: the W+ code diffuser."""

    name = "vspbfr_code_diffuser"
    stage_settings = STAGE1_SETTINGS

    def setup(self, device: torch.device, cfg: TrainConfig) -> None:
        super().setup(device, cfg)
        dec = self.codec.decoder.config.size
        if dec < self.cfg.size:
            raise ValueError(f"size {self.cfg.size} is larger than the StyleGAN2 decoder's {dec} px")

    def build_model(self) -> CodeDiffuser:
        dim = self.codec.encoder.config.style_dim
        if self.cfg.init_diffuser:
            model = load_code_diffuser(self.cfg.init_diffuser).train()
        else:
            model = CodeDiffuser(CodeDiffuserConfig(**{"dim": dim, **self.cfg.diffuser}))
        if model.config.dim != dim:
            raise ValueError(f"code diffuser width {model.config.dim} differs from the codec's W width {dim}")
        return model

    def decode(self, codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """StyleGAN2 images of W+ codes (fresh noise), pooled to the training size; differentiable."""
        return _pool(self.codec.decoder(codes, generator=generator).image, self.cfg.size)

    def collate(self, items: list[dict], device: torch.device) -> dict:
        lq, hq = stack(items, "lq", device), stack(items, "hq", device)
        seed = batch_seed(items)
        return {"lq": lq, "hq": hq, "cond": self.encode(lq), "target": self.encode(hq), "seed": seed}

    def training_loss(self, model, batch, step):
        c, cond = self.cfg, batch["cond"]
        g = step_generator(batch, step, cond.device)
        t = torch.full((cond.shape[0],), model.config.timesteps - 1, device=cond.device, dtype=torch.long)
        noise = randn_like_shape(cond.shape, cond, g)
        start = model.q_sample(cond, t, noise)  # official training start: the noised LQ code
        pred = model.sample(cond, start=start).code
        latent = F.l1_loss(pred, batch["target"])
        loss, logs = c.latent_weight * latent, {"latent_l1": latent.item()}
        if c.lpips_weight > 0 or c.id_weight > 0:
            perceptual, more = self.perceptual(self.decode(pred, g), batch["hq"], lpips_sum=False)
            loss, logs = loss + perceptual, {**logs, **more}
        return loss, {"loss": loss.item(), **logs}

    def validate(self, model, step, out_dir: Path) -> dict[str, float]:
        pairs = self.val_pairs()
        if pairs is None:
            return {}
        dev = next(model.parameters()).device
        g = generator_on(dev, self.cfg.val_seed)
        cols: dict[str, list] = {"LQ": [], "e4e(LQ)": [], "diffused": [], "HQ": []}
        l1, l1_lq = [], []
        for i in range(0, pairs[0].shape[0], VAL_CHUNK):
            lq, hq = (p[i : i + VAL_CHUNK].to(dev) for p in pairs)
            cond, target = self.encode(lq), self.encode(hq)
            pred = model.sample(cond, generator=g).code  # inference: start from N(0, I)
            l1.append((pred - target).abs().mean((1, 2)))
            l1_lq.append((cond - target).abs().mean((1, 2)))
            size = self.cfg.size
            for k, v in zip(cols, (lq, self.decode(cond, g), self.decode(pred, g), hq), strict=True):
                cols[k].append(_pool(v, size).cpu())
        out = {k: torch.cat(v) for k, v in cols.items()}
        metrics = self.image_metrics(out["diffused"], out["HQ"])
        metrics.update(code_l1=float(torch.cat(l1).mean()), code_l1_lq=float(torch.cat(l1_lq).mean()))
        self.save_grid(out, out_dir / "samples" / f"step_{step:06d}.png")
        return metrics

    def export(self, model, path: Path, step: int) -> None:
        save_code_diffuser(model, path)


class RestorationTask(VSPBFRTaskBase):
    """Stage 2: the restoration network against the VSPBFR discriminator."""

    name = "vspbfr_restoration"

    def __init__(self, cfg: RestorationTaskConfig):
        super().__init__(cfg)
        self.diffuser: CodeDiffuser | None = None
        self.discriminator: VSPBFRDiscriminator | None = None

    def setup(self, device: torch.device, cfg: TrainConfig) -> None:
        group = min(cfg.batch_size, DiscriminatorConfig().stddev_group)
        if cfg.batch_size % group:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be a multiple of the discriminator's stddev group {group}"
            )
        super().setup(device, cfg)
        what = "code_diffuser.pt (Hugging Face Wanglong2/VSPBFR), its conversion, or a stage-1 export"
        path = need_file("code_diffuser", self.cfg.code_diffuser, what)
        self.diffuser = load_code_diffuser(path, device).requires_grad_(False)

    def build_model(self) -> RestorationNet:
        c = self.cfg
        if c.init_from:
            model = load_restoration_net(c.init_from, which="g").train()
        else:
            model = RestorationNet(RestorationConfig(**{**c.model, "size": c.size}))
        if model.config.size != c.size:
            raise ValueError(
                f"{c.init_from} is a {model.config.size}-px restoration net, but size is {c.size}"
            )
        check_compatible(self.codec, self.diffuser, model)
        return model

    def build_aux(self) -> VSPBFRDiscriminator:
        c = self.cfg
        content = read_checkpoint(c.init_from, OFFICIAL_ALLOWED_GLOBALS).content if c.init_from else {}
        if isinstance(content, dict) and "d" in content:
            self.discriminator = discriminator_from_state_dict(content["d"], f"{c.init_from} [d]")
        else:
            self.discriminator = VSPBFRDiscriminator(
                DiscriminatorConfig(**{**c.discriminator, "size": c.size})
            )
        if self.discriminator.config.size != c.size:
            raise ValueError(f"discriminator is {self.discriminator.config.size} px, but size is {c.size}")
        return self.discriminator

    def aux_optimizer_settings(self, cfg: TrainConfig) -> dict:
        return lazy_adam_settings(self.cfg.d_lr, self.cfg.d_betas, cfg.eps, self.cfg.r1_every)

    def prompts(self, lq: torch.Tensor, generator: torch.Generator | None = None):
        """Frozen stage-1 path: (diffused W+ prompt, StyleGAN2 feature bank up to the net's size)."""
        with torch.no_grad():
            prompt = self.diffuser.sample(self.encode(lq), generator=generator).code
            bank = self.codec.decoder(prompt, generator=generator).features
        # The bank reaches the decoder's 1024 px; the restoration net reads maps up to its own size.
        need = self.cfg.size.bit_length() - 2
        return prompt, bank[:need]

    def collate(self, items: list[dict], device: torch.device) -> dict:
        lq, hq = stack(items, "lq", device), stack(items, "hq", device)
        seed = batch_seed(items)
        prompt, bank = self.prompts(lq, generator_on(device, seed))
        return {"lq": lq, "hq": hq, "prompt": prompt, "bank": bank, "seed": seed}

    def training_loss(self, model, batch, step):
        c = self.cfg
        self.discriminator.requires_grad_(False)  # G step: gradients reach D's input, not its weights
        g = step_generator(batch, step, batch["lq"].device)  # z, crossover index and layer noise
        fake = model(batch["lq"], batch["bank"], batch["prompt"], generator=g, mixing_prob=c.mixing)
        adv = g_nonsaturating_loss(self.discriminator(fake))
        perceptual, logs = self.perceptual(fake, batch["hq"], lpips_sum=c.lpips_sum)
        loss = c.gan_weight * adv + perceptual
        batch["fake"] = fake.detach()  # what the discriminator step judges
        return loss, {"loss": loss.item(), "g_adv": adv.item(), **logs}

    def aux_loss(self, model, batch, step):
        c, d = self.cfg, self.discriminator
        d.requires_grad_(True)
        regularize = step % c.r1_every == 0
        real = batch["hq"].detach().requires_grad_(regularize)
        real_pred, fake_pred = d(real), d(batch["fake"])
        loss = d_logistic_loss(real_pred, fake_pred)
        logs = {
            "d": loss.item(),
            "real_score": real_pred.mean().item(),
            "fake_score": fake_pred.mean().item(),
        }
        if regularize:
            r1 = r1_penalty(real_pred, real)
            loss = loss + c.r1_weight / 2 * r1 * c.r1_every  # lazy: scaled by the interval
            logs["r1"] = r1.item()
        return loss, logs

    def validate(self, model, step, out_dir: Path) -> dict[str, float]:
        from ..inference.metrics.psnr_ssim import psnr

        pairs = self.val_pairs()
        if pairs is None:
            return {}
        dev = next(model.parameters()).device
        g = generator_on(dev, self.cfg.val_seed)
        outs = []
        for i in range(0, pairs[0].shape[0], VAL_CHUNK):
            lq = pairs[0][i : i + VAL_CHUNK].to(dev)
            prompt, bank = self.prompts(lq, g)
            outs.append(model(lq, bank, prompt, generator=g, mixing_prob=self.cfg.mixing).cpu())
        lq, hq, out = pairs[0], pairs[1], torch.cat(outs)
        metrics = self.image_metrics(out, hq)
        metrics["psnr_lq"] = float(psnr(to_unit(lq), to_unit(hq)).mean())
        self.save_grid({"LQ": lq, "output": out, "HQ": hq}, out_dir / "samples" / f"step_{step:06d}.png")
        return metrics

    def export(self, model, path: Path, step: int) -> None:
        save_restoration_net(model, path)


def build_vspbfr_task(name: str, task_config: dict):
    """The VSPBFR task a job names ('vspbfr_code_diffuser' or 'vspbfr_restoration')."""
    if name == CodeDiffuserTask.name:
        return CodeDiffuserTask(CodeDiffuserTaskConfig(**task_config))
    if name == RestorationTask.name:
        return RestorationTask(RestorationTaskConfig(**task_config))
    raise ValueError(
        f"unknown VSPBFR task {name!r}; expected {CodeDiffuserTask.name!r} or {RestorationTask.name!r}"
    )
