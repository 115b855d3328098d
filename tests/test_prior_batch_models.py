"""``priorface priors`` with the real prior models (SAM, Depth-Anything, BLIP-2, LLaVA, CLIP text).

Tiny random-init models, saved to disk by the builders of test_priors_hf / test_priors_sam, stand in
for the real ones. A folder of 3 faces is extracted from the command line; each file must hold
exactly what the ComfyUI nodes produce for the same (degraded) faces, provenance included, so that a
model trained on the cache accepts the nodes' priors at inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("segment_anything")

from test_priors_hf import _save_blip2, _save_clip, _save_depth, _save_llava  # noqa: E402
from test_priors_sam import _tiny_state  # noqa: E402

from priorface.cli import main  # noqa: E402
from priorface.inference.degradations import degrade  # noqa: E402
from priorface.inference.images import load_image_file, resize_bchw, save_image_file  # noqa: E402
from priorface.inference.priors import hf_loading  # noqa: E402
from priorface.inference.priors.batch import INDEX_NAME, extract_priors_for_folder, file_seed  # noqa: E402
from priorface.inference.priors.batch_models import ModelOptions  # noqa: E402
from priorface.inference.priors.bundle_io import concat_bundles, read_prior_file  # noqa: E402
from priorface.inference.priors.captions import CAPTION_EXTRACTOR_ID, NO_LABEL_CAPTION  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 128
ALL = "sam_mask,depth_anything,blip2_caption,llava_description,clip_caption_embedding,clip_description_embedding"
RUN = ["--size", str(SIZE), "--degradation", "bicubic_x8", "--template", "utkface", "--device", "cpu"]
PRIORS = ("mask", "depth", "caption", "description", "caption_embedding", "description_embedding")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A ComfyUI-style models/ folder holding the tiny models."""
    root = tmp_path_factory.mktemp("models")
    _save_blip2(root / "LLM" / "tiny-blip2")
    _save_llava(root / "LLM" / "tiny-llava", next_=False)
    _save_depth(root / "depthanything" / "tiny-depth")
    _save_clip(root / "text_encoders" / "tiny-clip", projection=True)
    (root / "sams").mkdir()
    torch.save(_tiny_state(), root / "sams" / "sam_tiny.pth")
    yield root
    hf_loading.release()


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """3 smooth random 'faces' (dlib finds none: SAM falls back to the template landmarks)."""
    folder = tmp_path_factory.mktemp("faces")
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        noise = torch.rand(1, 3, 8, 8, generator=g)
        save_image_file(resize_bchw(noise, SIZE, SIZE).clamp(0, 1)[0], folder / f"{i}_0_0_face.png")
    return folder


def _args(models: Path, faces: Path, out: Path, *extra: str) -> list[str]:
    return [
        "priors",
        str(faces),
        "--out",
        str(out),
        *RUN,
        "--extractors",
        ALL,
        "--models-dir",
        str(models),
        "--sam",
        "sam_tiny.pth",  # by name, through the model-folder locator
        "--depth-model",
        "tiny-depth",
        "--caption-model",
        "tiny-blip2",
        "--describe-model",
        str(models / "LLM" / "tiny-llava"),  # by path
        "--clip-text",
        "tiny-clip",
        *extra,
    ]


