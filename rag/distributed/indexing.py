"""Distributed indexing on Ray Data: chunking in Ray tasks, dense and KV encoding on an actor pool, the
commit through the store's one write path.

    from blockrag.distributed import ray_index
    report = ray_index(collection, docs, address=None, workers=2)   # = collection.add_documents(docs)

The order of a run:

1. the driver drops the documents the store already holds unchanged and cuts the rest into *shards*
   (``shard_docs`` documents each), each keyed by a hash of its documents' content and of what encodes
   them (chunk settings and tokenizer hash, the dense models, the KV cache identity);
2. Ray tasks chunk each shard with the store's chunker, actors (one GPU each where the cluster has GPUs,
   else a share of the CPUs; batch sizes chosen from the device) encode its chunks for every dense and KV
   index; each shard's outputs go to ``<store>/staging/ray/<key>/`` and a ``done.json`` written last marks
   it finished;
3. the driver hands the staged chunks, vectors and KV files to :meth:`Collection.add_documents` (its one
   SQLite transaction, journal and write lock): nothing is encoded again there, and the crash guarantees
   are the plain path's. The shards' folders are removed after the commit.

A killed worker or driver before the commit leaves the store at its previous state; a rerun over the same
documents finds the finished shards by their keys and encodes only the others. KV files are content-keyed
and immutable, so those linked into the cache folder before a crash are simply reused.

The staging folder must be reachable by every worker (a local cluster, or a store on a shared filesystem).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

EXTRA_HINT = "Ray is not installed: install the extra with `pip install 'blockrag[ray]'`"
DONE = "done.json"


class RayNotInstalled(RuntimeError):
    """``--ray`` / :func:`ray_index` without the ``ray`` extra installed."""


def require_ray():
    """The ``ray`` module, or :class:`RayNotInstalled` with one line naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra
    except ImportError:
        raise RayNotInstalled(EXTRA_HINT) from None
    return ray


# ----------------------------------------------------------------------------- small helpers
def _sha(text: str, n: int = 32) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def doc_key(doc) -> str:
    """A document's content key: id, title, text and metadata (what its chunks are made from)."""
    return _sha("\x00".join([doc.id, doc.title, doc.text, json.dumps(doc.metadata, sort_keys=True)]), 24)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + "-" + _sha(name, 8)


