"""attention_kv: precomputed per-passage KV caches and cached generation (TurboRAG / Block-Attention / CacheBlend).

Public API (exact signatures)::

    from blockrag.attention_kv import Generator, KVCacheStore

    gen = Generator(model_name=None, *, cache_dir=None, model=None, tokenizer=None, device=None, dtype=None,
                    store=None, system_prompt=None, quant=None, kv_dtype=None, rope="stitch",
                    cuda_graphs=True, max_cache_len=None, device_cache_bytes=None, compile_decode=False,
                    compile_question=False)
        # model_name: anything rag.models.resolve_generator accepts (default SmolLM2-135M-Instruct);
        # or pass model=/tokenizer= already loaded (a Llama, Mistral or Qwen2 causal LM; the model itself
        # is not modified: the cached modes run its modules through the model seam). cache_dir defaults to
        # rag.models.cache_dir()/kv/<model revision>; quant="int8" stores 8-bit KV. On CUDA the question
        # forward and the decode step replay CUDA graphs; compile_decode=True / compile_question=True also
        # fuse them with torch.compile (faster decoding / lower TTFT; 10-20 s of compilation once, per
        # question length for the question graph).
    res = gen.generate(question: str, chunks: Sequence[Chunk], mode: str = "turbo",
                       max_new_tokens: int = 64, stream: bool = False, blend_ratio: float = 0.15,
                       check_layer: int = 1) -> GenerationResult
        # mode in {"full", "turbo", "block", "blend"}; chunks need .id, .text, .token_ids (from the
        # generator's tokenizer; empty token_ids -> the text is tokenised once). Missing caches are built.
        # stream=True returns a GenerationStream: iterate for text pieces, then .result.
    GenerationResult(answer, token_ids, mode, chunk_ids, ttft_ms, decode_tokens_per_s,
                     n_context_tokens, n_question_tokens, n_recomputed, timings)
    logits, info = gen.prefill(question, chunks, mode, blend_ratio=0.15, check_layer=1, extra_ids=(),
                               cache_max_len=None, blend_select=None)
        # prefill only: logits [question (+extra_ids) tokens, vocab]; extra_ids = teacher-forced answer.

    store = KVCacheStore(folder, model, tokenizer, *, system_prompt=None, dtype=torch.bfloat16,
                         quant=None, lru_bytes=1 << 30, model_name=None, batch_size=8, prefix=None)
        # prefix=None: the chat-template prefix (system prompt + opening of the user turn), shared sink;
        # prefix="..." overrides it verbatim ("" = no shared prefix).
    store.add(chunks, progress=None) -> int      # chunks newly encoded (tqdm bar for > 32 chunks)
    store.delete(chunk_ids) -> int               # chunk ids removed
    store.get(chunk) -> ChunkKV                  # LRU tier, then memory-mapped safetensors
    store.manifest() -> dict                     # identity (model, revision, tokenizer/prefix hash, dims,
                                                 # dtype, quant) for DocStore.record_index(...)
    # A store folder built with another model revision / tokenizer / prefix raises KVCacheMismatch.
    # Share one store between indexing and Generator: Generator(..., store=store).

The model seam (``model.ModelAdapter``) is the only module that knows transformers' model internals:
dims, RoPE parameters, embedding / norms / q-k-v-o projections / MLP / lm_head, and one decoder forward
``forward(ids, positions, attend, logits_rows=...)`` whose attention is a callback. Cache encoding, the
cached generator, CacheBlend, BlockRank, MRAG and the fine-tuning losses all run through it; ``full`` mode
uses transformers' public forward (``DynamicCache``) as the reference.

Lower level: ``BlockKVCache`` (static stitched buffer; its ``attend`` is the seam callback of the cached
modes), ``forward_block`` (one seam forward of a token block over it), ``GraphedStep`` (CUDA graph of an
n-token forward whose positions and cache length are read on the device: one graph for every decode step
of any context; ``Generator`` uses it on CUDA), ``blend_prefill``, ``masks``, ``rope``. Benchmark-only GPU
pieces (prefetching loaders, the fixed-length question graph) live in ``blockrag.eval.gpu_pieces``.
"""
from .cache_store import ChunkKV, KVCacheMismatch, KVCacheStore
from .blend import blend_prefill
from .generate import MODES, GenerationResult, GenerationStream, Generator
from .batch import BatchRequest
from .block_cache import BlockKVCache, GraphedStep, forward_block
from .model import ModelAdapter, UnsupportedModel

__all__ = ["Generator", "GenerationResult", "GenerationStream", "KVCacheStore", "KVCacheMismatch", "ChunkKV",
           "BlockKVCache", "GraphedStep", "forward_block", "blend_prefill", "ModelAdapter", "UnsupportedModel",
           "MODES", "BatchRequest"]
