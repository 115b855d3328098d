"""Training nodes of VSPBFR: stage 1 (code diffuser) and stage 2 (restoration network)."""

from __future__ import annotations

from pathlib import Path

from . import comfy_bridge
from .training_nodes import (
    TrainingNodeBase,
    _existing_folder,
    _file_input,
    _float_input,
    _folder_input,
    _optional_file,
    _optional_folder,
    job_defaults,
    job_task_settings,
    shipped_job,
)

_VSPBFR_STAGE1 = "vspbfr/stage1"
_VSPBFR_STAGE2 = "vspbfr/stage2"
ARCFACE_FILE = "Arcface.pth"


def _vspbfr_file_input(slot: str) -> tuple:
    from ..inference.vspbfr_loading import DOWNLOAD_FROM, FILES, file_choices

    choices = file_choices(comfy_bridge.LOCATOR, slot)
    official, what = FILES[slot]
    default = official if official in choices else choices[0]
    tip = f"models/priorface/vspbfr: {what}; officially {official} from {DOWNLOAD_FROM}."
    return (choices, {"default": default, "tooltip": tip})


def _find_or_expected(keys: tuple[str, ...], name: str) -> str | None:
    """Path of ``name`` in the first folder of ``keys`` that has it, else where it is expected to be.

    Handing the expected path to the task (rather than nothing) makes its refusal name the folder.
    """
    from ..inference.model_files import ModelFileNotFoundError

    for key in keys:
        try:
            return str(comfy_bridge.LOCATOR.resolve(key, name))
        except ModelFileNotFoundError:
            continue
    dirs = comfy_bridge.LOCATOR.search_dirs(keys[0])
    return str(dirs[0] / name) if dirs else None


def loss_weight_files() -> dict[str, str | None]:
    """LPIPS files from priorface_metrics and Arcface.pth from priorface_vspbfr (or priorface_metrics)."""
    from ..inference.metrics.lpips import BACKBONE_FILE, LINEAR_FILE, METRICS_KIND

    return {
        "lpips_linear": _find_or_expected((METRICS_KIND,), LINEAR_FILE),
        "lpips_backbone": _find_or_expected((METRICS_KIND,), BACKBONE_FILE),
        "arcface": _find_or_expected(("priorface_vspbfr", METRICS_KIND), ARCFACE_FILE),
    }


class _VSPBFRTrainBase(TrainingNodeBase):
    """Inputs and task settings both VSPBFR stages share."""

    MODEL_KEY = "priorface_vspbfr"
    # Tests only: let the tasks use random LPIPS/identity networks when the weight files are missing
    # (the tasks' allow_random_* opt-outs). Never a widget: real training must not use random nets.
    ALLOW_RANDOM_LOSS_NETS = False

    @classmethod
    def shared_inputs(cls) -> dict:
        """Face folders, alignment and loss weights (defaults from the job file)."""
        job = shipped_job(cls.JOB)["task_config"]
        return {
            "train_folder": _folder_input("Folder of HQ faces, FFHQ-aligned (or give landmarks_json)."),
            "val_folder": _folder_input("Optional held-out faces for sample grids and PSNR/SSIM."),
            "landmarks_json": _file_input(
                "Optional JSON {image name: 5 landmarks} (scripts/face_landmarks.py): faces are re-aligned to "
                "FFHQ framing with them. Empty: the files are FFHQ-aligned already."
            ),
            "size": (
                "INT",
                {
                    "default": int(job["size"]),
                    "min": 32,
                    "max": 1024,
                    "step": 32,
                    "tooltip": "Face side the stage trains at (official: 256 for stage 1, 512 for stage 2).",
                },
            ),
            "lpips_weight": _float_input(
                job["lpips_weight"],
                "LPIPS term weight; needs vgg.pth + vgg16-397923af.pth in models/priorface/metrics (0: off).",
            ),
            "id_weight": _float_input(
                job["id_weight"],
                "Identity (ArcFace) term weight; needs Arcface.pth in models/priorface/vspbfr.",
            ),
        }

    def shared_config(
        self, style_codec, train_folder, val_folder, landmarks_json, size, lpips_weight, id_weight
    ):
        """The VSPBFRTaskConfig fields both stages fill the same way."""
        from ..inference.vspbfr_loading import resolve_vspbfr_files

        codec = resolve_vspbfr_files(comfy_bridge.LOCATOR, style_codec=style_codec)["style_codec"]
        landmarks = _optional_file(landmarks_json, "landmarks_json")
        return {
            **loss_weight_files(),
            "style_codec": str(codec),
            "train_dirs": [str(_existing_folder(train_folder, "train_folder"))],
            "val_dirs": _optional_folder(val_folder, "val_folder"),
            "align": "ffhq" if landmarks else "none",
            "landmarks_json": landmarks,
            "size": size,
            "lpips_weight": lpips_weight,
            "id_weight": id_weight,
            "allow_random_lpips": self.ALLOW_RANDOM_LOSS_NETS,
            "allow_random_identity_net": self.ALLOW_RANDOM_LOSS_NETS,
        }


