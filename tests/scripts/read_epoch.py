"""Read one epoch of a shard split on this rank and write what it saw (a test helper run under torchrun)."""
import json
import sys

import torch.distributed as dist

from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split

shard_dir, out_path, epoch, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
settings = LoaderSettings(batch_size=4, image_size=16, shuffle=True, shuffle_window=8, augment=True, seed=7,
                          num_workers=workers)
loader = build_loader(open_split(shard_dir, "train"), settings, epoch=epoch, rank=rank, world_size=world)
batches = [{"index": b["sample_index"].tolist(), "padding": b["is_padding"].tolist(), "file_id": b["file_id"],
            "pixel": b["image"][:, 0, 0, 0].tolist()} for b in loader]
everything = [None] * world
dist.all_gather_object(everything, {"rank": rank, "steps": len(loader), "batches": batches})
if rank == 0:
    with open(out_path, "w") as handle:
        json.dump(everything, handle)
dist.destroy_process_group()
