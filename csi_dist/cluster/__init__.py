"""Running on clusters: SLURM knowledge (torch-free), preemption notices, submitit submission."""
