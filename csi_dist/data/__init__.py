"""Data: the label CSV, radiographs (find and decode one), the unlabelled images predict reads, the patient split, the
phantom dataset, the tar shards (shards/), model input and the loader's worker processes."""
