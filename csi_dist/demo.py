"""The README demo: phantom shards -> training -> evaluation, on the GPU when there is one, else on the CPU."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from csi_dist import evaluate, shards, train
from csi_dist.core.command import run_command
from csi_dist.core.config import DEMO_CONFIG
from csi_dist.data.shards.format import MANIFEST_NAME

log = logging.getLogger("csi_dist.demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi_dist.demo", description=__doc__)
    parser.add_argument("--images", type=int, default=600, help="phantom radiographs to generate")
    parser.add_argument("--shard-dir", default="data/demo_shards")
    parser.add_argument("--run-dir", type=Path, default=Path("checkpoints/demo"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not (Path(args.shard_dir) / MANIFEST_NAME).is_file():
        status = shards.main(["--demo", str(args.images), "--out", args.shard_dir, "--size", "64"])
        if status:
            return status
    overrides = [f"data.shard_dir={args.shard_dir}", *args.overrides]
    status = train.main(["--config", str(DEMO_CONFIG), "--run-dir", str(args.run_dir),
                         *[token for item in overrides for token in ("--set", item)]])
    if status:
        return status
    return evaluate.main(["--run-dir", str(args.run_dir)])


if __name__ == "__main__":
    run_command(main)
