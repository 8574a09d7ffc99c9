"""The core every layer stands on (torch-free except distributed.py): config, domain constants, which strategies exist, exit
codes, the run directory's layout, weights files, atomic files, secrets redaction, provenance, test faults, the process
group, and how commands' processes end."""
