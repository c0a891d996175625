"""The kernel limit: live plus starting kernels never exceed ``ERA_MAX_KERNELS``.

A slot is taken synchronously (no await between the check and the increment), so 200
concurrent creates cannot overshoot the way Enterprise Gateway's limit once did.
"""

from __future__ import annotations

from .errors import TooManyKernels


class KernelSlots:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def try_acquire(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def acquire(self) -> None:
        if self.used >= self.limit:
            raise TooManyKernels(f"kernel limit reached ({self.limit} live kernels); retry later", retry_after=2)
        self.used += 1

    def release(self) -> None:
        self.used = max(0, self.used - 1)
