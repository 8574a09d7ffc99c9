"""Model factory: every named backbone gives B x 6 x 5 zone logits from 1-channel input; weights only from files."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from csi_dist.core.config import ModelConfig
from csi_dist.model.loss import WeightedCSILoss
from csi_dist.model.factory import ModelError, _load_backbone_weights, backbone_spec, build_model, model_input_size


@pytest.mark.parametrize("name,size", [("Custom_1", 64), ("ResNet50", 64), ("CheXNet", 64), ("resnet18", 64)])
def test_backbones_give_zone_logits(name: str, size: int):
    model = build_model(ModelConfig(model_arch=name)).eval()
    assert model(torch.randn(2, 1, size, size)).shape == (2, 6, 5)


def test_a_timm_name_whose_head_has_its_own_layers_gives_zone_logits():
    """'any timm name': MobileNetV3 ends in a conv + activation after pooling (1024 features out, num_features
    says 288); the zone head must take what the backbone really gives (was: mat1 and mat2 shapes cannot be
    multiplied)."""
    model = build_model(ModelConfig(model_arch="mobilenetv3_small_050"), 64).eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(2, 1, 64, 64))
        assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 6, 5)
    assert model.zone_head.in_features == features.shape[1]


def test_raddino_is_a_vit_b14_at_518():
    spec = backbone_spec("RadDINO")
    assert spec.timm_name == "vit_base_patch14_dinov2" and spec.input_size == 518
    model = build_model(ModelConfig(model_arch="rad_dino")).eval()
    assert model.backbone.num_features == 768
    with torch.no_grad():
        assert model(torch.randn(1, 1, 518, 518)).shape == (1, 6, 5)


def test_raddino_follows_the_data_size_and_trains_there():
    """A ViT built for 518 px used to die on any other `data.image_size` (the trainer builds it for that size)."""
    config = ModelConfig(model_arch="RadDINO")
    assert model_input_size(config, 56) == 56 and model_input_size(config, 0) == 518
    model = build_model(config, model_input_size(config, 56))
    logits = model(torch.randn(2, 1, 56, 56))
    logits.sum().backward()
    assert logits.shape == (2, 6, 5) and model.backbone.pos_embed.grad is not None
    assert model.backbone.patch_embed.grid_size == (4, 4)


def test_unknown_arch_and_missing_weights_are_clear_errors(tmp_path: Path):
    with pytest.raises(ModelError, match="unknown model_arch 'ResNet5O'"):
        build_model(ModelConfig(model_arch="ResNet5O"))
    with pytest.raises(ModelError, match="pretrained weights file not found: .*nope.safetensors"):
        build_model(ModelConfig(model_arch="ResNet50", pretrained_weights=str(tmp_path / "nope.safetensors")))


def test_rgb_weights_load_into_the_grayscale_stem(tmp_path: Path):
    rgb = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "resnet18_rgb.safetensors"
    save_file(rgb.state_dict(), str(path))
    model = build_model(ModelConfig(model_arch="resnet18", pretrained_weights=str(path)))
    torch.testing.assert_close(model.backbone.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)


def test_hugging_face_dinov2_weights_give_the_same_features_in_timm(tmp_path: Path):
    """RadDINO users hold microsoft/rad-dino's Hugging Face file: its features must survive the move to timm."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    hf_model = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=256, image_size=56, patch_size=14, layerscale_value=0.5)).eval()
    weights = tmp_path / "rad_dino.safetensors"
    save_file({key: value.contiguous() for key, value in hf_model.state_dict().items()}, str(weights))
    timm_model = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, in_chans=1,
                                   img_size=56, embed_dim=64, depth=2, num_heads=4).eval()

    _load_backbone_weights(timm_model, weights, "vit_base_patch14_dinov2")

    gray = torch.rand(2, 1, 56, 56)
    with torch.no_grad():
        expected = hf_model(pixel_values=gray.expand(-1, 3, -1, -1)).pooler_output  # the CLS token after the norm
        assert torch.allclose(timm_model(gray), expected, atol=1e-4)


def test_weights_of_another_architecture_are_refused(tmp_path: Path):
    path = tmp_path / "densenet.safetensors"
    save_file(timm.create_model("densenet121", pretrained=False, num_classes=0).state_dict(), str(path))
    with pytest.raises(ModelError, match="no tensor matches|shape mismatch"):
        build_model(ModelConfig(model_arch="ResNet50", pretrained_weights=str(path)))


def test_a_crafted_pickle_is_refused(tmp_path: Path):
    class Payload:
        def __reduce__(self):
            return (print, ("owned",))
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(ModelError, match="cannot read pretrained weights"):
        build_model(ModelConfig(model_arch="Custom_1", pretrained_weights=str(path)))


def test_weighted_loss_matches_torch_and_ignores_masked_samples():
    logits, targets = torch.randn(4, 6, 5), torch.randint(0, 5, (4, 6))
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 5), targets.view(-1),
                                                 weight=torch.tensor([1, 1, 1, 1, 0.3]))
    loss = WeightedCSILoss(0.3)
    torch.testing.assert_close(loss(logits, targets), expected)
    mask = torch.tensor([True, True, False, False])
    torch.testing.assert_close(loss(logits, targets, mask), loss(logits[:2], targets[:2]))
    assert loss(logits, targets, torch.zeros(4, dtype=torch.bool)).item() == 0.0
