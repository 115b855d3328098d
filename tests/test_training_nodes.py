"""Training nodes: run the shared trainer inside (fake) ComfyUI, publish weights, resume after Cancel."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from priorface.inference import progress

SHARED_FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
pytestmark = pytest.mark.skipif(not SHARED_FACES.is_dir(), reason="shared face data not present")


@pytest.fixture
def faces(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for src in sorted((SHARED_FACES / "train" / "utkface").iterdir())[:6]:
        shutil.copy(src, folder / src.name)
    return folder


def _args(faces, **kw):
    args = dict(
        train_folder=str(faces),
        val_folder="",
        size=64,
        degradation="bicubic_x8",
        variant="full",
        preset="small",
        prior_dropout=0.3,
        save_name="node-run",
        steps=2,
        batch_size=2,
        learning_rate=2e-4,
        seed=0,
        resume=True,
        max_minutes=0.0,
    )
    args.update(kw)
    return args


def test_llvfsr_training_node_publishes_weights_the_loader_lists(comfy_env, check_outputs, faces):
    from priorface.nodes import llvfsr_nodes, training_nodes

    node = training_nodes.LLVFSRTrainNode()
    out = node.run(**_args(faces))
    check_outputs(training_nodes.LLVFSRTrainNode, out)
    published = Path(out[0])
    assert published == comfy_env.models_dir / "priorface" / "llvfsr" / "node-run.safetensors"
    assert "node-run.safetensors" in llvfsr_nodes.weight_choices()
    (model,) = llvfsr_nodes.LLVFSRLoaderNode().load("node-run.safetensors")
    restored = llvfsr_nodes.LLVFSRUpscaleNode().upscale(model, torch.rand(1, 8, 8, 3))[0]
    assert restored.shape == (1, 64, 64, 3)
    assert out[1].shape[-1] == 3 and out[1].shape[2] > 64, "curves image missing"


def test_cancelled_training_resumes_when_queued_again(comfy_env, faces, monkeypatch):
    from priorface.nodes import training_nodes
    from priorface.training import llvfsr_task

    real_loss = llvfsr_task.LLVFSRTask.training_loss

    def cancel_at_step_2(self, model, batch, step):
        if step == 2:
            comfy_env.model_management.interrupt_processing = True  # the Cancel button
            progress.check_interrupted()
        return real_loss(self, model, batch, step)

    monkeypatch.setattr(llvfsr_task.LLVFSRTask, "training_loss", cancel_at_step_2)
    node = training_nodes.LLVFSRTrainNode()
    with pytest.raises(comfy_env.model_management.InterruptProcessingException):
        node.run(**_args(faces, steps=3, save_name="cancelled"))
    comfy_env.model_management.interrupt_processing = False
    run_dir = comfy_env.models_dir.parent / "output" / "priorface_training" / "llvfsr" / "cancelled"
    assert (run_dir / "train_state.safetensors").is_file(), "the cancelled run kept no state"
    monkeypatch.setattr(llvfsr_task.LLVFSRTask, "training_loss", real_loss)
    out = node.run(**_args(faces, steps=3, save_name="cancelled"))
    rows = (run_dir / "log.csv").read_text().splitlines()
    assert Path(out[0]).is_file() and rows[0].startswith("step")


def test_bad_run_name_and_missing_folder_are_clear(comfy_env, faces):
    from priorface.nodes import training_nodes

    node = training_nodes.LLVFSRTrainNode()
    with pytest.raises(ValueError, match="save name"):
        node.run(**_args(faces, save_name="../escape"))
    with pytest.raises(FileNotFoundError, match="train_folder"):
        node.run(**_args(faces, train_folder=str(faces / "nope")))


def test_xpsr_training_node_trains_on_a_tiny_sd_folder_and_publishes_a_loadable_checkpoint(comfy_env, faces):
    pytest.importorskip("diffusers")
    import tiny_sd

    from priorface.models.xpsr_checkpoints import load_xpsr_checkpoint
    from priorface.nodes import train_sd_nodes, xpsr_nodes

    tiny_sd.save_tiny_diffusers_folder(comfy_env.models_dir / "diffusers" / "tiny-sd15", "sd15")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train_sd_nodes.XPSRTrainNode().run(
            model_name="diffusers/tiny-sd15",
            train_folder=str(faces),
            val_folder="",
            size=64,
            high_prompts_folder="",
            low_prompts_folder="",
            high_prompt="a photo of a face",
            low_prompt="blurry",
            sfa_mode="parallel",
            dfc_mode="paper",
            grad_accum=1,
            gradient_checkpointing=False,
            save_name="xpsr-node",
            steps=1,
            batch_size=2,
            learning_rate=5e-5,
            seed=0,
            resume=True,
            max_minutes=0.0,
        )
    finally:
        torch.set_num_threads(threads)
    published = Path(out[0])
    assert published == comfy_env.models_dir / "priorface" / "xpsr" / "xpsr-node"
    unet, controlnet = load_xpsr_checkpoint(published)
    assert unet is not None and controlnet is not None
    assert "xpsr-node" in xpsr_nodes.XPSRLoaderNode.INPUT_TYPES()["required"]["weights"][0]


# ---------------------------------------------------------------- AuthFace and VSPBFR training nodes


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loop_widgets(save_name, steps=1, batch_size=2, learning_rate=1e-4):
    return dict(
        save_name=save_name,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=0,
        resume=True,
        max_minutes=0.0,
    )


def test_loop_settings_come_from_the_shipped_job_files(comfy_env, tmp_path):
    import json

    from priorface.nodes import train_sd_nodes as sd
    from priorface.nodes import train_vspbfr_nodes as vs

    repo = Path(__file__).resolve().parents[1]
    for cls, job in [
        (sd.AuthFaceStage1TrainNode, "authface/stage1"),
        (sd.AuthFaceStage2TrainNode, "authface/stage2"),
        (vs.VSPBFRCodeDiffuserTrainNode, "vspbfr/stage1"),
        (vs.VSPBFRRestorationTrainNode, "vspbfr/stage2"),
    ]:
        train_section = json.loads((repo / "configs" / f"{job}.json").read_text())["train"]
        cfg = cls().train_config(tmp_path, steps=3, batch_size=2, lr=1e-3)
        for key in ("optimizer", "eps", "weight_decay", "precision", "ema_decay", "val_every", "ckpt_every"):
            if key in train_section:
                assert getattr(cfg, key) == train_section[key], (job, key)
        assert list(cfg.betas) == train_section["betas"] and cfg.grad_accum == train_section.get(
            "grad_accum", 1
        )
        assert (cfg.steps, cfg.lr) == (3, 1e-3)  # widgets win over the file
        spec = cls.INPUT_TYPES()["required"]
        assert spec["steps"][1]["default"] == train_section["steps"]
        assert spec["learning_rate"][1]["default"] == train_section["lr"]
    assert sd.AuthFaceStage1TrainNode.INPUT_TYPES()["required"]["learning_rate"][1]["default"] == 5e-7


@pytest.mark.slow
def test_authface_nodes_train_both_stages_and_publish_what_the_loaders_read(
    comfy_env, check_outputs, faces, monkeypatch, one_torch_thread
):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import tiny_sd

    from priorface.nodes import authface_nodes, comfy_bridge
    from priorface.nodes import train_sd_nodes as sd

    folder = tiny_sd.save_tiny_diffusers_folder(comfy_env.models_dir / "diffusers" / "tiny-sdxl", "sdxl")
    # A single file carries no tokenizer: ComfyUI's own stands in (here the tiny one).
    monkeypatch.setattr(comfy_bridge, "comfy_tokenizer_dirs", lambda: folder / "tokenizer")
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out1 = sd.AuthFaceStage1TrainNode().run(
            model_name="tiny-sdxl",
            train_folder=str(faces),
            val_folder="",
            caption_source="template",  # UTKFace file names carry age/gender/race labels
            captions_file="",
            caption_fallback="",
            resolution=64,
            validation_prompts="a photo of a face",
            grad_accum=1,
            gradient_checkpointing=False,
            **_loop_widgets("af-stage1", learning_rate=5e-7),
        )
    check_outputs(sd.AuthFaceStage1TrainNode, out1)
    stage1 = comfy_env.models_dir / "checkpoints" / "af-stage1.safetensors"
    assert Path(out1[0]) == stage1 and stage1.is_file()
    assert "af-stage1.safetensors" in authface_nodes.sdxl_choices()
    assert "af-stage1.safetensors" in sd.AuthFaceStage2TrainNode.INPUT_TYPES()["required"]["model_name"][0]
    assert out1[2].shape[1:] != (64, 64, 3), "no validation samples (one prompt x the job's seeds)"

    out2 = sd.AuthFaceStage2TrainNode().run(
        model_name="af-stage1.safetensors",
        train_folder=str(faces),
        val_folder=str(faces),
        landmarks_json="",
        landmark_template="ffhq",
        degradation="blind",
        resolution=64,
        lambda_d=1.0,
        lambda_s=200.0,
        weight_mode="time_aware",
        m=-0.5,
        s=1.0,
        regions="paired",
        grad_accum=1,
        gradient_checkpointing=False,
        **_loop_widgets("af-stage2", learning_rate=1e-5),
    )
    check_outputs(sd.AuthFaceStage2TrainNode, out2)
    controlnet = comfy_env.models_dir / "controlnet" / "af-stage2.safetensors"
    run_dir = comfy_env.models_dir.parent / "output" / "priorface_training" / "authface_stage2" / "af-stage2"
    assert Path(out2[0]) == controlnet
    assert controlnet.read_bytes() == (run_dir / "latest.safetensors").read_bytes()
    assert not (controlnet.parent / "af-stage2-diffusers").exists(), "only the file the loaders read"
    header = (run_dir / "log.csv").read_text().splitlines()[0]
    assert "loss_facial" in header and (run_dir / "time_weight.png").is_file()
    spec = authface_nodes.AuthFaceLoaderNode.INPUT_TYPES()["required"]
    assert "af-stage2.safetensors" in spec["weights"][0]
    (model,) = authface_nodes.AuthFaceLoaderNode().load(
        "af-stage1.safetensors", "af-stage2.safetensors", "auto"
    )
    assert model.controlnet is not None and model.unet is not None
    # Publishing over the model being trained from is refused before any training.
    with pytest.raises(ValueError, match="would overwrite"):
        sd.AuthFaceStage1TrainNode().run(
            model_name="af-stage1.safetensors",
            train_folder=str(faces),
            val_folder="",
            caption_source="template",
            captions_file="",
            caption_fallback="",
            resolution=64,
            validation_prompts="",
            grad_accum=1,
            gradient_checkpointing=False,
            **_loop_widgets("af-stage1"),
        )


@pytest.fixture
def vspbfr_files(comfy_env):
    """The three official files of the tiny VSPBFR and a tiny Arcface.pth in models/priorface/vspbfr."""
    import tiny_vspbfr

    from priorface.models.arcface_resnet import ArcFaceConfig, ArcFaceResNet

    folder = comfy_env.models_dir / "priorface" / "vspbfr"
    tiny_vspbfr.write_official_files(tiny_vspbfr.tiny_models(), folder)
    torch.manual_seed(0)
    arcface = ArcFaceResNet(ArcFaceConfig(layers=(1, 1, 1, 1), base_width=8, embedding_dim=16))
    torch.save(arcface.state_dict(), folder / "Arcface.pth")
    return folder


def _vspbfr_args(faces, save_name, **kw):
    args = dict(
        style_codec="style_encoder_decoder.pt",
        train_folder=str(faces),
        val_folder=str(faces),
        landmarks_json="",
        size=32,
        lpips_weight=0.1,
        id_weight=0.1,
        **_loop_widgets(save_name, steps=2, learning_rate=1.6e-3),
    )
    args.update(kw)
    return args


def test_vspbfr_nodes_train_both_stages_and_the_loader_loads_the_results(
    comfy_env, check_outputs, faces, vspbfr_files, monkeypatch, one_torch_thread
):
    from priorface.nodes import train_vspbfr_nodes as vs
    from priorface.nodes import vspbfr_nodes

    # No LPIPS files here: the test hook allows the tasks' random VGG; Arcface.pth is the tiny real file.
    monkeypatch.setattr(vs._VSPBFRTrainBase, "ALLOW_RANDOM_LOSS_NETS", True)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out1 = vs.VSPBFRCodeDiffuserTrainNode().run(**_vspbfr_args(faces, "cd-node"))
    check_outputs(vs.VSPBFRCodeDiffuserTrainNode, out1)
    assert Path(out1[0]) == vspbfr_files / "cd-node.safetensors"
    runs = comfy_env.models_dir.parent / "output" / "priorface_training"
    header = (runs / "vspbfr_code_diffuser" / "cd-node" / "log.csv").read_text().splitlines()[0]
    assert {"latent_l1", "lpips", "id"} <= set(header.split(","))
    assert out1[2].shape[2] > 4 * 32, "sample grid: LQ | e4e(LQ) | diffused | HQ"
    spec = vs.VSPBFRRestorationTrainNode.INPUT_TYPES()["required"]
    assert "cd-node.safetensors" in spec["code_diffuser"][0]

    out2 = vs.VSPBFRRestorationTrainNode().run(
        code_diffuser="cd-node.safetensors", **_vspbfr_args(faces, "rn-node", lpips_weight=0.5)
    )
    check_outputs(vs.VSPBFRRestorationTrainNode, out2)
    assert Path(out2[0]) == vspbfr_files / "rn-node.safetensors"
    header = (runs / "vspbfr_restoration" / "rn-node" / "log.csv").read_text().splitlines()[0]
    assert {"g_adv", "lpips", "id", "d", "r1"} <= set(header.split(","))

    assert (
        "rn-node.safetensors" in vspbfr_nodes.VSPBFRLoaderNode.INPUT_TYPES()["required"]["restoration_net"][0]
    )
    (bundle,) = vspbfr_nodes.VSPBFRLoaderNode().load(
        "style_encoder_decoder.pt", "cd-node.safetensors", "rn-node.safetensors"
    )
    (restored,) = vspbfr_nodes.VSPBFRRestoreFacesNode().restore(bundle, torch.rand(1, 40, 40, 3), 0, 4)
    assert restored.shape == (1, 32, 32, 3) and torch.isfinite(restored).all()


def test_vspbfr_nodes_surface_the_tasks_refusal_without_loss_weights(comfy_env, faces, vspbfr_files):
    from priorface.nodes import train_vspbfr_nodes as vs

    (vspbfr_files / "Arcface.pth").unlink()
    metrics = comfy_env.models_dir / "priorface" / "metrics"
    with pytest.raises(FileNotFoundError) as err:
        vs.VSPBFRCodeDiffuserTrainNode().run(**_vspbfr_args(faces, "no-lpips"))
    msg = str(err.value)
    assert str(metrics / "vgg.pth") in msg and "vgg16-397923af.pth" in msg and "lpips_weight to 0" in msg
    with pytest.raises(FileNotFoundError) as err:
        vs.VSPBFRRestorationTrainNode().run(
            code_diffuser="code_diffuser.pt", **_vspbfr_args(faces, "no-id", lpips_weight=0.0)
        )
    msg = str(err.value)
    assert str(vspbfr_files / "Arcface.pth") in msg and "resnet101" in msg and "id_weight to 0" in msg
    run_dir = comfy_env.models_dir.parent / "output" / "priorface_training" / "vspbfr_restoration" / "no-id"
    assert not (run_dir / "train_state.safetensors").exists()
