"""Compare LLV-FSR architecture options under the same wall-clock budget on this CPU.

    python scripts/bench_llvfsr_arch.py --seconds 600 v0 v4 plain_cnn

Each candidate trains from scratch on the job's training faces (default
configs/llvfsr/x8-aligned.json: aligned UTKFace, bicubic x8, embedded priors) with Adam 2e-4 and a
cosine schedule over the time budget, then prints its PSNR gain over bicubic on the FFHQ dev faces
reframed to the training template (as scripts/eval_llvfsr.py does). The budget is wall time, not
steps, because the question is what learns most per CPU second. Run candidates one after another,
or two at a time with --threads 1 on a 2-core machine (both then see the same contention).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# name -> LLVFSRConfig overrides on top of the job's model config
CANDIDATES = {
    "v0": {"block_conv": False, "rgb_last_stage": False},  # the first embedded weights' network
    "v0_u64": {"block_conv": False, "rgb_last_stage": False, "upsampler_width": 64},
    "v3": {"block_conv": True, "rgb_last_stage": False},
    "v4": {"block_conv": True, "rgb_last_stage": True},
    "v4_model1": {"block_conv": True, "rgb_last_stage": True, "variant": "model1"},
}


class PlainResidualCNN(nn.Module):
    """Reference without attention or priors: conv residual blocks at LR size + x2 sub-pixel stages."""

    def __init__(self, width: int = 64, blocks: int = 8, up_width: int = 32, scale: int = 8):
        super().__init__()
        self.scale = scale
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1), nn.ReLU(True), nn.Conv2d(width, width, 3, padding=1)
            )
            for _ in range(blocks)
        )
        up = [nn.Conv2d(width, up_width, 3, padding=1)]
        for _ in range(int(math.log2(scale))):
            up += [
                nn.Conv2d(up_width, 4 * up_width, 3, padding=1),
                nn.PixelShuffle(2),
                nn.LeakyReLU(0.2, True),
            ]
        self.up = nn.Sequential(*up, nn.Conv2d(up_width, 3, 3, padding=1))

    def forward(self, lr: torch.Tensor, **_priors) -> torch.Tensor:
        """Super-resolve ``lr``; priors are accepted and ignored."""
        f = x = self.head(lr)
        for block in self.body:
            x = x + block(x)
        base = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.up(x + f) + base


def build(name: str, task):
    """The candidate network ``name`` for this task."""
    from priorface.models.llvfsr import build_llvfsr

    if name == "plain_cnn":
        return PlainResidualCNN(scale=task.model_config().scale)
    return build_llvfsr(task.model_config(), **CANDIDATES[name])


def train_for(model, task, seconds: float, batch: int, seed: int) -> int:
    """Train ``model`` for ``seconds`` of wall time; returns the number of steps taken."""
    ds = task.train_set()
    rng = random.Random(seed)
    order = list(range(len(ds)))
    rng.shuffle(order)
    opt = torch.optim.Adam(model.parameters(), 2e-4, betas=(0.9, 0.99), eps=1e-8)
    start, step, pos = time.perf_counter(), 0, 0
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in opt.param_groups:  # cosine over the time budget, floor 1% of the peak
            group["lr"] = 2e-4 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * elapsed / seconds)))
        if pos + batch > len(order):
            rng.shuffle(order)
            pos = 0
        b = task.collate([ds[i] for i in order[pos : pos + batch]], torch.device("cpu"))
        pos += batch
        loss = (model(b["lq"], **b["priors"]) - b["hq"]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    return step


def dev_gain(model, task) -> tuple[float, float]:
    """(bicubic PSNR, model PSNR) on the reframed FFHQ dev faces."""
    from eval_llvfsr import dev_set

    from priorface.inference.metrics.psnr_ssim import psnr

    class Frame:  # what dev_set reads from a loaded model
        out_size = task.cfg.size
        template = task.cfg.template

    hq, lq, base = dev_set(Frame, task.cfg.degradation, 1234, align="reframe")
    model.eval()
    with torch.no_grad():
        priors = task.priors_for([{}] * len(lq), torch.device("cpu"))
        out = model(lq, **priors).clamp(0, 1)
    return float(psnr(base, hq).mean()), float(psnr(out, hq).mean())


def main(argv=None) -> int:
    """Train and score each named candidate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="+", choices=[*CANDIDATES, "plain_cnn"])
    parser.add_argument("--job", default=str(ROOT / "configs/llvfsr/x8-aligned.json"))
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from priorface.training.llvfsr_task import LLVFSRTask, LLVFSRTaskConfig

    torch.set_num_threads(args.threads)
    job = json.loads(Path(args.job).read_text())["task_config"]
    for name in args.candidates:
        torch.manual_seed(args.seed)
        task = LLVFSRTask(LLVFSRTaskConfig(**job))
        model = build(name, task)
        params = sum(p.numel() for p in model.parameters())
        steps = train_for(model, task, args.seconds, args.batch, args.seed)
        bicubic, ours = dev_gain(model, task)
        print(
            f"{name:10s} params {params / 1e6:.2f} M  steps {steps:5d} in {args.seconds:.0f} s  "
            f"dev PSNR {ours:.2f} vs bicubic {bicubic:.2f}  gain {ours - bicubic:+.2f} dB",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
