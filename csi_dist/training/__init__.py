"""Training: the loop's parts (strategies, checkpoints, schedules, accumulation, early stopping, compile, tracking)."""
