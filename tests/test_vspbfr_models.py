"""VSPBFR networks: StyleGAN2 ops, generator feature bank, e4e, code diffuser, restoration net, checkpoints."""

from __future__ import annotations

import argparse
import fractions
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_vspbfr import CD, E4E, RN, SG, build, randomize  # noqa: E402

from priorface.models.checkpoint import KeyMismatchError, UnsafeCheckpointError, match_state_dict
from priorface.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator
from priorface.models.stylegan2_ops import (
    EqualLinear,
    FusedLeakyReLU,
    ModulatedConv2d,
    fused_leaky_relu,
    upfirdn2d,
)
from priorface.models.vspbfr_checkpoints import (
    DIFFUSER_ARCH,
    convert_official_to_safetensors,
    infer_e4e_config,
    infer_restoration_config,
    infer_stylegan2_config,
    load_code_diffuser,
    load_restoration_net,
    load_style_codec,
)
from priorface.models.vspbfr_diffuser import CodeDiffuser, TACCBlock, beta_schedule
from priorface.models.vspbfr_encoder import E4EConfig, Encoder4Editing, StyleEncoder
from priorface.models.vspbfr_restore import RestorationConfig, RestorationNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


_randomize, _build = randomize, build


# ---------------------------------------------------------------- ops


