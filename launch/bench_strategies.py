"""Images/s and peak GPU memory of every seed backbone under every strategy on this GPU (bf16, one process).

Each cell trains 30 steps of batch 16 on phantom shards at the backbone's size (tests/scripts/train_runs.py runs
them one after the other in one launch); the figures are the trainer's own for steps 11-30 (train/images_per_second,
train/peak_gpu_memory_gib), a markdown table on stdout. Usage: python launch/bench_strategies.py OUT_DIR [WORKERS]
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "gpu")]

from csi_dist.data.shards.writer import write_demo  # noqa: E402
from test_gpu_matrix import CELLS, gpu_env, scalars  # noqa: E402
from test_parity import train_runs  # noqa: E402

out, workers = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "8"
write_demo(str(out / "shards"), n_images=800, image_size=256, seed=3, workers=8)
settings = [f"data.shard_dir={out / 'shards'}", "training.batch_size=16", "training.n_epochs=10",
            f"training.num_workers={workers}", "training.log_every_steps=10", "logging.wandb_mode=disabled",
            "training.mixed_precision=bf16", "training.max_steps=30", "callbacks.checkpoint_every_steps=0"]
statuses = train_runs(1, out / "runs", settings, CELLS, timeout=580, env=gpu_env())
print("| backbone x strategy | exit | img/s (steps 11-30) | peak GiB |\n|---|---|---|---|")
for cell, status in statuses.items():
    speed = scalars(out / "runs" / cell, "train/images_per_second")[1:]
    memory = scalars(out / "runs" / cell, "train/peak_gpu_memory_gib")
    print(f"| {cell} | {status} | {sum(speed) / max(len(speed), 1):.0f} | {max(memory, default=float('nan')):.2f} |")
