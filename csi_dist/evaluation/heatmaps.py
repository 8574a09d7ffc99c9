"""Where the model looks: one Grad-CAM map per lung zone, computed by captum, for the CNN backbones and the ViTs.

The map of zone z explains the logit of the grade the model predicts for z (the seed project indexed the class axis
by the zone number instead). CNNs: Grad-CAM on the backbone's deepest feature map at stride <= 32. ViTs (RadDINO):
the patch tokens entering the last block, laid out as their patch grid, so the map is Grad-CAM over patches. Maps
are upsampled to the input size and scaled to 0..1 per map; `save_heatmaps` writes one overlay per zone and a 6-zone
grid.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from csi_dist.core.config import CUSTOM_PURPLE_RED
from csi_dist.data.shards.reader import finish_on_device
from csi_dist.core.domain import CLASS_NAMES, NUM_CLASSES, NUM_ZONES, UNKNOWN_CLASS, ZONE_NAMES
from csi_dist.model.factory import unwrapped_model


class PatchGrid(nn.Module):
    """ViT tokens -> (B, C, h, w) patch grid; keeps the prefix (class, register) tokens for `PatchTokens`."""

    def __init__(self, grid_size: tuple[int, int], num_prefix_tokens: int):
        super().__init__()
        self.grid_size, self.num_prefix_tokens = grid_size, num_prefix_tokens
        self.prefix: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prefix = tokens[:, :self.num_prefix_tokens]
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *self.grid_size)


class PatchTokens(nn.Module):
    """The inverse of `PatchGrid`: the grid back to tokens, prefix first, so the ViT computes what it did."""

    def __init__(self, grid: PatchGrid):
        super().__init__()
        self.grid = [grid]  # a plain list: not a submodule, so not registered twice

    def forward(self, grid_map: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.grid[0].prefix, grid_map.flatten(2).transpose(1, 2)], dim=1)


# Grad-CAM's map has the explained layer's resolution: the deepest map at stride <= 32 (7 x 7 cells at 224 px, as
# ResNet50's layer4), so a backbone that goes on pooling (Custom_1 ends at 2 x 2 at 224 px) is explained where its
# map can still tell one lung zone from another.
MAX_CAM_STRIDE = 32


def _last_feature_map(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """The backbone module that last produces a spatial (B, C, H, W) output of at least input/32 (and 2) cells a
    side in a forward pass."""
    min_side = max(2, images.shape[-1] // MAX_CAM_STRIDE)
    finished: list[nn.Module] = []
    hooks = [module.register_forward_hook(lambda module, _, output: finished.append(module)
                                          if isinstance(output, torch.Tensor) and output.dim() == 4
                                          and output.shape[-1] >= min_side else None)
             for module in model.backbone.modules() if module is not model.backbone]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    if not finished:
        raise ValueError(f"{type(model.backbone).__name__}: no spatial feature map to explain")
    return finished[-1]


def cam_model_and_layer(model: nn.Module, images: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """The model to explain and the layer whose output Grad-CAM weighs (for a ViT, a copy whose last block reads
    its tokens through a patch grid)."""
    backbone = model.backbone
    if hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed"):
        explained = copy.deepcopy(model)
        vit = explained.backbone
        grid = PatchGrid(tuple(vit.patch_embed.grid_size), vit.num_prefix_tokens)
        last = vit.blocks[-1]
        last.norm1 = nn.Sequential(last.norm1, grid, PatchTokens(grid))  # the normed tokens the attention reads
        return explained, grid
    return model, _last_feature_map(model, images)


def zone_heatmaps(model: nn.Module, images: torch.Tensor,
                  layer: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(maps B x 6 x H x W in 0..1, predicted grades B x 6) for a batch of model inputs (B x 1 x H x W); `layer`
    replaces the CNN layer `cam_model_and_layer` picks (a module of `model`, e.g. to compare depths)."""
    model.eval()
    explained, chosen = cam_model_and_layer(model, images)
    layer = layer or chosen
    with torch.no_grad():
        grades = model(images).argmax(dim=-1)
    gradcam = LayerGradCam(lambda batch: explained(batch).flatten(1), layer)
    maps = []
    for zone in range(NUM_ZONES):
        target = (zone * NUM_CLASSES + grades[:, zone]).tolist()
        attribution = gradcam.attribute(images, target=target, relu_attributions=True)
        maps.append(LayerAttribution.interpolate(attribution, tuple(images.shape[-2:]), "bilinear")[:, 0])
    stacked = torch.stack(maps, dim=1).detach().float()
    peak = stacked.flatten(2).amax(dim=2).clamp_min(1e-12)[..., None, None]
    return (stacked / peak).cpu().numpy(), grades.cpu().numpy()


def grade_name(grade: int) -> str:
    return f"grade {grade} ({CLASS_NAMES[grade]})" if grade != UNKNOWN_CLASS else "unknown"


def zone_caption(zone_name: str, predicted: int, true: int | None) -> str:
    """"right_sup: predicted grade 2 (moderate), true grade 1 (mild)" (no true part where the label is unknown
    to us, as in predict)."""
    caption = f"{zone_name}: predicted {grade_name(predicted)}"
    return caption if true is None else f"{caption},\ntrue {grade_name(true)}"


