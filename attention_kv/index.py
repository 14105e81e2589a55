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
                 system_prompt: str | None = None, device: str | None = None, kv_policy: str = "precompute"):
        """``kv_policy``: ``"precompute"`` encodes every chunk's KV at indexing time; ``"on-demand"`` only
        records the chunks, and a chunk's KV is computed (and stored) the first time a question needs it."""
        if kv_policy not in ("precompute", "on-demand"):
            raise ValueError(f"kv_policy must be 'precompute' or 'on-demand', not {kv_policy!r}")
        self.name, self.model_name, self.quant, self.kv_policy = name, model_name, quant, kv_policy
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
            self._model, self._tokenizer = load_generator(self.model_name, device=self.device)
            on_gpu = next(self._model.parameters()).device.type == "cuda"
            self._store = KVCacheStore(self.folder / "cache", self._model, self._tokenizer,
                                       system_prompt=self.system_prompt, quant=self.quant,
                                       dtype=torch.bfloat16 if on_gpu else torch.float32,
                                       model_name=self.model_name, kv_policy=self.kv_policy)
        return self._store

    def generator(self, **kwargs):
        """A Generator sharing this index's model and caches."""
        from .generate import Generator

        store = self.store
        return Generator(model=self._model, tokenizer=self._tokenizer, store=store,
                         system_prompt=self.system_prompt, quant=self.quant, **kwargs)

    # ------------------------------------------------------------ Index protocol
    def build(self, chunks: Sequence) -> None:
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
                "kv_policy": self.kv_policy}
        tmp = folder / (META + ".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(folder / META)

    @classmethod
    def load(cls, folder: str | Path, **kwargs) -> "KVIndex":
        folder = Path(folder)
        meta = json.loads((folder / META).read_text())
        self = cls(model_name=meta["model"], quant=meta["quant"], system_prompt=meta["system_prompt"],
                   kv_policy=meta.get("kv_policy", "precompute"), **kwargs)
        self.attach(folder)
        return self

    def manifest(self) -> dict:
        m = self.store.manifest()
        return {"kind": "kv", "model": self.model_name or m["model"], "revision": m["revision"],
                "tokenizer_hash": m["tokenizer_hash"],
                "params": {"quant": self.quant, "prefix_hash": m["prefix_hash"], "dtype": m["dtype"]}}
