"""The registries a new model family plugs into: tower types chosen by config, the op table, gated
activations, and the int8 declarations every module with linear layers must make."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm.layers
import torch
from torch import nn

import fastclip
from fastclip import ref
from fastclip.backends import int8
from fastclip.backends.dispatch import FUSED_NAMES, OP_NAMES, OpTable, get_ops
from fastclip.models import registry
from fastclip.models.clip import CLIP
from fastclip.models.config import parse_config
from fastclip.models.transformer import Mlp
from fastclip.tolerance import SAME_MODEL_ATOL, SAME_MODEL_RTOL

VIT = {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32}
TEXT = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}


# ---------------------------------------------------------------- a family defined in this file only
@dataclass(frozen=True)
class BagConfig:
    """A toy text tower: the mean of the token embeddings through one linear layer."""

    context_length: int = 16
    vocab_size: int = 100
    width: int = 32
    declare_int8: bool = True
    type: str = "bag"


class BagTower(nn.Module):
    int8_exempt = ("embedding.weight",)

    def __init__(self, cfg: BagConfig, embed_dim: int):
        super().__init__()
        self.cfg, self.trim_last_block = cfg, True
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.fc = nn.Linear(cfg.width, embed_dim)

    def int8_linears(self):
        if self.cfg.declare_int8:
            yield self.fc.weight, self.fc.bias

    def run_lengths(self, tokens):
        return None

    def apply_op(self, tokens, ops, normalize=False):
        y = ops.linear(self.embedding(tokens).mean(dim=1), self.fc.weight, self.fc.bias)  # (B, E)
        return ops.l2_normalize(y) if normalize else y


def _parse_bag(name, raw, quick_gelu):
    return BagConfig(**{k: v for k, v in raw.items() if k != "type"})


@pytest.fixture
def bag_type(monkeypatch):
    """The toy family registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_TOWERS", dict(registry._TOWERS))
    registry.register_tower("text", "bag", _parse_bag, BagTower)


def _config(text_cfg, **top):
    return parse_config("toy", {"embed_dim": 24, "vision_cfg": VIT, "text_cfg": text_cfg, **top})


def test_a_new_tower_type_is_a_module_and_its_config(bag_type):
    cfg = _config({"type": "bag", "width": 40})
    assert isinstance(cfg.text, BagConfig) and cfg.text.width == 40 and "bag" in registry.registered("text")
    model = CLIP(cfg).init_random(seed=0).eval()
    assert isinstance(model.text, BagTower)
    tokens = torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        out = model.encode_text(tokens, normalize=True)
        want = nn.functional.normalize(model.text.fc(model.text.embedding(tokens).mean(dim=1)), dim=-1)
    torch.testing.assert_close(out, want, rtol=SAME_MODEL_RTOL, atol=SAME_MODEL_ATOL)
    assert len(int8.quantize_model(model)) == 6 + 1  # the ViT block's six linear views and the bag's fc


def test_undeclared_linear_layers_cannot_stay_fp32_under_int8(bag_type):
    model = CLIP(_config({"type": "bag", "declare_int8": False})).init_random(seed=0)
    with pytest.raises(ValueError, match=r"text\.fc\.weight.*int8_linears"):
        int8.quantize_model(model)
    model = CLIP(_config(TEXT)).init_random(seed=0)
    model.visual.extra = nn.Linear(64, 64)  # a block added without declaring its linear layer
    with pytest.raises(ValueError, match=r"visual\.extra\.weight"):
        int8.quantize_model(model)


def test_unregistered_tower_types_are_named():
    with pytest.raises(ValueError, match=r"supported: .*\bresnet\b.*\bvit\b") as info:
        parse_config("odd", {"embed_dim": 8, "vision_cfg": {"type": "no-such-tower"}, "text_cfg": TEXT})
    assert "'no-such-tower' (an unknown tower type)" in str(info.value) and "'odd'" in str(info.value)


