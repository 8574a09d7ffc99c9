"""Shards: the on-disk format (format.py), the writer (writer.py), the per-sample index (index.py), the check a user
runs (verify.py), the epoch plan (plan.py), the distributed reader (reader.py) and the drawing of samples (show.py)."""