def device_batch_sizes(device: str, kv_bytes_per_token: int = 0, tokens: int = 512) -> dict:
    """Batch sizes for the dense encoder and the KV prefill on ``device``: the CPU defaults, or on a GPU
    as many sequences as a quarter of its free memory holds (activations ~ 8x the stored KV per token)."""
    if not device.startswith("cuda"):
        return {"dense": 64, "kv": 8}
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    per_seq = max(1, 8 * kv_bytes_per_token * tokens)
    return {"dense": 512 if free > 8 << 30 else 128, "kv": int(min(256, max(8, free // 4 // per_seq)))}


# ----------------------------------------------------------------------------- the plan
def _plan(collection) -> dict:
    """What the workers need (and what keys a shard): chunking, the dense models, the KV identities."""
    from blockrag.attention_kv.index import KVIndex
    from blockrag.collection import RefusedIndex
    from blockrag.retrievers.dense import DenseRetriever
    from blockrag.store import IndexMismatch

    collection.chunker  # noqa: B018 - loads the tokenizer, records (or checks) its hash
    chunking = collection.store.get_setting("chunking")
    plan = {"chunking": {k: chunking.get(k) for k in ("tokenizer", "chunk_tokens", "overlap", "tokenizer_hash")},
            "dense": {}, "kv": {}}
    for name, index in collection.indexes.items():
        if isinstance(index, RefusedIndex):
            raise IndexMismatch(index.reason)
        if isinstance(index, DenseRetriever):
            entry = collection.store.manifest(name) or {}
            plan["dense"][name] = {"model": index.model_name, "revision": entry.get("revision"),
                                   "normalize": True}
        elif isinstance(index, KVIndex):
            store = index.store  # loads the generator: its identity is what the workers must reproduce
            dtype = str(next(store.model.parameters()).dtype).replace("torch.", "")
            plan["kv"][name] = {"model": index.model_name, "quant": index.quant,
                                "system_prompt": index.system_prompt, "model_dtype": dtype,
                                "adapter": index.adapter, "identity": store.identity}
    return plan


def _shards(docs: list, plan: dict, shard_docs: int, root: Path) -> list[dict]:
    ident = json.dumps(plan, sort_keys=True, default=str)
    rows = []
    for s in range(0, len(docs), shard_docs):
        part = docs[s:s + shard_docs]
        key = _sha(ident + "|" + ",".join(doc_key(d) for d in part))
        rows.append({"key": key, "dir": str(root / key),
                     "docs": json.dumps([{"id": d.id, "title": d.title, "text": d.text, "metadata": d.metadata}
                                         for d in part])})
    return rows


# ----------------------------------------------------------------------------- Ray stages
def chunk_shard(row: dict, plan: dict) -> dict:
    """Ray task: chunk a shard's documents with the store's chunker into ``chunks.json`` (once)."""
    from blockrag.chunking import TokenChunker
    from blockrag.documents import Document
    from blockrag.models import load_tokenizer, tokenizer_hash

    folder = Path(row["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    out = {"key": row["key"], "dir": row["dir"]}
    if (folder / "chunks.json").exists():
        return out
    c = plan["chunking"]
    tokenizer = load_tokenizer(c["tokenizer"])
    if c.get("tokenizer_hash") not in (None, tokenizer_hash(tokenizer)):
        raise RuntimeError(f"worker tokenizer {c['tokenizer']!r} hashes differently from the store's")
    chunker = TokenChunker(tokenizer, c["chunk_tokens"], c["overlap"])
    entries = []
    for d in json.loads(row["docs"]):
        doc = Document(**d)
        try:
            entries.append({"doc": doc_key(doc), "chunks": [asdict(ch) for ch in chunker.iter_split(doc)]})
        except Exception as err:  # noqa: BLE001 - the driver's chunker skips it with the usual warning
            entries.append({"doc": doc_key(doc), "error": f"{type(err).__name__}: {err}"})
    _atomic_write(folder / "chunks.json", json.dumps(entries).encode())
    return out


class ShardEncoder:
    """Ray actor: encodes a chunked shard for every dense and KV index of the plan (models loaded once)."""

    def __init__(self, plan: dict, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.plan = plan
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._dense: dict = {}
        self._kv: dict = {}

    def _dense_model(self, name: str):
        from blockrag.retrievers.dense import DenseRetriever

        if name not in self._dense:
            spec = self.plan["dense"][name]
            self._dense[name] = DenseRetriever(spec["model"], name=name, device=self.device,
                                               batch_size=device_batch_sizes(self.device)["dense"],
                                               show_progress=False)
        return self._dense[name]

    def _kv_model(self, name: str):
        import torch

        from blockrag.models import shared_generator

        if name not in self._kv:
            spec = self.plan["kv"][name]
            model, tok = shared_generator(spec["model"], dtype=getattr(torch, spec["model_dtype"]),
                                          device=self.device, adapter=spec.get("adapter"))
            i = spec["identity"]
            per_token = i["n_layers"] * 2 * i["n_kv_heads"] * i["head_dim"] * 4
            tokens = (self.plan["chunking"]["chunk_tokens"] or 512) + 128
            self._kv[name] = (model, tok, device_batch_sizes(self.device, per_token, tokens)["kv"])
        return self._kv[name]

    def __call__(self, row: dict) -> dict:
        import numpy as np
        import torch

        from blockrag.attention_kv.cache_store import KVCacheMismatch, KVCacheStore
        from blockrag.documents import Chunk

        folder = Path(row["dir"])
        if (folder / DONE).exists():
            return row
        entries = json.loads((folder / "chunks.json").read_text())
        chunks = [Chunk(**c) for e in entries for c in e.get("chunks", [])]
        for name in self.plan["dense"]:
            path = folder / f"dense-{_safe(name)}.npy"
            if not path.exists():
                vectors = self._dense_model(name).encode([c.text for c in chunks], progress=False) if chunks \
                    else np.zeros((0, 0), np.float32)
                fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npy")
                os.close(fd)
                np.save(tmp, vectors)
                os.replace(tmp, path)
        for name, spec in self.plan["kv"].items():
            model, tok, batch = self._kv_model(name)
            store = KVCacheStore(folder / f"kv-{_safe(name)}", model, tok, system_prompt=spec["system_prompt"],
                                 dtype=getattr(torch, spec["identity"]["dtype"]), quant=spec["quant"],
                                 model_name=spec["model"], batch_size=batch)
            if store.identity != spec["identity"]:
                diff = [k for k in store.identity if store.identity[k] != spec["identity"].get(k)]
                raise KVCacheMismatch(f"a worker's KV identity differs from the driver's in {', '.join(diff)} "
                                      f"(another model file, dtype or tokenizer on this node?)")
            store.add(chunks, progress=False)  # skips chunks whose files an interrupted run already wrote
        _atomic_write(folder / DONE, json.dumps({"chunks": len(chunks), "pid": os.getpid()}).encode())
        return row


# ----------------------------------------------------------------------------- driver
def _resources(ray, workers: int | None) -> tuple[int, dict]:
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    if workers is None:
        workers = gpus or 1
    if gpus:  # one GPU per encoder; its CPU share feeds it
        return workers, {"num_gpus": 1, "num_cpus": 1}
    return workers, {"num_cpus": max(1, cpus // workers)}  # torch threads = the actor's CPU share


def _connect(ray, address: str | None):
    if not ray.is_initialized():
        ray.init(address=address)  # None: RAY_ADDRESS, else a new local cluster


def _load_shard(folder: Path, plan: dict) -> tuple[dict, dict]:
    """(doc key -> chunks, dense name -> {chunk id: vector}) of a finished shard."""
    import numpy as np

    from blockrag.documents import Chunk

    entries = json.loads((folder / "chunks.json").read_text())
    by_doc = {e["doc"]: [Chunk(**c) for c in e["chunks"]] for e in entries if "chunks" in e}
    ids = [c["id"] for e in entries for c in e.get("chunks", [])]
    vectors = {}
    for name in plan["dense"]:
        v = np.load(folder / f"dense-{_safe(name)}.npy", allow_pickle=False)
        vectors[name] = dict(zip(ids, v)) if ids else {}
    return by_doc, vectors


def _link_kv(folder: Path, collection, plan: dict) -> int:
    """Hard-link (or copy) a shard's KV files into each KV index's cache folder; returns files placed."""
    n = 0
    for name in plan["kv"]:
        src = folder / f"kv-{_safe(name)}" / "chunks"
        dest = collection.indexes[name].store.folder / "chunks"
        for f in sorted(src.glob("*.safetensors")) if src.exists() else []:
            target = dest / f.name
            if target.exists():
                continue
            tmp = dest / f".{f.name}.{os.getpid()}.link"
            try:
                os.link(f, tmp)
            except OSError:  # another filesystem
                shutil.copyfile(f, tmp)
            os.replace(tmp, target)
            n += 1
    return n


@contextmanager
def _precomputed(collection, vectors: dict):
    indexes = [(collection.indexes[name], v) for name, v in vectors.items()]
    for index, v in indexes:
        index.precomputed = v
    try:
        yield
    finally:
        for index, _ in indexes:
            index.precomputed = None


def ray_index(collection, docs: Iterable, address: str | None = None, workers: int | None = None,
              shard_docs: int = 64, progress: bool = True):
    """Add ``docs`` to ``collection`` as :meth:`Collection.add_documents` does, with chunking and encoding
    spread over a Ray cluster (``address``: ``None`` connects to ``RAY_ADDRESS`` or starts a local one,
    unless Ray is already initialised). ``workers``: encoder actors (default: one per GPU, else 1).
    Returns the :class:`IngestReport` of the commit, with a note on the shards encoded and reused."""
    from tqdm.auto import tqdm

    from blockrag.collection import _check_document

    ray = require_ray()
    docs = list(docs)
    collection.refresh()
    plan = _plan(collection)
    todo, seen = [], set()
    for doc in docs:
        try:
            bad = _check_document(doc)
        except (TypeError, ValueError):
            bad = "invalid"
        if bad is not None:
            continue  # add_documents reports (or raises for) it as the plain path does
        old = collection.store.document(doc.id)
        if old is not None and (old.title, old.text) == (doc.title, doc.text):
            continue
        if doc_key(doc) not in seen:
            seen.add(doc_key(doc))
            todo.append(doc)
    root = collection.store.folder / "staging" / "ray"
    root.mkdir(parents=True, exist_ok=True)
    rows = _shards(todo, plan, shard_docs, root)
    pending = [r for r in rows if not (Path(r["dir"]) / DONE).exists()]
    if pending:
        _connect(ray, address)
        workers, actor_res = _resources(ray, workers)
        ds = ray.data.from_items(pending, override_num_blocks=len(pending))
        # chunking first, to completion: the encoder actors then hold the cluster's CPUs without starving it
        ds = ds.map(chunk_shard, fn_kwargs={"plan": plan}, num_cpus=1).materialize()
        if plan["dense"] or plan["kv"]:
            ds = ds.map(ShardEncoder, fn_constructor_kwargs={"plan": plan, "threads": actor_res.get("num_cpus")},
                        compute=ray.data.ActorPoolStrategy(size=workers), **actor_res)
        bar = tqdm(total=len(pending), desc=f"encoding on Ray ({workers} workers)", unit="shard",
                   disable=not progress)
        for _ in ds.iter_rows():
            bar.update(1)
        bar.close()
    chunks_by_doc: dict = {}
    vectors: dict = {name: {} for name in plan["dense"]}
    for row in rows:
        folder = Path(row["dir"])
        if not (folder / DONE).exists() and (plan["dense"] or plan["kv"]):
            raise RuntimeError(f"shard {row['key']} was not encoded (a worker failed); run again to resume")
        by_doc, vecs = _load_shard(folder, plan)
        chunks_by_doc.update(by_doc)
        for name, v in vecs.items():
            vectors[name].update(v)
        _link_kv(folder, collection, plan)

    def chunks_for(doc):
        staged = chunks_by_doc.get(doc_key(doc))
        return staged if staged is not None else collection.chunker.iter_split(doc)

    with _precomputed(collection, vectors):
        report = collection.add_documents(docs, chunks_for=chunks_for)
    for row in rows:  # committed: the staged outputs are no longer needed
        shutil.rmtree(row["dir"], ignore_errors=True)
    report.notes.append(f"ray: {len(rows)} shards, {len(pending)} encoded, {len(rows) - len(pending)} reused "
                        f"from an earlier run")
    return report
