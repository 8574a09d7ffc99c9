"""Small GPU tensors read on the host later, without draining the GPU's queue.

A value read at once (`.item()`, `bool()`, `.tolist()`) waits for every kernel queued before it, and the GPU then idles
while the host launches the next ones. A `HostCopy` is made where the value is (a copy into pinned host memory and an
event behind it) and read later: reading waits for that point of the queue only, which the GPU has usually passed.
On the CPU the tensor is simply kept.
"""
from __future__ import annotations

import torch


class HostCopy:
    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensor

    def read(self) -> torch.Tensor:
        """The values on the host (waits until the GPU has reached the point where the copy was made)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host
