"""Chinese-CLIP: transformers ChineseCLIPModel directories and OFA-Sys cn_clip checkpoints against their own code.

Tiny random models (every parameter perturbed) are written in the formats users hold: a ChineseCLIPModel saved
with save_pretrained beside a ChineseCLIPProcessor (BertTokenizer over the bundled vocabulary, a square-resize
image processor), and a cn_clip ``CLIP`` saved as cn_clip's training saves it (``{"state_dict": {"module." + k}}``).
fastclip loads them and must equal ``get_text_features`` / ``get_image_features`` and cn_clip's ``encode_text`` /
``encode_image`` to UPSTREAM_ATOL (max-abs, fp32, raw and L2-normalised), on the ref and cpu backends.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import cn_clip.clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cn_clip.clip import tokenize as cn_tokenize
from cn_clip.clip.model import CLIP as CnClip
from cn_clip.clip.model import convert_weights
from PIL import Image
from transformers import (
    BertTokenizer,
    ChineseCLIPConfig,
    ChineseCLIPImageProcessor,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
)

import fastclip
from fastclip.data.tokenizers import MissingTokenizerError, tokenizer_from_dir
from fastclip.data.wordpiece import WordPieceTokenizer, _bundled_vocab
from fastclip.errors import CheckpointError
from fastclip.loading import hub, keymaps_chinese_clip
from fastclip.tolerance import MIN_COSINE, PIXEL_ATOL, UPSTREAM_ATOL
from helpers.upstream import (
    _TABLE,
    calibrate_batchnorm_,
    make_images,
    perturb_,
    put_in_hub_cache,
    register_configs,
)

SIZE, PATCH, EMBED = 32, 8, 24
TEXTS = ["一只猫", "一只猫坐在垫子上，旁边是一只正在睡觉的小狗。", "皮卡丘", "Hello 北京 2024!",
         "杰尼龟、妙蛙种子和小火龙在草地上玩耍" * 3]
BACKENDS = ["ref", "cpu"]


def _maxabs(a, b) -> float:
    return (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max().item()


def _errs(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Max-abs of ``ours`` against ``ref``: raw and L2-normalised."""
    return _maxabs(ours, ref), _maxabs(F.normalize(ours, dim=-1), F.normalize(ref, dim=-1))


def _check(case: str, batch: int, image: tuple[float, float] | None, text: tuple[float, float]) -> None:
    """Assert the errors are within UPSTREAM_ATOL; rows with all four go to the table tests/conftest.py prints."""
    errs = [e for e in (*(image or ()), *text) if e == e]  # nan: not measured
    if len(errs) == 4:
        _TABLE.append(("chinese_clip", case, batch, *image, *text))
    assert max(errs) <= UPSTREAM_ATOL, f"{case} B={batch}: image {image}, text {text} above {UPSTREAM_ATOL}"


