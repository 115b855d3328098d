"""LLV-FSR network: variants, prior subsets, shapes, gradients, attention references, save/load."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from priorface.inference.priors.bundle import TextEmbedding
from priorface.models.checkpoint import KeyMismatchError, save_safetensors
from priorface.models.llvfsr import (
    ARCHITECTURE,
    LLVFSRConfig,
    build_llvfsr,
    llvfsr_config,
    load_llvfsr,
    save_llvfsr,
)
from priorface.models.llvfsr_blocks import PRIOR_NAMES, DescriptionAttention, TextFeatures, WindowAttention

TINY = dict(width=8, depth=2, heads=2, window=4, text_dim=6, mask_classes=3, upsampler_width=8)
ALL_SUBSETS = [set(c) for r in range(5) for c in itertools.combinations(PRIOR_NAMES, r)]


def _tiny(**kw) -> LLVFSRConfig:
    return llvfsr_config("small", **{**TINY, **kw})


def _model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_llvfsr(_tiny(**kw)).eval()


def _text(b: int, t: int, d: int, lengths=None) -> TextEmbedding:
    lengths = lengths or [t] * b
    attn = torch.tensor([[1] * n + [0] * (t - n) for n in lengths], dtype=torch.long)
    return TextEmbedding(torch.randn(b, t, d), attn, torch.randn(b, d))


def _priors(b: int, hr: int, cfg: LLVFSRConfig, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.mask_classes, (b, hr, hr), generator=g)
    torch.manual_seed(seed)
    return {
        "mask": F.one_hot(labels, cfg.mask_classes).permute(0, 3, 1, 2).float(),
        "depth": torch.rand(b, 1, hr, hr, generator=g),
        "caption": _text(b, 5, cfg.text_dim, [5, 3][:b] + [5] * max(0, b - 2)),
        "description": _text(b, 7, cfg.text_dim, [7, 2][:b] + [7] * max(0, b - 2)),
    }


def _lr(b: int, cfg: LLVFSRConfig, hr: int = 32) -> torch.Tensor:
    size = hr if cfg.upsample == "pre_bicubic" else hr // cfg.scale
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(2))


def _subset(priors: dict, names) -> dict:
    return {k: v for k, v in priors.items() if k in names}


@pytest.mark.parametrize(
    "variant,disabled",
    [("full", ())] + [("full", (p,)) for p in PRIOR_NAMES] + [("model2", ()), ("model2", ("depth",))],
)
def test_every_variant_runs_with_every_prior_subset(variant, disabled):
    model = _model(variant=variant, disabled_priors=disabled)
    assert set(model.priors) == set(PRIOR_NAMES) - set(disabled)
    cfg = model.config
    lr, priors = _lr(2, cfg), _priors(2, 32, cfg)
    outs = []
    with torch.no_grad():
        for names in ALL_SUBSETS:
            out = model(lr, **_subset(priors, names))
            assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
            outs.append(out)
    # A disabled prior changes nothing; every enabled one changes the output.
    for i, names in enumerate(ALL_SUBSETS):
        for p in PRIOR_NAMES:
            if p in names:
                continue
            j = ALL_SUBSETS.index(names | {p})
            assert torch.allclose(outs[i], outs[j]) == (p in disabled), (names, p)


def test_model1_ignores_priors_and_has_no_prior_parameters():
    model = _model(variant="model1")
    cfg = model.config
    lr, priors = _lr(2, cfg), _priors(2, 32, cfg)
    assert model.priors == () and not any(model.prior_parameters(p) for p in PRIOR_NAMES)
    assert not any(n.startswith(("encoders", "fusions")) for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(lr), model(lr, **priors))


@pytest.mark.parametrize("upsample", ["pixelshuffle", "pre_bicubic"])
@pytest.mark.parametrize("scale", [4, 8, 16])
def test_output_size_for_each_scale_and_upsampler(scale, upsample):
    model = _model(scale=scale, upsample=upsample, depth=1)
    cfg = model.config
    priors = _priors(1, 48, cfg)  # priors at a third resolution: resized inside
    lr = _lr(1, cfg, hr=64)
    with torch.no_grad():
        out = model(lr, **priors)
    assert out.shape == (1, 3, 64, 64)
    if upsample == "pixelshuffle":  # the global residual is the bicubic-upsampled input
        base = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
        last = [m for m in model.reconstruct.net if isinstance(m, torch.nn.Conv2d)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        with torch.no_grad():
            assert torch.allclose(model(lr, **priors), base, atol=1e-6)


def test_gradients_reach_exactly_the_present_priors():
    model = _model().train()
    cfg = model.config
    lr, priors = _lr(2, cfg), _priors(2, 32, cfg)
    for present in ({"mask"}, {"depth"}, {"caption"}, {"description"}, set(PRIOR_NAMES)):
        model.zero_grad(set_to_none=True)
        model(lr, **_subset(priors, present)).square().mean().backward()
        for name in PRIOR_NAMES:
            params = model.prior_parameters(name)
            assert params, name
            for pname, p in params:
                if name in present:
                    assert p.grad is not None and p.grad.abs().sum() > 0, (present, pname)
                else:
                    assert p.grad is None, (present, pname)


def test_prior_dropout_drops_whole_priors_per_sample():
    model = _model(prior_dropout=0.5)
    cfg = model.config
    b = 12
    lr, priors = _lr(b, cfg), _priors(b, 32, cfg)
    priors["caption"].attention_mask[:] = 1  # every sample has all four priors
    priors["description"].attention_mask[:] = 1
    with torch.no_grad():
        reference = [model(lr, **_subset(priors, names)) for names in ALL_SUBSETS]
        torch.manual_seed(3)
        dropped = model.train()(lr, **priors)
    matched = set()
    for i in range(b):
        hits = [k for k, ref in enumerate(reference) if torch.allclose(dropped[i], ref[i], atol=1e-5)]
        assert len(hits) == 1, f"sample {i} matches subsets {hits}"
        matched.add(hits[0])
    assert len(matched) > 2  # different samples lost different priors


def test_text_without_tokens_counts_as_absent():
    model = _model()
    cfg = model.config
    lr, priors = _lr(2, cfg), _priors(2, 32, cfg)
    priors["caption"].attention_mask[1] = 0
    priors["description"].attention_mask[1] = 0
    with_empty = model(lr, **priors)  # an empty text must not give 0/0 in pooling or attention
    with_empty.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        without = model(lr, **_subset(priors, {"mask", "depth"}))
    assert torch.allclose(with_empty[1], without[1], atol=1e-6)
    assert not torch.allclose(with_empty[0], without[0], atol=1e-4)


def test_mask_is_resized_nearest_and_depth_bilinear():
    model = _model(upsample="pre_bicubic", depth=1)
    cfg = model.config
    lr, priors = _lr(1, cfg, hr=16), _priors(1, 16, cfg)
    # Nearest from 32 to 16 reads pixel 2i: put the mask there and other classes in between.
    hi_mask = _priors(1, 32, cfg, seed=5)["mask"]
    hi_mask[..., ::2, ::2] = priors["mask"]
    flat_depth = torch.full((1, 1, 16, 16), 0.3)
    with torch.no_grad():
        a = model(lr, mask=priors["mask"], depth=flat_depth)
        b = model(lr, mask=hi_mask, depth=torch.full((1, 1, 37, 41), 0.3))
    assert torch.allclose(a, b, atol=1e-6)


def test_desa_modes_differ_only_when_a_description_is_given():
    a, b = _model(desa_mode="text_query"), _model(desa_mode="image_query")
    lr, priors = _lr(2, a.config), _priors(2, 32, a.config)
    no_desc = _subset(priors, {"mask", "depth", "caption"})
    with torch.no_grad():
        assert torch.equal(a(lr, **no_desc), b(lr, **no_desc))
        assert not torch.allclose(a(lr, **priors), b(lr, **priors), atol=1e-4)


def _desa_reference(desa: DescriptionAttention, x: torch.Tensor, text: TextFeatures) -> torch.Tensor:
    """Explicit-softmax version of both DesA readings, one sample and one head at a time."""
    b, c, h, w = x.shape
    heads, d = desa.heads, c // desa.heads
    pixels = desa.norm(x).flatten(2).transpose(1, 2)
    out = torch.zeros(b, h * w, c)
    for i in range(b):
        tok = text.tokens[i][text.valid[i]]
        if desa.mode == "text_query":
            q, (k, v) = desa.q_proj(tok), desa.kv_proj(pixels[i]).chunk(2, -1)
        else:
            q, (k, v) = desa.q_proj(pixels[i]), desa.kv_proj(tok).chunk(2, -1)
        for hd in range(heads):
            sl = slice(hd * d, (hd + 1) * d)
            logits = q[:, sl] @ k[:, sl].T / math.sqrt(d)
            if desa.mode == "text_query":  # tokens read the image, pixels take back their tokens' reading
                summaries = logits.softmax(dim=1) @ v[:, sl]
                out[i, :, sl] = logits.T.softmax(dim=1) @ summaries
            else:
                out[i, :, sl] = logits.softmax(dim=1) @ v[:, sl]
    return desa.out_proj(out).transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("mode", ["text_query", "image_query"])
def test_desa_matches_explicit_attention(mode):
    torch.manual_seed(0)
    desa = DescriptionAttention(8, 2, mode).eval()
    x = torch.randn(2, 8, 5, 6)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    text = TextFeatures(torch.randn(2, 4, 8), valid, torch.randn(2, 8))
    with torch.no_grad():
        assert torch.allclose(desa(x, text), _desa_reference(desa, x, text), atol=1e-5)


def test_window_attention_matches_per_window_attention_with_ragged_edges():
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, window=4, shifted=False).eval()
    x = torch.randn(1, 8, 6, 7)  # padded to 8x8 inside: padding must not be attended
    qkv = attn.qkv(x)
    ref = torch.zeros(1, 8, 6, 7)
    for r, c in itertools.product(range(0, 6, 4), range(0, 7, 4)):
        q, k, v = qkv[:, :, r : r + 4, c : c + 4].flatten(2).unflatten(1, (3, 2, 4)).permute(1, 0, 2, 4, 3)
        o = F.scaled_dot_product_attention(q, k, v)  # [1,heads,n,d]
        ref[:, :, r : r + 4, c : c + 4] = o.permute(0, 1, 3, 2).reshape(
            1, 8, *qkv[:, :, r : r + 4, c : c + 4].shape[-2:]
        )
    with torch.no_grad():
        assert torch.allclose(attn(x), attn.proj(ref), atol=1e-5)


def test_shifted_windows_never_mix_wrapped_pixels():
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, window=4, shifted=True).eval()
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        base = attn(x)

        def changed(r, c):
            y = x.clone()
            y[:, :, r, c] += 1.0
            return (attn(y) - base).abs().sum(1)[0] > 1e-6

    inner = torch.zeros(8, 8, dtype=torch.bool)
    inner[2:6, 2:6] = True  # the shifted window holding pixel (3,3)
    assert torch.equal(changed(3, 3), inner)
    corner = torch.zeros(8, 8, dtype=torch.bool)
    corner[:2, :2] = True  # (0,0) is rolled to the far corner but meets only its own wrapped block
    assert torch.equal(changed(0, 0), corner)


def test_save_load_round_trip(tmp_path):
    model = _model(desa_mode="image_query", disabled_priors=("depth",))
    trained_with = {"mask": {"extractor": "sam-vit-b+labels"}, "caption_embedding": {"extractor": "minilm"}}
    path = save_llvfsr(model, tmp_path / "llv.safetensors", trained_with, {"note": "x"})
    loaded = load_llvfsr(path)
    assert loaded.model.config == model.config and loaded.trained_with == trained_with
    assert loaded.metadata["note"] == "x"
    lr, priors = _lr(2, model.config), _priors(2, 32, model.config)
    with torch.no_grad():
        assert torch.equal(model(lr, **priors), loaded.model(lr, **priors))


def test_missing_key_is_named(tmp_path):
    model = _model()
    state = model.state_dict()
    gone = "fusions.1.branches.description.q_proj.weight"
    del state[gone]
    path = save_safetensors(state, tmp_path / "broken.safetensors", ARCHITECTURE, model.config.to_dict())
    with pytest.raises(KeyMismatchError, match=gone.replace(".", r"\.")):
        load_llvfsr(path)


def test_bad_inputs_and_configs_are_refused():
    model = _model()
    cfg = model.config
    lr, priors = _lr(1, cfg), _priors(1, 32, cfg)
    with pytest.raises(ValueError, match="mask must be"):
        model(lr, mask=priors["mask"][:, :2])
    with pytest.raises(ValueError, match="caption.tokens"):
        model(lr, caption=_text(1, 3, cfg.text_dim + 1))
    for bad in ({"variant": "model3"}, {"heads": 3}, {"disabled_priors": ("sketch",)}, {"scale": 3}):
        with pytest.raises(ValueError):
            _tiny(**bad)
    with pytest.raises(ValueError, match="unknown LLV-FSR config keys"):
        LLVFSRConfig.from_dict({**cfg.to_dict(), "colour": 1})
    assert LLVFSRConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("scale", [4, 8, 16])
def test_rgb_last_stage_and_block_conv_options(scale, tmp_path):
    model = _model(scale=scale, rgb_last_stage=True, block_conv=True)
    cfg = model.config
    lr, priors = _lr(2, cfg, hr=64), _priors(2, 64, cfg)
    with torch.no_grad():
        assert model(lr, **priors).shape == (2, 3, 64, 64)
    # the last stage is conv -> 12 channels -> PixelShuffle(2): no conv runs at output size
    net = model.reconstruct.net
    assert isinstance(net[-1], torch.nn.PixelShuffle) and net[-2].out_channels == 12
    shuffles = sum(isinstance(m, torch.nn.PixelShuffle) for m in net)
    assert shuffles == int(math.log2(scale))
    # block conv closes a residual: zero weights turn the basic block into the identity
    block = model.blocks[0]
    torch.nn.init.zeros_(block[2].weight)
    torch.nn.init.zeros_(block[2].bias)
    x = torch.randn(2, cfg.width, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    # ... and the conv is trained like everything else
    model.train()
    model(lr, **priors).square().mean().backward()
    assert block[2].weight.grad is not None and block[2].weight.grad.abs().sum() > 0
    path = save_llvfsr(model.eval(), tmp_path / "opts.safetensors")
    loaded = load_llvfsr(path).model
    assert loaded.config.rgb_last_stage and loaded.config.block_conv
    with torch.no_grad():
        assert torch.equal(model(lr, **priors), loaded(lr, **priors))


def test_configs_without_the_new_options_load_as_before():
    old = llvfsr_config("small").to_dict()
    for key in ("block_conv", "rgb_last_stage"):
        old.pop(key)
    cfg = LLVFSRConfig.from_dict(old)
    assert not cfg.block_conv and not cfg.rgb_last_stage
    assert len(build_llvfsr(cfg).blocks[0]) == 2
