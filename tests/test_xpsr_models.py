"""XPSR models: SFA modes, chunked attention, official key layout and sizes, init, gradients, DFC."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402
from diffusers.models.transformers.transformer_2d import Transformer2DModel  # noqa: E402

from priorface.models.checkpoint import KeyMismatchError  # noqa: E402
from priorface.models.xpsr_attention import (  # noqa: E402
    ChunkedAttnProcessor,
    semantic_fusion,
    set_attention_processor,
)
from priorface.models.xpsr_checkpoints import load_xpsr_checkpoint, load_xpsr_controlnet, load_xpsr_unet  # noqa: E402
from priorface.models.xpsr_controlnet import xpsr_controlnet_class  # noqa: E402
from priorface.models.xpsr_dfc import DFC_WEIGHT, PAPER_LATENT_HEADS, dfc_loss  # noqa: E402
from priorface.models.xpsr_unet import freeze_for_xpsr_training, xpsr_unet_class, xpsr_unet_from_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

# SD1.5 structure at 1/20 width: block channels differ between blocks 1 and 2 like 640/1280, so the
# pixel-attention key widths (skip channels) are distinguishable.
TINY = dict(
    sample_size=16,
    block_out_channels=(16, 32, 48, 48),
    layers_per_block=2,
    cross_attention_dim=24,  # differs from every block width, as 768 does for SD1.5
    attention_head_dim=2,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15 = dict(cross_attention_dim=768, sample_size=64)  # the rest are diffusers' defaults = SD1.5
SFA_PARTS = ("attentions_lowlevel", "attentions_connect", "to_rgbs", "conv_degradation")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    sd_unet = UNet2DConditionModel(**TINY).eval()
    torch.manual_seed(1)
    unet = xpsr_unet_from_sd(sd_unet).eval()
    controlnet = xpsr_controlnet_class().from_unet(sd_unet).eval()
    return sd_unet, unet, controlnet


def _inputs(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=g),
        text=torch.randn(batch, 5, 24, generator=g),
        low=torch.randn(batch, 7, 24, generator=g),
        image=torch.rand(batch, 3, 128, 128, generator=g),
    )


def _randomise_zero_convs(controlnet, seed=3):
    # Zero convs block every gradient at init; small random weights let the test see the graph.
    g = torch.Generator().manual_seed(seed)
    zeros = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for p in [p for m in zeros for p in m.parameters()] + list(
        controlnet.controlnet_cond_embedding.conv_out.parameters()
    ):
        p.data = 0.1 * torch.randn(p.shape, generator=g)


def _transformer(cross_dim, seed):
    torch.manual_seed(seed)
    return Transformer2DModel(2, 8, in_channels=16, cross_attention_dim=cross_dim, norm_num_groups=8).eval()


@torch.no_grad()
def test_sfa_modes_compute_what_they_claim():
    high, low, connect = _transformer(32, 0), _transformer(32, 1), _transformer(16, 2)
    h, c_high, c_low = torch.randn(2, 16, 4, 6), torch.randn(2, 5, 32), torch.randn(2, 7, 32)

    def call(m, x, ctx):
        return m(x, encoder_hidden_states=ctx, return_dict=False)[0]

    h_high, h_low = call(high, h, c_high), call(low, h, c_low)
    # Official flattening: (B, C, H, W) -> view(B, C, HW) -> permute to (B, HW, C).
    want = {
        "parallel": call(connect, h_high, h_low.view(2, 16, -1).permute(0, 2, 1)),
        "serial": call(low, h_high, c_low),
        "high_only": h_high,
        "low_only": h_low,
    }
    for mode, expected in want.items():
        got = semantic_fusion(h, high, low, connect, c_high, c_low, mode)
        torch.testing.assert_close(got, expected, msg=mode)
        # No low-level prompt: every mode falls back to the high-level branch.
        torch.testing.assert_close(semantic_fusion(h, high, low, connect, c_high, None, mode), h_high)
    assert (want["parallel"] - h_high).abs().max() > 1e-3  # the fusion layer really changes the features
    with pytest.raises(ValueError, match="unknown SFA mode"):
        semantic_fusion(h, high, low, connect, c_high, c_low, "mixed")


@torch.no_grad()
def test_chunked_fusion_attention_equals_unchunked(models):
    connect = _transformer(16, 2)
    h, tokens = torch.randn(2, 16, 6, 7), torch.randn(2, 42, 16)
    set_attention_processor(connect, AttnProcessor2_0(), None)
    sdpa = connect(h, encoder_hidden_states=tokens, return_dict=False)[0]
    set_attention_processor(connect, AttnProcessor(), None)  # classic bmm/softmax reference
    classic = connect(h, encoder_hidden_states=tokens, return_dict=False)[0]
    assert (
        set_attention_processor(connect, ChunkedAttnProcessor(chunk_size=5), None) == 2
    )  # 42 queries: 8 full chunks + 2
    chunked = connect(h, encoder_hidden_states=tokens, return_dict=False)[0]
    torch.testing.assert_close(chunked, sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, classic, atol=1e-5, rtol=1e-5)

    controlnet = copy.deepcopy(models[2])
    # Default is SDPA; the helper reaches exactly the attn1+attn2 of the 7 fusion transformers.
    assert isinstance(
        controlnet.down_blocks[0].attentions_connect[0].transformer_blocks[0].attn2.processor,
        AttnProcessor2_0,
    )
    assert set_attention_processor(controlnet, ChunkedAttnProcessor(3)) == 7 * 2
    assert isinstance(
        controlnet.mid_block.attentions_connect[0].transformer_blocks[0].attn1.processor, ChunkedAttnProcessor
    )
    assert isinstance(
        controlnet.mid_block.attentions[0].transformer_blocks[0].attn1.processor, AttnProcessor2_0
    )
    x = _inputs()
    base = models[2](x["sample"], 500, x["text"], x["image"], x["low"])
    out = controlnet(x["sample"], 500, x["text"], x["image"], x["low"])
    for a, b in zip(out.latent_preds, base.latent_preds, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sd15_sizes_and_key_counts_match_the_official_models():
    # Reference figures measured on the official diffusers-0.21.4 classes (papers.md 3.3 and 3.5).
    with torch.device("meta"):
        unet = xpsr_unet_class()(**SD15)
        controlnet = xpsr_controlnet_class().from_unet(unet, load_weights_from_unet=False)
    count = lambda m, keep=lambda n: True: sum(p.numel() for n, p in m.named_parameters() if keep(n))  # noqa: E731
    assert round(count(unet) / 1e6, 1) == 1107.8
    assert round(count(controlnet) / 1e6, 1) == 620.2
    assert round(count(unet, lambda n: "pixel_attentions" in n) / 1e6, 1) == 248.2
    assert round(count(controlnet, lambda n: any(s in n for s in SFA_PARTS)) / 1e6, 1) == 258.9
    assert sum(".pixel_attentions." in k for k in unet.state_dict()) == 312
    assert sum(any(s in k for s in SFA_PARTS) for k in controlnet.state_dict()) == 396
    kv = [
        [blk.pixel_attentions[j].transformer_blocks[0].attn2.to_k.weight.shape[1] for j in range(3)]
        for blk in unet.up_blocks
    ]
    assert kv == [[1280, 1280, 1280], [1280, 1280, 640], [640, 640, 320], [320, 320, 320]]
    with torch.device("meta"), pytest.raises(ValueError, match="SD1.5/SD2-shaped"):
        xpsr_unet_class()(**SD15, class_embed_type="timestep")


def _official_keys(stock: dict, extra_pattern: list[tuple[str, str]]) -> set[str]:
    """Stock diffusers keys + official extras spelled from papers.md 3.5 with a transformer's suffixes."""
    suffixes = [k.split("attentions.0.", 1)[1] for k in stock if k.startswith("down_blocks.0.attentions.0.")]
    keys = set(stock)
    for prefix, kind in extra_pattern:
        keys |= (
            {f"{prefix}.{s}" for s in suffixes}
            if kind == "transformer"
            else {f"{prefix}.{s}" for s in ("weight", "bias")}
        )
    return keys


