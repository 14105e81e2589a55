"""KV tiers: per-chunk KV entries in a stack of byte-budgeted tiers with pluggable storage.

An entry is one chunk's :class:`~blockrag.attention_kv.cache_store.ChunkKV`, keyed by the store's content key
(:meth:`KVCacheStore.key`: model revision, tokenizer, prefix, chunk ids, dtype/quant). Entries are immutable:
a key always names the same bytes, so a write never has to replace anything, two writers of one key write the
same thing, and readers need no locks. On disk an entry is the bytes of a safetensors blob with the tensor
names of the store's own files (``token_ids``, ``kv``, ``scale`` for int8).

Storage (:class:`Backend`): :class:`LocalDirBackend` (a folder), :class:`SharedFSBackend` (a folder on a
filesystem several machines mount: same layout, fsync before the rename), :class:`FsspecBackend` (any
``fsspec`` filesystem: object stores, ``memory://``, ``file://``). Every write goes to a temporary name and is
renamed into place, so a reader sees the whole entry or none of it.

Tiers: :class:`MemoryTier` (decoded tensors in host RAM, or on a device) and :class:`BlobTier` (a backend),
each with a byte budget and LRU or LFU eviction, and optionally int8 (``quant="int8"``: the store's
per-channel int8, half the bytes of bf16). :class:`TierStack` looks tiers up fastest first, copies a hit into
the faster tiers, and on a miss everywhere calls the compute callback (the chunk's KV encoding) once, stores
the result in every tier and serves it.

``TierStack.default(folder, ram_bytes=..., disk_bytes=..., remote=...)`` builds host RAM -> local disk ->
remote.
"""
from __future__ import annotations

import os
import tempfile
import threading
import uuid
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from .cache_store import ChunkKV, quantize_int8

__all__ = ["Backend", "LocalDirBackend", "SharedFSBackend", "FsspecBackend", "MemoryTier", "BlobTier",
           "TierStack", "to_bytes", "from_bytes", "CorruptEntry"]

_SUFFIX = ".safetensors"


class CorruptEntry(RuntimeError):
    """A stored entry could not be decoded (it is dropped and treated as a miss)."""


# ----------------------------------------------------------------------------- entry <-> bytes
def to_bytes(kv: ChunkKV, metadata: dict | None = None) -> bytes:
    """One entry as safetensors bytes (the tensor names of the store's per-chunk files)."""
    from safetensors.torch import save

    tensors = {"token_ids": kv.token_ids.to(torch.int32).contiguous().cpu(), "kv": kv.kv.contiguous().cpu()}
    if kv.scale is not None:
        tensors["scale"] = kv.scale.contiguous().cpu()
    return save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})


def from_bytes(data: bytes) -> ChunkKV:
    """Inverse of :func:`to_bytes`; raises :class:`CorruptEntry` on truncated or foreign bytes."""
    from safetensors.torch import load

    try:
        t = load(bytes(data))
        return ChunkKV(t["token_ids"], t["kv"], t.get("scale"))
    except Exception as e:  # safetensors raises its own error types; any failure means an unusable entry
        raise CorruptEntry(f"undecodable KV entry ({len(data)} bytes): {e}") from None


def _as_quant(kv: ChunkKV, quant: str | None) -> ChunkKV:
    if quant is None or kv.scale is not None:
        return kv
    if quant != "int8":
        raise ValueError(f"quant must be None or 'int8', not {quant!r}")
    q, scale = quantize_int8(kv.kv)
    return ChunkKV(kv.token_ids, q.contiguous(), scale.contiguous())


def _check_key(key: str) -> str:
    if not key or "/" in key or "\\" in key or key.startswith("."):
        raise ValueError(f"bad KV entry key {key!r}: expected a content hash")
    return key


# ----------------------------------------------------------------------------- storage backends
class Backend(Protocol):
    """Where a :class:`BlobTier` keeps its bytes. Keys are content hashes; entries are immutable."""

    def read(self, key: str) -> bytes | None:
        """The entry's bytes, or None when there is none."""

    def write(self, key: str, data: bytes) -> None:
        """Store atomically (a reader sees all of it or nothing); an existing entry may be left as it is."""

    def delete(self, key: str) -> None:
        """Remove the entry if present."""

    def exists(self, key: str) -> bool:
        """Whether the entry is stored (cheaper than reading it)."""

    def entries(self) -> list[tuple[str, int]]:
        """(key, size in bytes) of the stored entries, oldest first where the storage knows the age."""


