"""Zone heatmaps (issue 17): Grad-CAM through captum for every backbone family, each zone's map explaining that
zone's predicted grade, overlays written by evaluate."""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from csi_dist.core.config import ModelConfig
from csi_dist.data.phantom import zone_boxes, zone_masks
from csi_dist.core.domain import NUM_CLASSES, NUM_ZONES, ZONE_NAMES
from csi_dist.evaluation.heatmaps import cam_model_and_layer, zone_figures, zone_heatmaps
from csi_dist.model.factory import CSIModel, build_model


# The layer each backbone must be explained at, named here by hand: the deepest feature map at stride 32 (2 x 2 cells
# at 64 px: ResNet's layer4, DenseNet's final norm-act, Custom_1's third stage), and for the ViT the normed patch
# tokens the last block's attention reads (a 4 x 4 patch grid at 56 px).
EXPLAINED_AT = {"ResNet50": ("backbone.layer4", 64), "CheXNet": ("backbone.features.norm5", 64),
                "Custom_1": ("backbone.features.10", 64), "RadDINO": ("backbone.blocks.11.norm1", 56)}


def grad_cam_by_hand(model: nn.Module, images: torch.Tensor, layer_name: str) -> tuple[torch.Tensor, ...]:
    """Grad-CAM without captum: torch autograd's gradient of each sample's predicted-grade logit with respect to
    the named layer's output, averaged over the map's cells as channel weights; the ReLU of the weighted channel
    sum, bilinearly upsampled to the input and scaled to a peak of 1. Returns (maps B x 6 x H x W, predicted
    grades B x 6)."""
    captured = []
    handle = model.get_submodule(layer_name).register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        logits = model(images)
    finally:
        handle.remove()
    activation = captured[-1]
    vit = model.backbone if hasattr(model.backbone, "blocks") else None
    grades = logits.argmax(dim=-1)
    samples = torch.arange(images.shape[0])
    maps = []
    for zone in range(NUM_ZONES):
        gradient, = torch.autograd.grad(logits[samples, zone, grades[:, zone]].sum(), activation, retain_graph=True)
        values = activation
        if vit is not None:  # tokens (B, prefix + h*w, C), patches in row-major order -> (B, C, h, w)
            rows, cols = vit.patch_embed.grid_size
            values, gradient = (tokens[:, vit.num_prefix_tokens:].reshape(tokens.shape[0], rows, cols, -1)
                                .permute(0, 3, 1, 2) for tokens in (values, gradient))
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = (weights * values).sum(dim=1, keepdim=True).clamp_min(0)
        cam = nn.functional.interpolate(cam, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        maps.append((cam / cam.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12))[:, 0])
    return torch.stack(maps, dim=1).detach(), grades


@pytest.mark.parametrize("arch", list(EXPLAINED_AT))
def test_every_backbones_maps_are_grad_cam_computed_by_hand_for_its_predicted_grades(arch):
    """Compared with an independent Grad-CAM (autograd on the unmodified model, at the layer named above): a map of
    another layer, another logit, a ViT grid laid out wrongly or a patched ViT that computes something else differs."""
    layer_name, size = EXPLAINED_AT[arch]
    torch.manual_seed(0)
    model = build_model(ModelConfig(model_arch=arch), size).eval()
    images = torch.randn(2, 1, size, size)
    with torch.no_grad():  # the head centred on this batch: each sample's logits are the other's negated, so the
        features = model.backbone(images)  # two predict different grades in every zone, each explained by its own
        model.zone_head.bias.copy_(-model.zone_head.weight @ features.mean(dim=0))
    maps, grades = zone_heatmaps(model, images)
    assert maps.shape == (2, NUM_ZONES, size, size) and grades.shape == (2, NUM_ZONES)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6  # each map scaled to 0..1
    expected, expected_grades = grad_cam_by_hand(model, images, layer_name)
    assert (grades == expected_grades.numpy()).all() and (grades[0] != grades[1]).all()
    assert (expected.flatten(2).amax(dim=2) > 0.99).sum() >= NUM_ZONES  # not a comparison of empty maps
    difference = (torch.from_numpy(maps) - expected).abs().max().item()
    assert difference < 1e-4, difference


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


def test_each_overlay_names_its_predicted_and_true_grade_beside_a_labelled_colour_bar():
    """What a reader of the grid needs: each zone's predicted grade against its true one, and what the colours mean."""
    image, maps = np.linspace(0, 1, 32 * 32).reshape(32, 32), np.random.default_rng(0).random((NUM_ZONES, 32, 32))
    predicted, true = np.array([0, 1, 2, 3, 4, 2]), np.array([0, 2, 2, 4, 4, 1])
    per_zone, grid = zone_figures("00000042", image, maps, predicted, true)
    grid_titles = [axes.get_title() for axes in grid.axes if axes.get_title()]
    assert grid_titles[1] == "left_sup: predicted grade 1 (mild),\ntrue grade 2 (moderate)"
    assert grid_titles[3] == "left_mid: predicted grade 3 (severe),\ntrue unknown"
    assert per_zone[5].axes[0].get_title() == "00000042 left_inf: predicted grade 2 (moderate),\ntrue grade 1 (mild)"
    for figure in (grid, *per_zone):  # the colour bar: an extra axes with the map's 0..1 scale and its label
        colour_bar = figure.axes[-1]
        assert colour_bar.get_ylabel() == "Grad-CAM weight (1 = the map's peak)"
        assert colour_bar.get_ylim() == (0.0, 1.0)
    _, unlabelled = zone_figures("new", image, maps, predicted)  # predict: no labels, no true grade claimed
    assert [axes.get_title() for axes in unlabelled.axes][0] == "right_sup: predicted grade 0 (normal)"


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
