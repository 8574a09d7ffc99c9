"""Hyper-parameter tuning behind `python -m csi_dist.sweep` (csi_dist/sweep.py): an Optuna study whose trials are SLURM
jobs (or local processes), each a resumable training run. driver.py runs the sweep; study.py keeps the study's books,
trial.py runs in each trial's job, space.py reads search-space files, report.py writes the outputs, console.py says what
the driver does, wandb_agent.py runs a W&B-sweep trial."""
