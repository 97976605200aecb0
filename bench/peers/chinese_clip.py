"""Chinese-CLIP text peers (``ChineseClipPeerSet``) and the Chinese captions they time."""
from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (
    ATOL,
    BROKEN_COSINE,
    RTOL,
    Encoder,
    _features,
    _HfDirectoryPeers,
    _weights_fingerprint,
    cache_root,
    per_item_cosine,
    perturb_,
    precision,
)

# ====================================================================== Chinese-CLIP text tower
# A transformers ChineseCLIPModel with OFA-Sys/chinese-clip-vit-base-patch16's text tower (RoBERTa-wwm-ext base:
# 768 wide, 12 layers, 12 heads, MLP 3072, 21128 tokens, projection 512) and a one-layer 64-wide image tower (the
# rows time texts only), seeded and perturbed, saved with a ChineseCLIPProcessor (BertTokenizer over fastclip's
# bundled Chinese-CLIP vocabulary) as the directory fastclip loads.
CN_CLIP_TEXT_PEERS = ("fastclip", "fastclip encode_text", "fastclip-int8", "transformers", "torch.compile", "ort-fp32")
CN_CLIP_CONTEXT = 52  # cn_clip's context length: fastclip's tokenizer pads to it, the compiled / exported peers too
_CN_SUBJECTS = ["一只小猫", "两个孩子", "一位老人", "一辆红色的公交车", "一条小狗", "一群游客", "一碗热汤面", "一座高楼",
                "一艘小船", "一位穿着白色衬衫的年轻女子", "一匹马", "一杯咖啡", "几只鸽子", "一个骑自行车的男人"]
_CN_VERBS = ["坐在", "站在", "走过", "停在", "躺在", "望着", "穿过", "放在", "飞过", "漂浮在", "靠在", "等在"]
_CN_PLACES = ["沙滩上", "厨房的桌子旁", "热闹的街道", "雪山脚下", "城市公园里", "木制码头边", "安静的湖面", "火车站",
              "草地上", "拥挤的市场", "空旷的公路", "河岸边"]
_CN_DETAILS = ["夕阳西下", "下着小雨", "阳光明媚的下午", "背景是高大的树木", "天空中飘着白云", "周围长满了青草",
               "旁边有一把红伞", "黑白照片", "清晨柔和的光线", "远处有人在观看", "冬天的暴风雪中", "古老的石墙旁"]


