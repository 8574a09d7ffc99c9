"""csi_dist: distributed training, evaluation and tuning of chest X-ray Congestion Score Index models."""
import os
import time

# When the process started, as near as Python code can tell (the package is imported before torch is): the trainer
# reports its time to the first optimizer step from here, imports included, as users experience it.
PROCESS_START = time.perf_counter()

# The user's torch.compile cache directory, read before any import can fill in inductor's /tmp default (importing
# timm does): csi_dist.training.compilation caches in the run directory unless the user chose a directory.
USER_COMPILE_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
