"""VSPBFR inference: official order, seeds for every random source, sampler, trajectory, photos."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_vspbfr import CD, tiny_models, write_official_files

from priorface.inference import progress
from priorface.inference import vspbfr_pipeline as pipe
from priorface.inference.model_files import headless_locator
from priorface.inference.vspbfr_loading import load_vspbfr_models, resolve_vspbfr_files
from priorface.inference.vspbfr_sampler import kept_timesteps, posterior_coefficients, sample_codes
from priorface.models.vspbfr_diffuser import CodeDiffuser, CodeDiffuserConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

WHOLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces" / "whole"


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def _faces(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- order and shapes


def test_restore_faces_follows_the_official_order(models):
    """Reference: the networks' own APIs (CodeDiffuser.sample included) called in the papers.md order."""
    faces = _faces()
    got = pipe.restore_faces(models, faces, seed=7, mixing_prob=1.0)
    for i in range(2):
        gens = pipe.face_generators(7, i)
        with torch.no_grad():
            x = faces[i : i + 1] * 2 - 1
            w_lq = models.codec.encoder(torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear"))
            w0 = models.diffuser.sample(w_lq, gens["start"]).code
            noise = [
                torch.randn(1, 1, r, r, generator=gens["stylegan_noise"]) for r in (4, 8, 8, 16, 16, 32, 32)
            ]
            bank = models.codec.decoder(w0, noise=noise).features
            z = [torch.randn(1, 32, generator=gens["z"]) for _ in range(2)]
            assert float(torch.rand((), generator=gens["mixing"])) < 1.0
            index = int(torch.randint(1, 8, (), generator=gens["mixing"]))
            want = models.restoration(x, bank, w0, z, gens["restoration_noise"], inject_index=index)
        torch.testing.assert_close(got.faces[i], ((want[0] + 1) / 2).clamp(0, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.prompts[i], w0[0], rtol=1e-5, atol=1e-5)


def test_shapes_resizing_and_bad_input(models, caplog):
    with caplog.at_level(logging.INFO, logger=pipe.__name__):
        out = pipe.restore_faces(models, _faces(3, 48), seed=1, steps=2, return_trajectory=True)
    assert "from 48x48 to the model's 32x32" in caplog.text
    assert out.faces.shape == (3, 3, 32, 32) and out.prompts.shape == (3, 8, 32)
    assert out.trajectory.shape == (3, 3, 3, 32, 32)  # steps + 1 frames per face
    assert 0 <= float(out.faces.min()) and float(out.faces.max()) <= 1
    assert pipe.restore_faces(models, _faces(1, 32)).trajectory is None
    empty = pipe.restore_faces(models, torch.zeros(0, 3, 32, 32), return_trajectory=True)
    assert empty.faces.shape == (0, 3, 32, 32) and empty.trajectory.shape == (0, 5, 3, 32, 32)
    with pytest.raises(ValueError, match="square"):
        pipe.restore_faces(models, torch.rand(1, 3, 32, 40))
    with pytest.raises(ValueError, match="steps must be between 1 and"):
        pipe.restore_faces(models, _faces(1), steps=5)
    with pytest.raises(ValueError, match="seed"):
        pipe.restore_faces(models, _faces(1), seed=-1)


# ---------------------------------------------------------------- seeds


def test_same_seed_same_faces_without_global_rng(models):
    faces = _faces()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = pipe.restore_faces(models, faces, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not touched
    torch.manual_seed(123)
    b = pipe.restore_faces(models, faces, seed=3, return_trajectory=True)
    c = pipe.restore_faces(models, faces, seed=4)
    one = pipe.restore_faces(models, faces[:1], seed=3)
    nhwc = pipe.restore_faces(models, faces.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), seed=3)
    assert torch.equal(nhwc.faces, a.faces)  # the memory layout of the input does not matter
    assert torch.equal(a.faces, b.faces)  # also: asking for the trajectory changes nothing
    assert torch.equal(one.faces[0], a.faces[0])  # a face does not depend on the rest of the batch
    assert (a.faces - c.faces).abs().max() > 1e-3
    assert not torch.equal(a.faces[0], a.faces[1])


@pytest.mark.parametrize("source", pipe.SOURCES)
def test_every_random_source_is_seeded_and_used(models, monkeypatch, source):
    faces = _faces(1)
    real = pipe.face_generators
    base = pipe.restore_faces(models, faces, seed=5, mixing_prob=1.0)

    def swapped(seed, index):
        gens = real(seed, index)
        gens[source] = torch.Generator().manual_seed(999)
        return gens

    monkeypatch.setattr(pipe, "face_generators", swapped)
    a = pipe.restore_faces(models, faces, seed=5, mixing_prob=1.0)
    b = pipe.restore_faces(models, faces, seed=5, mixing_prob=1.0)
    assert torch.equal(a.faces, b.faces)
    assert (a.faces - base.faces).abs().max() > 1e-4, f"{source} does not change the output"
    assert torch.equal(a.prompts, base.prompts) == (source != "start")  # only the start moves the prompt


def test_style_mixing_probability(models):
    gens = [pipe.face_generators(0, i) for i in range(200)]
    like = torch.zeros(1)
    mixed = [len(pipe.latent_inputs(models, g, like, 0.5)[0]) == 2 for g in gens]
    assert 70 < sum(mixed) < 130
    assert not any(len(pipe.latent_inputs(models, g, like, 0.0)[0]) == 2 for g in gens[:20])


# ---------------------------------------------------------------- sampler


def _posterior_mean_direct(acp: np.ndarray, t: int, s: int | None, x0, xt):
    """Mean of q(x_s | x_t, x0) by Gaussian conditioning of x_s = sqrt(a_s) x0 + sqrt(1-a_s) e."""
    a_t, a_s = acp[t], (acp[s] if s is not None else 1.0)
    # Cov(x_s, x_t | x0) / Var(x_t | x0) with x_t = sqrt(a_t/a_s) x_s + sqrt(1 - a_t/a_s) e'
    gain = (1 - a_s) * np.sqrt(a_t / a_s) / (1 - a_t)
    return np.sqrt(a_s) * x0 + gain * (xt - np.sqrt(a_t) * x0)


def test_sampler_posterior_means_match_the_ddpm_formula():
    betas = np.linspace(np.sqrt(0.1), np.sqrt(0.99), 4) ** 2
    acp = np.cumprod(1 - betas)
    x0, xt = 0.7, -1.3
    for steps in (1, 2, 3, 4):
        kept = kept_timesteps(4, steps)
        assert kept[0] == 3 and (steps == 1 or kept[-1] == 0) and len(kept) == steps
        for j, (c0, ct) in enumerate(posterior_coefficients(torch.from_numpy(acp), kept)):
            s = kept[j + 1] if j + 1 < len(kept) else None
            assert c0 * x0 + ct * xt == pytest.approx(
                _posterior_mean_direct(acp, kept[j], s, x0, xt), abs=1e-12
            )
    # Textbook DDPM (Ho et al. eq. 7) for consecutive steps, and the diffuser's own buffers.
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    c0 = betas * np.sqrt(acp_prev) / (1 - acp)
    ct = (1 - acp_prev) * np.sqrt(1 - betas) / (1 - acp)
    got = posterior_coefficients(torch.from_numpy(acp), [3, 2, 1, 0])[::-1]
    np.testing.assert_allclose(np.array(got), np.stack([c0, ct], 1), rtol=1e-12)
    cd = CodeDiffuser(CodeDiffuserConfig(dim=8, blocks=1))
    np.testing.assert_allclose(cd.posterior_mean_coef1.numpy(), c0, rtol=1e-6)
    np.testing.assert_allclose(cd.posterior_mean_coef2.numpy(), ct, rtol=1e-6)


def test_sample_codes_runs_the_recursion_and_matches_the_model_sampler(models):
    cd = models.diffuser
    cond = torch.randn(2, 8, CD.dim, generator=torch.Generator().manual_seed(1))
    start = torch.randn(cond.shape, generator=torch.Generator().manual_seed(2))
    betas = np.linspace(np.sqrt(0.1), np.sqrt(0.99), 4) ** 2
    acp = np.cumprod(1 - betas)
    seen = []
    with torch.no_grad():
        full = sample_codes(cd, cond, 4, start=start, on_step=seen.append)
        torch.testing.assert_close(full[-1], cd.sample(cond, start=start).code)
        two = sample_codes(cd, cond, 2, start=start)
        x = start
        for t, s in ((3, 0), (0, None)):
            x0 = cd(x, cond, torch.full((2,), t))
            x = _posterior_mean_direct(acp, t, s, x0, x).float()
    assert seen == [0, 1, 2, 3] and len(full) == 5 and len(two) == 3
    torch.testing.assert_close(two[-1], x, rtol=1e-4, atol=1e-4)  # float64 vs float32 coefficients


# ---------------------------------------------------------------- trajectory, progress, interruption


def test_trajectory_frames_decode_each_code_with_one_noise(models):
    faces = _faces(1)
    out = pipe.restore_faces(models, faces, seed=2, steps=3, return_trajectory=True)
    gens = pipe.face_generators(2, 0)
    noise = pipe.stylegan_noise(models, gens["stylegan_noise"], torch.zeros(1))
    last = pipe.decode_codes(models, out.prompts, noise)
    torch.testing.assert_close(out.trajectory[0, -1], last[0], rtol=1e-4, atol=1e-5)
    diffs = [(out.trajectory[0, k + 1] - out.trajectory[0, k]).abs().mean() for k in range(3)]
    assert all(d > 1e-4 for d in diffs)


class _CountingBackend:
    def __init__(self, stop_after=None):
        self.totals, self.updates, self.checks, self.stop_after = [], 0, 0, stop_after

    def start(self, total, desc):
        self.totals.append(total)
        backend = self

        class Handle:
            def update(self, n=1, preview=None):
                backend.updates += n

            def close(self):
                pass

        return Handle()

    def check_interrupted(self):
        self.checks += 1
        if self.stop_after is not None and self.checks > self.stop_after:
            raise progress.InterruptedByUser("stop")


def test_progress_per_step_and_interruption(models):
    counting = _CountingBackend()
    progress.set_backend(counting)
    try:
        pipe.restore_faces(models, _faces(2), steps=3, return_trajectory=True)
        assert counting.totals == [2 * (3 + 1 + 4)] and counting.updates == 16
        stopper = _CountingBackend(stop_after=3)
        progress.set_backend(stopper)
        with pytest.raises(progress.InterruptedByUser):
            pipe.restore_faces(models, _faces(2), steps=4)
        assert stopper.updates < 3  # stopped inside the first face's diffusion
    finally:
        progress.set_backend(None)


# ---------------------------------------------------------------- files and whole photos


def test_loading_official_files_and_missing_file_message(models, tmp_path):
    paths = write_official_files(models, tmp_path / "priorface" / "vspbfr")
    loaded = load_vspbfr_models(**paths, device="cpu")
    faces = _faces(1)
    assert torch.equal(pipe.restore_faces(loaded, faces, 9).faces, pipe.restore_faces(models, faces, 9).faces)
    with pytest.raises(ValueError, match="chosen as style_codec"):
        load_vspbfr_models(paths["code_diffuser"], paths["code_diffuser"], paths["restoration_net"], "cpu")
    locator = headless_locator(tmp_path)
    assert (
        resolve_vspbfr_files(locator, code_diffuser="code_diffuser.pt")["code_diffuser"]
        == paths["code_diffuser"]
    )
    with pytest.raises(FileNotFoundError) as err:
        resolve_vspbfr_files(locator, style_codec="missing.pt")
    text = str(err.value)
    assert "missing.pt" in text and str(tmp_path / "priorface" / "vspbfr") in text
    assert "e4e style encoder" in text and "Wanglong2/VSPBFR" in text


@pytest.mark.skipif(not (WHOLE / "gfpgan_Blake_Lively.jpg").is_file(), reason="shared photos not present")
def test_restore_photo_pastes_every_face(models):
    from priorface.inference.face_pipeline import crop_faces, paste_back
    from priorface.inference.images import load_image_file

    photo = load_image_file(WHOLE / "gfpgan_Blake_Lively.jpg")[None]
    out, data, report = pipe.restore_photo(models, photo, seed=1, upscale=1.0)
    assert out.shape == photo.shape and len(report) == len(data.faces) == 2
    assert all("restored at 32 px, seed 1" in line for line in report)
    changed = (out - photo).abs().amax(1)[0] > 0.02
    for af in data.faces:
        x1, y1, x2, y2 = (int(v) for v in af.face.box)
        assert changed[y1:y2, x1:x2].float().mean() > 0.5
    assert changed.float().mean() < 0.5  # the background stays
    # strength 0 pastes the unrestored crops (blurred by their 32-px round trip, nothing else)
    kept, _, _ = pipe.restore_photo(models, photo, seed=1, strength=0.0)
    crops, data = crop_faces(photo, "dlib", None, "ffhq", 32)
    torch.testing.assert_close(kept, paste_back(photo, crops, data), rtol=0, atol=1e-6)