def test_official_key_layout_loads_with_zero_mismatches(models, tmp_path):
    sd_unet, unet, controlnet = models
    stock_cn = ControlNetModel.from_unet(sd_unet)
    unet_extra = [(f"up_blocks.{i}.pixel_attentions.{j}", "transformer") for i in range(4) for j in range(3)]
    cn_extra = [
        (f"down_blocks.{b}.{kind}.{j}", "transformer")
        for b in range(3)
        for j in range(2)
        for kind in SFA_PARTS[:2]
    ]
    cn_extra += [(f"mid_block.{kind}.0", "transformer") for kind in SFA_PARTS[:2]]
    cn_extra += [(f"controlnet_cond_embedding.to_rgbs.{k}", "conv") for k in range(3)]
    cn_extra += [(f"conv_degradation.{i}.0", "conv") for i in range(12)] + [
        ("conv_degradation_mid.0", "conv")
    ]
    assert set(unet.state_dict()) == _official_keys(sd_unet.state_dict(), unet_extra)
    assert set(controlnet.state_dict()) == _official_keys(stock_cn.state_dict(), cn_extra)

    # Official save_pretrained layout: config.json with the XPSR fields + safetensors (UNet) / .bin (ControlNet).
    from safetensors.torch import save_file

    root = tmp_path / "checkpoint-300000"
    for name, model, extra in (
        ("unet", unet, {"up_use_lowlevel_prompt": [False] * 4, "mid_use_lowlevel_prompt": False}),
        (
            "controlnet",
            controlnet,
            {"return_rgbs": True, "use_rrdb": False, "use_lowlevel_prompt": True, "use_latent_pred": True},
        ),
    ):
        (root / name).mkdir(parents=True)
        cfg = {
            **dict(model.config),
            "_class_name": type(model).__name__[4:],
            "_diffusers_version": "0.21.4",
            **extra,
        }
        (root / name / "config.json").write_text(json.dumps(cfg))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if name == "unet":
            save_file(state, str(root / name / "diffusion_pytorch_model.safetensors"))
        else:
            torch.save(state, root / name / "diffusion_pytorch_model.bin")
    loaded_unet, report_unet = load_xpsr_unet(root / "unet")
    loaded_cn, report = load_xpsr_controlnet(root / "controlnet")
    assert report.ok and report_unet.ok and not report.missing and not report.unexpected
    x = _inputs()
    with torch.no_grad():
        a = controlnet(x["sample"], 10, x["text"], x["image"], x["low"])
        b = loaded_cn(x["sample"], 10, x["text"], x["image"], x["low"])
        torch.testing.assert_close(b.mid_block_res_sample, a.mid_block_res_sample)
        ya = unet(x["sample"], 10, x["text"], a.down_block_res_samples, a.mid_block_res_sample).sample
        yb = loaded_unet(x["sample"], 10, x["text"], b.down_block_res_samples, b.mid_block_res_sample).sample
    torch.testing.assert_close(yb, ya)

    # A wrong layout is reported key by key.
    state = {
        k: v for k, v in unet.state_dict().items() if k != "up_blocks.1.pixel_attentions.2.proj_out.bias"
    }
    state["up_blocks.1.pixel_attention.2.proj_out.bias"] = torch.zeros(1)
    save_file(state, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(KeyMismatchError, match=r"up_blocks\.1\.pixel_attentions\.2\.proj_out\.bias") as err:
        load_xpsr_unet(root / "unet")
    assert "up_blocks.1.pixel_attention.2.proj_out.bias" in str(err.value)
    cfg = json.loads((root / "controlnet" / "config.json").read_text())
    (root / "controlnet" / "config.json").write_text(json.dumps({**cfg, "use_rrdb": True}))
    with pytest.raises(ValueError, match="use_rrdb"):
        load_xpsr_controlnet(root / "controlnet")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_xpsr_unet(tmp_path)
    with pytest.raises(FileNotFoundError, match="unet"):
        load_xpsr_checkpoint(tmp_path)


def test_from_unet_copies_sd_weights_like_the_official_code(models):
    sd_unet, _, controlnet = models
    sd = sd_unet.state_dict()
    own = controlnet.state_dict()
    random_keys = set(controlnet.random_init_keys)
    want_random = {
        f"{blk}.attentions_connect.{j}.transformer_blocks.0.attn2.{p}.weight"
        for blk, n in (("down_blocks.0", 2), ("down_blocks.1", 2), ("down_blocks.2", 2), ("mid_block", 1))
        for j in range(n)
        for p in ("to_k", "to_v")
    }
    assert random_keys == want_random
    copied = 0
    for key, value in own.items():
        for kind in SFA_PARTS[:2]:
            if f".{kind}." in key and key not in random_keys:
                torch.testing.assert_close(value, sd[key.replace(f".{kind}.", ".attentions.")])
                copied += 1
    assert copied == 14 * 26 - len(want_random)
    for key in random_keys:  # C x C keys/values over image tokens (SD's are C x 768): random init
        assert own[key].shape[0] == own[key].shape[1] and own[key].abs().sum() > 0
    torch.testing.assert_close(own["time_embedding.linear_1.weight"], sd["time_embedding.linear_1.weight"])
    assert own["controlnet_down_blocks.0.weight"].abs().sum() == 0  # zero convs stay zero


@torch.no_grad()
def test_high_only_controlnet_equals_stock_diffusers_controlnet(models):
    sd_unet, _, controlnet = models
    torch.manual_seed(5)
    stock = ControlNetModel.from_unet(sd_unet).eval()
    _randomise_zero_convs(stock)
    ours = copy.deepcopy(controlnet)
    ours.load_state_dict(stock.state_dict(), strict=False)  # same stock weights, SFA extras kept
    x = _inputs(1, batch=2)
    ref = stock(x["sample"], 321, x["text"], x["image"], conditioning_scale=0.7, return_dict=False)
    for low, mode in ((x["low"], "high_only"), (None, "parallel")):
        out = ours(x["sample"], 321, x["text"], x["image"], low, conditioning_scale=0.7, sfa_mode=mode)
        assert len(out.down_block_res_samples) == 12
        for a, b in zip(out.down_block_res_samples, ref[0], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.mid_block_res_sample, ref[1], atol=1e-5, rtol=1e-4)
    full = ours(x["sample"], 321, x["text"], x["image"], x["low"], sfa_mode="parallel")
    assert (full.mid_block_res_sample - ref[1] / 0.7).abs().max() > 1e-4  # SFA changes the residuals
    # Heads: RGB at 1/2, 1/4, 1/8 of the control image; one latent per residual, at its size.
    assert [tuple(r.shape) for r in full.rgbs] == [(2, 3, 64, 64), (2, 3, 32, 32), (2, 3, 16, 16)]
    assert [tuple(p.shape[1:]) for p in full.latent_preds] == [
        (4, *r.shape[-2:]) for r in full.down_block_res_samples
    ]
    torch.testing.assert_close(full.latent_preds[4], ours.conv_degradation[4](full.down_block_res_samples[4]))
    with pytest.raises(ValueError, match="8x the latent size"):
        ours(x["sample"], 321, x["text"], x["image"][..., :64, :64], x["low"])


@torch.no_grad()
def test_unet_pixel_attention_wiring(models):
    sd_unet, unet, controlnet = models
    x = _inputs(2)
    # Without ControlNet residuals the XPSR UNet is the SD UNet.
    torch.testing.assert_close(
        unet(x["sample"], 7, x["text"]).sample, sd_unet(x["sample"], 7, x["text"]).sample
    )
    cn = copy.deepcopy(controlnet)
    _randomise_zero_convs(cn)
    out = cn(x["sample"], 7, x["text"], x["image"], x["low"])
    seen = {}

    def record(key):
        def hook(module, args, kwargs, output):
            seen[key] = kwargs["encoder_hidden_states"]  # returns None: output unchanged

        return hook

    hooks = [
        pa.register_forward_hook(record((i, j)), with_kwargs=True)
        for i, blk in enumerate(unet.up_blocks)
        for j, pa in enumerate(blk.pixel_attentions)
    ]
    try:
        y = unet(x["sample"], 7, x["text"], out.down_block_res_samples, out.mid_block_res_sample).sample
    finally:
        for hk in hooks:
            hk.remove()
    assert y.shape == (1, 4, 16, 16) and torch.isfinite(y).all()
    res = out.down_block_res_samples
    for (i, j), tokens in seen.items():  # up block i, layer j keys on residual 11 - (3i + j)
        r = res[11 - (3 * i + j)]
        torch.testing.assert_close(tokens, r.flatten(2).transpose(1, 2))
    assert len(seen) == 12
    plain = sd_unet(
        x["sample"],
        7,
        x["text"],
        down_block_additional_residuals=res,
        mid_block_additional_residual=out.mid_block_res_sample,
    )
    assert (plain.sample - y).abs().max() > 1e-4  # pixel attentions act on top of the residual addition


def test_gradients_reach_exactly_the_trainable_set(models):
    _, unet0, controlnet0 = models
    unet, controlnet = copy.deepcopy(unet0).train(), copy.deepcopy(controlnet0).train()
    _randomise_zero_convs(controlnet)
    trainable = freeze_for_xpsr_training(unet, controlnet)
    assert len(trainable) == len(list(controlnet.parameters())) + sum(
        ".pixel_attentions." in n for n, _ in unet.named_parameters()
    )
    x = _inputs(4)
    out = controlnet(x["sample"], 600, x["text"], x["image"], x["low"])
    eps = unet(x["sample"], 600, x["text"], out.down_block_res_samples, out.mid_block_res_sample).sample
    hr = torch.rand(1, 3, 128, 128) * 2 - 1
    dfc = dfc_loss(out.rgbs, out.latent_preds, out.latent_pred_mid, hr, torch.randn(1, 4, 16, 16))
    (F.mse_loss(eps, torch.randn_like(eps)) + dfc.total).backward()
    names = lambda m: {n for n, p in m.named_parameters() if p.grad is not None}  # noqa: E731
    assert names(unet) == {n for n, _ in unet.named_parameters() if ".pixel_attentions." in n}
    assert names(controlnet) == {n for n, _ in controlnet.named_parameters()}
    dead = [
        n
        for m in (unet, controlnet)
        for n, p in m.named_parameters()
        if p.grad is not None and p.grad.abs().sum() == 0
    ]
    assert dead == []


def test_dfc_terms_shapes_and_weight():
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g)
    rgbs = [torch.randn(2, 3, s, s, generator=g) for s in (32, 16, 8)]
    sizes = [8, 8, 8, 8, 4, 4, 4, 2, 2, 2, 1, 1]
    latents = [torch.randn(2, 4, s, s, generator=g) for s in sizes]
    mid = torch.randn(2, 4, 1, 1, generator=g)

    def l1(pred, target):
        return (
            (pred - F.interpolate(target, size=pred.shape[-2:], mode="bilinear", align_corners=False))
            .abs()
            .mean()
        )

    official = dfc_loss(rgbs, latents, mid, hr, z)
    assert len(official.pixel_terms) == 3 and len(official.latent_terms) == 13
    assert official.weight == DFC_WEIGHT == 0.05
    torch.testing.assert_close(official.latent_terms[-1], l1(mid, z))
    want = 0.05 * (sum(l1(r, hr) for r in rgbs) + sum(l1(p, z) for p in latents) + l1(mid, z))
    torch.testing.assert_close(official.total, want)
    paper = dfc_loss(rgbs, latents, mid, hr, z, mode="paper")
    assert PAPER_LATENT_HEADS == (2, 5, 8) and len(paper.latent_terms) == 3
    torch.testing.assert_close(paper.latent_terms[1], l1(latents[5], z))
    torch.testing.assert_close(
        paper.total, 0.05 * (sum(paper.pixel_terms) + sum(l1(latents[i], z) for i in (2, 5, 8)))
    )
    assert dfc_loss(rgbs, latents, mid, hr, z, weight=1.0).total.item() == pytest.approx(
        official.total.item() / 0.05, rel=1e-5
    )
    with pytest.raises(ValueError, match="unknown DFC mode"):
        dfc_loss(rgbs, latents, mid, hr, z, mode="both")
    with pytest.raises(ValueError, match="hr_pixels"):
        dfc_loss(rgbs, latents, mid, hr[:, :1], z)
