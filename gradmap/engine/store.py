"""Where the engine keeps hidden states between decoder layers: on the compute device while a byte budget allows,
else in host memory (pinned when the device is CUDA, so copies back overlap with compute).

Keys are arbitrary hashables (the engine uses ``(position, micro_batch)``). A tensor put on the host is copied back
to the device by :meth:`StateStore.get`; the store never holds two copies of one state.
"""

from __future__ import annotations

import torch


class DeviceBudget:
    """Bytes of hidden states that all the stores of one engine may keep on the compute device together."""

    def __init__(self, limit: int | None):
        self.limit, self.used = limit, 0

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within the limit."""
        return self.limit is None or self.used + size <= self.limit


class StateStore:
    """A dictionary of hidden-state tensors with a device byte budget and host spill.

    Args:
        device: the compute device.
        budget: the engine's shared :class:`DeviceBudget` (``None``: unlimited). On a CPU device every state is "on
            the device" and nothing spills.

    Attributes:
        device_bytes, host_bytes: bytes held now on each side; ``peak_device_bytes``, ``peak_host_bytes``: maxima.
    """

    def __init__(self, device: torch.device, budget: DeviceBudget | None = None):
        self.device = torch.device(device)
        self.budget = budget
        self._data: dict = {}
        self.device_bytes = 0
        self.host_bytes = 0
        self.peak_device_bytes = 0
        self.peak_host_bytes = 0

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def put(self, key, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (detached) under ``key``, replacing any previous value."""
        self.pop(key)
        t = tensor.detach()
        size = self._nbytes(t)
        spill = self.device.type != "cpu" and self.budget is not None and not self.budget.fits(size)
        if spill:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
            host.copy_(t, non_blocking=False)
            self._data[key] = host
            self.host_bytes += size
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        else:
            self._data[key] = t
            self._device_add(size)

    def _device_add(self, size: int) -> None:
        self.device_bytes += size
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        if self.budget is not None:
            self.budget.used += size

    def get(self, key) -> torch.Tensor:
        """The tensor under ``key`` on the compute device (a copy when it was spilled to the host).

        Raises:
            KeyError: nothing stored under ``key``.
        """
        t = self._data[key]
        return t if t.device == self.device else t.to(self.device, non_blocking=True)

    def __contains__(self, key) -> bool:
        return key in self._data

    def pop(self, key) -> None:
        """Forget ``key`` (no error if absent)."""
        t = self._data.pop(key, None)
        if t is None:
            return
        if t.device == self.device:
            self._device_add(-self._nbytes(t))
        else:
            self.host_bytes -= self._nbytes(t)

    def share(self, other: "StateStore") -> None:
        """Hold the same tensors as ``other`` (references, no copy; each store forgets its own independently)."""
        for key, t in other._data.items():
            self.pop(key)
            self._data[key] = t
            size = self._nbytes(t)
            if t.device == self.device:
                self._device_add(size)
            else:
                self.host_bytes += size
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)

    def keys(self) -> list:
        """The stored keys."""
        return list(self._data)

    def clear(self) -> None:
        """Forget everything."""
        for key in self.keys():
            self.pop(key)
