"""Builders shared by the model / loading suites: random upstream models (open_clip, transformers), their
inputs, every checkpoint format, Hugging Face directories, a fake offline hub cache, and the table of
max-abs errors that tests/conftest.py prints at the end of the run.

open_clip and transformers are imported plainly: without them these suites fail, they never skip.
"""
from __future__ import annotations

import io
import json
import random
import zlib
from pathlib import Path

import open_clip
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers

import fastclip
from fastclip.loading import keymaps
from fastclip.loading.factory import _build
from fastclip.models import tiny
from fastclip.tolerance import UPSTREAM_ATOL

ROOT = Path(__file__).resolve().parents[2]
EOT, SOT = 49407, 49406
NOISE = 0.02

# ---------------------------------------------------------------- error table (printed at the end)
_TABLE: list[tuple[str, str, int, float, float, float, float]] = []


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def assert_matches(model, upstream: Upstream, batch: int, case: str, suite: str) -> None:
    """encode_image / encode_text of a fastclip model equal the upstream's, raw and L2-normalised."""
    images, tokens = upstream.inputs(batch)
    ref_img, ref_txt = upstream.outputs(batch)
    with torch.no_grad():
        img, img_n = model.encode_image(images), model.encode_image(images, normalize=True)
        txt, txt_n = model.encode_text(tokens), model.encode_text(tokens, normalize=True)
    errs = (_maxabs(img, ref_img), _maxabs(img_n, F.normalize(ref_img, dim=-1)),
            _maxabs(txt, ref_txt), _maxabs(txt_n, F.normalize(ref_txt, dim=-1)))
    _TABLE.append((suite, case, batch, *errs))
    names = ("image", "image (normalised)", "text", "text (normalised)")
    bad = [f"{n}: {e:.3e}" for n, e in zip(names, errs, strict=True) if not e <= UPSTREAM_ATOL]
    assert not bad, f"{case} B={batch}: max-abs error above {UPSTREAM_ATOL}: " + ", ".join(bad)


# ---------------------------------------------------------------- random weights and inputs
@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, std: float = NOISE) -> torch.nn.Module:
    """Add N(0, std) to every parameter, so zero biases and unit LayerNorm weights are not special."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
    return module.eval()


# end-of-text positions per batch size: the last position, early ones, and padding after it
def eot_positions(batch: int, length: int) -> list[int]:
    table = {1: [length - 1], 3: [1, length // 2, 9], 5: [length - 1, 4, 1, length - 2, length // 3]}
    return table.get(batch, [(7 * i + 1) % length for i in range(batch)])


def make_tokens(batch: int, length: int, *, eot: int, lo: int, hi: int, pad: int = 0, sot: int | None = None,
                seed: int = 0) -> torch.Tensor:
    """(B, L) int64: [sot] random ids in [lo, hi) ... eot, pad, pad, ... with eot at eot_positions()."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.full((batch, length), pad, dtype=torch.long)
    for row, pos in enumerate(eot_positions(batch, length)):
        tokens[row, :pos] = torch.randint(lo, hi, (pos,), generator=gen)
        if sot is not None and pos > 0:
            tokens[row, 0] = sot
        tokens[row, pos] = eot
    return tokens


def clip_tokens(batch: int, length: int = 77, seed: int = 0) -> torch.Tensor:
    return make_tokens(batch, length, eot=EOT, lo=1, hi=SOT, sot=SOT, seed=seed)


def make_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(batch, 3, size, size, generator=gen)


