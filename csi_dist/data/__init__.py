"""Data: label CSV and image reading, the tar shard writer, the phantom dataset and the distributed shard reader."""
