"""Model factory: one `build_model(cfg)` for every backbone, each topped by the 6-zone x 5-class CSI head."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from csi_dist.core.config import ModelConfig
from csi_dist.core.domain import NUM_CLASSES, NUM_ZONES

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model that cannot be built: unknown name, missing or mismatched weights file."""


CUSTOM_1_WIDTHS = (64, 128, 256, 512, 1024)  # the seed's Custom_1
TINY_CNN_WIDTHS = (8, 16, 32, 64, 128)  # Custom_1 at 1/8 of its widths: 0.1M parameters instead of 6.3M


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str | None  # None = our own Custom_1 CNN, at `widths`
    input_size: int
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    widths: tuple[int, ...] = CUSTOM_1_WIDTHS


# The seed project's names (case, "_" and "-" ignored) -> timm backbones and native input sizes.
NAMED_BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec("resnet50", 224),
    "chexnet": BackboneSpec("densenet121", 224),
    "densenet121": BackboneSpec("densenet121", 224),
    "raddino": BackboneSpec("vit_base_patch14_dinov2", 518, (("img_size", 518),)),
    "custom1": BackboneSpec(None, 224),
    # for smoke tests of a pipeline (CI, a first run on a new cluster), not for results: it trains and checkpoints
    # the way Custom_1 does, with checkpoints of 2 MB instead of 100 MB
    "tinycnn": BackboneSpec(None, 224, widths=TINY_CNN_WIDTHS),
}


def _canonical(name: str) -> str:
    return re.sub(r"[_\-\s]", "", name.lower())


def backbone_spec(model_arch: str) -> BackboneSpec:
    """The backbone for a config name: a named CSI backbone or any timm model name."""
    named = NAMED_BACKBONES.get(_canonical(model_arch))
    if named is not None:
        return named
    import timm  # 2-4 s of imports (torchvision, torch._dynamo) that Custom_1 runs never pay
    if model_arch in timm.list_models():
        default = timm.get_pretrained_cfg(model_arch)
        size = default.input_size[-1] if default is not None else 224
        return BackboneSpec(model_arch, size)
    raise ModelError(
        f"unknown model_arch {model_arch!r}: use ResNet50, CheXNet, RadDINO, Custom_1 (Tiny_CNN: its 0.1M-parameter "
        f"version for smoke tests) or a timm model name "
        f"(timm.list_models() lists them)")