def _features(out) -> torch.Tensor:
    """transformers 5 may return an output object from get_*_features: use its pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class Upstream:
    """An upstream model (open_clip or transformers) with its inputs and cached reference outputs."""

    def __init__(self, label: str, model, kind: str, image_size: int, tokens_fn):
        self.label, self.model, self.kind = label, model.eval(), kind
        self.image_size, self.tokens_fn = image_size, tokens_fn
        self._inputs, self._outputs = {}, {}

    def inputs(self, batch: int):
        if batch not in self._inputs:
            self._inputs[batch] = (make_images(batch, self.image_size, seed=batch), self.tokens_fn(batch))
        return self._inputs[batch]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tokens: torch.Tensor):
        m = self.model
        if self.kind == "open_clip":
            return m.encode_image(images).float(), m.encode_text(tokens).float()
        return (_features(m.get_image_features(pixel_values=images)).float(),
                _features(m.get_text_features(input_ids=tokens)).float())

    def outputs(self, batch: int):
        if batch not in self._outputs:
            self._outputs[batch] = self.encode(*self.inputs(batch))
        return self._outputs[batch]


def fastclip_from_openclip(name_or_cfg, state_dict: dict, backend: str = "ref"):
    """fastclip model holding an OpenCLIP/OpenAI-layout state dict (in memory, through the key map)."""
    cfg = fastclip.get_model_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    sd = keymaps.from_openclip({k: v.detach().clone() for k, v in state_dict.items()})
    return _build(cfg, sd, "<memory>", "cpu", "fp32", backend)


def fastclip_from_hf(hf_model, name: str, backend: str = "ref"):
    cfg = keymaps.config_from_hf(hf_model.config.to_dict(), name)
    sd = keymaps.from_hf({k: v.detach().clone() for k, v in hf_model.state_dict().items()}, cfg)
    return _build(cfg, sd, "<memory>", "cpu", "fp32", backend)


# ---------------------------------------------------------------- tiny configs (OpenCLIP JSON)
# The one set of tiny configs, shared with `fastclip verify` (fastclip/models/tiny.py); OPENCLIP_TINY are
# those open_clip builds too.
TINY_CONFIGS, OPENCLIP_TINY = tiny.TINY_CONFIGS, tiny.OPENCLIP_TINY


def register_configs(tmp_path_factory, label: str, configs: dict) -> Path:
    """Write OpenCLIP-style JSON ``configs`` ({name: config}) to a fresh folder and register them with
    fastclip; returns the folder."""
    folder = tmp_path_factory.mktemp(label)
    for name, raw in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(raw))
    assert sorted(fastclip.add_model_config(folder)) == sorted(configs)
    return folder


def openclip_upstream(name: str, seed: int, like: torch.nn.Module | None = None) -> Upstream:
    """open_clip.create_model(name), perturbed (or holding the weights of ``like``)."""
    torch.manual_seed(seed)  # open_clip's init uses the global generator
    model = open_clip.create_model(name).eval()
    if like is not None:
        model.load_state_dict(like.state_dict())
    else:
        perturb_(model, seed)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    ctx = model.context_length
    return Upstream(f"open_clip {name}", model, "open_clip", size, lambda b: clip_tokens(b, ctx, seed=b))


# ---------------------------------------------------------------- transformers models and directories
def hf_clip_config() -> transformers.CLIPConfig:
    # Vision QuickGELU (OpenAI), text GELU: each tower's activation is mapped on its own.
    return transformers.CLIPConfig(
        projection_dim=48,
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="gelu",
                         bos_token_id=SOT, eos_token_id=EOT, pad_token_id=1),
        vision_config=dict(hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, hidden_act="quick_gelu"),
    )


SIGLIP_VOCAB, SIGLIP_CTX, SIGLIP_EOS, SIGLIP_PAD = 300, 16, 1, 1


def hf_siglip_config() -> transformers.SiglipConfig:
    return transformers.SiglipConfig(
        text_config=dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=SIGLIP_VOCAB, max_position_embeddings=SIGLIP_CTX, projection_size=96,
                         pad_token_id=SIGLIP_PAD, eos_token_id=SIGLIP_EOS, bos_token_id=None),
        vision_config=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
    )


def hf_upstream(make_model, label: str) -> Upstream:
    torch.manual_seed(zlib.crc32(label.encode()) % 1000)  # transformers' init uses the global generator
    model = perturb_(make_model(), seed=zlib.crc32(label.encode()) % 1000)
    size = model.config.vision_config.image_size
    if isinstance(model, transformers.SiglipModel):
        def tokens(b):
            return make_tokens(b, SIGLIP_CTX, eot=SIGLIP_EOS, lo=3, hi=SIGLIP_VOCAB, pad=SIGLIP_PAD, seed=b)
    else:
        def tokens(b):
            return clip_tokens(b, 77, seed=b)
    return Upstream(label, model, "hf", size, tokens)


def write_clip_tokenizer(directory: Path) -> None:
    """vocab.json / merges.txt / tokenizer.json of OpenAI's CLIP BPE (from open_clip's bundled file)."""
    st = open_clip.tokenizer.SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in st.encoder.items()}
    merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges]).save_pretrained(directory)


def write_siglip_tokenizer(directory: Path, vocab_size: int = SIGLIP_VOCAB) -> None:
    """A small sentencepiece model trained on a generated corpus, saved as a transformers SiglipTokenizer."""
    import sentencepiece as spm

    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "mu", "sen", "pa", "lo", "ve", "qui", "dra", "ne", "so", "xa", "bel", "tor"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    model_file = directory / "spiece.model"
    model_file.write_bytes(buf.getvalue())
    transformers.SiglipTokenizer(vocab_file=str(model_file)).save_pretrained(directory)


def save_siglip2_naflex(directory: Path, *, vision_width: int, text_width: int, patch: int, grid: int, budget: int,
                       vocab: int, context: int, seed: int, **text_extra):
    """A tiny perturbed transformers Siglip2Model with a NaFlex vision config, its Siglip2ImageProcessor
    (``budget`` = max_num_patches) and a sentencepiece tokenizer saved in ``directory`` -> (model, processor)."""
    cfg = transformers.Siglip2Config(
        text_config=dict(hidden_size=text_width, intermediate_size=112, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=vocab, max_position_embeddings=context, pad_token_id=1, eos_token_id=1,
                         bos_token_id=None, **text_extra),
        vision_config=dict(hidden_size=vision_width, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=patch, num_patches=grid * grid),
    )
    torch.manual_seed(seed)
    model = perturb_(transformers.Siglip2Model(cfg), seed=seed).eval()
    processor = transformers.Siglip2ImageProcessor(patch_size=patch, max_num_patches=budget)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    write_siglip_tokenizer(directory, vocab)
    return model, processor


def save_hf_dir(up: Upstream, directory: Path) -> Path:
    """save_pretrained + tokenizer files + preprocessor_config.json, as a hub repo holds them."""
    model = up.model
    model.save_pretrained(directory)
    size = up.image_size
    if isinstance(model, transformers.SiglipModel):
        write_siglip_tokenizer(directory)
        transformers.SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(directory)
    else:
        write_clip_tokenizer(directory)
        transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                        crop_size={"height": size, "width": size}).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- checkpoint files
def save_state_dict(sd: dict, path: Path, fmt: str) -> Path:
    """fmt: "bin" / "pt" (torch.save), "safetensors", "wrapper" (a training checkpoint: module.-prefixed)."""
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        safetensors.torch.save_file(sd, str(path))
    elif fmt == "wrapper":
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        torch.save(sd, path)
    return path


class Marker:
    """A pickle payload: unpickling it runs exec(), which writes ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        import builtins

        return builtins.exec, (f"open({self.path!r}, 'w').write('pwned')",)