def _upfirdn_direct(x: np.ndarray, k: np.ndarray, up: int, down: int, pad) -> np.ndarray:
    """Textbook definition on one 2-D map: zero-stuff, pad/crop, full convolution, decimate."""
    h, w = x.shape
    u = np.zeros((h * up, w * up))
    u[::up, ::up] = x
    px0, px1, py0, py1 = pad
    u = np.pad(u, ((max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
    u = u[max(-py0, 0) : u.shape[0] - max(-py1, 0), max(-px0, 0) : u.shape[1] - max(-px1, 0)]
    kh, kw = k.shape
    out = np.zeros((u.shape[0] - kh + 1, u.shape[1] - kw + 1))
    for y in range(out.shape[0]):
        for xx in range(out.shape[1]):
            out[y, xx] = sum(
                u[y + kh - 1 - a, xx + kw - 1 - b] * k[a, b] for a in range(kh) for b in range(kw)
            )
    return out[::down, ::down]


@pytest.mark.parametrize(
    "up,down,pad",
    [
        (1, 1, (1, 1, 1, 1)),
        (2, 1, (2, 1, 2, 1)),
        (1, 2, (1, 1, 1, 1)),
        (2, 2, (1, -1, 0, 2)),
        (3, 1, (-1, 2, 1, 0)),
    ],
)
def test_upfirdn2d_matches_the_definition(up, down, pad):
    g = _gen(0)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    k = torch.randn(3, 4, generator=g, dtype=torch.float64)  # asymmetric: catches a missing flip
    got = upfirdn2d(x, k, up=up, down=down, pad=pad)
    for b in range(2):
        for c in range(3):
            want = _upfirdn_direct(x[b, c].numpy(), k.numpy(), up, down, pad)
            np.testing.assert_allclose(got[b, c].numpy(), want, rtol=1e-10, atol=1e-10)


def test_fused_leaky_relu_formula():
    g = _gen(1)
    x, b = torch.randn(2, 4, 3, 3, generator=g), torch.randn(4, generator=g)
    y = x + b.view(1, 4, 1, 1)
    want = torch.where(y > 0, y, 0.2 * y) * math.sqrt(2)
    torch.testing.assert_close(fused_leaky_relu(x, b), want)
    act = FusedLeakyReLU(4)
    act.bias.data.copy_(b)
    torch.testing.assert_close(act(x), want)
    v = torch.randn(5, 4, generator=g)  # 2-D input (EqualLinear activations)
    torch.testing.assert_close(act(v), torch.where(v + b > 0, v + b, 0.2 * (v + b)) * math.sqrt(2))


def test_equal_linear_runtime_scale_and_lr_mul():
    torch.manual_seed(0)
    lin = EqualLinear(8, 3, lr_mul=0.01, bias_init=0.5)
    x = torch.randn(4, 8)
    want = x @ (lin.weight * 0.01 / math.sqrt(8)).T + 0.5 * 0.01
    torch.testing.assert_close(lin(x), want)


@pytest.mark.parametrize("dilation", [1, 2])
def test_modulated_conv_demodulates_and_convolves_per_sample(dilation):
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, style_dim=7, dilation=dilation)
    x, s = torch.randn(3, 6, 9, 9), torch.randn(3, 7)
    w = conv.sample_weights(s)
    norms = w.pow(2).sum([2, 3, 4]).sqrt()
    torch.testing.assert_close(norms, torch.ones(3, 5), rtol=1e-4, atol=1e-4)
    want = torch.cat([F.conv2d(x[i : i + 1], w[i], padding=dilation, dilation=dilation) for i in range(3)])
    torch.testing.assert_close(conv(x, s), want, rtol=1e-4, atol=1e-5)
    plain = ModulatedConv2d(6, 5, 3, style_dim=7, demodulate=False)
    assert not torch.allclose(plain.sample_weights(s).pow(2).sum([2, 3, 4]), torch.ones(3, 5), atol=0.1)


# ---------------------------------------------------------------- StyleGAN2 generator


def test_generator_feature_bank_and_determinism():
    gen = _build(StyleGAN2Generator, SG)
    w = torch.randn(2, SG.n_latent, SG.style_dim, generator=_gen(3))
    with torch.no_grad():
        a = gen(w, generator=_gen(5))
        b = gen(w, generator=_gen(5))
        c = gen(w, generator=_gen(6))
        fixed1 = gen(w, randomize_noise=False, generator=_gen(5))
        fixed2 = gen(w, randomize_noise=False, generator=_gen(6))
        wide = gen(w[:, 0], generator=_gen(5))
        tiled = gen(w[:, :1].expand(-1, SG.n_latent, -1), generator=_gen(5))
    assert a.image.shape == (2, 3, 32, 32)
    assert [tuple(f.shape) for f in a.features] == [(2, 32, r, r) for r in (4, 8, 16, 32)]
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    assert not torch.allclose(a.image, c.image)
    torch.testing.assert_close(fixed1.image, fixed2.image, rtol=0, atol=0)  # stored noise buffers
    torch.testing.assert_close(wide.image, tiled.image)
    with pytest.raises(ValueError, match="layers"):
        gen(torch.randn(1, SG.n_latent + 1, SG.style_dim))


# ---------------------------------------------------------------- e4e


def test_e4e_codes_are_base_plus_deltas_plus_latent_avg():
    enc = _build(StyleEncoder, E4E)
    x = torch.rand(2, 3, 96, 96, generator=_gen(1)) * 2 - 1  # resized to 64 inside
    with torch.no_grad():
        raw = enc.encoder(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
        avg = torch.randn(E4E.num_styles, E4E.style_dim, generator=_gen(2))
        enc.set_latent_avg(avg)
        torch.testing.assert_close(enc(x), raw + avg)
        for head in enc.encoder.styles[1:]:  # without deltas every layer is the base code
            head.linear.weight.zero_()
            head.linear.bias.zero_()
        flat = enc.encoder(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
    assert raw.shape == (2, E4E.num_styles, E4E.style_dim)
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat))
    assert not torch.allclose(raw, raw[:, :1].expand_as(raw))
    with pytest.raises(ValueError, match="e4e input"):
        enc.encoder(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------- code diffuser


def test_beta_schedule_matches_papers_numbers():
    betas = beta_schedule(4, 0.1, 0.99)
    np.testing.assert_allclose(betas.numpy(), [0.100, 0.294, 0.591, 0.990], atol=6e-4)
    acp = torch.cumprod(1 - betas, 0)
    assert abs(float(acp[-1]) - 0.0026) < 5e-5
    cd = CodeDiffuser(CD)
    # t = 0: the posterior mean is exactly the predicted x0.
    assert (
        float(cd.posterior_mean_coef1[0]) == pytest.approx(1.0) and float(cd.posterior_mean_coef2[0]) == 0.0
    )


def _tacc_reference(block: TACCBlock, x, cond):
    """TACC block written from papers.md section 4.2 with explicit einsums."""
    x = x / torch.sqrt((x**2).mean(dim=1, keepdim=True) + 1e-8)  # PixelNorm over the layer axis
    k, v, q = x @ block.k_matrix.weight.T, x @ block.v_matrix.weight.T, cond @ block.q_matrix.weight.T
    h = torch.einsum("bld,bmd->blm", k, q).div(math.sqrt(18)).softmax(-1) @ v
    a = block.attention_layer
    q2, k2, v2 = x @ a.q_matrix.weight.T, cond @ a.k_matrix.weight.T, x @ a.v_matrix.weight.T
    s = torch.einsum("bld,ble->bde", k2, q2).div(math.sqrt(x.shape[-1])).softmax(1)
    out = F.layer_norm(v2 @ s, (x.shape[-1],))
    h = F.layer_norm(h + out, (x.shape[-1],))
    return h * (1 + block.gamma_(cond)) + block.beta_(cond)


def test_tacc_block_matches_reference_and_pixelnorm_quirk():
    torch.manual_seed(0)
    block = _randomize(TACCBlock(16))
    g = _gen(1)
    x, cond = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 17, generator=g)
    with torch.no_grad():
        got = block(x, cond)
        torch.testing.assert_close(got, _tacc_reference(block, x, cond), rtol=1e-4, atol=1e-5)
        # PixelNorm over dim 1: rescaling one channel across all layers changes nothing.
        scaled = x * torch.rand(16, generator=g).add(0.5)
        torch.testing.assert_close(block(scaled, cond), got, rtol=1e-4, atol=1e-5)


def test_code_diffuser_sampler_is_seeded_and_returns_intermediates():
    cd = _build(CodeDiffuser, CD)
    cond = torch.randn(2, 8, 32, generator=_gen(1))
    with torch.no_grad():
        a = cd.sample(cond, _gen(7), return_intermediates=True)
        b = cd.sample(cond, _gen(7))
        c = cd.sample(cond, _gen(8))
        start = torch.randn(cond.shape, generator=_gen(7))
        x = start
        for i in (3, 2, 1, 0):  # the posterior-mean recursion written out
            x0 = cd(x, cond, torch.full((2,), i))
            x = cd.posterior_mean_coef1[i] * x0 + cd.posterior_mean_coef2[i] * x
    assert len(a.intermediates) == 5 and b.intermediates == []
    torch.testing.assert_close(a.intermediates[0], start)
    torch.testing.assert_close(a.intermediates[-1], a.code)
    torch.testing.assert_close(a.code, b.code, rtol=0, atol=0)
    torch.testing.assert_close(a.code, x)
    assert not torch.allclose(a.code, c.code)


# ---------------------------------------------------------------- restoration network


def _restoration_inputs(seed=0):
    g = _gen(seed)
    lq = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    bank = [torch.randn(2, 32, r, r, generator=g) for r in (4, 8, 16, 32)]
    return lq, bank, torch.randn(2, 8, 32, generator=g)


def test_restoration_net_shape_determinism_and_inputs_used():
    net = _build(RestorationNet, RN)
    lq, bank, prompt = _restoration_inputs()
    with torch.no_grad():
        a = net(lq, bank, prompt, generator=_gen(3))
        b = net(lq, bank, prompt, generator=_gen(3))
        c = net(lq, bank, prompt, generator=_gen(4))
        bank2 = list(bank)
        bank2[0] = torch.zeros_like(bank[0])  # the 4x4 map is not used by the official decoder
        d = net(lq, bank2, prompt, generator=_gen(3))
        bank2[2] = bank[2] + 1
        e = net(lq, bank2, prompt, generator=_gen(3))
        z = torch.randn(2, 32, generator=_gen(9))
        mix = net(lq, bank, prompt, [z, z], generator=_gen(3), inject_index=3)
        single = net(lq, bank, prompt, z, generator=_gen(3))
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(a, d, rtol=0, atol=0)
    assert not torch.allclose(a, e)
    torch.testing.assert_close(mix, single)  # mixing a z with itself is no mixing
    with pytest.raises(ValueError, match="feature_bank"):
        net(lq, bank[:2], prompt)
    with pytest.raises(ValueError, match="prompt"):
        net(lq, bank, prompt[:, :4])


# ---------------------------------------------------------------- official checkpoints


def test_inferred_configs_of_full_size_models():
    with torch.device("meta"):
        assert infer_stylegan2_config(StyleGAN2Generator().state_dict()) == StyleGAN2Config()
        assert infer_restoration_config(RestorationNet().state_dict()) == RestorationConfig()
        assert infer_e4e_config(Encoder4Editing().state_dict()) == E4EConfig()
        small = StyleGAN2Config(size=64, channel_multiplier=1, channel_divisor=16, n_mlp=3)
        assert infer_stylegan2_config(StyleGAN2Generator(small).state_dict()) == small


def _official_files(tmp_path):
    enc, dec = _build(StyleEncoder, E4E, 1), _build(StyleGAN2Generator, SG, 2)
    cd, rn = _build(CodeDiffuser, CD, 3), _build(RestorationNet, RN, 4)
    avg = torch.randn(E4E.num_styles, E4E.style_dim, generator=_gen(5))
    enc.set_latent_avg(avg)
    state = {f"encoder.{k}": v for k, v in enc.encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in dec.state_dict().items()})
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": 32, "start_from_latent_avg": True, "lr": 1e-4}
    args = argparse.Namespace(size=256, Tstep=4, batch=16, ckpt=None)
    files = {
        "codec": {"state_dict": state, "latent_avg": avg, "opts": opts},
        "diffuser": {
            "att_mapper": cd.state_dict(),
            "mapper_optim": {"state": {}, "param_groups": []},
            "args": args,
        },
        "restoration": {
            "g_ema": rn.state_dict(),
            "g": rn.state_dict(),
            "args": args,
            "ada_aug_p": 0.0,
            "iter": 10,
        },
    }
    paths = {}
    for name, obj in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(obj, paths[name])
    return paths, files, (enc, dec, cd, rn)


def _outputs(enc, dec, cd, rn):
    lq, bank, prompt = _restoration_inputs(11)
    x = F.interpolate(lq, size=(64, 64), mode="bilinear", align_corners=False)
    w = torch.randn(2, SG.n_latent, SG.style_dim, generator=_gen(12))
    with torch.no_grad():
        return (
            enc(x),
            dec(w, generator=_gen(13)).image,
            cd.sample(w, _gen(14)).code,
            rn(lq, bank, prompt, generator=_gen(15)),
        )


def test_official_layouts_load_strictly_and_convert(tmp_path):
    paths, files, models = _official_files(tmp_path)
    want = _outputs(*models)
    codec = load_style_codec(paths["codec"])
    cd, rn = load_code_diffuser(paths["diffuser"]), load_restoration_net(paths["restoration"])
    assert match_state_dict(cd, files["diffuser"]["att_mapper"]).ok
    assert match_state_dict(rn, files["restoration"]["g_ema"]).ok
    assert codec.opts["stylegan_size"] == 32 and codec.encoder.config == E4E and codec.decoder.config == SG
    for got, ref in zip(_outputs(codec.encoder, codec.decoder, cd, rn), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    converted = [convert_official_to_safetensors(paths[n], tmp_path / f"{n}.safetensors") for n in paths]
    codec2 = load_style_codec(converted[0])
    cd2, rn2 = load_code_diffuser(converted[1]), load_restoration_net(converted[2])
    for got, ref in zip(_outputs(codec2.encoder, codec2.decoder, cd2, rn2), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=DIFFUSER_ARCH):
        load_restoration_net(converted[1])


def test_wrong_key_is_named_and_unknown_objects_are_refused(tmp_path):
    paths, files, _ = _official_files(tmp_path)
    sd = dict(files["diffuser"]["att_mapper"])
    sd["att_mapper.0.q_matrix.wieght"] = sd.pop("att_mapper.0.q_matrix.weight")
    torch.save({"att_mapper": sd}, tmp_path / "bad.pt")
    with pytest.raises(KeyMismatchError) as err:
        load_code_diffuser(tmp_path / "bad.pt")
    assert "att_mapper.0.q_matrix.wieght" in str(err.value) and "att_mapper.0.q_matrix.weight" in str(
        err.value
    )
    evil = dict(files["restoration"], args=fractions.Fraction(1, 3))
    torch.save(evil, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="Fraction"):
        load_restoration_net(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a VSPBFR"):
        torch.save({"model": {}}, tmp_path / "other.pt")
        convert_official_to_safetensors(tmp_path / "other.pt", tmp_path / "o.safetensors")
