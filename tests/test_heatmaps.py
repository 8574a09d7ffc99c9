"""Zone heatmaps (issue 17): Grad-CAM through captum for every backbone family, each zone's map explaining that
zone's predicted grade, overlays written by evaluate."""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

from csi_dist.config import ModelConfig
from csi_dist.data.phantom import zone_boxes, zone_masks
from csi_dist.domain import NUM_CLASSES, NUM_ZONES, ZONE_NAMES
from csi_dist.evaluation.heatmaps import cam_model_and_layer, zone_heatmaps
from csi_dist.models import CSIModel, build_model


@pytest.mark.parametrize("arch, size", [("ResNet50", 64), ("CheXNet", 64), ("RadDINO", 56), ("Custom_1", 64)])
def test_every_backbone_gives_six_maps_of_the_input_size_for_its_predicted_grades(arch, size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(model_arch=arch), size).eval()
    images = torch.randn(2, 1, size, size)
    maps, grades = zone_heatmaps(model, images)
    assert maps.shape == (2, NUM_ZONES, size, size) and grades.shape == (2, NUM_ZONES)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6  # each map scaled to 0..1
    with torch.no_grad():
        logits = model(images)
        explained, _ = cam_model_and_layer(model, images)
        assert torch.allclose(explained(images), logits, atol=1e-5)  # the ViT's patch grid changes nothing
    assert (grades == logits.argmax(dim=-1).numpy()).all()


@pytest.mark.parametrize("arch", ["Custom_1", "ResNet50"])
def test_a_cnn_is_explained_at_stride_32_even_where_it_pools_further(arch):
    """At 224 px Custom_1's last map is 2 x 2 cells, too coarse to tell lung zones apart: its map comes from the
    7 x 7 stage, as ResNet50's (layer4) does."""
    model = build_model(ModelConfig(model_arch=arch), 224).eval()
    images = torch.randn(1, 1, 224, 224)
    _, layer = cam_model_and_layer(model, images)
    shapes = []
    handle = layer.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape[-2:])))
    with torch.no_grad():
        model(images)
    handle.remove()
    assert shapes[-1] == (7, 7)


class ZoneReader(nn.Module):
    """A backbone whose feature map k is the image inside zone k's box: zone k's evidence lies in that box alone."""

    def __init__(self, size: int):
        super().__init__()
        masks = torch.from_numpy(zone_masks(size)).float()
        self.register_buffer("masks", masks)
        self.masked = nn.Identity()  # the spatial map Grad-CAM explains
        self.num_features = NUM_ZONES

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.masked(images * self.masks).mean(dim=(2, 3))


def test_each_zones_map_lies_in_that_zones_region():
    """With a model whose zone z reads only zone z's box, zone z's map must fall inside that box: a map computed for
    the wrong target (the seed indexed the class axis by the zone number) lands in another zone's box."""
    size = 96
    model = CSIModel(ZoneReader(size), NUM_ZONES, dropout_rate=0.0)
    with torch.no_grad():
        model.zone_head.weight.zero_()
        model.zone_head.bias.zero_()
        for zone in range(NUM_ZONES):
            for grade in range(NUM_CLASSES):
                model.zone_head.weight[zone * NUM_CLASSES + grade, zone] = grade + 1.0
    images = 0.5 + 0.5 * torch.rand(3, 1, size, size)
    maps, _ = zone_heatmaps(model, images)
    boxes = zone_boxes(size)
    for zone, name in enumerate(ZONE_NAMES):
        top, bottom, left, right = boxes[name]
        inside = maps[:, zone, top:bottom, left:right].sum(axis=(1, 2)) / maps[:, zone].sum(axis=(1, 2))
        chance = (bottom - top) * (right - left) / size ** 2
        assert (inside > 0.95).all() and chance < 0.1, (name, inside, chance)


@pytest.mark.slow
def test_evaluate_writes_six_overlays_and_a_grid_per_image(trained_run: Path):
    """The fixture evaluated the test split with --heatmaps 2 (predict --heatmaps: tests/test_predict.py)."""
    written = sorted(path.name for path in (trained_run / "evaluation" / "heatmaps" / "test").glob("*.png"))
    file_ids = [name.removesuffix("_zones.png") for name in written if name.endswith("_zones.png")]
    assert len(file_ids) == 2
    for file_id in file_ids:
        assert {f"{file_id}_{zone}.png" for zone in ZONE_NAMES} | {f"{file_id}_zones.png"} <= set(written)


@pytest.mark.slow
def test_the_seeds_heatmap_settings_draw_val_images_at_the_end_and_every_epoch(trained_run: Path):
    """The fixture trained with heatmap.enabled, heatmap.every_epoch and the seed's purple-to-red map."""
    config = (trained_run / "resolved_config.ini").read_text()
    assert "color_map = custom_purple_red" in config
    shard_dir = Path(re.search(r"^shard_dir = (.+)$", config, flags=re.MULTILINE).group(1))
    with tarfile.open(shard_dir / "val" / "shard-000000.tar") as first_val_shard:
        first_val_id = first_val_shard.getnames()[0].split(".")[0]  # heatmap.images = 1: the split's first image
    for folder in (trained_run / "heatmaps", trained_run / "heatmaps" / "epoch_000"):
        written = {path.name for path in folder.glob("*.png")}
        assert written == {f"{first_val_id}_{zone}.png" for zone in [*ZONE_NAMES, "zones"]}, (folder, written)
