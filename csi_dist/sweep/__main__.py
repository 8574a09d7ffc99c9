"""``python -m csi_dist.sweep``: the sweep driver's command line (csi_dist/sweep/driver.py)."""

# Through the import name, so that submitit pickles csi_dist.sweep.trial.TrialTask by reference, not a __main__ copy.
from csi_dist.core.command import run_command
from csi_dist.sweep.driver import main

if __name__ == "__main__":
    run_command(main)
