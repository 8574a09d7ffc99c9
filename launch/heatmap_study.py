"""GPU study (issue 17): do Grad-CAM zone maps of a trained model localize? Phantom with correlated vs independent
zones, several backbones, last layer vs an earlier one. Prints one JSON line per (run, layer): for each zone
[own share, other maps' share, chance, images graded 2-3]. The BENCHMARKS.md runs (on one H200):

    python launch/heatmap_study.py /tmp/hs \
      '{"name":"corr-R50","data":"corr","n":400,"independent":false,"size":224,"arch":"ResNet50","epochs":12,
        "layers":["backbone.layer3"]}' \
      '{"name":"ind-R50","data":"ind","n":1200,"independent":true,"size":224,"arch":"ResNet50","epochs":30,
        "layers":["backbone.layer3"]}' \
      '{"name":"ind-C1","data":"ind","n":1200,"independent":true,"size":224,"arch":"Custom_1","epochs":30,
        "layers":["backbone.features.10"]}' \
      '{"name":"ind-CheX","data":"ind","n":1200,"independent":true,"size":224,"arch":"CheXNet","epochs":30,
        "layers":["backbone.features.denseblock3"]}'

(each plan on one line.) Shards of the same "data" name are written once and reused.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from csi_dist.core.config import load_config
from csi_dist.data.phantom import generate_phantom, zone_masks
from csi_dist.data.shards.reader import LoaderSettings, build_loader, finish_on_device, open_split
from csi_dist.data.shards.writer import write_shards
from csi_dist.core.domain import NUM_ZONES, ZONE_NAMES
from csi_dist.evaluation.trained_model import load_trained_model
from csi_dist.evaluation.heatmaps import zone_heatmaps
from csi_dist.core.run_dir import RunDir

out = Path(sys.argv[1])
plans = [json.loads(arg) for arg in sys.argv[2:]]


def shards(name: str, n: int, independent: bool, size: int) -> Path:
    target = out / f"shards_{name}"
    if not (target / "manifest.json").exists():
        csv = generate_phantom(out / f"raw_{name}", n, image_size=256, seed=5, workers=8, independent_zones=independent)
        write_shards(csv, csv.parent / "images", target, image_size=size, workers=8, overwrite=True)
    return target


def shares(model, layer, images, masks):
    """b x map z x box k: the share of map z's mass inside zone k's box."""
    maps, _ = zone_heatmaps(model, images, layer)
    mass = maps.reshape(*maps.shape[:2], -1).sum(axis=2) + 1e-12
    return np.einsum("bzhw,khw->bzk", maps, masks.astype(np.float32)) / mass[..., None]


for plan in plans:
    started = time.time()
    data = shards(plan["data"], plan["n"], plan["independent"], plan["size"])
    run_dir = out / plan["name"]
    settings = [f"data.shard_dir={data}", f"data.image_size={plan['size']}", f"model.model_arch={plan['arch']}",
                f"training.batch_size={plan.get('bs', 32)}", f"training.n_epochs={plan['epochs']}",
                "training.num_workers=6", "training.mixed_precision=bf16", "logging.wandb_mode=disabled",
                f"optimization.learning_rate={plan.get('lr', 0.001)}", "callbacks.early_stopping_patience=100",
                *plan.get("extra", [])]
    command = [sys.executable, "-m", "csi_dist.train", "--config", "configs/demo.ini", "--run-dir", str(run_dir),
               *[a for s in settings for a in ("--set", s)]]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(json.dumps({"run": plan["name"], "train_rc": result.returncode, "tail": result.stderr[-1500:]}))
        continue
    history = json.loads(RunDir(run_dir).history.read_text())
    f1 = [round(r.get("val_f1_macro", float("nan")), 3) for r in history]
    config = load_config(RunDir(run_dir).resolved_config)
    accelerator = Accelerator()
    model, _, _, size = load_trained_model(config, run_dir, "best", accelerator)
    model.eval()
    loader = build_loader(open_split(data, "test"), LoaderSettings.from_config(config, size, train=False,
                                                                                device=accelerator.device),
                          epoch=0, rank=0, world_size=1)
    masks = zone_masks(size)
    chance = masks.reshape(NUM_ZONES, -1).mean(axis=1)
    layers = {"last": None, **{name: dict(model.named_modules())[name] for name in plan.get("layers", [])}}
    table = {key: [] for key in layers}
    graded = []
    for batch in loader:
        images = finish_on_device(batch, accelerator.device)
        for key, layer in layers.items():
            table[key].append(shares(model, layer, images, masks))
        keep = ~batch["is_padding"].numpy()
        graded.append(batch["zones"].numpy()[keep])
        for key in table:
            table[key][-1] = table[key][-1][keep]
    zones = np.concatenate(graded)
    for key in table:
        s = np.concatenate(table[key])  # n, map, box
        row = {"run": plan["name"], "layer": key, "val_f1_macro": f1, "seconds": round(time.time() - started)}
        for zone, name in enumerate(ZONE_NAMES):
            high = (zones[:, zone] >= 2) & (zones[:, zone] <= 3)
            own = s[high, zone, zone].mean()
            other = np.delete(s[high][:, :, zone], zone, axis=1).mean()
            row[name] = [round(float(own), 3), round(float(other), 3), round(float(chance[zone]), 3), int(high.sum())]
        row["own_all_images"] = round(float(np.mean([s[:, z, z].mean() for z in range(NUM_ZONES)])), 3)
        row["lungs_all"] = round(float(s.sum(axis=2).mean()), 3)
        print(json.dumps(row), flush=True)