# ---------------------------------------------------------------- transformers ChineseCLIPModel directory
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = ChineseCLIPConfig(
        text_config=dict(vocab_size=21128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                           image_size=SIZE, patch_size=PATCH),
        projection_dim=EMBED)
    torch.manual_seed(0)
    model = perturb_(ChineseCLIPModel(cfg), seed=1)
    d = tmp_path_factory.mktemp("chinese_clip_hf")
    model.save_pretrained(d)
    tokenizer = BertTokenizer(vocab=dict(_bundled_vocab()))
    images = ChineseCLIPImageProcessor(size={"height": SIZE, "width": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                       do_center_crop=False)
    ChineseCLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(d)
    return d, model


def _hf_text(model, processor, texts):
    inputs = processor(text=texts, padding="max_length", max_length=52, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**inputs)
    return inputs["input_ids"], (out if isinstance(out, torch.Tensor) else out.pooler_output)


def _hf_image(model, pixels):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_dir_equals_chinese_clip_model(hf_dir, backend):
    d, model = hf_dir
    ours = fastclip.load(d, backend=backend)
    assert ours.cfg.text.pool_type == "first" and ours.cfg.text.proj_type == "linear"
    assert ours.cfg.preprocess.resize_mode == "squash" and ours.preprocess.cfg.resize_mode == "squash"
    processor = ChineseCLIPProcessor.from_pretrained(d)
    for texts in (TEXTS[1:2], TEXTS):  # batch 1 and an odd batch of texts of different lengths
        ids, ref = _hf_text(model, processor, texts)
        assert torch.equal(ours.tokenizer(texts), ids)
        pixels = make_images(len(texts), SIZE, seed=len(texts))
        with torch.no_grad():
            _check(f"ChineseCLIPModel dir {backend}", len(texts), _errs(ours.encode_image(pixels), _hf_image(model, pixels)),
                   _errs(ours.encode_text(ids), ref))


def test_hf_dir_embed_texts_and_tokenizer(hf_dir):
    d, model = hf_dir
    ours = fastclip.load(d)
    _, ref = _hf_text(model, ChineseCLIPProcessor.from_pretrained(d), TEXTS)
    emb = ours.embed_texts(TEXTS)
    assert emb.dtype == np.float32 and emb.shape == (len(TEXTS), EMBED)
    _check("embed_texts", len(TEXTS), None, (float("nan"), _errs(torch.from_numpy(emb), ref)[1]))  # L2-normalised
    tok = fastclip.get_tokenizer(d)
    assert isinstance(tok, WordPieceTokenizer) and torch.equal(tok(TEXTS), ours.tokenizer(TEXTS))


def test_hf_dir_without_tokenizer_files(hf_dir, tmp_path):
    d, _ = hf_dir
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        shutil.copy(d / name, tmp_path / name)
    ours = fastclip.load(tmp_path)
    assert ours.tokenizer is None
    with pytest.raises(MissingTokenizerError, match="has no vocab.txt.*WordPieceTokenizer.chinese_clip"):
        ours.embed_texts(["猫"])
    assert isinstance(tokenizer_from_dir(d), WordPieceTokenizer)


def test_hf_dir_int8(hf_dir):
    """precision="int8": per-text cosine to transformers' fp32 features >= MIN_COSINE."""
    d, model = hf_dir
    ours = fastclip.load(d, precision="int8")
    _, ref = _hf_text(model, ChineseCLIPProcessor.from_pretrained(d), TEXTS)
    cosine = F.cosine_similarity(torch.from_numpy(ours.embed_texts(TEXTS)), ref, dim=-1)
    assert cosine.min().item() >= MIN_COSINE, cosine


def test_hf_dir_preprocessing_equals_processor(hf_dir):
    """preprocessor_config.json (a square resize, no crop) gives ChineseCLIPProcessor's pixels; embed_images equals
    the processor + get_image_features."""
    d, model = hf_dir
    ours = fastclip.load(d)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 80), (90, 40))]
    pixels = ChineseCLIPProcessor.from_pretrained(d)(images=images, return_tensors="pt")["pixel_values"]
    assert _maxabs(torch.stack([ours.preprocess(im) for im in images]), pixels) <= PIXEL_ATOL
    emb = ours.embed_images(images)
    _check("embed_images", len(images), (float("nan"), _errs(torch.from_numpy(emb), _hf_image(model, pixels))[1]),
           (float("nan"),) * 2)


def test_hub_id_and_tag(hf_dir, offline_hub):
    """A ChineseCLIPModel hub repo (from the offline cache) loads by its id; the CN-CLIP names' tags name OFA-Sys's
    transformers repos."""
    d, model = hf_dir
    put_in_hub_cache(offline_hub, "OFA-Sys/chinese-clip-tiny", {f.name: f for f in d.iterdir() if f.is_file()})
    ours = fastclip.load("OFA-Sys/chinese-clip-tiny")
    _, ref = _hf_text(model, ChineseCLIPProcessor.from_pretrained(d), TEXTS)
    with torch.no_grad():
        _check("hub id", len(TEXTS), None, _errs(ours.encode_text(ours.tokenizer(TEXTS)), ref))
    assert hub.pretrained_entry("CN-CLIP-ViT-B-16", "ofa_sys") == {"hf_hub": "OFA-Sys/chinese-clip-vit-base-patch16",
                                                                  "format": "hf"}


def test_hf_state_dict_file_with_config(hf_dir, tmp_path_factory):
    """A ChineseCLIPModel's model.safetensors alone, loaded with a registered config of its shape."""
    d, model = hf_dir
    raw = {"embed_dim": EMBED, "tokenizer": "wordpiece",
           "vision_cfg": {"image_size": SIZE, "patch_size": PATCH, "width": 32, "layers": 2, "head_width": 8,
                          "mlp_ratio": 2.5, "act": "quick_gelu"},
           "text_cfg": _text_cfg(32, 2, 4, 64, 64)}
    register_configs(tmp_path_factory, "cn_hf_cfg", {"CN-CLIP-test-hf": raw})
    ours = fastclip.load("CN-CLIP-test-hf", pretrained=d / "model.safetensors")
    ids = WordPieceTokenizer.chinese_clip()(TEXTS)
    with torch.no_grad():
        ref = model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
        _check("file", len(TEXTS), None, _errs(ours.encode_text(ids), ref if isinstance(ref, torch.Tensor) else ref.pooler_output))