class LocalDirBackend:
    """A local folder: ``root/<key[:2]>/<key>.safetensors``, written to a temp file and renamed into place."""

    fsync = False

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / (_check_key(key) + _SUFFIX)

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if path.exists():  # immutable: the same key holds the same bytes
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + key + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def entries(self) -> list[tuple[str, int, float]]:
        out = []
        for p in self.root.glob("*/*" + _SUFFIX):
            try:
                st = p.stat()
            except FileNotFoundError:  # deleted by another process meanwhile
                continue
            out.append((p.name[:-len(_SUFFIX)], st.st_size, st.st_mtime))
        out.sort(key=lambda e: e[2])
        return [(k, n) for k, n, _ in out]


class SharedFSBackend(LocalDirBackend):
    """A folder on a filesystem several hosts mount (NFS, Lustre, ...). Same layout as
    :class:`LocalDirBackend`; the data is fsync'ed before the rename, so another host that sees the name
    (close-to-open consistency) also sees the bytes."""

    fsync = True


class FsspecBackend:
    """Any ``fsspec`` filesystem: ``FsspecBackend("s3://bucket/kv")``, ``FsspecBackend("memory://kv")``,
    ``FsspecBackend("file:///mnt/kv")`` (``storage_options`` go to the filesystem). Writes go to
    ``root/.tmp/`` and are moved into place (a rename on file systems; on object stores a copy, and
    objects appear whole)."""

    def __init__(self, url: str, **storage_options):
        try:
            import fsspec
        except ImportError:
            raise ImportError("FsspecBackend needs fsspec: pip install fsspec") from None
        self.fs, self.root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = self.root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{_check_key(key)}{_SUFFIX}"

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self.fs.exists(path):
            return
        tmp = f"{self.root}/.tmp/{key}.{uuid.uuid4().hex}"
        self.fs.makedirs(f"{self.root}/.tmp", exist_ok=True)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, path)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def delete(self, key: str) -> None:
        try:
            self.fs.rm(self._path(key))
        except FileNotFoundError:
            pass

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def entries(self) -> list[tuple[str, int]]:
        out = []
        for path, info in self.fs.find(self.root, detail=True).items():
            name = path.rsplit("/", 1)[-1]
            if "/.tmp/" in path or not name.endswith(_SUFFIX):
                continue
            out.append((name[:-len(_SUFFIX)], int(info.get("size") or 0)))
        return out


# ----------------------------------------------------------------------------- eviction policies
class _LRU:
    """Least recently used first."""

    def __init__(self):
        self._order: OrderedDict[str, None] = OrderedDict()

    def __len__(self):
        return len(self._order)

    def insert(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def hit(self, key: str) -> None:
        self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    retire = remove

    def victim(self) -> str:
        return next(iter(self._order))


class _LFU:
    """Least frequently used first, ties broken least recently used; O(1) per operation (one insertion-ordered
    bucket per count). The counts of evicted entries are remembered (the last ``ghosts`` of them), so a popular
    entry that was pushed out comes back with its history instead of as a newcomer; without that, which
    entries stick depends on the early requests rather than on popularity."""

    def __init__(self, ghosts: int = 65536):
        self._count: dict[str, int] = {}
        self._buckets: dict[int, OrderedDict[str, None]] = defaultdict(OrderedDict)
        self._min = 0
        self._ghosts: OrderedDict[str, int] = OrderedDict()
        self._max_ghosts = ghosts

    def __len__(self):
        return len(self._count)

    def insert(self, key: str) -> None:
        if key in self._count:
            return self.hit(key)
        c = self._ghosts.pop(key, 0) + 1
        self._count[key] = c
        self._buckets[c][key] = None
        self._min = c if len(self._count) == 1 else min(self._min, c)

    def hit(self, key: str) -> None:
        c = self._count[key]
        b = self._buckets[c]
        del b[key]
        if not b:
            del self._buckets[c]
            if self._min == c:
                self._min = c + 1
        self._count[key] = c + 1
        self._buckets[c + 1][key] = None

    def remove(self, key: str) -> None:
        c = self._count.pop(key, None)
        if c is None:
            return
        b = self._buckets[c]
        del b[key]
        if not b:
            del self._buckets[c]
            if self._min == c:
                self._min = min(self._buckets) if self._buckets else 0

    def retire(self, key: str) -> None:
        """Evicted (not deleted): keep its count for when it comes back."""
        c = self._count.get(key)
        self.remove(key)
        if c is not None and self._max_ghosts > 0:
            self._ghosts[key] = c
            while len(self._ghosts) > self._max_ghosts:
                self._ghosts.popitem(last=False)

    def victim(self) -> str:
        if self._min not in self._buckets:
            self._min = min(self._buckets)
        return next(iter(self._buckets[self._min]))


def _policy(name: str):
    if name == "lru":
        return _LRU()
    if name == "lfu":
        return _LFU()
    raise ValueError(f"eviction policy must be 'lru' or 'lfu', not {name!r}")


# ----------------------------------------------------------------------------- tiers
class _TierBase:
    """Budget, eviction order and counters shared by both tier kinds."""

    def __init__(self, name: str, budget_bytes: int | None, policy: str, quant: str | None):
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"tier {name!r}: budget_bytes must be >= 0 or None (unbounded)")
        if quant not in (None, "int8"):
            raise ValueError(f"tier {name!r}: quant must be None or 'int8', not {quant!r}")
        self.name, self.budget_bytes, self.quant = name, budget_bytes, quant
        self.policy_name = policy
        self._policy = _policy(policy)
        self._sizes: dict[str, int] = {}
        self.used_bytes = 0
        self.hits = self.misses = self.evictions = self.corrupt = 0
        self._lock = threading.RLock()

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[str]:
        """The keys this tier holds (this process's view), e.g. for a router that sends work to the holder."""
        with self._lock:
            return list(self._sizes)

    def stats(self) -> dict:
        n = self.hits + self.misses
        return {"tier": self.name, "entries": len(self._sizes), "used_bytes": self.used_bytes,
                "budget_bytes": self.budget_bytes, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / n if n else 0.0, "evictions": self.evictions, "corrupt": self.corrupt}

    def reset_stats(self) -> None:
        self.hits = self.misses = self.evictions = self.corrupt = 0

    def _track(self, key: str, size: int) -> None:
        self._sizes[key] = size
        self.used_bytes += size
        self._policy.insert(key)

    def _forget(self, key: str) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.used_bytes -= size
            self._policy.remove(key)

    def _fits(self, size: int) -> bool:
        return self.budget_bytes is None or size <= self.budget_bytes

    def _evict_for(self, size: int, keep: str | None = None) -> None:
        if self.budget_bytes is None:
            return
        while self._sizes and self.used_bytes + size > self.budget_bytes:
            victim = self._policy.victim()
            if victim == keep:  # never the entry being written
                break
            self._policy.retire(victim)
            self._drop(victim)
            self.evictions += 1

    def _drop(self, key: str) -> None:
        self._forget(key)


