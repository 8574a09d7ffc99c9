"""`python -m csi_dist.submit`: train on SLURM through submitit (see csi_dist.cluster.submit)."""
import sys

from csi_dist.cluster.submit import main

if __name__ == "__main__":
    sys.exit(main())
