"""The KV cache store as a Collection index, so passage caches follow the DocStore's adds and deletes.

    collection.build_index("kv")                 # encodes every chunk once (prefix + chunk, keys pre-RoPE)
    generator = collection.index("kv").generator()

Cache files are immutable and keyed by content, so the index folder is written in place (no folder
swap): a rebuild after an interruption re-encodes only the chunks that are missing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

META = "kv_index.json"


class KVIndex:
    def __init__(self, name: str = "kv", model_name: str | None = None, quant: str | None = None,
                 system_prompt: str | None = None, device: str | None = None, kv_policy: str = "precompute",
                 adapter: str | None = None):
        """``kv_policy``: ``"precompute"`` encodes every chunk's KV at indexing time; ``"on-demand"`` only
        records the chunks, and a chunk's KV is computed (and stored) the first time a question needs it.
        ``adapter``: a LoRA adapter (folder, or ``"default"``) merged into the generator whose KV is cached;
        recorded with the index (its revision is part of the caches' revision)."""
        if kv_policy not in ("precompute", "on-demand"):
            raise ValueError(f"kv_policy must be 'precompute' or 'on-demand', not {kv_policy!r}")
        self.name, self.model_name, self.quant, self.kv_policy = name, model_name, quant, kv_policy
        self.adapter = adapter_spec(adapter)
        self.system_prompt, self.device = system_prompt, device
        self.folder: Path | None = None
        self._pending_delete: list[str] = []  # removed in save(), i.e. after the store's commit
        self._store = None
        self._model = self._tokenizer = None

    def attach(self, folder: str | Path) -> None:
        """Called by the Collection with this index's folder before any chunk is added."""
        self.folder = Path(folder)

    @property
    def store(self):
        if self._store is None:
            import torch

            from blockrag.models import shared_generator as load_generator  # one copy per process

            from .cache_store import KVCacheStore

            if self.folder is None:
                raise RuntimeError("KVIndex has no folder: build it through Collection.build_index('kv')")
            self._model, self._tokenizer = load_generator(self.model_name, device=self.device, adapter=self.adapter)
            on_gpu = next(self._model.parameters()).device.type == "cuda"
            self._store = KVCacheStore(self.folder / "cache", self._model, self._tokenizer,
                                       system_prompt=self.system_prompt, quant=self.quant,
                                       dtype=torch.bfloat16 if on_gpu else torch.float32,
                                       model_name=self.model_name, kv_policy=self.kv_policy)
        return self._store

    def matches(self, model_name: str | None, adapter=None) -> bool:
        """Whether this index caches the KV of generator ``model_name`` with LoRA ``adapter``."""
        return self.model_name == model_name and _same_adapter(adapter_spec(adapter), self.adapter, model_name)

    def generator(self, **kwargs):
        """A Generator sharing this index's model and caches. ``adapter=`` another LoRA adapter than the
        index's (or ``"none"``): a Generator with that model, whose passage caches (another revision) are
        computed on first use in its own cache folder, never taken from this index."""
        from .generate import Generator

        if "adapter" in kwargs:
            want = adapter_spec(kwargs.pop("adapter"))
            if not _same_adapter(want, self.adapter, self.model_name):
                import logging

                logging.getLogger(__name__).warning(
                    "kv index %r was built with adapter %s; answering with %s: passage caches are rebuilt on "
                    "first use", self.name, self.adapter or "none", want or "none")
                return Generator(self.model_name, device=self.device, system_prompt=self.system_prompt,
                                 quant=self.quant, adapter=want, **kwargs)
        store = self.store
        return Generator(model=self._model, tokenizer=self._tokenizer, store=store,
                         system_prompt=self.system_prompt, quant=self.quant, **kwargs)

    # ------------------------------------------------------------ Index protocol
    def build(self, chunks: Sequence) -> None:
        """A full (re)build: caches another model or adapter left in this folder are removed first (they would
        be refused, and nothing else reads them)."""
        if self._store is None and self.folder is not None and (self.folder / "cache" / "manifest.json").exists():
            from .cache_store import KVCacheMismatch

            try:
                self.store
            except KVCacheMismatch:
                import shutil

                shutil.rmtree(self.folder / "cache")
        self.add(chunks)

    def add(self, chunks: Sequence) -> None:
        chunks = list(chunks)
        if chunks:
            self.store.add(chunks)

    def delete(self, chunk_ids: Sequence[str]) -> None:
        # deferred to save(): the Collection saves in-place indexes after its commit, so a crash before the
        # commit never leaves the committed state without the cache files it needs
        self._pending_delete += list(chunk_ids)

    def reload(self) -> None:
        """Re-read the cache's chunk map (another process wrote it), dropping deletes not yet saved."""
        self._pending_delete = []
        if self._store is not None:
            with self._store._lock:
                self._store._index = self._store._read_index()

    def save(self, folder: str | Path) -> None:
        if self._pending_delete:
            self.store.delete(self._pending_delete)
            self._pending_delete = []
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"model": self.model_name, "quant": self.quant, "system_prompt": self.system_prompt,
                "kv_policy": self.kv_policy, "adapter": self.adapter}
        tmp = folder / (META + ".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(folder / META)

    @classmethod
    def load(cls, folder: str | Path, **kwargs) -> "KVIndex":
        folder = Path(folder)
        meta = json.loads((folder / META).read_text())
        self = cls(model_name=meta["model"], quant=meta["quant"], system_prompt=meta["system_prompt"],
                   kv_policy=meta.get("kv_policy", "precompute"), adapter=meta.get("adapter"), **kwargs)
        self.attach(folder)
        return self

    def manifest(self) -> dict:
        m = self.store.manifest()
        return {"kind": "kv", "model": self.model_name or m["model"], "revision": m["revision"],
                "tokenizer_hash": m["tokenizer_hash"],
                "params": {"quant": self.quant, "prefix_hash": m["prefix_hash"], "dtype": m["dtype"],
                           "adapter": self.adapter}}


def adapter_spec(adapter) -> str | None:
    """How an adapter is recorded: None for none, ``"default"``, or an absolute folder."""
    if adapter is None or str(adapter).lower() in ("none", "off", ""):
        return None
    return "default" if str(adapter) == "default" else str(Path(adapter).expanduser().resolve())


def _same_adapter(a, b, model_name) -> bool:
    """Whether two recorded adapters give the same model ("default" may resolve to none for other models)."""
    if a == b:
        return True
    from .lora import resolve_adapter

    ra, rb = resolve_adapter(a, model_name), resolve_adapter(b, model_name)
    return (ra and Path(ra).resolve()) == (rb and Path(rb).resolve())