def chinese_captions(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` seeded Chinese captions of 5 to ~45 characters (most short, as bench/captions.py's English ones)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(_CN_SUBJECTS), rng.choice(_CN_VERBS), rng.choice(_CN_PLACES)]
        parts += [("，" + rng.choice(_CN_DETAILS)) for _ in range(min(3, int(rng.expovariate(1.0))))]
        out.append("".join(parts) + "。")
    return out


def chinese_clip_config():
    """transformers ``ChineseCLIPConfig``: chinese-clip-vit-base-patch16's text tower and projection, a tiny image
    tower."""
    import transformers

    return transformers.ChineseCLIPConfig(
        text_config=dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=512)


class _CnText(torch.nn.Module):
    """transformers' ``get_text_features`` on (input_ids, attention_mask), as a module for compile and export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class ChineseClipPeerSet(_HfDirectoryPeers):
    """Chinese-CLIP text peers on one set of weights; every encoder takes a list of captions and includes its
    tokenization:

    * ``fastclip`` / ``fastclip-int8``: ``embed_texts`` of ``fastclip.load(directory)`` (L2-normalised rows);
      ``fastclip encode_text``: ``encode_text(tokenizer(texts))`` (52 tokens, padded rows trimmed by the tower);
    * ``transformers``: the directory's tokenizer with ``padding="longest"`` and its attention mask, then
      ``get_text_features`` (eager) -- the reference;
    * ``torch.compile``: ``get_text_features`` under ``torch.compile`` (default mode, static shapes: 52 tokens);
    * ``ort-fp32``: ONNX Runtime on ``torch.onnx.export`` (dynamo) of ``get_text_features`` with a dynamic batch
      axis, on the 52-token input.
    """

    def __init__(self, arch: str = "CN-CLIP-ViT-B-16", seed: int = 0, config=None):
        import transformers

        self.arch = arch
        config = config or chinese_clip_config()
        torch.manual_seed(seed)  # transformers' init draws from the global generator
        self.hf = perturb_(transformers.ChineseCLIPModel(config), seed)
        from fastclip.data.wordpiece import _bundled_vocab

        self.tokenizer = transformers.BertTokenizer(vocab=dict(_bundled_vocab()))
        self.cache_dir = cache_root() / f"{arch}-text-{_weights_fingerprint(dict(self.hf.state_dict()))}"
        self.info: dict[str, dict] = {}
        self._reference: dict[int, tuple] = {}
        self._built: dict[tuple, object] = {}

    def _save(self, staging: Path) -> None:
        import transformers

        self.hf.save_pretrained(staging)
        size = self.hf.config.vision_config.image_size
        images = transformers.ChineseCLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False)
        transformers.ChineseCLIPProcessor(image_processor=images, tokenizer=self.tokenizer).save_pretrained(staging)

    def tokens(self, texts: list[str], padding="max_length") -> dict[str, torch.Tensor]:
        """The tokenizer's input_ids and attention_mask (B, L): 52 tokens, or the longest text's with "longest"."""
        out = self.tokenizer(texts, padding=padding, max_length=CN_CLIP_CONTEXT, truncation=True, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def reference(self, texts: list[str]) -> torch.Tensor:
        """transformers eager features of ``texts``, cached per list."""
        if id(texts) not in self._reference:
            with torch.inference_mode():
                self._reference[id(texts)] = (texts, _features(self.hf.get_text_features(**self.tokens(texts))))
        return self._reference[id(texts)][1]

    @functools.cached_property
    def compiled(self) -> Callable:
        return torch.compile(_CnText(self.hf).eval(), dynamic=False)

    def onnx_path(self) -> Path:
        """``get_text_features`` exported with a dynamic batch axis: ``text/model.onnx`` (+ ``.data``)."""
        path = self.cache_dir / "text" / "model.onnx"
        if path.is_file():
            return path
        example = self.tokens(chinese_captions(2, seed=1))
        staging = self.cache_dir / "text.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        batch = torch.export.Dim("batch")
        torch.onnx.export(_CnText(self.hf).eval(), (example["input_ids"], example["attention_mask"]),
                          str(staging / "model.onnx"), dynamo=True, dynamic_shapes=({0: batch}, {0: batch}),
                          input_names=["input_ids", "attention_mask"], output_names=["features"], verbose=False)
        staging.rename(path.parent)
        return path

    def ort_fp32(self) -> Callable:
        if "ort-fp32" not in self._built:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(str(self.onnx_path()), opts, providers=["CPUExecutionProvider"])
            self._built["ort-fp32"] = lambda t: torch.from_numpy(
                session.run(None, {k: v.numpy() for k, v in t.items()})[0])
        return self._built["ort-fp32"]

    def text_encoder(self, impl: str, captions: list[str]) -> Encoder:
        """captions -> features for ``impl`` (tokenization included), checked against transformers eager on
        ``captions`` (also the warm-up)."""
        if impl in ("fastclip", "fastclip-int8"):
            fn = self.fastclip("int8" if impl == "fastclip-int8" else "fp32").embed_texts
        elif impl == "fastclip encode_text":
            model = self.fastclip()

            def fn(texts):
                return model.encode_text(model.tokenizer(texts))
        elif impl == "transformers":
            def fn(texts):
                return _features(self.hf.get_text_features(**self.tokens(texts, padding="longest")))
        elif impl == "torch.compile":
            def fn(texts, compiled=self.compiled):
                return compiled(**self.tokens(texts))
        elif impl == "ort-fp32":
            run = self.ort_fp32()

            def fn(texts):
                return run(self.tokens(texts))
        else:
            raise ValueError(f"{impl!r} is not a text peer of {self.arch} (peers: {', '.join(CN_CLIP_TEXT_PEERS)})")
        self._check(impl, fn, captions)
        return fn

    def _check(self, impl: str, fn: Encoder, captions: list[str]) -> None:
        with torch.inference_mode():
            got = torch.as_tensor(fn(captions))  # embed_texts returns a numpy array
        want = self.reference(captions)
        if impl in ("fastclip", "fastclip-int8"):  # embed_texts returns L2-normalised rows
            want = F.normalize(want, dim=-1)
        if precision(impl) != "fp32":
            cosine = per_item_cosine(got, want)
            self.info.setdefault(f"{impl} text", {}).update(
                min_cosine_to_fp32=round(cosine.min().item(), 5), mean_cosine_to_fp32=round(cosine.mean().item(), 5))
            if cosine.min().item() < BROKEN_COSINE:
                raise AssertionError(f"{self.arch} text {impl} disagrees with transformers eager: per-item cosine "
                                     f"{cosine.min().item():.5f} < {BROKEN_COSINE}")
        else:
            try:
                torch.testing.assert_close(got.float(), want.float(), atol=ATOL, rtol=RTOL)
            except AssertionError as exc:
                raise AssertionError(f"{self.arch} text {impl} disagrees with transformers eager: {exc}") from None
