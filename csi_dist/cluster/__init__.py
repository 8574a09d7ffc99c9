"""Running on clusters: SLURM knowledge (torch-free) and preemption notices turned into one stop decision."""