def test_layer_lists_are_resnet_towers():
    cfg = parse_config("odd", {"embed_dim": 8, "vision_cfg": {"layers": [3, 4, 6, 3], "width": 64, "image_size": 224},
                               "text_cfg": TEXT})
    assert (cfg.vision.type, cfg.vision.layers, cfg.vision.width) == ("resnet", (3, 4, 6, 3), 64)


def test_unsupported_timm_trunks_are_named():
    with pytest.raises(ValueError, match=r"'odd'.*timm trunk 'resnet50' is not supported"):
        parse_config("odd", {"embed_dim": 8, "vision_cfg": {"timm_model_name": "resnet50", "image_size": 224},
                             "text_cfg": TEXT})


def test_hf_text_towers_parse_by_name():
    cfg = parse_config("odd", {"embed_dim": 8, "vision_cfg": VIT, "text_cfg": {"hf_model_name": "xlm-roberta-base"}})
    assert (cfg.text.type, cfg.text.width, cfg.text.layers, cfg.text.vocab_size) == ("hf", 768, 12, 250002)
    with pytest.raises(ValueError, match=r"'no-such/model' is not a model fastclip knows.*hf_model_config"):
        parse_config("odd", {"embed_dim": 8, "vision_cfg": VIT, "text_cfg": {"hf_model_name": "no-such/model"}})


def test_op_names_are_the_op_table_fields():
    assert OP_NAMES + FUSED_NAMES == tuple(f for f in OpTable.__dataclass_fields__ if f != "backend")
    assert get_ops("ref").encoder_block is None  # fused ops are optional; the plain tables compose them
    for name in OP_NAMES:
        assert callable(getattr(ref, name)), f"fastclip.ref has no op {name!r}"
        for backend in ("ref", "cpu"):
            assert callable(getattr(get_ops(backend), name))


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_gated_mlp_equals_timm_glu_mlp(backend):
    """A SwiGLU MLP is one linear_act over [gate; value] rows: equal to timm's GluMlp (gate first). The cpu
    and triton tables run it as the reference op (their kernels implement the ungated activations)."""
    torch.manual_seed(0)
    ours = Mlp(48, 80, "swiglu")
    assert ours.c_fc.weight.shape == (160, 48) and ours.c_proj.weight.shape == (48, 80)
    theirs = timm.layers.GluMlp(48, hidden_features=160, act_layer=nn.SiLU, gate_last=False)
    theirs.fc1.load_state_dict(ours.c_fc.state_dict())
    theirs.fc2.load_state_dict(ours.c_proj.state_dict())
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours.apply_op(x, get_ops(backend)), theirs(x), rtol=SAME_MODEL_RTOL,
                                   atol=SAME_MODEL_ATOL)


def test_gated_activation_in_a_model_config():
    cfg = _config(dict(TEXT, act="swiglu"))
    model = CLIP(cfg).init_random(seed=0).eval()
    assert model.text.transformer.resblocks[0].mlp.c_fc.weight.shape == (2 * 128, 32)
    assert model.encode_text(torch.randint(0, 99, (2, 16))).shape == (2, 24)
    with pytest.raises(ValueError, match="relu"):
        _config(dict(TEXT, act="relu"))


def test_every_builtin_config_builds_through_the_registry():
    vision, text = set(registry.registered("vision")), set(registry.registered("text"))
    builtins = sorted(p.stem for p in (Path(fastclip.__file__).parent / "models" / "configs").glob("*.json"))
    assert set(builtins) <= set(fastclip.list_models())
    for name in builtins:  # (other tests register configs of their own)
        cfg = fastclip.get_model_config(name)
        assert cfg.vision.type in vision and cfg.text.type in text
        vision_type = ("timm" if name.startswith(("EVA", "PE-Core", "MobileCLIP")) else
                       "resnet" if name.startswith(("RN", "CN-CLIP-RN")) else "vit")
        text_type = "hf" if name.startswith(("xlm-roberta", "roberta", "CN-CLIP")) else "clip"
        assert (cfg.vision.type, cfg.text.type) == (vision_type, text_type), name
