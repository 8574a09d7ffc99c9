"""csi_dist: distributed training, evaluation and tuning of chest X-ray Congestion Score Index models."""
import time

# When the process started, as near as Python code can tell (the package is imported before torch is): the trainer
# reports its time to the first optimizer step from here, imports included, as users experience it.
PROCESS_START = time.perf_counter()
