"""Throughput benchmark: the synthetic ceiling next to the real loader and the real trainer on phantom shards.

    python -m csi_dist.bench                                   # resnet50@224 bs256 and densenet121@512 bs64
    python -m csi_dist.bench --case resnet50@224x256 --compile --out bench.json

For each case ``ARCH@SIZExBATCH`` it measures, on the GPU when there is one:

* ceiling: the trainer's own step (training/step.py: bf16 autocast, channels_last, fused AdamW, WeightedCSILoss)
  on random tensors already on the device: the most the model can do on this machine; and, where the trainer
  finishes images on the GPU (data.gpu_augment), the same step with that finishing (normalise and augment uint8
  pixels already on the device) in front: "% of ceiling" is then measured against it, so that it measures the
  trainer and not the augmentation;
* loader: the real shard reader (``csi_dist.data.shards.reader``, the trainer's workers) alone, finishing images
  where the trainer does (``--gpu-augment``: on the GPU the workers only read and decode, and hand over uint8
  pixels);
* end to end: ``python -m csi_dist.train`` itself on the same shards, its images/s and where its time went
  (waiting on the loader, waiting on the GPU, the host's own work) read back from the run's TensorBoard scalars
  after ``--warmup`` steps, its time to the first step and its peak GPU memory;
* files (``--pil-baseline``): a plain PIL-from-files Dataset on the phantom's source PNGs, for the loader.

Every rate is the median of ``--repeats`` measurements of ``--steps`` steps (the ceiling's timed apart, the
trainer's consecutive windows of one run after its warm-up).

The loader column and the trainer's data-wait share are the step-time breakdown: a share near 0 % means the step
waits on compute, not on data. Phantom shards are written once per size and format (``--image-format``) under
``--work-dir``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from csi_dist import USER_COMPILE_CACHE_DIR
from csi_dist.core.command import run_command
from csi_dist.core.config import DEMO_CONFIG, ConfigError, ModelConfig, OptimizationConfig, load_config
from csi_dist.data.shards.format import MANIFEST_NAME
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR
from csi_dist.core.run_dir import RunDir

if TYPE_CHECKING:
    import torch

# torch, the models and the reader are imported where they are used: `--help`, a usage error and a bad --set are
# answered in a second (issue 34)

log = logging.getLogger("csi_dist.bench")

DEFAULT_CASES = ("resnet50@224x256", "densenet121@512x64")
TRAIN_FRACTION = 0.7  # of the phantom's images (the shard writer's default split)


@dataclass(frozen=True)
class Case:
    arch: str
    image_size: int
    batch_size: int

    @classmethod
    def parse(cls, text: str) -> "Case":
        try:
            arch, rest = text.split("@")
            size, batch = rest.split("x")
            return cls(arch, int(size), int(batch))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected ARCH@SIZExBATCH such as resnet50@224x256, got {text!r}")

    def __str__(self) -> str:
        return f"{self.arch}@{self.image_size} bs{self.batch_size}"


def synchronize(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_ceiling(case: Case, device: torch.device, steps: int, warmup: int, compile_model: bool,
                      finish_on_device: bool = False, compile_mode: str = "default", repeats: int = 3) -> dict:
    """Images/s of the training step on tensors already on the device (no data loading at all): the median of
    `repeats` timed runs of `steps` steps. finish_on_device: then also, with the same model, the step with the images
    starting as uint8 pixels on the device, normalised and augmented there first (data.gpu_augment's share of the
    GPU, as the trainer does with it on), under "finishing"."""
    import torch

    from csi_dist.data.shards.reader import finish_on_device as finish
    from csi_dist.data.transforms import AUGMENT_DRAWS
    from csi_dist.model.loss import WeightedCSILoss
    from csi_dist.model.factory import build_model
    from csi_dist.training.accumulation import BufferSnapshot
    from csi_dist.training.schedules import build_optimizer
    from csi_dist.training.step import SingleProcess, train_step
    from csi_dist.training.strategies import SingleProcessStrategy
    model = build_model(ModelConfig(model_arch=case.arch, dropout_rate=0.0)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimizationConfig(optimizer="adamw"), fused=device.type == "cuda")
    step_model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode) \
        if compile_model else model
    shape = (case.batch_size, 1, case.image_size, case.image_size)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    draws = torch.rand(case.batch_size, AUGMENT_DRAWS, device=device)
    images = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 5, (case.batch_size, 6), device=device)
    mask = torch.ones(case.batch_size, dtype=torch.bool, device=device)
    process = SingleProcess(device, torch.bfloat16 if device.type == "cuda" else None)
    criterion, strategy, buffers = WeightedCSILoss().to(device), SingleProcessStrategy(), BufferSnapshot(model)

    def step(finishing: bool) -> None:  # the trainer's own step (training/step.py) on one process, minus the loader
        step_images = images
        if finishing:  # the trainer's own finishing (reader.finish_on_device) of a batch already copied
            step_images = finish({"pixels": pixels, "augment_draws": draws, "normalization": "medical"}, device)
            step_images = step_images.contiguous(memory_format=torch.channels_last)
        train_step(step_model, [(None, step_images, targets, mask)], criterion=criterion, strategy=strategy,
                   optimizer=optimizer, accelerator=process, buffers=buffers)

    def measure(finishing: bool) -> dict:
        for _ in range(warmup):
            step(finishing)
        rates = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(finishing)
            synchronize(device)
            rates.append(steps * case.batch_size / (time.perf_counter() - start))
        return {"images_per_second": statistics.median(rates), "measurements": rates}

    result = measure(finishing=False)
    if finish_on_device:
        result["finishing"] = measure(finishing=True)
    return result


def loader_throughput(shard_dir: Path, case: Case, workers: int, batches: int, augment: bool = True,
                      finish_on_device: bool = False) -> dict:
    """Images/s of the real reader alone, as the trainer configures it for training (augment=False: as for eval;
    finish_on_device: the workers' share of data.gpu_augment, uint8 pixels out)."""
    from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split
    settings = LoaderSettings(batch_size=case.batch_size, image_size=case.image_size, augment=augment, shuffle=True,
                              shuffle_window=1024, num_workers=workers, finish_on_device=finish_on_device)
    loader = build_loader(open_split(shard_dir, "train"), settings, epoch=0, rank=0, world_size=1)
    return _time_batches(iter(loader), batches, workers, lambda batch: batch["sample_index"].shape[0])


class PlainFileDataset:
    """The baseline users write first: PIL opens each file, grayscale, resize, to a tensor (a map-style dataset)."""

    def __init__(self, files: list[Path], image_size: int):
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        import torch
        from PIL import Image
        with Image.open(self.files[index]) as image:
            image = image.convert("L").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(
            1, self.image_size, self.image_size).float().div_(255)


def plain_file_throughput(image_dir: Path, case: Case, workers: int, batches: int) -> dict:
    import torch
    files = sorted(image_dir.glob("*.png"))
    loader = torch.utils.data.DataLoader(PlainFileDataset(files, case.image_size), batch_size=case.batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=False)
    return _time_batches(iter(loader), batches, workers, lambda batch: batch.shape[0])


def _time_batches(batches_iter, batches: int, workers: int, count) -> dict:
    for _ in range(max(workers, 1)):  # worker start-up is not throughput: one batch from every worker first
        next(batches_iter)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += count(next(batches_iter))
    rate = images / (time.perf_counter() - start)
    return {"images_per_second": rate, "images_per_second_per_worker": rate / max(workers, 1)}


def end_to_end(shard_dir: Path, case: Case, run_dir: Path, steps: int, warmup: int, workers: int,
               compile_model: bool, strategy: str, trainer_overrides: list[str] = (), restart: bool = False,
               gpu_augment: str = "auto", repeats: int = 3) -> dict:
    """The real trainer, launched as users launch it (torchrun, one process), for warmup + repeats x steps optimizer
    steps: the median of its `repeats` consecutive measurements of `steps` steps after the warm-up.

    restart: then launch it again on the same run directory, as a requeued job would be, for as many steps more,
    and report that process's time to its first step too (it resumes from the checkpoint and compile cache).
    """
    log_every = math.gcd(steps, warmup) if warmup else steps
    total_steps = warmup + repeats * steps
    overrides = {"model.model_arch": case.arch, "model.compile": str(compile_model).lower(),
                 "data.shard_dir": shard_dir, "data.image_size": case.image_size,
                 "training.batch_size": case.batch_size, "data.num_workers": workers,
                 "training.n_epochs": 1, "training.log_every_steps": log_every,
                 "optimization.optimizer": "adamw", "logging.wandb_mode": "disabled",
                 "callbacks.checkpoint_every_steps": 0, "callbacks.early_stopping_patience": 0,
                 "training.strategy": strategy, "data.gpu_augment": gpu_augment}
    shutil.rmtree(run_dir, ignore_errors=True)  # the scalars read back must be this run's only
    run_trainer(run_dir, overrides | {"training.max_steps": total_steps}, trainer_overrides, "never")
    scalars = read_scalars(RunDir(run_dir).tensorboard)

    def measurements(tag: str) -> list[list[float]]:  # the log windows of each measurement after the warm-up
        return [[value for step, value in scalars[tag] if warmup + index * steps < step <= warmup + (index + 1) * steps]
                for index in range(repeats)]
    # every window holds log_every * batch images, so a measurement's rate is the harmonic mean of its windows'
    rates = [len(windows) / sum(1 / value for value in windows) for windows in measurements("train/images_per_second")]
    result = {"images_per_second": statistics.median(rates), "measurements": rates,
              "seconds_to_first_step": scalars["train/seconds_to_first_step"][0][1],
              "peak_gpu_memory_gib": max((value for _, value in scalars.get("train/peak_gpu_memory_gib", [])),
                                         default=None)}
    for share in ("data_wait_share", "device_wait_share", "host_share"):  # where the time went, over all windows
        windows = [value for group in measurements(f"train/{share}") for value in group]
        result[share] = sum(windows) / len(windows)
    if restart:
        run_trainer(run_dir, overrides | {"training.max_steps": 2 * total_steps}, trainer_overrides, "auto")
        first_steps = read_scalars(RunDir(run_dir).tensorboard)["train/seconds_to_first_step"]
        if len(first_steps) != 2:
            raise RuntimeError(f"{run_dir}: the relaunched trainer took no step (is the epoch too short?)")
        result["restart_seconds_to_first_step"] = first_steps[-1][1]
    return result


def launch_environment() -> dict[str, str]:
    """This process's environment as the user gave it: without the torch.compile cache directory that importing
    timm (or compiling the ceiling) filled in here, which would hand the launched trainer this process's kernels."""
    environment = dict(os.environ)
    if USER_COMPILE_CACHE_DIR is None:
        environment.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return environment


def run_trainer(run_dir: Path, overrides: dict, trainer_overrides: list[str], resume: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "csi_dist.train", "--config", str(DEMO_CONFIG), "--run-dir", str(run_dir), "--resume", resume]
    for override in [f"{key}={value}" for key, value in overrides.items()] + list(trainer_overrides):
        command += ["--set", override]
    result = subprocess.run(command, capture_output=True, text=True, env=launch_environment())
    with (run_dir / "train.log").open("a") as log_file:
        log_file.write(result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"training failed ({result.returncode}):\n{result.stderr[-3000:]}")


def read_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def phantom_shards(work_dir: Path, case: Case, batches: int, image_format: str = "png") -> Path:
    """Phantom shards at the case's size with `batches` batches of training images in one epoch."""
    needed = math.ceil((batches + 2) * case.batch_size / TRAIN_FRACTION)
    shard_dir = work_dir / f"phantom_{case.image_size}_{needed}_{image_format}"
    if not (shard_dir / MANIFEST_NAME).is_file():
        from csi_dist.data.shards.writer import write_demo
        write_demo(shard_dir, n_images=needed, image_size=case.image_size, image_format=image_format)
    return shard_dir


def format_table(rows: list[dict]) -> str:
    header = ("| case | workers | ceiling img/s | ceiling with GPU finishing img/s | end-to-end img/s | % of ceiling "
              "| waits on data % | waits on GPU % | host % | loader img/s | loader img/s/worker "
              "| loader no-augment img/s | PIL files img/s | first step s | restart first step s | peak GiB |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in rows:
        e2e = row["end_to_end"]
        # the ceiling of the same work: with the images finished on the GPU when the trainer finishes them there
        ceiling = row.get("ceiling_finishing") or row["ceiling"]

        def number(value, digits=0):
            return "-" if value is None else f"{value:.{digits}f}"
        lines.append(" | ".join([
            f"| {row['case']} {row['strategy']}{' compiled' if row['compile'] else ''}"
            f"{'' if row.get('compile_mode', 'default') == 'default' else ' ' + row['compile_mode']}"
            f" {row['image_format']} gpu_augment={row['gpu_augment']}", str(row["workers"]),
            number(row["ceiling"]["images_per_second"]),
            number(row.get("ceiling_finishing", {}).get("images_per_second")), number(e2e["images_per_second"]),
            number(100 * e2e["images_per_second"] / ceiling["images_per_second"], 1),
            number(100 * e2e["data_wait_share"], 1), number(100 * e2e.get("device_wait_share", math.nan), 1),
            number(100 * e2e.get("host_share", math.nan), 1),
            number(row["loader"]["images_per_second"]), number(row["loader"]["images_per_second_per_worker"], 1),
            number(row.get("loader_no_augment", {}).get("images_per_second")),
            number(row.get("files", {}).get("images_per_second")), number(e2e["seconds_to_first_step"], 1),
            number(e2e.get("restart_seconds_to_first_step"), 1),
            number(e2e["peak_gpu_memory_gib"], 1)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi_dist.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--case", dest="cases", type=Case.parse, action="append",
                        help=f"ARCH@SIZExBATCH, repeatable (default: {' and '.join(DEFAULT_CASES)})")
    parser.add_argument("--steps", type=int, default=20, help="steps of one measurement (default: 20)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per number, the median reported (default: 3)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="steps before measuring: cudnn autotune, compile (default: 10)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help=f"loader workers (default: one per CPU core, at most 16: {min(16, os.cpu_count() or 1)} "
                             f"here)")
    parser.add_argument("--loader-batches", type=int, default=60,
                        help="batches timed after one from every worker (default: 60)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (ceiling and trainer)")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode of the ceiling's step (reduce-overhead: CUDA graphs; default: "
                             "default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed to the trainer, e.g. --set training.cudnn_benchmark=false (repeatable; default: none)")
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp2"),
                        help="the trainer's strategy (default: ddp)")
    parser.add_argument("--pil-baseline", action="store_true", help="also time a plain PIL-from-files loader")
    parser.add_argument("--restart", action="store_true",
                        help="relaunch the trainer on its run directory, as a requeue would; time its first step")
    parser.add_argument("--gpu-augment", choices=("auto", "true", "false"), default="auto",
                        help="where images are finished (data.gpu_augment), for the trainer and the loader column "
                             "(default: auto, on the GPU when there is one)")
    parser.add_argument("--image-format", choices=("png", "npy"), default="png",
                        help="phantom shards' image format (default: png)")
    parser.add_argument("--work-dir", type=Path, default=Path("data/bench"),
                        help="where the phantom shards and the trainer's runs go (default: data/bench)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (default: none, the table is "
                        "printed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # the trainer's overrides, checked before anything is measured or torch loads
        load_config(DEMO_CONFIG, args.overrides)
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_CONFIG_ERROR
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for case in args.cases or [Case.parse(text) for text in DEFAULT_CASES]:
        trainer_steps = (2 if args.restart else 1) * (args.repeats * args.steps + args.warmup)
        shard_dir = phantom_shards(args.work_dir, case, max(trainer_steps, args.loader_batches + args.workers),
                                   args.image_format)
        on_device = args.gpu_augment == "true" or (args.gpu_augment == "auto" and device.type == "cuda")
        row = {"case": str(case), **asdict(case), "device": torch.cuda.get_device_name() if device.type == "cuda"
               else "cpu", "compile": args.compile, "workers": args.workers,
               "strategy": args.strategy, "trainer_overrides": args.overrides, "gpu_augment": args.gpu_augment,
               "image_format": args.image_format, "compile_mode": args.compile_mode}
        log.info("%s: ceiling", case)
        row["ceiling"] = synthetic_ceiling(case, device, args.steps, args.warmup, args.compile, on_device,
                                           compile_mode=args.compile_mode, repeats=args.repeats)
        if on_device:  # what normalising and augmenting on the GPU costs the step, measured apart
            row["ceiling_finishing"] = row["ceiling"].pop("finishing")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("%s: loader", case)
        row["loader"] = loader_throughput(shard_dir, case, args.workers, args.loader_batches,
                                          finish_on_device=on_device)
        if args.pil_baseline:  # like for like: the reader without augmentation next to PIL without augmentation
            row["loader_no_augment"] = loader_throughput(shard_dir, case, args.workers, args.loader_batches,
                                                         augment=False)
            row["files"] = plain_file_throughput(shard_dir / "raw" / "images", case, args.workers,
                                                 args.loader_batches)
        log.info("%s: end to end", case)
        row["end_to_end"] = end_to_end(shard_dir, case, args.work_dir / "runs" / case.arch, args.steps,
                                       args.warmup, args.workers, args.compile, args.strategy,
                                       args.overrides, args.restart, args.gpu_augment, args.repeats)
        rows.append(row)
        log.info("%s", json.dumps(row))
    table = format_table(rows)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    run_command(main)