# ---------------------------------------------------------------- OFA-Sys cn_clip checkpoints
def _text_cfg(width, layers, heads, inter, max_pos):
    return {"hf_model_name": "hfl/chinese-roberta-wwm-ext", "hf_pooler_type": "cls_last_hidden_state_pooler",
            "hf_proj_type": "linear", "context_length": 52,
            "hf_model_config": {"model_type": "bert", "vocab_size": 21128, "hidden_size": width,
                                "num_hidden_layers": layers, "num_attention_heads": heads,
                                "intermediate_size": inter, "max_position_embeddings": max_pos,
                                "type_vocab_size": 2, "pad_token_id": 0, "layer_norm_eps": 1e-12,
                                "hidden_act": "gelu"}}


CN_TINY = {"embed_dim": EMBED, "tokenizer": "wordpiece",
           "preprocess": {"resize_mode": "squash"},
           "vision_cfg": {"image_size": SIZE, "patch_size": PATCH, "width": 64, "layers": 2, "head_width": 16,
                          "act": "quick_gelu"},
           "text_cfg": _text_cfg(32, 2, 4, 64, 64)}


def _cn_clip(text_width: int = 32) -> CnClip:
    torch.manual_seed(0)
    model = CnClip(embed_dim=EMBED, image_resolution=SIZE, vision_layers=2, vision_width=64, vision_patch_size=PATCH,
                   vision_head_width=16, vocab_size=21128, text_attention_probs_dropout_prob=0.0,
                   text_hidden_act="gelu", text_hidden_dropout_prob=0.0, text_hidden_size=text_width,
                   text_initializer_range=0.02, text_intermediate_size=64, text_max_position_embeddings=64,
                   text_num_attention_heads=4, text_num_hidden_layers=2, text_type_vocab_size=2)
    return perturb_(model, seed=2)


def _save_cn_clip(model: CnClip, path):
    """As cn_clip's training saves it: the DDP ``module.`` prefix, under "state_dict", with a bert pooler."""
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    w = model.bert_config.hidden_size
    sd["module.bert.pooler.dense.weight"], sd["module.bert.pooler.dense.bias"] = torch.randn(w, w), torch.randn(w)
    torch.save({"epoch": 3, "step": 100, "name": "tiny", "state_dict": sd}, path)
    return path


@pytest.fixture(scope="module")
def cn_file(tmp_path_factory):
    register_configs(tmp_path_factory, "cn_tiny_cfg", {"CN-CLIP-test-tiny": CN_TINY})
    model = _cn_clip()
    return _save_cn_clip(model, tmp_path_factory.mktemp("cn_clip") / "clip_cn_tiny.pt"), model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("by_name", [True, False], ids=["name", "inferred"])
def test_cn_clip_file_equals_cn_clip(cn_file, backend, by_name):
    path, model = cn_file
    ours = fastclip.load("CN-CLIP-test-tiny", pretrained=path, backend=backend) if by_name else \
        fastclip.load(path, backend=backend)
    assert ours.cfg.name == "CN-CLIP-test-tiny"
    for texts in (TEXTS[1:2], TEXTS):  # batch 1 and an odd batch
        ids = cn_tokenize(texts)
        assert torch.equal(ours.tokenizer(texts), ids)  # the bundled vocabulary, cn_clip's settings
        pixels = make_images(len(texts), SIZE, seed=len(texts))
        with torch.no_grad():
            _check(f"cn_clip .pt {'named' if by_name else 'inferred'} {backend}", len(texts),
                   _errs(ours.encode_image(pixels), model.encode_image(pixels)),
                   _errs(ours.encode_text(ids), model.encode_text(ids)))
    with torch.no_grad():
        assert _maxabs(ours.log_logit_scale, model.logit_scale) == 0


def test_cn_clip_fp16_file(cn_file, tmp_path):
    """cn_clip's released files hold fp16 weights (cn_clip.clip.model.convert_weights): loaded as fp32, they equal
    cn_clip run in fp32 on the same fp16-rounded weights (what cn_clip.load_from_name does on a CPU)."""
    _, model = cn_file
    half = copy.deepcopy(model)
    convert_weights(half)
    path = _save_cn_clip(half, tmp_path / "clip_cn_fp16.pt")
    ref = copy.deepcopy(model)
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    ours = fastclip.load(path)
    assert ours.cfg.name == "CN-CLIP-test-tiny" and ours.log_logit_scale.dtype == torch.float32
    pixels, ids = make_images(3, SIZE, seed=3), cn_tokenize(TEXTS[:3])
    with torch.no_grad():
        _check("cn_clip fp16 .pt", 3, _errs(ours.encode_image(pixels), ref.encode_image(pixels)),
               _errs(ours.encode_text(ids), ref.encode_text(ids)))