# ---------------------------------------------------------------- a fake, offline Hugging Face hub cache
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes]) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        dst = snapshot / name
        if isinstance(src, bytes):
            dst.write_bytes(src)
        else:
            dst.symlink_to(Path(src).resolve())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def save_tiny_openai_checkpoint(path: Path, embed_dim: int = 64, width: int = 128) -> Path:
    """A small open_clip CLIP (quick GELU, 64 px images, patch 32, 2 layers per tower, seed 0) saved as an
    OpenAI-layout state dict at ``path``: fastclip.load infers its architecture from the shapes."""
    torch.manual_seed(0)
    upstream = open_clip.model.CLIP(
        embed_dim=embed_dim, quick_gelu=True, vision_cfg=dict(image_size=64, patch_size=32, width=width, layers=2),
        text_cfg=dict(context_length=77, vocab_size=49408, width=width, heads=2, layers=2))
    torch.save(upstream.state_dict(), path)
    return path


@torch.no_grad()
def calibrate_batchnorm_(model: torch.nn.Module, images: torch.Tensor, seed: int) -> torch.nn.Module:
    """Give every BatchNorm2d of ``model`` (an open_clip ResNet tower) gains 1 + N(0, 0.1), shifts N(0, 0.1) and
    running statistics of its own inputs on ``images`` (one train-mode pass), then moved off them (means
    + N(0, 0.05), variances x U(0.7, 1.4)): activations stay O(1) through the whole tower and no BatchNorm is
    near the identity, so folding it into the convolutions is really tested."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    last = {id(m.bn3) for m in model.modules() if hasattr(m, "conv3") and hasattr(m, "downsample")}
    for bn in norms:
        gain = 0.1 if id(bn) in last else 1.0  # a block's last BatchNorm: small, so the residual stream stays O(1)
        bn.weight.copy_(gain * (1 + 0.1 * torch.randn(bn.weight.shape, generator=gen)))
        bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=gen))
        bn.momentum = 1.0  # the running statistics become this batch's
    model.train()
    model(images)
    model.eval()
    for bn in norms:
        bn.momentum = 0.1
        bn.running_mean.add_(0.05 * torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.mul_(0.7 + 0.7 * torch.rand(bn.running_var.shape, generator=gen))
        bn.num_batches_tracked.fill_(1000 + seed)
    return model


OPENCLIP_CONFIG_DIR = Path(open_clip.__file__).parent / "model_configs"
TINY_RESNET_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}


def resnet_config(real: str, width: int | None = None) -> dict:
    """open_clip's config ``real`` (RN50, ...); with ``width``: that stem width (the real blocks per stage and
    image size) and a one-layer text tower, so every architecture runs in seconds."""
    raw = json.loads((OPENCLIP_CONFIG_DIR / f"{real}.json").read_text())
    if width is not None:
        raw = dict(raw, embed_dim=64, vision_cfg=dict(raw["vision_cfg"], width=width), text_cfg=dict(TINY_RESNET_TEXT))
    return raw


def resnet_upstream(label: str, raw: dict, seed: int) -> Upstream:
    """open_clip.model.CLIP of the ResNet config ``raw``, perturbed, its BatchNorms calibrated and moved
    (calibrate_batchnorm_)."""
    torch.manual_seed(seed)  # open_clip's init uses the global generator
    model = open_clip.model.CLIP(raw["embed_dim"], raw["vision_cfg"], raw["text_cfg"],
                                 quick_gelu=bool(raw.get("quick_gelu", False)))
    perturb_(model, seed)
    size = raw["vision_cfg"]["image_size"]
    calibrate_batchnorm_(model.visual, make_images(2, size, seed=100 + seed), seed)
    ctx = raw["text_cfg"]["context_length"]
    return Upstream(label, model, "open_clip", size, lambda b: clip_tokens(b, ctx, seed=b))