class MemoryTier(_TierBase):
    """Decoded entries in memory: host RAM (``device="cpu"``, pinned with ``pin=True``) or a GPU."""

    def __init__(self, budget_bytes: int | None = 1 << 30, policy: str = "lru", *, quant: str | None = None,
                 device: str | torch.device = "cpu", pin: bool = False, name: str | None = None):
        super().__init__(name or ("host" if str(device) == "cpu" else str(device)), budget_bytes, policy, quant)
        self.device, self.pin = torch.device(device), pin
        self._data: dict[str, ChunkKV] = {}

    def get(self, key: str) -> ChunkKV | None:
        with self._lock:
            ent = self._data.get(key)
            if ent is None:
                self.misses += 1
                return None
            self.hits += 1
            self._policy.hit(key)
            return ent

    def put(self, key: str, kv: ChunkKV) -> ChunkKV:
        """Store (evicting to the budget); returns the stored form (quantised / moved)."""
        ent = _as_quant(kv, self.quant)
        if ent.kv.device != self.device:
            ent = ent.to(self.device)
        if self.pin and self.device.type == "cpu" and torch.cuda.is_available():
            ent = ent.pin()
        with self._lock:
            if key in self._data:
                return self._data[key]
            if not self._fits(ent.nbytes):
                return ent
            self._evict_for(ent.nbytes)
            self._data[key] = ent
            self._track(key, ent.nbytes)
        return ent

    def discard(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        self._data.pop(key, None)
        self._forget(key)


class BlobTier(_TierBase):
    """Entries as safetensors bytes in a :class:`Backend` (local disk, shared filesystem, object store).

    The tier's index (sizes, eviction order) is this process's view, seeded from the backend's listing when
    the tier opens; on a shared backend an entry another process wrote is found on read and then tracked,
    and one another process evicted reads as a miss. ``budget_bytes=None``: unbounded (a remote tier that
    holds everything).
    """

    def __init__(self, backend: Backend, budget_bytes: int | None = None, policy: str = "lru", *,
                 quant: str | None = None, name: str | None = None, scan: bool = True):
        super().__init__(name or type(backend).__name__, budget_bytes, policy, quant)
        self.backend = backend
        self.bytes_read = self.bytes_written = 0
        if scan:
            for key, size in backend.entries():
                self._track(key, size)
            self._evict_for(0)

    def __contains__(self, key: str) -> bool:
        """Tracked here, or written by another process sharing the storage."""
        return key in self._sizes or self.backend.exists(key)

    def get(self, key: str) -> ChunkKV | None:
        data = self.backend.read(key)
        with self._lock:
            if data is None:
                self.misses += 1
                self._forget(key)  # evicted elsewhere
                return None
            try:
                ent = from_bytes(data)
            except CorruptEntry:
                self.corrupt += 1
                self.misses += 1
                self._drop(key)
                return None
            self.hits += 1
            self.bytes_read += len(data)
            if key in self._sizes:
                self._policy.hit(key)
            else:  # written by another process
                self._track(key, len(data))
                self._evict_for(0, keep=key)
        return ent

    def put(self, key: str, kv: ChunkKV) -> ChunkKV:
        """Write (atomically, evicting to the budget); returns the stored form."""
        ent = _as_quant(kv, self.quant)
        data = to_bytes(ent)
        with self._lock:
            if key in self._sizes or not self._fits(len(data)):
                return ent
            self._evict_for(len(data))
        self.backend.write(key, data)  # tracked only once readable, so a reader never forgets it early
        with self._lock:
            if key not in self._sizes:
                self._track(key, len(data))
                self._evict_for(0, keep=key)  # concurrent puts may have overfilled the budget meanwhile
            self.bytes_written += len(data)
        return ent

    def discard(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        self._forget(key)
        self.backend.delete(key)


class Tier(Protocol):
    """What :class:`TierStack` needs of a tier."""

    name: str

    def get(self, key: str) -> ChunkKV | None: ...

    def put(self, key: str, kv: ChunkKV) -> ChunkKV: ...

    def discard(self, key: str) -> None: ...

    def stats(self) -> dict: ...


# ----------------------------------------------------------------------------- the stack
class TierStack:
    """Tiers, fastest first. ``get(key, compute)``: the first tier holding ``key`` serves it and the entry is
    copied into the faster tiers; on a miss everywhere ``compute()`` (or the stack's ``compute(key)``) builds
    the entry once — concurrent requests for the same key in this process wait for that one computation —
    and it is written to every tier (write-through, so the slow shared tiers fill for other readers).
    """

    def __init__(self, tiers: Iterable[Tier], compute: Callable[[str], ChunkKV] | None = None):
        self.tiers = list(tiers)
        if not self.tiers:
            raise ValueError("TierStack needs at least one tier")
        self.compute = compute
        self.computed = 0
        self._inflight: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @classmethod
    def default(cls, folder: str | os.PathLike, *, ram_bytes: int = 1 << 30, disk_bytes: int | None = 64 << 30,
                remote: str | Backend | None = None, policy: str = "lru", slow_quant: str | None = None,
                compute: Callable[[str], ChunkKV] | None = None) -> "TierStack":
        """Host RAM -> local folder -> (optional) remote; ``remote`` is an fsspec URL or a backend;
        ``slow_quant="int8"`` stores int8 in the disk and remote tiers."""
        tiers: list[Tier] = [MemoryTier(ram_bytes, policy, name="host"),
                             BlobTier(LocalDirBackend(folder), disk_bytes, policy, quant=slow_quant, name="disk")]
        if remote is not None:
            backend = FsspecBackend(remote) if isinstance(remote, str) else remote
            tiers.append(BlobTier(backend, None, policy, quant=slow_quant, name="remote"))
        return cls(tiers, compute)

    def __contains__(self, key: str) -> bool:
        return any(key in t for t in self.tiers)

    def lookup(self, key: str) -> tuple[ChunkKV | None, int]:
        """(entry, index of the tier that held it), or (None, -1); promotes a hit into the faster tiers."""
        for i, tier in enumerate(self.tiers):
            ent = tier.get(key)
            if ent is not None:
                for faster in self.tiers[:i]:
                    ent_up = faster.put(key, ent)
                    if faster is self.tiers[0]:
                        ent = ent_up
                return ent, i
        return None, -1

    def put(self, key: str, kv: ChunkKV) -> ChunkKV:
        """Write to every tier, slowest first (a fast tier never holds what no slower tier could serve);
        returns the fastest tier's form."""
        ent = kv
        for tier in reversed(self.tiers):
            ent = tier.put(key, kv)
        return ent

    def get(self, key: str, compute: Callable[[], ChunkKV] | None = None) -> ChunkKV:
        ent, _ = self.lookup(key)
        if ent is not None:
            return ent
        with self._lock:
            lock = self._inflight.setdefault(key, threading.Lock())
        with lock:
            try:
                ent, _ = self.lookup(key)  # computed by another thread while this one waited
                if ent is not None:
                    return ent
                if compute is not None:
                    kv = compute()
                elif self.compute is not None:
                    kv = self.compute(key)
                else:
                    raise KeyError(f"KV entry {key} is in no tier and there is no compute callback")
                self.computed += 1
                return self.put(key, kv)
            finally:
                with self._lock:
                    self._inflight.pop(key, None)

    def discard(self, key: str) -> None:
        for t in self.tiers:
            t.discard(key)

    def stats(self) -> list[dict]:
        return [t.stats() for t in self.tiers]

    def reset_stats(self) -> None:
        self.computed = 0
        for t in self.tiers:
            t.reset_stats()
