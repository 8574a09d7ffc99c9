"""`csi-shards` (`python -m csi_dist.shards`): write CSI WebDataset shards from a label CSV and its images, say whether
they are usable, draw their samples. The writer is csi_dist/data/shards/writer.py, the check verify.py, the drawing
show.py."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from csi_dist.core.command import run_command
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR
from csi_dist.data.labels import LabelError
from csi_dist.data.radiographs import DEFAULT_JPEG_QUALITY, ImageError
from csi_dist.data.shards.format import IMAGE_EXTENSIONS, SPLIT_NAMES
from csi_dist.data.shards.verify import verify_shards
from csi_dist.data.shards.writer import (DEFAULT_DEMO_IMAGES, DEFAULT_DEMO_OUT, DEFAULT_DEMO_SIZE, DEFAULT_IMAGE_SIZE,
                                         DEFAULT_SHARD_MAX_MB, ShardWriteError, write_demo, write_shards)
from csi_dist.data.split import DEFAULT_FRACTIONS, DEFAULT_SEED, SplitError

logger = logging.getLogger("csi_dist.shards")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csi-shards", description="Write CSI WebDataset shards, say whether they are usable, draw samples.",
        epilog="Quick start: csi-shards --demo 200  (phantom data into data/demo_shards)")
    parser.add_argument("--demo", type=int, nargs="?", const=DEFAULT_DEMO_IMAGES, metavar="N",
                        help=f"generate N phantom images (default {DEFAULT_DEMO_IMAGES}) under OUT/raw and shard them")
    parser.add_argument("--out", dest="demo_out", type=Path, default=DEFAULT_DEMO_OUT, metavar="DIR",
                        help=f"--demo output directory (default {DEFAULT_DEMO_OUT})")
    parser.add_argument("--size", dest="demo_size", type=int, default=DEFAULT_DEMO_SIZE, metavar="PIXELS",
                        help=f"--demo image side (default {DEFAULT_DEMO_SIZE})")
    parser.add_argument("--workers", dest="demo_workers", type=int, metavar="N",
                        help="--demo worker processes (default: all cores)")
    parser.add_argument("--demo-format", choices=IMAGE_EXTENSIONS, default="png",
                        help="--demo image format (default png; npy: raw arrays, nothing to decode)")
    commands = parser.add_subparsers(dest="command", metavar="{write,verify,show}")

    write = commands.add_parser("write", help="write shards from a label CSV and an image directory",
                                description="Write shards, split.csv and manifest.json from a label CSV and its "
                                            "images. Bad CSV rows are all named in one error; an --out that already "
                                            "holds shards is refused before the CSV is read.")
    write.add_argument("--csv", type=Path, required=True, help="label CSV (';'-separated, FileID + 6 zones + csi)")
    write.add_argument("--encoding", help="encoding of --csv, e.g. utf-8 or cp1252 (default: UTF-8 with or without "
                       "BOM, else cp1252 with a warning)")
    write.add_argument("--images", type=Path, required=True, help="directory of <FileID>.png/.jpg/.dcm/.nii.gz")
    write.add_argument("--out", type=Path, required=True, help="output directory for shards and manifest")
    write.add_argument("--size", type=int, default=DEFAULT_IMAGE_SIZE, metavar="PIXELS",
                       help=f"side of the square images stored in the shards (default {DEFAULT_IMAGE_SIZE})")
    write.add_argument("--image-format", choices=IMAGE_EXTENSIONS, default="png",
                       help="png (default, lossless), jpg, or npy: raw uint8 arrays, lossless, no decoding in the "
                            "loader, about 1.5x the bytes (for few CPU cores per GPU; see BENCHMARKS.md)")
    write.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, metavar="1-100",
                       help=f"JPEG quality with --image-format jpg (default {DEFAULT_JPEG_QUALITY})")
    sizing = write.add_mutually_exclusive_group()
    sizing.add_argument("--shard-max-mb", type=float, default=DEFAULT_SHARD_MAX_MB, metavar="MB",
                        help=f"close a shard once it holds this many MB (default {DEFAULT_SHARD_MAX_MB:g})")
    sizing.add_argument("--samples-per-shard", type=int, metavar="N",
                        help="close a shard after N samples instead of by size")
    write.add_argument("--workers", type=int, metavar="N", help="decode/encode processes (default: all usable cores)")
    write.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help=f"seed of the train/val/test split: the same seed and CSV give the same split "
                            f"(default {DEFAULT_SEED})")
    write.add_argument("--split-fractions", type=float, nargs=3, default=DEFAULT_FRACTIONS,
                       metavar=("TRAIN", "VAL", "TEST"),
                       help=f"share of the patients in each split, summing to 1 (default "
                            f"{' '.join(f'{fraction:g}' for fraction in DEFAULT_FRACTIONS)})")
    write.add_argument("--split-file", type=Path, metavar="FILE",
                       help="reuse this split.csv (of an earlier write) instead of computing a split")
    write.add_argument("--exclude-ids", default="", metavar="IDS", help="comma-separated FileIDs to leave out")
    write.add_argument("--strict", action="store_true", help="fail instead of skipping missing/corrupt images")
    write.add_argument("--overwrite", action="store_true", help="replace shards already in --out")

    verify = commands.add_parser(
        "verify", help="say whether the shards are usable, as training and evaluation will read them",
        description="Check every shard against the manifest as the reader reads it, and give one verdict per changed "
                    "shard and one for the whole set: usable (every sample reads intact), usable with N damaged "
                    "samples (named: they are skipped when read), or unusable. Exit 0 when every sample reads intact, "
                    "1 otherwise.")
    verify.add_argument("directory", type=Path, help="shard directory (holds manifest.json)")

    show = commands.add_parser("show", help="draw a PNG grid of samples, as the model sees them, with their grades")
    show.add_argument("directory", type=Path, nargs="?", help="shard directory (or give --csv and --images)")
    show.add_argument("--csv", type=Path, help="label CSV, to look at images before sharding (with --images)")
    show.add_argument("--images", type=Path, help="image directory of --csv")
    show.add_argument("--n", type=int, default=16, help="samples to draw: the first N (default 16)")
    show.add_argument("--split", choices=SPLIT_NAMES, default="train", help="split of the shards (default train)")
    show.add_argument("--augment", action="store_true", help="apply the training augmentation")
    show.add_argument("--seed", type=int, default=42, help="augmentation seed (default 42, as training)")
    show.add_argument("--size", type=int, metavar="PIXELS",
                      help="image side fed to the model (default: the shards'; 512 for --csv)")
    show.add_argument("--tile", type=int, default=256, metavar="PIXELS",
                      help="tile side in the PNG, pixels (default 256)")
    show.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG (default samples.png)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `csi-shards`; returns 0 on success, 1 when verify finds problems, 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and args.demo is None:
        parser.error("give a command (write, verify or show) or --demo N")
    if args.command == "show":
        from csi_dist.data.shards.show import run_show  # imports torch (seconds): only `show` needs it
        return run_show(args)
    try:
        if args.command == "verify":
            result = verify_shards(args.directory)
            for shard in result.shards:
                if not shard.intact:
                    logger.log(logging.WARNING if shard.notes else logging.ERROR, "%s", shard.line())
            for problem in result.problems[result.manifest_unreadable:]:
                logger.warning("%s", problem)
            logger.log(logging.INFO if result.all_intact else logging.ERROR, "verdict: %s", result.verdict())
            return 0 if result.all_intact else 1
        if args.command == "write":
            exclude = {file_id.strip() for file_id in args.exclude_ids.split(",") if file_id.strip()}
            write_shards(args.csv, args.images, args.out, image_size=args.size, image_format=args.image_format,
                         jpeg_quality=args.jpeg_quality, shard_max_mb=args.shard_max_mb,
                         samples_per_shard=args.samples_per_shard, workers=args.workers, split_seed=args.seed,
                         split_fractions=args.split_fractions, split_file=args.split_file, exclude_ids=exclude,
                         strict=args.strict, overwrite=args.overwrite, csv_encoding=args.encoding)
        else:
            write_demo(args.demo_out, args.demo, image_size=args.demo_size, workers=args.demo_workers,
                       image_format=args.demo_format)
    except (LabelError, SplitError, ImageError, ShardWriteError) as err:
        logger.error("%s", err)
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    run_command(main)
