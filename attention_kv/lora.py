"""Block-Attention LoRA adapters: train one with peft, load one merged into the generator's weights.

    blockrag finetune --data train.json --out my-adapter          # train (CPU-friendly defaults)
    Generator(adapter="my-adapter")                               # answer with it (merged at load)

Training (:func:`train_adapter`) wraps the generator in a peft ``LoraConfig`` (low-rank updates of the
attention projections) and runs :func:`attention_kv.finetune.train_loop`: the Block-Attention recipe
(passages see only the shared prefix and themselves, contiguous positions; half the steps with the plain
causal mask; loss on the answer tokens), over the model seam, so only the LoRA weights get gradients.
The saved folder is an ordinary peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``, fp16)
plus ``blockrag_adapter.json`` (training options and measured cost).

Loading (:func:`merge_adapter`) applies the adapter with peft and merges it (``merge_and_unload``): the
result is a plain model of the base's shape, so generation costs exactly what the base model costs. The
merged model's config carries ``blockrag_adapter`` (the adapter folder's revision hash), which
:func:`attention_kv.cache_store.config_revision` includes: KV caches built with the base model (or another
adapter) have another revision and are refused, and the Generator's default cache folder (keyed by the
revision) is a new one, rebuilt on first use.

:data:`DEFAULT_ADAPTER` ships with blockrag: trained by ``blockrag finetune`` for SmolLM2-135M-Instruct (the
command is in the README and in its ``blockrag_adapter.json``); ``adapter="default"`` resolves to it for that
generator only.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Sequence

import torch

DEFAULT_ADAPTER = Path(__file__).resolve().parent / "adapters" / "smollm2-135m-block"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
INFO_FILE = "blockrag_adapter.json"
NO_ADAPTER = ("none", "off", "")


class AdapterNotAvailable(ValueError):
    """An adapter that cannot be used: missing folder, peft not installed, or made for another model."""


def require_peft():
    try:
        import peft
    except ImportError:
        raise AdapterNotAvailable("LoRA adapters need peft: pip install 'blockrag[finetune]'") from None
    return peft


def is_default_generator(name: str | None) -> bool:
    """True for the bundled generator (SmolLM2-135M-Instruct): by any of its names, or its converted folder
    (compared by path: nothing is loaded or converted here)."""
    from blockrag.models import DEFAULT_GENERATOR, _GENERATOR_PACKAGES, cache_dir

    if name is None or name in _GENERATOR_PACKAGES or name == DEFAULT_GENERATOR:
        return True
    if not name or not Path(name).expanduser().exists():  # a model object without a name, or another model
        return False
    converted = cache_dir() / "models" / Path(_GENERATOR_PACKAGES[DEFAULT_GENERATOR][1]).stem
    return Path(name).expanduser().resolve() == converted.resolve()


def resolve_adapter(adapter: str | Path | None, generator: str | None = None) -> Path | None:
    """The adapter folder to load, or None for the plain model.

    ``None`` / ``"none"``: no adapter. ``"default"``: :data:`DEFAULT_ADAPTER` when ``generator`` is the bundled
    one and peft is installed (else None: the bundled adapter fits that model only; a missing peft is warned
    about). A path: that folder (it must hold ``adapter_config.json``)."""
    if adapter is None or str(adapter).lower() in NO_ADAPTER:
        return None
    if str(adapter) == "default":
        if not is_default_generator(generator) or not (DEFAULT_ADAPTER / "adapter_config.json").exists():
            return None
        try:
            require_peft()
        except AdapterNotAvailable as err:
            import warnings

            warnings.warn(f"the bundled block-attention adapter is not used: {err}")
            return None
        return DEFAULT_ADAPTER
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").exists():
        raise AdapterNotAvailable(f"no LoRA adapter at {path} (expected adapter_config.json there; "
                                  f"train one with `blockrag finetune --out {path}`)")
    return path


def adapter_revision(path: str | Path) -> str:
    """Hash of an adapter folder (its json files and weight samples, as for model folders)."""
    from blockrag.models import model_revision

    return model_revision(str(Path(path).resolve()))


def merge_adapter(model, path: str | Path, copy_model: bool = False):
    """``model`` with the LoRA adapter at ``path`` merged into its weights (peft ``merge_and_unload``); the
    config gets ``blockrag_adapter = {"revision", "path"}``. peft changes the model it wraps in place:
    ``copy_model=True`` merges into a copy and leaves ``model`` as it was."""
    peft = require_peft()
    path = Path(path)
    if getattr(model.config, "blockrag_adapter", None):
        raise AdapterNotAvailable(f"the model already has an adapter merged ({model.config.blockrag_adapter})")
    if copy_model:
        model = copy.deepcopy(model)
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(path))
    except (ValueError, RuntimeError, KeyError) as err:  # shapes / module names of another base model
        raise AdapterNotAvailable(f"the LoRA adapter at {path} does not fit this model: "
                                  f"{str(err).splitlines()[0]}") from None
    merged = wrapped.merge_and_unload()
    merged.config.blockrag_adapter = {"revision": adapter_revision(path), "path": str(path)}
    return merged.eval()


def adapter_size(path: str | Path) -> dict:
    """{"bytes": the adapter's weight file size, "parameters": LoRA parameter count}."""
    from safetensors.torch import load_file

    f = Path(path) / "adapter_model.safetensors"
    n = sum(t.numel() for t in load_file(str(f)).values())
    return {"bytes": f.stat().st_size, "parameters": n}


def lora_config(rank: int = 8, alpha: int | None = None, targets: Sequence[str] = DEFAULT_TARGETS,
                dropout: float = 0.0):
    peft = require_peft()
    return peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets),
                           lora_dropout=dropout, bias="none", task_type="CAUSAL_LM")


