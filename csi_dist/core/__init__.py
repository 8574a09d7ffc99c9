"""The core every layer stands on: config, domain constants, which strategies exist, exit codes, the run directory's
layout, weights files, atomic files, secrets redaction, provenance, test faults, the process group, and how commands'
processes end. Torch loads at import only in weights.py and distributed.py."""