def color_map(name: str):
    """A matplotlib colormap by name, or the seed's custom_purple_red (purple, blue, green, yellow, red)."""
    from matplotlib import colormaps
    from matplotlib.colors import LinearSegmentedColormap
    if name == CUSTOM_PURPLE_RED:
        return LinearSegmentedColormap.from_list(name, ["purple", "blue", "green", "yellow", "red"])
    return colormaps[name]


COLOUR_BAR_LABEL = "Grad-CAM weight (1 = the map's peak)"
# an overlay: the map over the radiograph at this opacity, so the anatomy stays visible beneath it
OVERLAY_ALPHA = 0.45


def zone_figures(file_id: str, image: np.ndarray, maps: np.ndarray, grades: np.ndarray,
                 true_grades: np.ndarray | None = None, color_map_name: str = "jet"):
    """(one Figure per zone, the 6-zone grid Figure) of an image: each map over the radiograph, titled with the
    zone's predicted grade (and true grade when known), with a colour bar of the map's scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    scale = ScalarMappable(Normalize(0, 1), color_map(color_map_name))
    zone_figures_, grid = [], Figure(figsize=(7.6, 10.4))
    FigureCanvasAgg(grid)  # a bare Figure on an Agg canvas: nothing left open in pyplot's registry
    grid_axes = grid.subplots(3, 2)
    for zone, name in enumerate(ZONE_NAMES):
        true = None if true_grades is None else int(true_grades[zone])
        caption = zone_caption(name, int(grades[zone]), true)
        figure = Figure(figsize=(4.6, 4.6))
        FigureCanvasAgg(figure)
        axis = figure.subplots()
        for target, title in ((axis, f"{file_id} {caption}"), (grid_axes[zone // 2, zone % 2], caption)):
            target.imshow(image, cmap="gray")
            target.imshow(maps[zone], cmap=scale.cmap, norm=scale.norm, alpha=OVERLAY_ALPHA)
            target.set_title(title, fontsize=9)
            target.axis("off")
        figure.colorbar(scale, ax=axis, fraction=0.046, pad=0.03, label=COLOUR_BAR_LABEL)
        zone_figures_.append(figure)
    grid.colorbar(scale, ax=grid_axes, fraction=0.03, pad=0.03, label=COLOUR_BAR_LABEL)
    grid.suptitle(f"{file_id}: where the model looks for each zone's predicted grade (Grad-CAM)", fontsize=10)
    return zone_figures_, grid


def save_heatmaps(out_dir: Path, file_id: str, image: np.ndarray, maps: np.ndarray, grades: np.ndarray,
                  color_map_name: str = "jet", true_grades: np.ndarray | None = None) -> list[Path]:
    """One overlay PNG per zone (`<FileID>_<zone>.png`) and a 6-zone grid (`<FileID>_zones.png`); `image` H x W."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_zone, grid = zone_figures(file_id, image, maps, grades, true_grades, color_map_name)
    written = []
    for name, figure in zip(ZONE_NAMES, per_zone):
        written.append(out_dir / f"{file_id}_{name}.png")
        figure.savefig(written[-1], dpi=100, bbox_inches="tight")
    written.append(out_dir / f"{file_id}_zones.png")
    grid.savefig(written[-1], dpi=100, bbox_inches="tight")
    return written


def display_image(model_input: torch.Tensor) -> np.ndarray:
    """A model input (1 x H x W, normalised) as a 0..1 grey image for display."""
    pixels = model_input[0].float()
    return ((pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-12)).cpu().numpy()


def heatmaps_for_images(model: nn.Module, images: list[tuple[str, torch.Tensor]], out_dir: Path,
                        device: torch.device, batch_size: int = 8, color_map_name: str = "jet",
                        true_grades: dict[str, np.ndarray] | None = None) -> None:
    """Maps and overlays for (FileID, model input 1 x H x W) pairs, written under `out_dir`; `model` may be the
    prepared (wrapped) one; `true_grades` (6 zone labels by FileID) adds each zone's true grade to its title."""
    model = unwrapped_model(model)
    true_grades = true_grades or {}
    for start in range(0, len(images), batch_size):
        part = images[start:start + batch_size]
        maps, grades = zone_heatmaps(model, torch.stack([image for _, image in part]).to(device))
        for (file_id, image), image_maps, image_grades in zip(part, maps, grades):
            save_heatmaps(out_dir, file_id, display_image(image), image_maps, image_grades, color_map_name,
                          true_grades.get(file_id))


def heatmaps_for_batches(model: nn.Module, batches, n_images: int, out_dir: Path, device: torch.device,
                         color_map_name: str = "jet") -> list[str]:
    """Maps and overlays for the first `n_images` real, decodable samples of `batches` (the reader's batch dicts),
    titled with their true grades; returns the FileIDs drawn."""
    chosen: list[tuple[str, torch.Tensor]] = []
    true_grades: dict[str, np.ndarray] = {}
    for batch in batches:
        images = finish_on_device(batch, device)  # finished by the workers or (data.gpu_augment) on the device
        for image, file_id, zones, padding, failed in zip(images, batch["file_id"], batch["zones"],
                                                          batch["is_padding"], batch["decode_failed"]):
            if not padding and not failed and len(chosen) < n_images:
                chosen.append((str(file_id), image))
                true_grades[str(file_id)] = zones.cpu().numpy()
        if len(chosen) >= n_images:
            break
    heatmaps_for_images(model, chosen, out_dir, device, color_map_name=color_map_name, true_grades=true_grades)
    return [file_id for file_id, _ in chosen]
