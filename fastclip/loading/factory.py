"""Creating and loading models: ``fastclip.load`` / ``fastclip.create_model`` / ``fastclip.get_tokenizer``."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..backends import bf16
from ..backends import int8 as quant
from ..errors import CheckpointError, UnknownModelError
from ..models.clip import CLIP
from ..models.config import ModelConfig, get_model_config, list_models, parse_config
from . import hub, keymaps, keymaps_chinese_clip, keymaps_eva, keymaps_eva_baai, keymaps_mobileclip, keymaps_pe_meta
from .checkpoints import read_state_dict

# "int8": fp32 master weights, linear layers packed as int8 after loading (fastclip/backends/int8.py)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def _check_precision(precision: str, device, backend: str | None) -> None:
    """Raise ValueError before any work if ``precision`` cannot run on ``device`` with ``backend``."""
    _dtype(precision)
    if precision == "int8":
        quant.check_int8(device, backend)
    elif precision == "bf16":
        bf16.check_bf16(device, backend)


def _finish(model: CLIP, precision: str, backend: str | None) -> CLIP:
    """Resolve the backend; for int8, pack the linear layers (fp32 weights loaded) and keep them packed."""
    if precision == "int8":  # smoothing from a built-in synthetic calibration set (docs/int8.md)
        from ..quantize import default_plan

        model.int8_weights = quant.quantize_model(model, default_plan(model))
    return model.set_backend(backend)


def _attach_io(model: CLIP, tokenizer_dir: Path | None, preprocess_cfg=None, repo_id: str | None = None) -> CLIP:
    """Give the model its tokenizer and image preprocessing. A SigLIP directory without tokenizer files
    loads with ``tokenizer`` None and ``tokenizer_missing`` saying which files to add (embed_texts raises it)."""
    from ..data.preprocess import Preprocess, PreprocessConfig

    cfg, spec = model.cfg, model.cfg.preprocess
    if preprocess_cfg is None:
        preprocess_cfg = PreprocessConfig(cfg.vision.image_size, tuple(spec.mean), tuple(spec.std),
                                          spec.resize_mode, spec.interpolation)
    model.preprocess = Preprocess(preprocess_cfg)
    model.tokenizer = _tokenizer_for(cfg, tokenizer_dir)
    if model.tokenizer is None and tokenizer_dir is not None:
        from ..data.tokenizers import siglip_tokenizer_help

        model.tokenizer_missing = siglip_tokenizer_help(tokenizer_dir, repo_id)
    if model.tokenizer is None and tokenizer_dir is not None and cfg.tokenizer == "wordpiece":  # Chinese-CLIP
        model.tokenizer_missing = (f"{tokenizer_dir} has no vocab.txt (nor a WordPiece tokenizer.json); copy the "
                                   "model's tokenizer files into it, or set model.tokenizer = "
                                   "fastclip.tokenizer.WordPieceTokenizer.chinese_clip() (cn_clip's vocabulary)")
    return model


def _tokenizer_for(cfg: ModelConfig, tokenizer_dir: Path | None):
    if cfg.tokenizer == "wordpiece":  # Chinese-CLIP: the directory's BERT vocabulary, else cn_clip's bundled one
        return _wordpiece_tokenizer(cfg, tokenizer_dir)
    if getattr(cfg.text, "hf_tokenizer_name", None):  # open_clip's HFTokenizer (MetaCLIP 2): the directory's files
        try:
            return None if tokenizer_dir is None else _hf_text_tokenizer(cfg, tokenizer_dir)
        except FileNotFoundError:  # no tokenizer files: the model loads without a tokenizer
            return None
    if cfg.tokenizer == "clip":
        from ..data.tokenizers import ClipTokenizer

        return ClipTokenizer(context_length=cfg.text.context_length)
    if tokenizer_dir is not None:
        from ..data.tokenizers import SiglipTokenizer, has_siglip_vocab

        if has_siglip_vocab(tokenizer_dir):  # save_pretrained of a SiglipModel alone writes none
            return SiglipTokenizer.from_dir(tokenizer_dir, context_length=cfg.text.context_length)
    return None  # no tokenizer files (or a random-weight SigLIP model); embed_texts says so


TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt"]  # the tokenizer files of a hub repo


def _wordpiece_tokenizer(cfg: ModelConfig, tokenizer_dir: Path | None):
    """Chinese-CLIP's WordPiece tokenizer: a transformers directory's (None if it has no vocabulary), or with no
    directory (cn_clip files, create_model) the bundled cn_clip vocabulary."""
    from ..data.wordpiece import WordPieceTokenizer, has_wordpiece_vocab

    if tokenizer_dir is None:
        return WordPieceTokenizer.chinese_clip(cfg.text.context_length)
    if has_wordpiece_vocab(tokenizer_dir):
        return WordPieceTokenizer.from_dir(tokenizer_dir, cfg.text.context_length)
    return None


def _hf_text_tokenizer(cfg: ModelConfig, tokenizer_dir: Path):
    """open_clip's HFTokenizer over ``tokenizer_dir`` (text_cfg ``hf_tokenizer_name`` / ``tokenizer_kwargs.clean``)."""
    from ..tokenizer import HFTokenizer

    return HFTokenizer(tokenizer_dir, cfg.text.context_length, cfg.text.tokenizer_clean)