@pytest.fixture(scope="module")
def cache(models, faces, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "priors"
    assert main(_args(models, faces, out)) == 0
    return out


def _node_priors(comfy_env, models: Path, faces: Path):
    """The priors the nodes give the same LQ faces, chained as in workflows/llvfsr_full_priors.json."""
    from priorface.nodes import hf_prior_nodes as hf
    from priorface.nodes import sam_nodes

    paths = sorted(faces.glob("*.png"))
    lq = [
        degrade(
            resize_bchw(load_image_file(p)[None], SIZE, SIZE), "bicubic_x8", file_seed(0, p.name), "input"
        )[0]
        for p in paths
    ]
    images = torch.cat(lq).permute(0, 2, 3, 1).contiguous()
    llm = lambda name: hf.LoadCaptionModelNode().load(str(models / "LLM" / name), "auto")[0]  # noqa: E731
    priors, _ = hf.CaptionNode().caption(llm("tiny-blip2"), images, 30, 1, "", 4)
    priors, _ = hf.DescribeNode().describe(llm("tiny-llava"), images, "llvfsr", "", "auto", 120, 1, 2, priors)
    sam = sam_nodes.SAMLoaderNode().load(str(models / "sams" / "sam_tiny.pth"))[0]
    priors = sam_nodes.SAMFaceMaskNode().segment(
        images, sam, "prompted", "plausible", 16, 0.88, 0.95, "utkface", priors
    )[0]
    depth = hf.LoadDepthModelNode().load(str(models / "depthanything" / "tiny-depth"), "auto")[0]
    priors = hf.DepthNode().estimate(depth, images, 4, priors)[0]
    clip = hf.LoadCLIPTextNode().load(str(models / "text_encoders" / "tiny-clip"), "auto")[0]
    priors = hf.CLIPTextEmbeddingNode().encode(clip, priors, "caption", 8)[0]
    return hf.CLIPTextEmbeddingNode().encode(clip, priors, "description", 8)[0]


def _as_json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def test_cache_holds_what_the_nodes_give_with_their_provenance(comfy_env, models, faces, cache):
    files = sorted(cache.glob("*.safetensors"))
    assert [f.stem for f in files] == [p.stem for p in sorted(faces.glob("*.png"))]
    batch = concat_bundles([read_prior_file(f)[0] for f in files])
    nodes = _node_priors(comfy_env, models, faces)
    assert set(PRIORS) <= set(batch.present())
    ids = {n: batch.sources[n]["extractor"] for n in PRIORS}
    assert ids == {
        "mask": "sam:custom:sam_tiny",
        "depth": "depth_anything:tiny-depth",
        "caption": "blip2:tiny-blip2",
        "description": "llava:tiny-llava",
        "caption_embedding": "clip_text:tiny-clip",
        "description_embedding": "clip_text:tiny-clip",
    }
    for name in PRIORS:  # extractor ids and settings exactly as the nodes record them
        assert _as_json(batch.sources[name]) == _as_json(nodes.sources[name]), name
    assert batch.caption == nodes.caption and batch.description == nodes.description
    assert batch.mask_labels == nodes.mask_labels and batch.mask.shape == (3, 7, SIZE, SIZE)
    assert torch.equal(batch.mask.float(), nodes.mask.float())
    assert torch.allclose(batch.depth, nodes.depth, atol=1e-5) and float(batch.depth.std()) > 0
    for name in ("caption_embedding", "description_embedding"):
        got, want = getattr(batch, name), getattr(nodes, name)
        n = got.tokens.shape[1]
        assert torch.equal(got.attention_mask, want.attention_mask[:, :n])
        assert torch.allclose(got.tokens, want.tokens[:, :n] * want.attention_mask[:, :n, None], atol=1e-5)
        assert torch.allclose(got.pooled, want.pooled, atol=1e-5)
    index = json.loads((cache / INDEX_NAME).read_text())
    assert index["extractors"] == ALL.split(",") and index["run"]["degradation"] == "bicubic_x8"


def test_rerun_skips_and_changed_settings_redo(models, faces, cache, capsys):
    stamps = {f: f.stat().st_mtime_ns for f in cache.glob("*.safetensors")}
    assert main(_args(models, faces, cache)) == 0
    assert "extracted 0, already done 3" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in cache.glob("*.safetensors")} == stamps
    # Another caption length is another prior: every file is redone, not silently kept.
    assert main(_args(models, faces, cache, "--caption-max-tokens", "5")) == 0
    assert "extracted 3, already done 0" in capsys.readouterr().out
    assert read_prior_file(sorted(cache.glob("*.safetensors"))[0])[0].sources["caption"]["settings"] == {
        "max_new_tokens": 5,
        "num_beams": 1,
        "prompt": "",
    }


