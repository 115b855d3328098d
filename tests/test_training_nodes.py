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
    from priorface.nodes import training_nodes, xpsr_nodes

    tiny_sd.save_tiny_diffusers_folder(comfy_env.models_dir / "diffusers" / "tiny-sd15", "sd15")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = training_nodes.XPSRTrainNode().run(
            base_model="diffusers/tiny-sd15",
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