def _attach_hub_tokenizer(model: CLIP) -> CLIP:
    """A model whose text_cfg names ``hf_tokenizer_name`` (MetaCLIP 2) and that has no tokenizer yet gets it
    from that hub repo, as open_clip.get_tokenizer does; if the repo cannot be had (offline, not cached) the
    model loads without one and ``tokenizer_missing`` says why."""
    repo = getattr(model.cfg.text, "hf_tokenizer_name", None)
    if model.tokenizer is not None or not repo:
        return model
    from ..errors import FastclipError

    try:
        model.tokenizer = _hf_text_tokenizer(model.cfg, hub.download_repo(repo, TOKENIZER_PATTERNS))
    except (FastclipError, FileNotFoundError) as exc:
        model.tokenizer_missing = f"its tokenizer ({repo}) could not be loaded: {exc}"
    return model


def _check_keys(model: CLIP, sd: dict, source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in expected:  # BatchNorm's step counter: torch's own strict load accepts a state dict without it
        if key.endswith(".num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mis_shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                  for k in sorted(set(expected) & set(sd)) if tuple(sd[k].shape) != expected[k]]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mis_shaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit model {model.cfg.name!r}: " + "; ".join(problems))


def _build(cfg: ModelConfig, sd: dict, source: str, device, precision: str, backend: str) -> CLIP:
    """Instantiate on the meta device and assign the checkpoint's tensors (no random init, no copies
    beyond the final dtype/device cast)."""
    _check_precision(precision, device, backend)
    dtype = _dtype(precision)
    for key, shape in (("log_logit_scale", ()), ("logit_bias", (1,))):
        if key in sd and sd[key].numel() == 1:
            sd[key] = sd[key].reshape(shape)
    with torch.device("meta"):
        model = CLIP(cfg, backend="ref")
    _check_keys(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    return _finish(model, precision, backend)


def _outside_inference_mode(fn):
    """Build models from normal tensors even when called under ``torch.inference_mode()``: an inference
    tensor has no version counter, so the packed and int8 copies derived from its weights could not be
    cached (fastclip/backends/weight_packs.py) and views of it would not find their parameter."""
    @functools.wraps(fn)
    def build(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return build


@_outside_inference_mode
def create_model(name: str, device="cpu", precision: str = "fp32", backend: str | None = None,
                 seed: int | None = 0) -> CLIP:
    """A model of a registered architecture with random weights (OpenCLIP's init scheme).

    ``precision``: "fp32", "fp16", "bf16", or "int8" (CPU only: int8 linear layers, see fastclip/backends/int8.py).
    """
    _check_precision(precision, device, backend)
    cfg = get_model_config(name)
    model = CLIP(cfg, backend="ref").init_random(seed).to(device=device, dtype=_dtype(precision)).eval()
    model = _attach_io(_finish(model, precision, backend), None)
    if getattr(cfg.vision, "type", None) == "naflex":  # SigLIP 2 NaFlex: patch-budget preprocessing
        from ..data.naflex import attach_naflex_preprocess

        model = attach_naflex_preprocess(model)
    return model


def _with_quick_gelu(cfg: ModelConfig) -> ModelConfig:
    """A pretrained tag marked quick_gelu, as open_clip applies it: to the image tower and to a CLIP text tower
    (a Hugging Face text model keeps its own activation)."""
    text = replace(cfg.text, act="quick_gelu") if cfg.text.type == "clip" else cfg.text
    return replace(cfg, vision=replace(cfg.vision, act="quick_gelu"), text=text)


def _weights_file_of(directory: Path) -> Path:
    for name in _HF_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(_HF_WEIGHTS)}")


def _read_weights(path: Path, trust: bool) -> dict:
    """A weights file, or a sharded checkpoint's index JSON (each shard read in turn)."""
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(read_state_dict(path.parent / shard, trust=trust))
        return sd
    return read_state_dict(path, trust=trust)


def _load_hf_dir(directory: Path, cfg: ModelConfig | None, device, precision, backend, trust,
                 name: str | None = None) -> CLIP:
    from ..data.preprocess import PreprocessConfig

    hf_cfg = json.loads((directory / "config.json").read_text())
    if keymaps_eva.is_timm_trunk_config(hf_cfg):  # timm/<trunk>.<tag>: an image trunk alone
        raise CheckpointError(keymaps_eva.timm_trunk_repo_error(directory, hf_cfg))
    cfg = cfg or keymaps.config_from_hf(hf_cfg, name or hf_cfg.get("_name_or_path") or directory.name)
    weights = _weights_file_of(directory)
    sd = keymaps.from_hf(_read_weights(weights, trust), cfg)
    model = _build(cfg, sd, str(weights), device, precision, backend)
    pre_file = directory / "preprocessor_config.json"
    if getattr(cfg.vision, "type", None) == "naflex":  # SigLIP 2 NaFlex: patch-budget preprocessing
        from ..data.naflex import attach_naflex_preprocess

        return attach_naflex_preprocess(_attach_io(model, directory, None, name), pre_file)
    pre = PreprocessConfig.from_hf(json.loads(pre_file.read_text())) if pre_file.is_file() else None
    if pre is None and (directory / "processor_config.json").is_file():  # transformers 5's processor save_pretrained
        nested = json.loads((directory / "processor_config.json").read_text()).get("image_processor")
        pre = PreprocessConfig.from_hf(nested) if isinstance(nested, dict) else None
    return _attach_io(model, directory, pre, name)  # name: the hub id the directory came from, if any


def _load_openclip_dir(directory: Path, device, precision, backend, trust, name: str | None = None) -> CLIP:
    """An OpenCLIP hub repo: open_clip_config.json (model_cfg, preprocess_cfg) + weights."""
    meta = json.loads((directory / "open_clip_config.json").read_text())
    raw = dict(meta["model_cfg"])
    pre = meta.get("preprocess_cfg", {})
    raw.setdefault("preprocess", {k: pre[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pre})
    cfg = parse_config(name or directory.name, raw)
    weights = next((directory / f for f in hub.OPENCLIP_WEIGHTS if (directory / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(hub.OPENCLIP_WEIGHTS)}")
    return _from_state_dict(cfg, read_state_dict(weights, trust=trust), str(weights), device, precision, backend,
                            _own_tokenizer_dir(cfg, directory))


_TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "spiece.model")


def _own_tokenizer_dir(cfg: ModelConfig, directory: Path) -> Path | None:
    """``directory`` if it holds the tokenizer files of its text_cfg's ``hf_tokenizer_name`` (open_clip's
    push_to_hf_hub saves them beside the weights), else None (that hub repo is read instead)."""
    if getattr(cfg.text, "hf_tokenizer_name", None) and any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return directory
    return None


def _from_state_dict(cfg: ModelConfig, sd: dict, source: str, device, precision, backend,
                     tokenizer_dir: Path | None = None) -> CLIP:
    if keymaps_chinese_clip.is_chinese_clip_layout(sd):  # ChineseCLIPModel / OFA-Sys cn_clip state dicts
        sd = keymaps_chinese_clip.from_chinese_clip(sd, cfg)
        return _attach_io(_build(cfg, sd, source, device, precision, backend), tokenizer_dir)
    if keymaps.is_hf_layout(sd):
        sd = keymaps.from_hf(sd, cfg)
    elif keymaps_eva.is_openclip_eva_layout(sd):
        sd = keymaps_eva.from_openclip_eva(sd)
    elif keymaps_mobileclip.is_openclip_mci_layout(sd):  # MobileCLIP2-B: a timm trunk with a convolutional stem
        sd = keymaps_mobileclip.from_openclip_mci(sd)
    elif keymaps_eva_baai.is_baai_eva_layout(sd):  # BAAI EVA-CLIP release files
        sd = keymaps_eva_baai.from_baai_eva(sd)
    elif keymaps_pe_meta.is_meta_pe_layout(sd):  # Meta's Perception Encoder release files (facebook/PE-Core-*)
        sd = keymaps_pe_meta.from_meta_pe(sd)
    elif keymaps.is_openclip_layout(sd) or keymaps.is_openclip_hf_text_layout(sd):  # hf text: open_clip's names
        sd = keymaps.from_openclip(sd)
    elif ("visual.conv1.weight" in sd and "text.token_embedding.weight" in sd) or keymaps_eva.is_fastclip_eva_layout(sd):
        pass  # fastclip's own names: torch.save(model.state_dict()) of a fastclip model
    elif keymaps_mobileclip.is_fastclip_mci_layout(sd):
        pass  # fastclip's own names of a model with a convolutional stem
    else:
        raise CheckpointError(
            f"checkpoint {source} is neither an OpenAI/OpenCLIP nor a Hugging Face CLIP/SigLIP state dict "
            f"(first keys: {', '.join(list(sd)[:5])})"
        )
    return _attach_hub_tokenizer(_attach_io(_build(cfg, sd, source, device, precision, backend), tokenizer_dir))


def _load_meta_pe(arch: str, sd: dict, source: str, device, precision, backend) -> CLIP:
    """A Meta PE-Core state dict (keymaps_pe_meta) as architecture ``arch``, with the preprocessing Meta trained
    with (its ``meta`` tag's: mean and std 0.5, squash resize, bilinear)."""
    cfg = get_model_config(arch)
    pre = hub.pretrained_entry(cfg.name, "meta").get("preprocess", {})
    cfg = replace(cfg, preprocess=replace(cfg.preprocess, **{k: tuple(v) if isinstance(v, list) else v
                                                             for k, v in pre.items()}))
    return _from_state_dict(cfg, sd, source, device, precision, backend)


def _load_int8_file(path: Path, cfg: ModelConfig | None, device, precision, backend) -> CLIP:
    """A checkpoint written by ``fastclip quantize`` (fastclip/quantize.py): int8 weights and the calibrated
    plan, used as they are. ``cfg`` None: the architecture named in the file's metadata."""
    from .. import quantize

    if cfg is None:
        name = quantize.int8_file_model(path)
        if name not in list_models():
            raise UnknownModelError(f"{path} is an int8 checkpoint of {name!r}, which is not a registered architecture; "
                                    f"add its config (fastclip.add_model_config) or load({name!r}, pretrained=...)")
        cfg = get_model_config(name)
    def build(sd: dict, p: str) -> CLIP:  # the file holds fastclip's own names: no key map
        return _attach_hub_tokenizer(_attach_io(_build(cfg, sd, str(path), device, p, backend), None))

    return quantize.load_int8_file(path, build, precision, backend)


def _load_dir_int8(directory: Path, path: Path, device, precision, backend, trust) -> CLIP:
    """``load(model_dir, pretrained=int8_file)``: the int8 file ``fastclip quantize`` wrote for a model directory
    (a transformers / OpenCLIP directory has no registered architecture name), with the directory's config,
    tokenizer and preprocessing."""
    from .. import quantize

    if not quantize.is_int8_file(path):
        raise CheckpointError(f"load({str(directory)!r}, pretrained={str(path)!r}): a model directory takes no "
                              f"pretrained= other than an int8 file written for it by `fastclip quantize`")
    base = _load_path(directory, device, "fp32", "ref", trust)
    model = _load_int8_file(path, base.cfg, device, precision, backend)
    for io in ("preprocess", "tokenizer", "tokenizer_missing"):
        if hasattr(base, io):
            setattr(model, io, getattr(base, io))
    return model


def _is_timm_and_openclip_dir(path: Path) -> bool:
    """A hub repo of the timm org that holds both timm's image trunk (config.json with ``architecture``,
    model.safetensors) and open_clip's whole model (open_clip_config.json + weights): the open_clip files load."""
    if not (path / "open_clip_config.json").is_file() or not (path / "config.json").is_file():
        return False
    try:
        return keymaps_eva.is_timm_trunk_config(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def _load_path(path: Path, device, precision, backend, trust, name: str | None = None) -> CLIP:
    """``name``: the hub id a downloaded directory came from (its snapshot folder is named by a commit hash)."""
    if path.is_dir():
        if _is_timm_and_openclip_dir(path):  # timm/resnet50_clip.openai: timm's trunk files and open_clip's
            return _load_openclip_dir(path, device, precision, backend, trust, name)
        if (path / "config.json").is_file():
            return _load_hf_dir(path, None, device, precision, backend, trust, name)
        if (path / "open_clip_config.json").is_file():
            return _load_openclip_dir(path, device, precision, backend, trust, name)
        raise CheckpointError(f"{path} holds neither a Hugging Face model (config.json) nor an OpenCLIP one "
                              f"(open_clip_config.json)")
    from .. import quantize

    if quantize.is_int8_file(path):
        return _load_int8_file(path, None, device, precision, backend)
    sd = read_state_dict(path, trust=trust)
    if keymaps.is_hf_layout(sd):
        raise CheckpointError(f"{path} is a Hugging Face state dict: load its directory (with config.json) instead")
    if keymaps_eva_baai.is_baai_eva_layout(sd):
        raise CheckpointError(keymaps_eva_baai.needs_name(str(path), sd))
    if keymaps_chinese_clip.is_cn_clip_layout(sd):  # OFA-Sys cn_clip .pt: the CN-CLIP architecture its shapes fit
        cfg = get_model_config(keymaps_chinese_clip.architecture_of(str(path), sd))
        return _from_state_dict(cfg, sd, str(path), device, precision, backend)
    if keymaps_pe_meta.is_meta_pe_layout(sd):  # no config in the file: the architecture from its shapes
        return _load_meta_pe(keymaps_pe_meta.architecture_of(str(path), sd), sd, str(path), device, precision, backend)
    try:
        cfg = keymaps.infer_openai_config(sd, name=path.stem)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    return _from_state_dict(cfg, sd, str(path), device, precision, backend)


@_outside_inference_mode
def load(name_or_path: str | os.PathLike, pretrained: str | os.PathLike | None = None, device="cpu",
         precision: str = "fp32", backend: str | None = None, trust: bool = False) -> CLIP:
    """Load a model with its weights, tokenizer and preprocessing.

    - ``load("ViT-B-32", pretrained="laion2b_s34b_b79k")``: architecture name + pretrained tag;
    - ``load("ViT-B-32-quickgelu", pretrained="/path/to/weights.safetensors")``: name + checkpoint
      (OpenCLIP ``.bin``/``.pt``/``.safetensors``, OpenAI state dict or TorchScript archive, HF state dict);
    - ``load("/path/to/ViT-B-32.pt")``: an OpenAI checkpoint alone (architecture inferred from shapes);
    - ``load("/path/to/hf_dir")`` or ``load("openai/clip-vit-base-patch32")``: a transformers
      CLIPModel/SiglipModel directory or hub id; ``load("hf-hub:laion/...")``: an OpenCLIP hub repo;
    - ``load("hf-hub:facebook/PE-Core-B16-224")`` (or without ``hf-hub:``): Meta's own Perception Encoder release
      (its ``.pt``, keymaps_pe_meta.py), as the architecture of the same model with Meta's preprocessing.

    Checkpoints never run code: pickles load with ``weights_only=True`` and TorchScript archives are
    read as data, unless ``trust=True``. ``backend``: "auto", "ref", "cpu" (alias "cpp") or "triton"; None (the
    default) means the ``FASTCLIP_BACKEND`` environment variable if set, else "auto". ``precision``:
    "fp32", "fp16", "bf16", or "int8" (CPU only: the fp32 weights load, then the linear layers are
    quantised to int8 and pre-packed; see fastclip/backends/int8.py).
    """
    _check_precision(precision, device, backend)
    name = os.fspath(name_or_path)
    if pretrained is None and Path(name).exists():
        return _load_path(Path(name), device, precision, backend, trust)
    if pretrained is not None and Path(name).is_dir():
        return _load_dir_int8(Path(name), Path(os.fspath(pretrained)).expanduser(), device, precision, backend, trust)
    if pretrained is None and (meta := keymaps_pe_meta.meta_repo(name)) is not None:  # facebook/PE-Core-*: one .pt
        weights = hub.download_file(meta, keymaps_pe_meta.weights_file(meta))
        return _load_meta_pe(keymaps_pe_meta.META_REPOS[meta], read_state_dict(weights, trust=trust), str(weights),
                             device, precision, backend)
    if name.startswith("hf-hub:"):
        repo_id = name[len("hf-hub:"):]
        return _load_path(hub.download_repo(repo_id), device, precision, backend, trust, repo_id)
    if name not in list_models() and name.replace("/", "-") not in list_models():
        if "/" in name and pretrained is None and not name.startswith((".", "/", "~")):
            return _load_path(hub.download_repo(name), device, precision, backend, trust, name)
        import difflib

        close = difflib.get_close_matches(name.replace("/", "-"), list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see fastclip.list_models())"
        raise UnknownModelError(f"{name!r} is neither a file, a directory, a hub id nor a known architecture{hint}")
    cfg = get_model_config(name)
    if pretrained is None:
        tags = ", ".join(hub.pretrained_tags(cfg.name)) or "none published"
        raise ValueError(f"load({name!r}) needs pretrained= a tag ({tags}) or a checkpoint path; "
                         f"fastclip.create_model({name!r}) makes a randomly initialised model")
    path = Path(os.fspath(pretrained)).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / "config.json").is_file():
                return _load_hf_dir(path, cfg, device, precision, backend, trust)
            return _load_path(path, device, precision, backend, trust)
        from .. import quantize

        if quantize.is_int8_file(path):  # written by `fastclip quantize`: int8 weights and plan, no calibration
            return _load_int8_file(path, cfg, device, precision, backend)
        return _from_state_dict(cfg, read_state_dict(path, trust=trust), str(path), device, precision, backend)
    entry = hub.pretrained_entry(cfg.name, os.fspath(pretrained))
    if entry.get("quick_gelu"):
        cfg = _with_quick_gelu(cfg)
    if entry.get("preprocess"):
        cfg = replace(cfg, preprocess=replace(cfg.preprocess, **{k: tuple(v) if isinstance(v, list) else v
                                                                 for k, v in entry["preprocess"].items()}))
    if entry["format"] == "hf":
        return _load_hf_dir(hub.download_repo(entry["hf_hub"]), cfg, device, precision, backend, trust,
                            entry["hf_hub"])
    weights = hub.download_openclip_weights(entry["hf_hub"])
    return _from_state_dict(cfg, read_state_dict(weights, trust=trust), str(weights), device, precision, backend)


def get_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of an architecture name, a model directory, or a hub id."""
    from ..data.tokenizers import ClipTokenizer, tokenizer_from_dir

    name = os.fspath(name_or_path)
    if Path(name).is_dir():
        if keymaps_chinese_clip.is_chinese_clip_dir(Path(name)):  # ChineseCLIPModel: its BERT WordPiece vocabulary
            from ..data.wordpiece import WordPieceTokenizer

            return WordPieceTokenizer.from_dir(name, keymaps_chinese_clip.CONTEXT_LENGTH)
        if keymaps.is_metaclip2_dir(Path(name)):  # MetaClip2Model: its tokenizer as transformers runs it
            return _hf_text_tokenizer(keymaps.config_from_hf(json.loads((Path(name) / "config.json").read_text()),
                                                              name), Path(name))
        return tokenizer_from_dir(name)
    if name in list_models():
        cfg = get_model_config(name)
        if cfg.tokenizer == "wordpiece":  # Chinese-CLIP: cn_clip's bundled vocabulary
            return _wordpiece_tokenizer(cfg, None)
        if getattr(cfg.text, "hf_tokenizer_name", None):  # open_clip's HFTokenizer (MetaCLIP 2)
            return _hf_text_tokenizer(cfg, hub.download_repo(cfg.text.hf_tokenizer_name, TOKENIZER_PATTERNS))
        if cfg.tokenizer == "clip":
            return ClipTokenizer(context_length=cfg.text.context_length)
        tags = hub.pretrained_tags(name)
        if not tags:
            raise UnknownModelError(f"{name} has no published tokenizer; pass a directory with tokenizer files")
        repo = hub.pretrained_entry(name, tags[0])["hf_hub"]
        return tokenizer_from_dir(hub.download_repo(repo, ["*.json", "*.model", "*.txt"]), cfg.text.context_length)
    if "/" in name:
        return tokenizer_from_dir(hub.download_repo(name.removeprefix("hf-hub:"), ["*.json", "*.model", "*.txt"]))
    raise UnknownModelError(f"unknown model {name!r} (see fastclip.list_models())")