def test_bad_model_options_fail_early_naming_the_problem(models, faces, tmp_path, capsys):
    out = tmp_path / "priors"
    missing = tmp_path / "no-such-depth-model"
    args = _args(models, faces, out)
    args[args.index("--depth-model") + 1] = str(missing)
    assert main(args) == 2
    assert str(missing) in capsys.readouterr().err and not out.exists()
    base = ["priors", str(faces), "--out", str(out), *RUN, "--models-dir", str(models)]
    assert main([*base, "--extractors", "mask,depth_anything"]) == 2
    assert "'depth_anything' needs --depth-model" in capsys.readouterr().err
    assert main([*base, "--extractors", "mask", "--depth-model", "tiny-depth"]) == 2
    assert "--depth-model was given but none of ['depth_anything']" in capsys.readouterr().err
    assert main([*base, "--extractors", "mask,sam_mask", "--sam", "sam_tiny.pth"]) == 2
    assert "'mask' and 'sam_mask' both set the 'mask' prior" in capsys.readouterr().err
    assert main([*base, "--extractors", "blip2_caption", "--caption-model", "tiny-llava"]) == 2
    assert "needs a blip2 model" in capsys.readouterr().err
    assert main([*base, "--extractors", "blip2_caption", "--caption-model", "nonexistent-blip2"]) == 2
    err = capsys.readouterr().err
    assert "'nonexistent-blip2' not found for 'LLM'" in err and str(models / "LLM") in err


def test_clip_embeds_template_captions_when_no_captioner_runs(models, faces, tmp_path):
    """A reader of priors gets the embedded template caption when nobody extracts one."""
    opts = ModelOptions(clip_text=models / "text_encoders" / "tiny-clip", device="cpu")
    extract_priors_for_folder(
        faces, tmp_path, ["clip_caption_embedding"], size=64, template="utkface", models=opts
    )
    bundle = read_prior_file(sorted(tmp_path.glob("*.safetensors"))[0])[0]
    assert bundle.caption == [NO_LABEL_CAPTION]
    assert bundle.sources["caption"]["extractor"] == CAPTION_EXTRACTOR_ID
    record = bundle.sources["caption_embedding"]
    assert record["extractor"] == "clip_text:tiny-clip"
    assert record["settings"]["source_extractor"] == CAPTION_EXTRACTOR_ID
    assert bundle.caption_embedding.tokens.shape[-1] == 16  # the tiny CLIP's width, not MiniLM's 384


@pytest.mark.slow
def test_one_training_step_on_the_cache_accepts_the_node_priors(comfy_env, models, faces, cache, tmp_path):
    from priorface.inference.llvfsr_restore import load_llvfsr_model, upscale_faces
    from priorface.training.llvfsr_task import LLVFSRTask, LLVFSRTaskConfig
    from priorface.training.loop import TrainConfig, train

    assert main(_args(models, faces, cache)) == 0  # back to the node settings after the rerun test
    tiny = {"width": 8, "depth": 1, "heads": 2, "window": 4, "upsampler_width": 8}
    cfg = LLVFSRTaskConfig(
        train_dirs=[str(faces)],
        size=SIZE,
        priors=["mask", "depth", "caption", "description"],
        model=tiny,
        priors_dir=str(cache),
    )
    train(
        LLVFSRTask(cfg), TrainConfig(out_dir=str(tmp_path), steps=1, batch_size=2, ckpt_every=1, device="cpu")
    )
    llvfsr = load_llvfsr_model(tmp_path / "latest.safetensors")
    assert {n: r["extractor"] for n, r in llvfsr.trained_with.items()} == {
        "mask": "sam:custom:sam_tiny",
        "depth": "depth_anything:tiny-depth",
        "caption_embedding": "clip_text:tiny-clip",
        "description_embedding": "clip_text:tiny-clip",
    }
    nodes = _node_priors(comfy_env, models, faces)
    lq = torch.rand(3, 3, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    out = upscale_faces(llvfsr, lq, nodes)  # the nodes' priors are accepted, none refused
    assert out.shape == (3, 3, SIZE, SIZE) and torch.isfinite(out).all()


def test_the_torch_free_cli_tables_match_the_extractors():
    from priorface.inference.priors import batch_cli, hf_describe
    from priorface.inference.priors.batch_models import MODEL_EXTRACTORS

    assert batch_cli.MODEL_EXTRACTOR_NAMES == tuple(MODEL_EXTRACTORS)
    assert batch_cli.MODEL_OPTIONS == {spec.option: spec.kind for spec in MODEL_EXTRACTORS.values()}
    assert batch_cli.DESCRIBE_PRESETS == tuple(hf_describe.PRESETS)
