"""Fast-weight memory ops of Hope: the self-modifying Titans memory and the CMS levels."""
from hope_kernels._dispatch import BACKENDS, resolve_backend

__all__ = ["BACKENDS", "resolve_backend"]