def train_adapter(model, examples, out: str | Path, *, steps: int, lr: float = 5e-4, rank: int = 8,
                  alpha: int | None = None, targets: Sequence[str] = DEFAULT_TARGETS, block_prob: float = 0.5,
                  seed: int = 0, progress: bool = True, info: dict | None = None, base_name: str | None = None,
                  **loop) -> dict:
    """Train a LoRA adapter on ``model`` (changed in place by peft: pass a private copy, e.g. from
    :func:`blockrag.models.load_generator`) with the Block-Attention loop, and save it to ``out``.
    Returns the history (``train_loop``'s) with ``adapter_bytes``, ``lora_parameters``, ``revision``."""
    from .finetune import train_loop

    peft = require_peft()
    torch.manual_seed(seed)  # the LoRA A matrices' initialisation
    wrapped = peft.get_peft_model(model, lora_config(rank, alpha, targets))
    hist = train_loop(wrapped, examples, steps=steps, lr=lr, block_prob=block_prob, seed=seed,
                      progress=progress, desc="block-attention LoRA", **loop)
    save_adapter(wrapped, out, base_name)
    size = adapter_size(out)
    lens = [len(e.input_ids) for e in examples]
    k = max(1, min(20, len(hist["loss"]) // 4))
    record = {"rank": rank, "alpha": alpha or 2 * rank, "targets": list(targets), "lr": lr,
              "block_prob": block_prob, "steps": hist["steps_done"], "planned_steps": steps, "seed": seed,
              "n_examples": len(examples), "mean_tokens": sum(lens) / len(lens),
              "loss_first": sum(hist["loss"][:k]) / k, "loss_last": sum(hist["loss"][-k:]) / k,
              "wall_s": hist["wall_s"], "cpu_s": hist["cpu_s"], "s_per_step": hist["s_per_step"],
              "threads": torch.get_num_threads(), "adapter_bytes": size["bytes"],
              "lora_parameters": size["parameters"], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **(info or {})}
    (Path(out) / INFO_FILE).write_text(json.dumps(record, indent=1))
    hist.update(adapter_bytes=size["bytes"], lora_parameters=size["parameters"], revision=adapter_revision(out),
                info=record)
    return hist


def save_adapter(wrapped, out: str | Path, base_name: str | None = None) -> None:
    """peft's ``save_pretrained``, with the LoRA weights stored as fp16 (half the file; they are cast back to
    the model's dtype when loaded) and the base model recorded by name (``base_name``, default the bundled
    generator's hub id), not by the local folder it was loaded from (peft's model card, which names it, is
    not kept)."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    f = out / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f), metadata={"format": "pt"})
    from blockrag.models import DEFAULT_GENERATOR

    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = base_name or DEFAULT_GENERATOR
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    card = out / "README.md"  # peft's model-card template: it names the local folder the base came from
    if card.exists():
        card.unlink()


def training_examples(fmt, tokenizer, data: Sequence[str | Path] = (), synthetic_seeds: Sequence[int] = (10, 11),
                      synthetic: int = 300, n_distractors: int = 2, distractor_tokens: int | None = 80,
                      seed: int = 0) -> list:
    """QA files' examples (:func:`attention_kv.finetune.qa_examples`) + ``synthetic`` examples from the synthetic
    generator's ``synthetic_seeds`` (fictional worlds: facts the model cannot know, so the answer must come
    from the passages), shuffled together."""
    import random

    from .finetune import qa_examples, synthetic_examples

    out = []
    for path in data:
        out += qa_examples(fmt, tokenizer, path, n_distractors, distractor_tokens, seed=seed)
    if synthetic and synthetic_seeds:
        per_seed = -(-synthetic // len(synthetic_seeds))
        out += synthetic_examples(fmt, tokenizer, list(synthetic_seeds), n_distractors + 1, per_seed)[:synthetic]
    random.Random(seed).shuffle(out)
    return out


def finetune(out: str | Path, data: Sequence[str | Path] = (), *, generator: str | None = None, steps: int = 200,
             lr: float = 5e-4, rank: int = 8, block_prob: float = 0.5, synthetic_seeds: Sequence[int] = (10, 11),
             synthetic: int = 300, n_distractors: int = 2, distractor_tokens: int | None = 80,
             max_tokens: int = 512, seed: int = 0, progress: bool = True, command: str | None = None,
             **loop) -> dict:
    """``blockrag finetune``: load the generator (fp32, CPU), build the examples exactly as the KV store
    formats prompts, train a LoRA adapter with the Block-Attention recipe, save it to ``out``. Examples longer
    than ``max_tokens`` are dropped (CPU time grows with the sequence). Returns the history."""
    import tempfile

    from blockrag.models import load_generator

    from .cache_store import KVCacheStore

    require_peft()
    for path in data:
        if not Path(path).exists():
            raise FileNotFoundError(f"training data not found: {path}")
    model, tok = load_generator(generator, dtype=torch.float32, device="cpu")
    with tempfile.TemporaryDirectory(prefix="blockrag-ft-") as tmp:
        fmt = KVCacheStore(tmp, model, tok, dtype=torch.float32)  # the prompt layout only; nothing is encoded
        examples = training_examples(fmt, tok, data, synthetic_seeds, synthetic, n_distractors,
                                     distractor_tokens, seed)
    n_all = len(examples)
    examples = [e for e in examples if len(e.input_ids) <= max_tokens]
    if not examples:
        raise ValueError(f"no training examples of at most {max_tokens} tokens")
    info = {"command": command, "generator": generator or "default", "data": [Path(p).name for p in data],
            "synthetic_seeds": list(synthetic_seeds), "synthetic": synthetic, "n_distractors": n_distractors,
            "distractor_tokens": distractor_tokens, "max_tokens": max_tokens, "dropped_long": n_all - len(examples)}
    if progress:
        lens = [len(e.input_ids) for e in examples]
        print(f"{len(examples)} training examples ({n_all - len(examples)} longer than {max_tokens} tokens "
              f"dropped), {sum(lens) / len(lens):.0f} tokens on average", flush=True)
    return train_adapter(model, examples, out, steps=steps, lr=lr, rank=rank, block_prob=block_prob, seed=seed,
                         progress=progress, info=info, base_name=generator, **loop)


def with_adapter(model, adapter, generator: str | None = None):
    """``model`` if it already carries ``adapter`` (merged), else a merged copy (the given model is shared and
    left unchanged); ``adapter`` as in :func:`resolve_adapter`."""
    path = resolve_adapter(adapter, generator if generator is not None else _model_name(model))
    if path is None:
        return model
    have = getattr(model.config, "blockrag_adapter", None)
    if have and have.get("revision") == adapter_revision(path):
        return model
    return merge_adapter(model, path, copy_model=True)


def _model_name(model) -> str | None:
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return name or ""
