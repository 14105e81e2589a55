"""blockrag: retrieval-augmented generation over precomputed per-passage KV caches.

The public SDK::

    from blockrag import Collection, Pipeline, Generator, load_path

    collection = Collection("my_store")
    collection.add_documents(load_path("docs/"))
    pipe = Pipeline(collection, retriever="hybrid", k=5, generator=Generator(), mode="turbo")
    answer = pipe.ask("Who founded the bank?")

Names are imported lazily, so ``import blockrag`` (and ``blockrag --version``) does not load torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from ._compat import check_dependencies

__version__ = "0.2.0"

check_dependencies()

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    "Collection": ".collection",
    "IngestReport": ".collection",
    "Pipeline": ".pipeline",
    "Answer": ".pipeline",
    "Document": ".documents",
    "Chunk": ".documents",
    "load_path": ".documents",
    "load_folder": ".documents",
    "load_jsonl": ".documents",
    "Generator": ".attention_kv.generate",
    "GenerationResult": ".attention_kv.generate",
    "KVCacheStore": ".attention_kv.cache_store",
    "registry": ".registry",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load on first use
    from .attention_kv.cache_store import KVCacheStore
    from .attention_kv.generate import GenerationResult, Generator
    from .collection import Collection, IngestReport
    from .documents import Chunk, Document, load_folder, load_jsonl, load_path
    from .pipeline import Answer, Pipeline


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'blockrag' has no attribute {name!r}")
    mod = import_module(module, __name__)
    value = mod if name == "registry" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
