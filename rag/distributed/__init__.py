"""Scale-out on Ray (the optional ``ray`` extra): distributed indexing (:func:`ray_index`) and generator
replicas with cache-aware routing (:mod:`blockrag.distributed.serving`).

Nothing here imports Ray at module level: without the extra, the plain paths are unchanged and asking for
Ray fails with :class:`RayNotInstalled` (one line naming the extra).
"""
from __future__ import annotations

from .indexing import RayNotInstalled, ray_index, require_ray

__all__ = ["RayNotInstalled", "ray_index", "require_ray"]