class Custom1Backbone(nn.Module):
    """The seed's small 5-stage CNN (7x7/2 -> 64, 5x5/2 -> 128, then 3x3/2 -> 256, 512, 1024), global average pooled;
    Tiny_CNN is the same at other `widths`."""

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = CUSTOM_1_WIDTHS):
        super().__init__()
        kernels, pools = (7, 5, 3, 3, 3), (True, True, False, False, False)
        stages = list(zip((in_chans, *widths[:-1]), widths, kernels, pools))
        layers: list[nn.Module] = []
        for in_channels, out_channels, kernel, pool in stages:
            layers += [nn.Conv2d(in_channels, out_channels, kernel, stride=2, padding=kernel // 2, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(images)).flatten(1)


class CSIModel(nn.Module):
    """Backbone features -> dropout -> one linear map per zone (stored as a single matrix) -> B x 6 x 5 logits."""

    def __init__(self, backbone: nn.Module, num_features: int, dropout_rate: float):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout_rate)
        self.zone_head = nn.Linear(num_features, NUM_ZONES * NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        zone_logits = self.zone_head(self.dropout(features))
        # a fresh tensor, not a view: FSDP2 cannot hook in-place ops on a view of a module output
        return zone_logits.view(-1, NUM_ZONES, NUM_CLASSES).clone()


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"pretrained weights file not found: {path} (csi_dist never downloads weights; "
                         f"copy the file to the cluster and set model.pretrained_weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure is reported with the file name
        raise ModelError(f"cannot read pretrained weights {path}: {error}") from error
    for wrapper_key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    return {re.sub(r"^(module\.|backbone\.)", "", key): value for key, value in state.items()}


# Hugging Face Dinov2Model names (the format of microsoft/rad-dino) -> timm ViT names. Both the transformers 4
# (attention.attention.query, attention.output.dense) and transformers 5 (attention.q_proj, o_proj) spellings.
_HF_DINOV2_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.(norm[12]|mlp\.fc[12])\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")


def _timm_from_hf_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face Dinov2Model state dict in timm's ViT layout (separate q/k/v projections -> one qkv)."""
    converted: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("dinov2.")
        qkv = _HF_QKV.match(key)
        if qkv:
            block, long_name, short_name, kind = qkv.groups()
            qkv_parts.setdefault((block, kind), {})[(long_name or short_name)[0]] = value
            continue
        for pattern, replacement in _HF_DINOV2_RENAMES:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = value
                break
    for (block, kind), parts in qkv_parts.items():
        converted[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def _load_backbone_weights(backbone: nn.Module, path: Path, timm_name: str | None) -> None:
    state = _load_state_dict_file(path)
    if any(key.removeprefix("dinov2.").startswith("encoder.layer.") for key in state):
        state = _timm_from_hf_dinov2(state)
    if timm_name is not None and timm_name.startswith("vit_"):
        from timm.models.vision_transformer import checkpoint_filter_fn
        state = checkpoint_filter_fn(state, backbone)  # DINOv2 layout -> timm, resamples position embeddings
    own = backbone.state_dict()
    for key, value in list(state.items()):
        if key in own and value.ndim == 4 and value.shape[1] == 3 and own[key].shape[1] == 1:
            from timm.models import adapt_input_conv
            state[key] = adapt_input_conv(1, value)  # RGB stem -> grayscale stem
    state = {key: value for key, value in state.items() if key in own}
    if not state:
        raise ModelError(f"{path}: no tensor matches the {timm_name or 'Custom_1'} backbone; "
                         f"is it a checkpoint of another architecture?")
    mismatched = [key for key, value in state.items() if value.shape != own[key].shape]
    if mismatched:
        raise ModelError(f"{path}: shape mismatch for {mismatched[:3]} (weights of another architecture?)")
    missing = [key for key in own if key not in state]
    backbone.load_state_dict(state, strict=False)
    log.info("loaded %d backbone tensors from %s (%d left at initialisation)", len(state), path, len(missing))


def is_vision_transformer(spec: BackboneSpec) -> bool:
    """A ViT: built for one input size (its position embeddings), and never channels_last."""
    return spec.timm_name is not None and spec.timm_name.startswith(("vit_", "test_vit"))


def _vit_kwargs(spec: BackboneSpec, image_size: int | None) -> dict[str, object]:
    """A ViT follows the data's size (`data.image_size`): timm sizes its position embeddings for it, and resamples
    pretrained ones when they are loaded. The size must be a whole number of patches."""
    kwargs = dict(spec.timm_kwargs)
    if image_size is None or not is_vision_transformer(spec):
        return kwargs
    patch = _patch_size(spec.timm_name)
    if image_size % patch:
        raise ModelError(f"data.image_size = {image_size} does not fit {spec.timm_name}: a ViT needs a multiple of "
                         f"its patch size {patch} (e.g. {image_size // patch * patch or patch} or "
                         f"{(image_size // patch + 1) * patch})")
    return kwargs | {"img_size": image_size}


INPUT_CHANNELS = 1  # radiographs are grayscale: every backbone takes one channel


def model_input_size(cfg: ModelConfig, data_image_size: int) -> int:
    """The side length the model sees: `data.image_size`, or the backbone's native size when that is 0."""
    return data_image_size or backbone_spec(cfg.model_arch).input_size


def uses_channels_last(cfg: ModelConfig) -> bool:
    """channels_last memory for the timm CNNs that gain from it (not ViTs, not Custom_1)."""
    spec = backbone_spec(cfg.model_arch)
    return cfg.channels_last and spec.timm_name is not None and not is_vision_transformer(spec)


def _patch_size(timm_name: str) -> int:
    """From timm's naming (vit_base_patch14_dinov2 -> 14); its test ViTs use 16."""
    match = re.search(r"patch(\d+)", timm_name)
    return int(match.group(1)) if match else 16


def build_model(cfg: ModelConfig, image_size: int | None = None) -> nn.Module:
    """The CSI model for `cfg.model_arch`, single-channel input, output B x 6 x 5 zone logits; a ViT is built for
    `image_size` (default: its native size)."""
    spec = backbone_spec(cfg.model_arch)
    if spec.timm_name is None:
        backbone: nn.Module = Custom1Backbone(in_chans=INPUT_CHANNELS, widths=spec.widths)
    else:
        import timm
        backbone = timm.create_model(spec.timm_name, pretrained=False, num_classes=0,
                                     in_chans=INPUT_CHANNELS, **_vit_kwargs(spec, image_size))
    if cfg.pretrained_weights:
        _load_backbone_weights(backbone, Path(cfg.pretrained_weights), spec.timm_name)
    # what the backbone gives after its pooling and any head layers of its own (MobileNetV3: a conv to 1024 after
    # 288 features); Custom_1 and timm models without such layers have num_features only
    features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    return CSIModel(backbone, features, cfg.dropout_rate)


def unwrapped_model(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's and DDP's (or DeepSpeed's) wrappers, whose state dict keys carry
    prefixes. Not accelerate's `unwrap_model`: that imports DeepSpeed (when installed), whose accelerator probe prints
    "Setting accelerator to CPU" on a machine without a GPU (tests/test_quiet_output.py)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
