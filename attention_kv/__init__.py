"""attention_kv: precomputed per-passage KV caches and cached generation (TurboRAG / Block-Attention / CacheBlend).

Public API (exact signatures)::

    from blockrag.attention_kv import Generator, KVCacheStore

    gen = Generator(model_name=None, *, cache_dir=None, model=None, tokenizer=None, device=None, dtype=None,
                    store=None, system_prompt=None, quant=None, kv_dtype=None, rope="stitch",
                    cuda_graphs=True, max_cache_len=None, device_cache_bytes=None, compile_decode=False,
                    compile_question=False)
        # model_name: anything rag.models.resolve_generator accepts (default SmolLM2-135M-Instruct);
        # or pass model=/tokenizer= already loaded. The model is switched to the "blockrag" attention
        # implementation (identical to SDPA unless a BlockKVCache is passed). cache_dir defaults to
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

GPU serving pieces (used by eval/bench_ttft.py): ``prefetch.DeviceKVPool`` (GPU-resident tier, one fused
gather+RoPE kernel per stitch), ``prefetch.LayerPrefetcher`` (pinned host -> GPU copies in layer groups,
overlapped with a replayed CUDA graph through per-layer device flags; int8 dequant fused),
``GraphedBlockForward`` (CUDA graph of the question-block forward for a fixed context length),
``GraphedStep`` (CUDA graph of an n-token forward whose positions and cache length are read on the device:
one graph for every decode step of any context; ``Generator`` uses it on CUDA).

Lower level: ``BlockKVCache`` (HF-Cache-compatible static stitched cache), ``forward_block``,
``GraphedBlockForward`` (CUDA graph of the question-block forward), ``blend_prefill``, ``masks``, ``rope``.
"""
from .cache_store import ChunkKV, KVCacheMismatch, KVCacheStore
from .blend import blend_prefill
from .generate import MODES, GenerationResult, GenerationStream, Generator
from .hf_integration import BlockKVCache, GraphedBlockForward, GraphedStep, forward_block, register

__all__ = ["Generator", "GenerationResult", "GenerationStream", "KVCacheStore", "KVCacheMismatch", "ChunkKV",
           "BlockKVCache", "GraphedBlockForward", "GraphedStep", "forward_block", "blend_prefill", "register", "MODES"]