RN_SIZE = 64
CN_TINY_RN = {**CN_TINY, "vision_cfg": {"image_size": RN_SIZE, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32}}


def test_cn_clip_resnet_file_equals_cn_clip(tmp_path_factory):
    """CN-CLIP-RN50's layout: cn_clip's ModifiedResNet image tower (OpenAI names, BatchNorm statistics)."""
    register_configs(tmp_path_factory, "cn_tiny_rn_cfg", {"CN-CLIP-test-tiny-rn": CN_TINY_RN})
    torch.manual_seed(0)
    model = CnClip(embed_dim=EMBED, image_resolution=RN_SIZE, vision_layers=[1, 1, 1, 1], vision_width=16,
                   vision_patch_size=None, vision_head_width=32, vocab_size=21128, text_attention_probs_dropout_prob=0.0,
                   text_hidden_act="gelu", text_hidden_dropout_prob=0.0, text_hidden_size=32, text_initializer_range=0.02,
                   text_intermediate_size=64, text_max_position_embeddings=64, text_num_attention_heads=4,
                   text_num_hidden_layers=2, text_type_vocab_size=2)
    perturb_(model, seed=3)
    calibrate_batchnorm_(model.visual, make_images(4, RN_SIZE, seed=9), seed=4)
    model.eval()
    path = _save_cn_clip(model, tmp_path_factory.mktemp("cn_clip_rn") / "clip_cn_rn_tiny.pt")
    ours = fastclip.load(path)
    assert ours.cfg.name == "CN-CLIP-test-tiny-rn"
    pixels, ids = make_images(3, RN_SIZE, seed=3), cn_tokenize(TEXTS[:3])
    with torch.no_grad():
        _check("cn_clip .pt ResNet cpu", 3, _errs(ours.encode_image(pixels), model.encode_image(pixels)),
               _errs(ours.encode_text(ids), model.encode_text(ids)))


def test_cn_clip_file_that_fits_no_architecture(cn_file, tmp_path):
    path = _save_cn_clip(_cn_clip(text_width=48), tmp_path / "clip_cn_odd.pt")
    with pytest.raises(CheckpointError, match=r"clip_cn_odd\.pt is a Chinese-CLIP \(cn_clip\) state dict \(text width "
                                              r"48.*fit none of the Chinese-CLIP architectures.*CN-CLIP-ViT-B-16"):
        fastclip.load(path)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: text\.proj\.weight"):
        fastclip.load("CN-CLIP-test-tiny", pretrained=path)


def _cn_clip_on_meta(vision: str, text: str) -> CnClip:
    """cn_clip's model of ``vision@text`` as cn_clip.clip.utils.create_model combines its model_configs."""
    folder = Path(cn_clip.clip.__file__).parent / "model_configs"
    info = {**json.loads((folder / f"{vision}.json").read_text()), **json.loads((folder / f"{text}.json").read_text())}
    if isinstance(info["vision_layers"], str):
        info["vision_layers"] = json.loads(info["vision_layers"])
    with torch.device("meta"):
        return CnClip(**info)


@pytest.mark.parametrize("name,struct", [
    ("CN-CLIP-ViT-B-16", ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese")),
    ("CN-CLIP-ViT-L-14", ("ViT-L-14", "RoBERTa-wwm-ext-base-chinese")),
    ("CN-CLIP-ViT-L-14-336", ("ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese")),
    ("CN-CLIP-ViT-H-14", ("ViT-H-14", "RoBERTa-wwm-ext-large-chinese")),
    ("CN-CLIP-RN50", ("RN50", "RBT3-chinese")),
])
def test_named_configs_are_cn_clips(name, struct):
    """Each registered CN-CLIP architecture holds exactly the parameters (names through the key map, shapes) of
    cn_clip's model of the same name."""
    cfg = fastclip.get_model_config(name)
    assert cfg.tokenizer == "wordpiece" and cfg.text.context_length == 52 and cfg.text.pool_type == "first"
    assert cfg.preprocess.resize_mode == "squash"
    with torch.device("meta"):
        ours = fastclip.CLIP(cfg)
    theirs = keymaps_chinese_clip.from_cn_clip(_cn_clip_on_meta(*struct).state_dict())
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert isinstance(fastclip.get_tokenizer(name), WordPieceTokenizer)
