"""Peer benchmark: our trainer next to timm's train.py on the same images, model, batch and precision.

    python launch/bench_timm_peer.py --timm-train path/to/timm/train.py --shard-dir SHARDS --arch resnet50 \
        --image-size 224 --batch-size 256 --out peer.json

timm's train.py is not part of this repository: pass the file from a pytorch-image-models checkout whose version
matches the installed timm. It reads an image folder here (timm's `wds/` reader expects a `cls` target per sample,
which CSI shards do not have), made of the very PNG members of the train shards: both sides decode the same bytes.

Both sides: the same timm backbone with 1 input channel and 30 outputs (6 zones x 5 classes for ours, 30 classes
for timm), bf16 autocast, channels_last, AdamW, cudnn autotuning, the same number of loader workers, pinned
memory. Each keeps its own augmentation (ours: small affine + intensity jitter; timm's defaults: random resized
crop, flip, colour jitter) and its own optimizer implementation (ours fused AdamW, timm's foreach AdamW) — what a
user of each gets. Images/s are taken after `--warmup` optimizer steps, from each side's own periodic log; the
synthetic ceiling (csi_dist.bench) is measured first, in this process.

With `--raw-size S` both sides start from the users' data instead: full-resolution radiographs (phantom PNGs of
S x S px) and a label CSV. timm's train.py reads those files, decoding and resizing every image every epoch; we
write shards at --image-size once (timed, on all cores) and train from them. The result gives both the
steady-state rate of each and the wall time of E epochs with the shard writing counted in.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from csi_dist.bench import Case, end_to_end, launch_environment, synthetic_ceiling
from csi_dist.data.phantom import generate_phantom
from csi_dist.data.shards.reader import open_split
from csi_dist.data.shards.format import SPLIT_FILE_NAME
from csi_dist.data.shards.writer import available_cores, write_shards
from csi_dist.data.split import SPLIT_COLUMN, load_split
from csi_dist.core.domain import CSV_SEPARATOR, FILE_ID_COLUMN, PATIENT_COLUMN

# timm's train.py logs "Train: <epoch> [<update>/<updates per epoch> ...": the step count each line stands for
TIMM_TRAIN_LINE = re.compile(r"Train: \d+ \[\s*(\d+)/")
# runs timm's train.py as __main__ and reports its peak GPU memory at exit (timm does not log it)
TIMM_LAUNCHER = ("import atexit, runpy, sys, torch\n"
                 "atexit.register(lambda: print('PEAK_GPU_MEMORY_GIB', torch.cuda.max_memory_allocated() / 2**30, "
                 "flush=True))\n"
                 "sys.argv = sys.argv[1:]\n"
                 "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def fill_image_folder(folder: Path, fill: Callable[[Path], int]) -> int:
    """<folder>/train/0/ (one class: timm's ImageFolder), filled by `fill(class_dir)` once; returns its image count.

    Filled under a temporary name and renamed, so an interrupted fill is redone rather than reused half-done.
    """
    class_dir = folder / "train" / "0"
    if class_dir.is_dir():
        return len(list(class_dir.iterdir()))
    partial = folder / "train.partial" / "0"
    shutil.rmtree(partial.parent, ignore_errors=True)
    partial.mkdir(parents=True)
    count = fill(partial)
    partial.parent.rename(folder / "train")
    return count


def image_folder_from_shards(shard_dir: Path, folder: Path) -> int:
    """The train split's image members, extracted as <folder>/train/0/<key>.png."""
    def extract(class_dir: Path) -> int:
        count = 0
        for shard in open_split(shard_dir, "train").shards:
            with tarfile.open(shard.path, "r:") as archive:
                for member in archive:
                    if member.isreg() and member.name.endswith((".png", ".jpg")):
                        (class_dir / Path(member.name).name).write_bytes(archive.extractfile(member).read())
                        count += 1
        return count
    return fill_image_folder(folder, extract)


def raw_radiographs(work_dir: Path, raw_size: int, unique: int, count: int) -> Path:
    """`count` full-resolution phantom radiographs in the users' layout (labels.csv + images/); return the CSV.

    `unique` images are drawn and each is hard-linked under several FileIDs (and patients): decoding costs the same
    per file whether or not its pixels repeat, and drawing thousands of large phantoms would take minutes.
    """
    csv_path = work_dir / f"raw_{raw_size}_{count}" / "labels.csv"
    if csv_path.is_file():
        return csv_path
    source_csv = generate_phantom(work_dir / f"raw_{raw_size}_unique", unique, image_size=raw_size)
    source = pd.read_csv(source_csv, sep=CSV_SEPARATOR, dtype=str, keep_default_na=False)
    image_dir = csv_path.parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        row, copy = source.iloc[index % unique].copy(), index // unique
        original = source_csv.parent / "images" / f"{row[FILE_ID_COLUMN]}.png"
        row[FILE_ID_COLUMN] = f"{row[FILE_ID_COLUMN]}_c{copy}"
        row[PATIENT_COLUMN] = f"{row[PATIENT_COLUMN]}_c{copy}"
        link = image_dir / f"{row[FILE_ID_COLUMN]}.png"
        if not link.exists():
            os.link(original, link)
        rows.append(row)
    pd.DataFrame(rows).to_csv(csv_path.with_suffix(".partial"), sep=CSV_SEPARATOR, index=False)
    csv_path.with_suffix(".partial").rename(csv_path)
    return csv_path


def image_folder_from_split(csv_path: Path, shard_dir: Path, folder: Path) -> int:
    """The raw files of the shards' train split, hard-linked as <folder>/train/0/<FileID>.png."""
    def link(class_dir: Path) -> int:
        split = load_split(shard_dir / SPLIT_FILE_NAME)
        train_ids = split.loc[split[SPLIT_COLUMN] == "train", FILE_ID_COLUMN]
        for file_id in train_ids:
            os.link(csv_path.parent / "images" / f"{file_id}.png", class_dir / f"{file_id}.png")
        return len(train_ids)
    return fill_image_folder(folder, link)


def epochs_table(result: dict, train_images: int, epochs=(1, 10, 50)) -> dict:
    """Wall seconds of E training epochs for each side, shard writing counted in ours (start-up left out)."""
    ours_rate, timm_rate = result["ours"]["images_per_second"], result["timm"]["images_per_second"]
    table = {}
    for count in epochs:
        ours = result["shard_write_seconds"] + count * train_images / ours_rate
        timm = count * train_images / timm_rate
        table[str(count)] = {"ours_seconds": ours, "timm_seconds": timm, "speedup": timm / ours}
    return table


def run_timm(timm_train: Path, folder: Path, case: Case, steps: int, warmup: int, workers: int,
             compile_model: bool, log_every: int, log_path: Path) -> dict:
    """timm's train.py for one epoch of the folder; each output line timestamped as it arrives."""
    command = [sys.executable, "-c", TIMM_LAUNCHER, str(timm_train), "--data-dir", str(folder),
               "--train-split", "train", "--val-split", "", "--model", case.arch, "--in-chans", "1",
               "--num-classes", "30", "--mean", "0.5", "--std", "0.5", "--img-size", str(case.image_size),
               "-b", str(case.batch_size),
               "--epochs", "1", "--warmup-epochs", "0", "--opt", "adamw", "--lr", "1e-3", "--amp",
               "--amp-dtype", "bfloat16", "--channels-last", "--pin-mem", "-j", str(workers),
               "--log-interval", str(log_every), "--output", str(log_path.parent / "timm_output")]
    if compile_model:
        command.append("--torchcompile")
    if not torch.cuda.is_available():
        command += ["--device", "cpu", "--no-prefetcher"]
    start = time.perf_counter()
    stamped = []  # (seconds since launch, line)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=launch_environment()) as process:
        for line in process.stdout:
            stamped.append((time.perf_counter() - start, line.rstrip("\n")))
    log_path.write_text("\n".join(f"{seconds:8.2f} {line}" for seconds, line in stamped) + "\n")
    if process.returncode != 0:
        raise RuntimeError(f"timm train.py failed ({process.returncode}):\n" +
                           "\n".join(line for _, line in stamped[-40:]))
    # a line for update u is printed once step u + 1 is done: rate between the lines after warmup and the last
    updates = [(int(match.group(1)) + 1, seconds) for seconds, line in stamped
               if (match := TIMM_TRAIN_LINE.search(line))]
    measured = [(update, seconds) for update, seconds in updates if update > warmup and update <= warmup + steps]
    (first_update, first_seconds), (last_update, last_seconds) = measured[0], measured[-1]
    peak = [float(line.split()[1]) for _, line in stamped if line.startswith("PEAK_GPU_MEMORY_GIB")]
    return {"images_per_second": (last_update - first_update) * case.batch_size / (last_seconds - first_seconds),
            "measured_steps": [first_update, last_update],
            "seconds_to_first_step": updates[0][1],  # from launch: the interpreter's start included
            "peak_gpu_memory_gib": peak[0] if peak and torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, required=True, help="timm's train.py")
    parser.add_argument("--shard-dir", type=Path, help="shards at --image-size (csi-shards); or --raw-size")
    parser.add_argument("--raw-size", type=int, help="start from full-resolution phantom radiographs of this side")
    parser.add_argument("--raw-unique", type=int, default=256, help="distinct raw images drawn (--raw-size)")
    parser.add_argument("--arch", default="resnet50", help="a timm model name (both sides)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="optimizer steps before measuring")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--work-dir", type=Path, default=Path("data/bench_peer"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    case = Case(args.arch, args.image_size, args.batch_size)
    log_every = args.warmup  # both sides log at the same steps
    if args.steps % log_every:
        parser.error("--steps must be a multiple of --warmup (both sides log every --warmup steps)")
    if (args.shard_dir is None) == (args.raw_size is None):
        parser.error("give one of --shard-dir and --raw-size")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    folder = args.work_dir / "image_folder"
    result = {"case": str(case), "compile": args.compile, "workers": args.workers}
    if args.raw_size:
        # the train split is about 70 % (65 % for margin): enough for one timm epoch of warmup + steps + 1 updates
        count = math.ceil((args.steps + args.warmup + 2) * args.batch_size / 0.65)
        csv_path = raw_radiographs(args.work_dir, args.raw_size, args.raw_unique, count)
        args.shard_dir = args.work_dir / f"shards_{csv_path.parent.name}_to_{args.image_size}"
        start = time.perf_counter()
        manifest = write_shards(csv_path, csv_path.parent / "images", args.shard_dir, image_size=args.image_size,
                                overwrite=True)
        result.update({"raw_size": args.raw_size, "raw_images": count,
                       "shard_write_seconds": time.perf_counter() - start,
                       "shard_write_workers": available_cores(), "skipped": manifest["skipped"]["count"]})
        folder = args.work_dir / f"image_folder_{csv_path.parent.name}"
        images = image_folder_from_split(csv_path, args.shard_dir, folder)
    else:
        images = image_folder_from_shards(args.shard_dir, folder)
    if images < (args.steps + args.warmup + 1) * args.batch_size:
        parser.error(f"{args.shard_dir}: {images} train images, fewer than one epoch of "
                     f"{args.steps + args.warmup + 1} steps needs")
    result["train_images"] = images
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result["ceiling"] = synthetic_ceiling(case, device, args.steps, args.warmup, args.compile)
    torch.cuda.empty_cache()  # the trainer and timm run in their own processes
    result["ours"] = end_to_end(args.shard_dir, case, args.work_dir / "ours", args.steps, args.warmup,
                                args.workers, args.compile, "ddp")
    result["timm"] = run_timm(args.timm_train, folder, case, args.steps, args.warmup, args.workers, args.compile,
                              log_every, args.work_dir / "timm_train.log")
    result["speedup"] = result["ours"]["images_per_second"] / result["timm"]["images_per_second"]
    result["ours_percent_of_ceiling"] = (100 * result["ours"]["images_per_second"]
                                         / result["ceiling"]["images_per_second"])
    if args.raw_size:
        result["epochs"] = epochs_table(result, images)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
