"""Transformers prior extractors on tiny random-init models saved as real model folders.

Each model (BLIP-2, LLaVA 1.5, LLaVA-NeXT, Depth-Anything, CLIP text) is built from a tiny config
with a tiny offline tokenizer, written with ``save_pretrained`` and loaded back through
``load_hf_model``, the loader the nodes use. Outputs are compared with direct transformers calls.
"""

from __future__ import annotations

import json
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from priorface.inference.priors import hf_loading  # noqa: E402
from priorface.inference.priors.bundle import PriorBundle  # noqa: E402
from priorface.inference.priors.hf_caption import GenerationOptions, add_captions, caption_images  # noqa: E402
from priorface.inference.priors.hf_clip_text import add_text_embedding, encode_texts  # noqa: E402
from priorface.inference.priors.hf_depth import add_depth, estimate_depth, normalise_per_face  # noqa: E402
from priorface.inference.priors.hf_describe import (  # noqa: E402
    DEFAULT_TARGETS,
    INSTRUCTIONS,
    add_descriptions,
    build_prompt,
    describe_images,
    instruction_for,
)

FAKE_COMFY = Path(__file__).parent / "fake_comfy"
WORDS = "a photo of face man woman smiling with glasses blurry sharp bright dark hair eyes nose mouth young old".split()
CHAT_TEMPLATE = (
    "{% for message in messages %}USER: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TINY_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


def _word_tokenizer(extra=()):
    """A word-level fast tokenizer (no files needed) with <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *extra]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _llama(vocab):
    return dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _save_blip2(folder: Path) -> None:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    processor = Blip2Processor(
        BlipImageProcessor(size={"height": 28, "width": 28}), _word_tokenizer(), num_query_tokens=4
    )
    vocab = len(processor.tokenizer)  # the processor added <image>
    text = dict(
        model_type="opt",
        vocab_size=vocab,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    qformer = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        encoder_hidden_size=16,
    )
    config = Blip2Config(
        vision_config={**TINY_VISION, "num_hidden_layers": 1},
        qformer_config={**qformer, "vocab_size": vocab},
        text_config=text,
        num_query_tokens=4,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(4)  # a seed whose random model writes words, not only special tokens
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_llava(folder: Path, next_: bool) -> None:
    import transformers as tf

    tok = _word_tokenizer(extra=("<image>",))
    vision = {**TINY_VISION, "model_type": "clip_vision_model", "projection_dim": 16}
    common = dict(
        vision_config=vision,
        text_config=_llama(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    proc_args = dict(
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    size = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    torch.manual_seed(1)
    if next_:
        pins = [[28, 28], [28, 56], [56, 28]]
        model = tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(**common, image_grid_pinpoints=pins))
        processor = tf.LlavaNextProcessor(
            tf.LlavaNextImageProcessor(**size, image_grid_pinpoints=pins), **proc_args
        )
    else:
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(**common))
        processor = tf.LlavaProcessor(tf.CLIPImageProcessor(**size), **proc_args)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_depth(folder: Path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, DPTImageProcessor

    backbone = dict(
        model_type="dinov2",
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=28,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8,
        head_hidden_size=4,
    )
    torch.manual_seed(2)
    model = DepthAnythingForDepthEstimation(config)
    with torch.no_grad():  # He-scaled weights: the default 0.02 init predicts an all-zero map after ReLU
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5)
        model.head.conv3.bias.fill_(0.1)
    model.save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False
    ).save_pretrained(folder)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    vocab["th"], vocab["the</w>"] = len(vocab), len(vocab) + 1
    eot = "<|endoftext|>"
    return CLIPTokenizer(
        vocab=vocab,
        merges=[("t", "h"), ("th", "e</w>")],
        unk_token=eot,
        bos_token="<|startoftext|>",
        eos_token=eot,
        pad_token=eot,
    )


def _save_clip(folder: Path, projection: bool, tokenizer_folder: Path | None = None) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = _clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(3)
    (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).save_pretrained(folder)
    tok.save_pretrained(tokenizer_folder or folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    _save_blip2(root / "tiny-blip2")
    _save_llava(root / "tiny-llava", next_=False)
    _save_llava(root / "tiny-llava-next", next_=True)
    _save_depth(root / "tiny-depth")
    _save_clip(root / "tiny-clip-proj", projection=True)
    # Diffusers pipeline layout, as an SD1.5 folder has it: text_encoder/ and tokenizer/.
    _save_clip(root / "sd" / "text_encoder", projection=False, tokenizer_folder=root / "sd" / "tokenizer")
    (root / "sd" / "model_index.json").write_text("{}")
    yield root
    hf_loading.release()


def _faces(n=3, h=40, w=36):
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, 3, h, w, generator=g)


def _load(path, **kw):
    return hf_loading.load_hf_model(path, keep_loaded=False, **kw)


# --- loading, cache and errors -----------------------------------------------------------------


def test_folders_load_as_their_family_in_fp32_on_cpu(folders):
    expected = {
        "tiny-blip2": "blip2",
        "tiny-llava": "llava",
        "tiny-llava-next": "llava_next",
        "tiny-depth": "depth_anything",
        "tiny-clip-proj": "clip_text",
        "sd": "clip_text",
    }
    for name, family in expected.items():
        hf = _load(folders / name, precision="fp16")  # half precision is refused on CPU
        assert hf.family == family and hf.dtype == torch.float32 and hf.device.type == "cpu"
        assert hf.extractor_id == f"{family}:{name}"
        assert next(hf.model.parameters()).dtype == torch.float32
    assert type(_load(folders / "sd").model).__name__ == "CLIPTextModel"
    assert type(_load(folders / "tiny-clip-proj").model).__name__ == "CLIPTextModelWithProjection"


def test_cache_keeps_and_releases_models(folders):
    hf_loading.release()
    a = hf_loading.load_hf_model(folders / "tiny-depth")
    assert hf_loading.load_hf_model(folders / "tiny-depth") is a
    assert hf_loading.cached_folders() == [str((folders / "tiny-depth").resolve())]
    assert _load(folders / "tiny-depth") is a and hf_loading.cached_folders() == []  # handed over, not kept
    assert _load(folders / "tiny-depth") is not a  # keep_loaded=False never fills the cache
    b = hf_loading.load_hf_model(folders / "tiny-depth")
    assert hf_loading.release(folders / "tiny-depth") == 1 and hf_loading.cached_folders() == []
    assert hf_loading.load_hf_model(folders / "tiny-depth") is not b
    hf_loading.release()


def test_wrong_family_is_refused_with_the_folder_named(folders):
    with pytest.raises(ValueError, match="depth_anything.*expected blip2 or llava"):
        _load(folders / "tiny-depth", families=("blip2", "llava"))
    hf = _load(folders / "tiny-depth")
    with pytest.raises(ValueError, match="captioning needs a blip2 model.*tiny-depth"):
        caption_images(hf, _faces(1))


def test_broken_folders_give_clear_errors(folders, tmp_path):
    def broken(name, change):
        target = tmp_path / name
        shutil.copytree(folders / "tiny-clip-proj", target)
        change(target)
        return target

    no_weights = broken("no-weights", lambda d: (d / "model.safetensors").unlink())
    with pytest.raises(FileNotFoundError, match=r"no-weights has no model weights.*model\.safetensors"):
        _load(no_weights)
    no_config = broken("no-config", lambda d: (d / "config.json").unlink())
    with pytest.raises(FileNotFoundError, match="no-config has no config.json.*Expected files"):
        _load(no_config)
    bad_json = broken("bad-json", lambda d: (d / "config.json").write_text("{not json"))
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        _load(bad_json)
    truncated = broken("truncated", lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00"))
    with pytest.raises(ValueError, match="could not load the clip_text model in .*truncated"):
        _load(truncated)
    no_tok = broken("no-tokenizer", lambda d: (d / "tokenizer.json").unlink())
    with pytest.raises(FileNotFoundError, match="no-tokenizer lacks tokenizer.json"):
        _load(no_tok)
    (tmp_path / "clip_l.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="a file, not a folder"):
        _load(tmp_path / "clip_l.safetensors")
    other = broken("other", lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert"})))
    with pytest.raises(ValueError, match="model_type 'bert'; supported"):
        _load(other)


# --- BLIP-2 ----------------------------------------------------------------------------------


def _reference_generate(hf, inputs, prompt_len, max_new_tokens, num_beams=1):
    out = hf.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    return [t.strip() for t in hf.processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)]


def test_blip2_captions_match_direct_generation(folders):
    hf = _load(folders / "tiny-blip2")
    faces = _faces(3)
    options = GenerationOptions(max_new_tokens=6)
    texts = caption_images(hf, faces, options, batch_size=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts) and any(texts)
    arrays = hf_loading.to_uint8_list(faces)
    with torch.inference_mode():
        ref = _reference_generate(hf, hf.processor(images=arrays, return_tensors="pt"), 4 + 1, 6)
    assert texts == ref
    assert caption_images(hf, faces, options, batch_size=1) == texts  # deterministic, batch-independent
    for text in caption_images(hf, faces, GenerationOptions(max_new_tokens=3, num_beams=2)):
        assert len(text.split()) <= 3
    prompted = caption_images(hf, faces[:1], options, prompt="a photo of")
    with torch.inference_mode():
        inputs = hf.processor(images=arrays[:1], text=["a photo of"], return_tensors="pt")
        assert prompted == _reference_generate(hf, inputs, inputs["input_ids"].shape[1], 6)


def test_blip2_caption_prior_records_provenance(folders):
    hf = _load(folders / "tiny-blip2")
    bundle = add_captions(PriorBundle(batch_size=2), hf, _faces(2), GenerationOptions(5, 2))
    assert len(bundle.caption) == 2
    assert bundle.sources["caption"] == {
        "extractor": "blip2:tiny-blip2",
        "settings": {"max_new_tokens": 5, "num_beams": 2, "prompt": ""},
    }
    with pytest.raises(ValueError, match="num_beams must be in 1..16"):
        GenerationOptions(num_beams=0)


# --- LLaVA -----------------------------------------------------------------------------------


def test_instruction_presets():
    assert INSTRUCTIONS["xpsr_high"] == "Please provide a descriptive summary of the content of this image"
    assert INSTRUCTIONS["xpsr_low"].startswith("Please describe the quality of this image and evaluate it")
    assert "lighting" in INSTRUCTIONS["authface_tags"] and "shot type" in INSTRUCTIONS["authface_tags"]
    assert instruction_for("custom", "  Describe the eyes. ") == "Describe the eyes."
    with pytest.raises(ValueError, match="needs an instruction"):
        instruction_for("custom", " ")
    with pytest.raises(ValueError, match="unknown instruction preset"):
        instruction_for("xpsr")


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-next"])
def test_llava_descriptions_match_direct_generation(folders, name):
    hf = _load(folders / name)
    faces = _faces(3, 40, 52)
    prompt = build_prompt(hf, INSTRUCTIONS["xpsr_low"])
    assert prompt == f"USER: <image>\n{INSTRUCTIONS['xpsr_low']} ASSISTANT:"  # the folder's chat template
    options = GenerationOptions(max_new_tokens=5)
    texts = describe_images(hf, faces, INSTRUCTIONS["xpsr_low"], options, batch_size=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts) and any(texts)
    with torch.inference_mode():
        inputs = hf.processor(
            images=hf_loading.to_uint8_list(faces), text=[prompt] * 3, return_tensors="pt", padding=True
        )
        assert texts == _reference_generate(hf, inputs, inputs["input_ids"].shape[1], 5)
    assert describe_images(hf, faces, INSTRUCTIONS["xpsr_low"], options, batch_size=3) == texts


def test_llava_presets_fill_their_target_prior(folders):
    hf = _load(folders / "tiny-llava")
    faces, options = _faces(2), GenerationOptions(max_new_tokens=3)
    bundle = PriorBundle(batch_size=2)
    for preset in ("xpsr_high", "xpsr_low", "llvfsr", "authface_tags"):
        bundle, texts = add_descriptions(bundle, hf, faces, preset, options=options)
        target = DEFAULT_TARGETS[preset]
        assert getattr(bundle, target) == texts
        assert bundle.sources[target]["extractor"] == "llava:tiny-llava"
        assert bundle.sources[target]["settings"]["instruction"] == INSTRUCTIONS[preset]
    bundle, _ = add_descriptions(bundle, hf, faces, "custom", "Describe the eyes.", "prompt_low", options)
    assert bundle.sources["prompt_low"]["settings"]["preset"] == "custom"
    with pytest.raises(ValueError, match="target must be 'auto' or one of"):
        add_descriptions(bundle, hf, faces, "llvfsr", target="depth", options=options)


# --- Depth-Anything --------------------------------------------------------------------------


def test_normalise_per_face_known_values():
    d = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])
    out = normalise_per_face(d)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(out[1], torch.zeros(1, 2, 2))  # flat: no near, no far
    assert torch.allclose(
        normalise_per_face(d, near_is_large=False)[0, 0], torch.tensor([[1.0, 0.75], [0.5, 0.0]])
    )


def test_depth_is_face_sized_normalised_per_face_and_matches_reference(folders):
    import torch.nn.functional as F

    hf = _load(folders / "tiny-depth")
    faces = _faces(3, 40, 36)
    depth = estimate_depth(hf, faces, batch_size=2)
    assert depth.shape == (3, 1, 40, 36) and depth.dtype == torch.float32
    flat = depth.flatten(1)
    assert torch.allclose(flat.min(1).values, torch.zeros(3)) and torch.allclose(
        flat.max(1).values, torch.ones(3)
    )
    with torch.inference_mode():
        inputs = hf.processor(images=hf_loading.to_uint8_list(faces), return_tensors="pt")
        raw = hf.model(**inputs).predicted_depth.unsqueeze(1)
    raw = F.interpolate(raw, size=(40, 36), mode="bicubic", align_corners=False)
    lo = raw.amin(dim=(1, 2, 3), keepdim=True)
    hi = raw.amax(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(depth, (raw - lo) / (hi - lo), atol=1e-5)  # 1 = largest disparity = nearest
    assert torch.allclose(estimate_depth(hf, faces[1:2]), depth[1:2], atol=1e-5)  # per face, not per batch
    bundle = add_depth(PriorBundle(batch_size=3), hf, faces)
    assert bundle.sources["depth"]["extractor"] == "depth_anything:tiny-depth"
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        estimate_depth(hf, faces[:, :1])


# --- CLIP text -------------------------------------------------------------------------------


def _clip_reference(hf, ids):
    out = hf.model(input_ids=torch.tensor(ids))
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.last_hidden_state, pooled


def test_clip_short_text_equals_plain_77_token_encoding(folders):
    hf = _load(folders / "sd")
    emb = encode_texts(hf, ["the cat sat", ""])
    assert emb.tokens.shape == (2, 77, 16) and emb.pooled.shape == (2, 16)
    ids = hf.processor(["the cat sat"], padding="max_length", max_length=77)["input_ids"]
    with torch.inference_mode():
        tokens, pooled = _clip_reference(hf, ids)
    assert torch.allclose(emb.tokens[0], tokens[0], atol=1e-5) and torch.allclose(
        emb.pooled[0], pooled[0], atol=1e-5
    )
    n_real = sum(1 for i in ids[0][1:] if i != 1) + 2  # BOS + text + EOS
    assert emb.attention_mask[0].tolist() == [1] * n_real + [0] * (77 - n_real)
    assert emb.attention_mask[1].sum() == 2


def test_clip_long_text_is_chunked_concatenated_and_pooled_by_mean(folders):
    hf = _load(folders / "tiny-clip-proj")
    long_text = " ".join(["ab"] * 100)  # "a", "b</w>" per word: 200 tokens
    body = hf.processor(long_text, add_special_tokens=False)["input_ids"]
    assert len(body) == 200
    emb = encode_texts(hf, [long_text, "the cat"], batch_size=2)
    assert emb.tokens.shape == (2, 3 * 77, 16) and emb.pooled.shape == (2, 8)
    assert emb.attention_mask[0].sum() == 200 + 3 * 2
    chunks = [body[:75], body[75:150], body[150:]]
    rows = [[0, *c, 1] + [1] * (75 - len(c)) for c in chunks]
    with torch.inference_mode():
        tokens, pooled = _clip_reference(hf, rows)
        _empty_tokens, _ = _clip_reference(hf, [[0, 1] + [1] * 75])
    assert torch.allclose(emb.tokens[0], tokens.reshape(3 * 77, 16), atol=1e-5)
    assert torch.allclose(emb.pooled[0], pooled.mean(0), atol=1e-5)
    # The short text's missing chunks are an empty text's encoding, masked out.
    assert emb.attention_mask[1, 77:].sum() == 0
    assert torch.allclose(emb.tokens[1, 77:154], _empty_tokens[0], atol=1e-5)


def test_clip_embedding_prior_needs_texts_and_records_provenance(folders):
    hf = _load(folders / "tiny-clip-proj")
    bundle = PriorBundle(batch_size=2)
    with pytest.raises(ValueError, match="no 'caption' texts"):
        add_text_embedding(bundle, hf, "caption")
    bundle = bundle.with_prior("description", ["a face", "the eyes"], {"extractor": "llava:x"})
    bundle = add_text_embedding(bundle, hf, "description")
    src = bundle.sources["description_embedding"]
    assert src["extractor"] == "clip_text:tiny-clip-proj" and src["settings"]["source_extractor"] == "llava:x"
    assert bundle.description_embedding.tokens.shape == (2, 77, 16)


# --- nodes -----------------------------------------------------------------------------------


def test_nodes_load_from_model_folders_and_extract(comfy_env, check_outputs, folders):
    from priorface.nodes import hf_prior_nodes as m

    for kind, name in (("LLM", "tiny-blip2"), ("LLM", "tiny-llava"), ("depthanything", "tiny-depth")):
        shutil.copytree(folders / name, comfy_env.models_dir / kind / name)
    shutil.copytree(folders / "sd", comfy_env.models_dir / "text_encoders" / "sd")
    (comfy_env.models_dir / "text_encoders" / "clip_l.safetensors").write_bytes(b"x")
    assert m.LoadCaptionModelNode.INPUT_TYPES()["required"]["model_name"][0] == ["tiny-blip2", "tiny-llava"]
    assert m.LoadCLIPTextNode.choices() == ["sd"]  # single files carry no tokenizer: not offered

    blip = m.LoadCaptionModelNode().load("tiny-blip2", "auto", False)[0]
    llava = m.LoadCaptionModelNode().load("tiny-llava", "auto", False)[0]
    depth_model = m.LoadDepthModelNode().load("tiny-depth", "auto", False)[0]
    clip = m.LoadCLIPTextNode().load("sd", "auto", False)[0]
    images = _faces(2, 32, 32).permute(0, 2, 3, 1).contiguous()

    priors, captions = check_outputs(m.CaptionNode, m.CaptionNode().caption(blip, images, 4, 1, "", 1))
    assert captions.count("\n") == 1 and priors.caption is not None
    priors, texts = check_outputs(
        m.DescribeNode,
        m.DescribeNode().describe(llava, images, "xpsr_high", "", "auto", 4, 1, 2, priors=priors),
    )
    assert priors.prompt_high is not None and priors.caption is not None and texts.count("\n") == 1
    priors, preview = check_outputs(
        m.DepthNode, m.DepthNode().estimate(depth_model, images, 2, priors=priors)
    )
    assert preview.shape == (2, 32, 32, 3) and torch.equal(preview[..., 0], priors.depth[:, 0])
    (priors,) = m.CLIPTextEmbeddingNode().encode(clip, priors, "caption", 8)
    assert priors.caption_embedding.tokens.shape[0] == 2
    assert set(priors.present()) == {"caption", "prompt_high", "depth", "caption_embedding"}
    assert comfy_env.updates  # progress went through ComfyUI's bar
    with pytest.raises(ValueError, match="priors hold 2 face"):
        m.DepthNode().estimate(depth_model, images[:1], 2, priors=priors)
    with pytest.raises(ValueError, match="holds a depth_anything model"):
        m.LoadCaptionModelNode().load(
            str(comfy_env.models_dir / "depthanything" / "tiny-depth"), "auto", False
        )


def test_node_module_imports_transformers_lazily():
    code = (
        f"import sys; sys.path.insert(0, {str(FAKE_COMFY)!r})\n"
        "import folder_paths; folder_paths.reset('/nonexistent')\n"
        "import priorface.nodes.hf_prior_nodes\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