class VSPBFRCodeDiffuserTrainNode(_VSPBFRTrainBase):
    """VSPBFR stage 1: the W+ code diffuser on a frozen e4e encoder and StyleGAN2 decoder."""

    NODE_ID = "PriorFaceTrainVSPBFRCodeDiffuser"
    DISPLAY_NAME = "PriorFace Train VSPBFR Stage 1 (Code Diffuser)"
    DESCRIPTION = (
        "VSPBFR stage 1: trains the code diffuser that turns the e4e code of a degraded face into the W+ code of "
        "the clean one (L1 on codes + LPIPS + identity on the StyleGAN2 decodings), with the frozen style codec "
        "and blind degradations on the fly; settings of configs/vspbfr/stage1.json. Published to "
        "models/priorface/vspbfr, where the VSPBFR Loader and the stage-2 node list it. Needs a GPU in practice."
    )
    TASK = "vspbfr_code_diffuser"
    JOB = _VSPBFR_STAGE1
    DEFAULTS = job_defaults(_VSPBFR_STAGE1)
    JOB_TASK_KEYS = ("diffuser", "latent_weight")

    @classmethod
    def task_inputs(cls) -> dict:
        return {"style_codec": _vspbfr_file_input("style_codec"), **cls.shared_inputs()}

    def build_task(self, style_codec, **shared):
        from ..training.vspbfr_tasks import CodeDiffuserTask, CodeDiffuserTaskConfig

        fields = self.shared_config(style_codec, **shared)
        self._sources = [Path(fields["style_codec"])]
        return CodeDiffuserTask(
            CodeDiffuserTaskConfig(**job_task_settings(self.JOB, self.JOB_TASK_KEYS), **fields)
        )


def _codec_widths(decoder_config) -> dict:
    """Widths of the chosen style codec's StyleGAN2 decoder that a new restoration net must share."""
    keys = ("style_dim", "n_mlp", "channel_multiplier", "channel_divisor", "lr_mlp")
    return {k: getattr(decoder_config, k) for k in keys}


def _restoration_task_class():
    from ..training.vspbfr_tasks import RestorationTask

    class CodecSizedRestorationTask(RestorationTask):
        """RestorationTask whose new networks take their widths from the style codec's decoder.

        The released restoration net and discriminator have exactly the release codec's widths, so
        with the official codec this is the official architecture; any other codec gets a matching one.
        """

        def build_model(self):
            dec = self.codec.decoder.config
            self.cfg.model = {**_codec_widths(dec), **self.cfg.model}
            widths = {"channel_multiplier": dec.channel_multiplier, "channel_divisor": dec.channel_divisor}
            self.cfg.discriminator = {**widths, **self.cfg.discriminator}
            return super().build_model()

    return CodecSizedRestorationTask


class VSPBFRRestorationTrainNode(_VSPBFRTrainBase):
    """VSPBFR stage 2: the restoration network against the StyleGAN2 discriminator."""

    NODE_ID = "PriorFaceTrainVSPBFRRestoration"
    DISPLAY_NAME = "PriorFace Train VSPBFR Stage 2 (Restoration)"
    DESCRIPTION = (
        "VSPBFR stage 2: trains the restoration network on the visual style prompts of the frozen codec and "
        "code diffuser (the released code_diffuser.pt or your stage-1 result): non-saturating GAN + LPIPS + "
        "identity, R1 every 16 steps, EMA; settings of configs/vspbfr/stage2.json. Published to "
        "models/priorface/vspbfr, where the VSPBFR Loader lists it. Needs a GPU in practice."
    )
    TASK = "vspbfr_restoration"
    JOB = _VSPBFR_STAGE2
    DEFAULTS = job_defaults(_VSPBFR_STAGE2)
    JOB_TASK_KEYS = ("lpips_sum", "gan_weight", "mixing", "r1_weight", "r1_every", "d_lr", "d_betas")

    @classmethod
    def task_inputs(cls) -> dict:
        return {
            "style_codec": _vspbfr_file_input("style_codec"),
            "code_diffuser": _vspbfr_file_input("code_diffuser"),
            **cls.shared_inputs(),
        }

    def build_task(self, style_codec, code_diffuser, **shared):
        from ..inference.vspbfr_loading import resolve_vspbfr_files
        from ..training.vspbfr_tasks import RestorationTaskConfig

        fields = self.shared_config(style_codec, **shared)
        diffuser = resolve_vspbfr_files(comfy_bridge.LOCATOR, code_diffuser=code_diffuser)["code_diffuser"]
        self._sources = [Path(fields["style_codec"]), diffuser]
        config = RestorationTaskConfig(
            **job_task_settings(self.JOB, self.JOB_TASK_KEYS), **fields, code_diffuser=str(diffuser)
        )
        return _restoration_task_class()(config)


NODES = [VSPBFRCodeDiffuserTrainNode, VSPBFRRestorationTrainNode]
