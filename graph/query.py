"""Query modes over a :class:`graph.index.GraphIndex`, each a retriever returning chunk hits.

* ``local``  (LightRAG): low-level keywords -> matching entities -> their chunks and their neighbours'.
* ``global`` (LightRAG): the query -> matching relations -> the chunks that state them and their endpoints'.
* ``hybrid``: local + global (reciprocal-rank fusion). ``mix``: hybrid + plain chunk vectors.
  ``naive``: chunk vectors only.
* ``path`` (PathRAG): paths of <= ``max_hops`` hops from the query's entities, pruned by flow (resource 1
  at the source, decayed by ``alpha`` per hop, dropped below ``theta``); a path's reliability is its mean
  flow. Extensions (both switchable): ``flow="relevance"`` splits the resource over next hops by how well
  each relation's keywords match the question (``"uniform"`` = the paper's even split: flow alone cannot
  tell a "works for" hop from a "born in" hop), and ``open_paths=True`` keeps paths ending anywhere (the
  answer entity of a multi-hop question is unknown), ``False`` = only between retrieved entities. The
  enumeration is guarded by ``max_branch`` per node and a ``max_expansions`` budget.
* ``ppr`` (HippoRAG): personalized PageRank (damping 0.8) over an entity-passage graph (passage-entity
  edges weighted by entity specificity, entity-entity edges by relation weight, boosted for relations
  whose keywords match the question), seeded by the query's entities and lightly (``passage_weight``)
  by the passages nearest the query (HippoRAG 2); the ranking is then multiplied by the passage's
  similarity to the question-without-its-entities (``passage_sim_power``), so that among the passages
  the walk reaches, those saying what the question asks about come first.

:meth:`GraphRetriever.context` returns the structured context (entities, relations, path texts, chunks)
trimmed to a token budget, most reliable path last.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from blockrag.retrievers.base import Hit

from .extract import normalise_name, query_keywords
from .store import edge_ends, edge_id

MODES = ("local", "global", "hybrid", "mix", "naive", "path", "ppr")


@dataclass
class Analysis:
    query: str
    low: list[str]
    high: list[str]
    qvec: np.ndarray
    entities: dict[str, float]   # entity key -> match score (0..1)
    relations: dict[str, float]  # edge id -> similarity to the query
    hvec: np.ndarray | None = None  # the query without its matched entity names: what it asks about


@dataclass
class Path:
    nodes: list[str]
    flow: float
    relevance: float
    score: float

    @property
    def edges(self) -> list[str]:
        return [edge_id(a, b) for a, b in zip(self.nodes, self.nodes[1:])]


@dataclass
class GraphContext:
    entities: list[dict] = field(default_factory=list)
    relations: list[dict] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)
    tokens: int = 0

    def text(self) -> str:
        parts = []
        if self.entities:
            parts.append("Entities:\n" + "\n".join(f"- {e['name']} ({e['type']}): {e['description']}"
                                                  for e in self.entities))
        if self.relations:
            parts.append("Relations:\n" + "\n".join(
                f"- {r['source']} -- {', '.join(r['keywords'])} -- {r['target']}: {r['description']}"
                for r in self.relations))
        if self.chunks:
            parts.append("Sources:\n" + "\n".join(f"[{c['id']}] {c.get('text', '')}" for c in self.chunks))
        if self.paths:  # last: nearest the question, most reliable path at the very end
            parts.append("Reasoning paths:\n" + "\n".join(f"- {p}" for p in self.paths))
        return "\n\n".join(parts)


def approx_tokens(text: str) -> int:
    return max(1, int(len(text.split()) * 1.3))


class GraphRetriever:
    """``GraphRetriever(graph_index, mode="local")``: a retriever (``retrieve``, ``retrieve_batch``).

    ``collection``: optional, supplies chunk texts to :meth:`context` (anything with ``get_chunks(ids)``).
    ``keyword_extractor``: optional callable ``query -> (low, high)`` (e.g. :class:`graph.llm.LLMKeywordExtractor`);
    the default uses the index's extractor (spaCy noun phrases/entities vs. content words).
    """

    def __init__(self, index, mode: str = "local", collection=None, keyword_extractor: Callable | None = None,
                 top_entities: int = 20, top_relations: int = 60, entity_threshold: float = 0.75,
                 neighbour_weight: float = 0.3, alpha: float = 0.8, theta: float = 1e-3, max_hops: int = 3,
                 max_paths: int = 30, max_branch: int = 40, max_expansions: int = 20000,
                 damping: float = 0.8, passage_weight: float = 0.05, relation_boost: float = 4.0,
                 relation_sharpness: float = 10.0, passage_sim_power: float = 2.0, flow: str = "relevance",
                 open_paths: bool = True,
                 rrf_k: int = 60, name: str | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown graph mode {mode!r}; choose from {', '.join(MODES)}")
        self.index, self.mode, self.collection = index, mode, collection
        self.keyword_extractor = keyword_extractor
        self.name = name or f"graph-{mode}"
        self.top_entities, self.top_relations = top_entities, top_relations
        self.entity_threshold, self.neighbour_weight = entity_threshold, neighbour_weight
        self.alpha, self.theta, self.max_hops = alpha, theta, max_hops
        self.max_paths, self.max_branch, self.max_expansions = max_paths, max_branch, max_expansions
        self.damping, self.passage_weight, self.relation_boost = damping, passage_weight, relation_boost
        self.relation_sharpness, self.passage_sim_power = relation_sharpness, passage_sim_power
        self.flow, self.open_paths = flow, open_paths
        self.rrf_k = rrf_k
        self._ppr = None  # (store version, matrix parts)
        self.last_paths: list[Path] = []

    # ------------------------------------------------------------ protocol
    def retrieve(self, query: str, k: int = 10) -> list[Hit]:
        scores = self.score(query, k)
        return [Hit(c, float(s)) for c, s in sorted(scores.items(), key=lambda kv: -kv[1])[:k]]

    def retrieve_batch(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        return [self.retrieve(q, k) for q in queries]

    def score(self, query: str, k: int = 10) -> dict[str, float]:
        if len(self.index) == 0:
            return {}
        mode = self.mode
        if mode == "naive":
            return self._naive(query, max(k, 1))
        a = self.analyse(query)
        if mode == "local":
            return self._local(a)
        if mode == "global":
            return self._global(a)
        if mode == "hybrid":
            return self._rrf([self._local(a), self._global(a)])
        if mode == "mix":
            return self._rrf([self._local(a), self._global(a), self._naive(query, max(3 * k, 30))])
        if mode == "path":
            return self._path(a, k)
        return self._pagerank(a, k)

    # ------------------------------------------------------------ analysis
    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.index._encode(texts)

    def analyse(self, query: str) -> Analysis:
        """Keywords, query vector, matched entities and relations (cached for the last few queries)."""
        key = (query, self.index.store.version, id(self.keyword_extractor), self.entity_threshold,
               self.top_entities, self.top_relations)
        cache = self.index.analysis_cache  # shared by every mode over this index
        if key in cache:
            return cache[key]
        idx, g = self.index, self.index.store.g
        if self.keyword_extractor is not None:
            low, high = self.keyword_extractor(query)
        else:
            low, high = query_keywords(idx.extractor, query)
        vecs = self._encode([query] + list(low))
        qvec, lvecs = vecs[0], vecs[1:]
        ents: dict[str, float] = {}
        exact = set()
        for kw in low:
            k = normalise_name(kw)
            if k in g:
                ents[k] = 1.0
                exact.add(kw)
        if idx.entities is not None and len(idx.entities):
            if len(lvecs):
                for kw, hits in zip(low, idx.entities.search(lvecs, 5)):
                    if kw in exact:  # a name found as is is not also fuzzily matched to look-alikes
                        continue
                    for e, s in hits:
                        if s >= self.entity_threshold:
                            ents[e] = max(ents.get(e, 0.0), float(s))
            if not ents:  # no keyword matched: the entities nearest to the whole query
                for e, s in idx.entities.search(qvec[None], self.top_entities)[0]:
                    ents[e] = max(ents.get(e, 0.0), float(s))
        rest = query
        for kw in low:
            if normalise_name(kw) in ents:
                rest = re.sub(re.escape(kw), " ", rest, flags=re.I)
        rest = re.sub(r"\s+", " ", rest).strip()
        hvec = self._encode([rest])[0] if rest and rest != query else qvec
        rels: dict[str, float] = {}
        if idx.relations is not None and len(idx.relations):
            for e, s in idx.relations.search(qvec[None], self.top_relations)[0]:
                rels[e] = float(s)
        a = Analysis(query, list(low), list(high), qvec, ents, rels, hvec)
        if len(cache) >= 4096:
            cache.pop(next(iter(cache)))
        cache[key] = a
        return a

    def _seeds(self, a: Analysis) -> list[tuple[str, float]]:
        """Matched entities weighted by specificity, best first."""
        idx = self.index
        seeds = [(e, s * idx.idf(e)) for e, s in a.entities.items() if e in idx.store.g]
        seeds.sort(key=lambda kv: -kv[1])
        return seeds[: self.top_entities]

    # ------------------------------------------------------------ modes
    def _naive(self, query: str, k: int) -> dict[str, float]:
        idx = self.index
        if idx.dense is not None:
            return {h.chunk_id: h.score for h in idx.dense.retrieve(query, k)}
        if idx.chunks is None or len(idx.chunks) == 0:
            return {}
        qvec = self._encode([query])
        return {c: float(s) for c, s in idx.chunks.search(qvec, k)[0]}

    def _local(self, a: Analysis) -> dict[str, float]:
        idx, g = self.index, self.index.store.g
        scores: dict[str, float] = defaultdict(float)
        seeds = self._seeds(a)
        max_idf = max((idx.idf(e) for e, _ in seeds), default=1.0)
        for e, w in seeds:
            for c in idx.store.entity_chunks(e):
                scores[c] += w
            nbrs = sorted(g[e].items(), key=lambda kv: -sum(x[0] for x in kv[1]["support"].values()))[:10]
            if not nbrs:
                continue
            top_w = max(sum(x[0] for x in d["support"].values()) for _, d in nbrs)
            for n, d in nbrs:
                rel = sum(x[0] for x in d["support"].values()) / top_w
                contrib = self.neighbour_weight * w * rel * idx.idf(n) / max_idf
                for c in idx.store.entity_chunks(n):
                    scores[c] += contrib
        return dict(scores)

    def _global(self, a: Analysis) -> dict[str, float]:
        idx = self.index
        scores: dict[str, float] = defaultdict(float)
        for eid, s in a.relations.items():
            sup = idx.store.relation_support(eid)
            for c, (w, _, _) in sup.items():
                scores[c] += s * min(w, 2.0) / 2.0
            for end in edge_ends(eid):
                for c in idx.store.entity_chunks(end):
                    scores[c] += self.neighbour_weight * s / len(sup or [1]) * 0.5
        return dict(scores)

    def _rrf(self, score_dicts: list[dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for sd in score_dicts:
            for rank, (c, _) in enumerate(sorted(sd.items(), key=lambda kv: -kv[1]), start=1):
                out[c] += 1.0 / (self.rrf_k + rank)
        return dict(out)

    # ------------------------------------------------------------ PathRAG
    def paths(self, a: Analysis) -> list[Path]:
        """Best paths (<= max_hops) from the query's entities, most reliable first.

        Flow (PathRAG): resource 1 at the source, passed to next hops decayed by ``alpha``, dropped below
        ``theta``; a path's reliability is the mean flow of its nodes after the source. ``flow="relevance"``
        (default) splits the resource over next hops in proportion to exp(sharpness * relevance of the
        relation's keywords to the question) instead of evenly (``flow="uniform"``, as in the paper).
        ``open_paths`` (default) keeps paths ending anywhere; otherwise only those ending at retrieved
        entities (seeds and endpoints of query-matched relations), as in PathRAG.
        """
        g = self.index.store.g
        seeds = self._seeds(a)
        if not seeds:
            return []
        targets = None
        if not self.open_paths:
            targets = set(e for e, _ in seeds)
            for eid in a.relations:
                targets.update(edge_ends(eid))
        budget = [self.max_expansions]
        found: list[Path] = []

        def dfs(nodes, flows):
            u = nodes[-1]
            if len(nodes) - 1 >= self.max_hops or budget[0] <= 0:
                return
            nbrs = [v for v in g[u] if v not in nodes]
            if not nbrs:
                return
            budget[0] -= len(nbrs)
            rel = self._edge_relevance(a, {edge_id(u, v) for v in nbrs})
            rs = np.array([rel.get(edge_id(u, v), 0.0) for v in nbrs])
            if self.flow == "relevance":
                w = np.exp(self.relation_sharpness * (rs - rs.max()))
                w = w / w.sum()
            else:
                w = np.full(len(nbrs), 1.0 / len(nbrs))
            order = np.argsort(-w)[: self.max_branch]
            for j in order:
                f = self.alpha * flows[-1] * float(w[j])
                if f < self.theta:
                    break
                v = nbrs[j]
                nn, ff = nodes + [v], flows + [f]
                if targets is None or v in targets:
                    mean = sum(ff[1:]) / (len(ff) - 1)
                    found.append(Path(nn, mean, float(np.mean([rel.get(edge_id(x, y), rs[j])
                                                                for x, y in zip(nn[-2:], nn[-1:])])), mean))
                dfs(nn, ff)

        for src, _ in seeds[:5]:
            dfs([src], [1.0])
        found.sort(key=lambda p: -p.score)
        return found[: self.max_paths]

    def _ball_edges(self, seeds: list[str], radius: int = 2, cap: int = 20000) -> set[str]:
        """Edges touching entities within ``radius`` hops of the seeds (at most ``cap``)."""
        g = self.index.store.g
        frontier, seen, edges = list(seeds), set(seeds), set()
        for _ in range(radius):
            nxt = []
            for u in frontier:
                for v in g[u]:
                    edges.add(edge_id(u, v))
                    if v not in seen:
                        seen.add(v)
                        nxt.append(v)
                if len(edges) >= cap:
                    return edges
            frontier = nxt
        return edges

    def _edge_relevance(self, a: Analysis, edges: set[str]) -> dict[str, float]:
        """How well each relation's keywords match what the question asks about (cosine of the keyword
        phrase with the query stripped of its entity names); keyword vectors are cached on the index."""
        idx = self.index
        store = idx.store
        phrases = {}
        for e in edges:
            if store.g.has_edge(*edge_ends(e)):
                kws = [k for k in store.relation_keywords(e) if k != "co-occurs"][:3]
                phrases[e] = ", ".join(kws) or "related to"
        missing = sorted({p for p in phrases.values() if p not in idx._kw_vec})
        if missing:
            for p, v in zip(missing, idx._encode(missing)):
                idx._kw_vec[p] = v
        if not phrases:
            return {}
        uniq = sorted(set(phrases.values()))
        sims = dict(zip(uniq, (np.stack([idx._kw_vec[p] for p in uniq]) @ a.hvec).tolist()))
        return {e: sims[p] for e, p in phrases.items()}

    def _path(self, a: Analysis, k: int) -> dict[str, float]:
        idx = self.index
        paths = self.paths(a)
        self.last_paths = paths
        scores: dict[str, float] = defaultdict(float)
        for rank, p in enumerate(paths):
            for eid in p.edges:
                for c, (w, _, _) in idx.store.relation_support(eid).items():
                    scores[c] += p.score * min(w, 2.0) / 2.0
        if not scores:
            return self._local(a)
        # chunks of the query's own entities come next (1-hop facts), then neighbours'
        top = max(scores.values())
        local = self._local(a)
        lt = max(local.values(), default=1.0) or 1.0
        for c, s in local.items():
            scores[c] += 0.2 * top * s / lt
        return dict(scores)

    # ------------------------------------------------------------ HippoRAG PPR
    def _ppr_matrix(self):
        import scipy.sparse as sp

        idx = self.index
        store = idx.store
        if self._ppr is not None and self._ppr[0] == store.version:
            return self._ppr[1]
        ents = list(store.g.nodes)
        chunk_ids = list(store.chunk_doc)
        e_pos = {e: i for i, e in enumerate(ents)}
        c_pos = {c: len(ents) + i for i, c in enumerate(chunk_ids)}
        rows, cols, vals = [], [], []
        for e in ents:
            w = idx.idf(e)
            for c in store.g.nodes[e]["chunks"]:
                if c in c_pos:
                    rows += [e_pos[e], c_pos[c]]
                    cols += [c_pos[c], e_pos[e]]
                    vals += [w, w]
        for a_, b_, d in store.g.edges(data=True):
            w = min(sum(x[0] for x in d["support"].values()), 4.0)
            rows += [e_pos[a_], e_pos[b_]]
            cols += [e_pos[b_], e_pos[a_]]
            vals += [w, w]
        n = len(ents) + len(chunk_ids)
        A = sp.csr_matrix((np.asarray(vals, np.float64), (rows, cols)), shape=(n, n))
        parts = (A, ents, chunk_ids, e_pos, c_pos)
        self._ppr = (store.version, parts)
        return parts

    def _pagerank(self, a: Analysis, k: int) -> dict[str, float]:
        import scipy.sparse as sp

        A, ents, chunk_ids, e_pos, c_pos = self._ppr_matrix()
        n = A.shape[0]
        seeds = self._seeds(a)
        if not seeds:
            return self._naive(a.query, max(k, 10))
        pers = np.zeros(n)
        for e, w in seeds:
            pers[e_pos[e]] += w
        if self.passage_weight > 0:
            naive = self._naive(a.query, 20)
            pos = {c: max(s, 0.0) for c, s in naive.items() if c in c_pos}
            norm = sum(pos.values())
            if norm > 0:  # passages near the query share passage_weight of the seed mass (HippoRAG 2)
                tot = pers.sum()
                for c, s in pos.items():
                    pers[c_pos[c]] += self.passage_weight * tot * s / norm
        pers /= pers.sum()
        M = A
        if self.relation_boost > 0:
            # query-aware transitions: relations near the seeds that match the question weigh more
            rel = self._edge_relevance(a, self._ball_edges([e for e, _ in seeds]))
            if rel:
                best = max(rel.values())
                r, c, v = [], [], []
                g = self.index.store.g
                for eid, sim in rel.items():
                    x, y = edge_ends(eid)
                    if x in e_pos and y in e_pos:
                        w = min(sum(z[0] for z in g.edges[x, y]["support"].values()), 4.0)
                        extra = w * self.relation_boost * math.exp(-self.relation_sharpness * (best - sim))
                        r += [e_pos[x], e_pos[y]]
                        c += [e_pos[y], e_pos[x]]
                        v += [extra, extra]
                if r:
                    M = A + sp.csr_matrix((v, (r, c)), shape=A.shape)
        deg = np.asarray(M.sum(axis=1)).ravel()
        inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
        P = sp.diags(inv) @ M  # row-stochastic
        PT = P.T.tocsr()
        dangling = deg == 0
        p = pers.copy()
        d = self.damping
        for _ in range(60):
            nxt = d * (PT @ p + p[dangling].sum() * pers) + (1 - d) * pers
            if np.abs(nxt - p).sum() < 1e-8:
                p = nxt
                break
            p = nxt
        ne = len(ents)
        chunk_scores = p[ne:]
        top = [i for i in np.argsort(-chunk_scores)[: max(k, 10) * 10] if chunk_scores[i] > 0]
        out = {chunk_ids[i]: float(chunk_scores[i]) for i in top}
        return self._dense_reweight(a, out)

    def _dense_reweight(self, a: Analysis, scores: dict[str, float]) -> dict[str, float]:
        """Graph proximity AND query similarity: score * max(cos, 0.01) ** passage_sim_power.

        Among the passages the walk reaches, prefer those that also say what the question asks about
        (the bridge passage of "the company that employs X" mentions the company *and* its founding)."""
        if self.passage_sim_power <= 0 or not scores:
            return scores
        sims = self._chunk_sims(a, list(scores))
        if sims is None:
            return scores
        return {c: s * max(sims.get(c, 0.0), 0.01) ** self.passage_sim_power for c, s in scores.items()}

    def _chunk_sims(self, a: Analysis, ids: list[str]) -> dict[str, float] | None:
        idx = self.index
        vi = idx.chunks if idx.chunks is not None else getattr(getattr(idx, "dense", None), "index", None)
        if vi is None or getattr(vi, "kind", "flat") != "flat":
            return None
        ids = [c for c in ids if c in vi.rows]
        if not ids:
            return {}
        dense = getattr(idx, "dense", None)
        qvec = a.hvec if a.hvec is not None else a.qvec
        if dense is not None and idx.chunks is None:  # the dense retriever may use another model
            qvec = dense.encode([a.query])[0]
        return dict(zip(ids, (vi.vectors(ids) @ qvec).tolist()))

    # ------------------------------------------------------------ context
    def context(self, query: str, k: int = 10, token_budget: int = 2000,
                count_tokens: Callable[[str], int] = approx_tokens, chunk_texts: dict | None = None) -> GraphContext:
        """Entities, relations, path texts and chunks for ``query`` within ``token_budget`` tokens.

        The budget is split: 25% entities, 25% relations, 20% paths, the rest chunks (unused parts roll over
        to the chunks). Chunk texts come from ``chunk_texts`` or the retriever's ``collection``.
        """
        idx = self.index
        s = idx.store
        a = self.analyse(query) if len(idx) else None
        hits = self.retrieve(query, k)
        ctx = GraphContext()
        if a is None:
            return ctx
        used = 0

        def take(budget, items, render):
            nonlocal used
            out, spent = [], 0
            for it in items:
                t = count_tokens(render(it))
                if spent + t > budget:
                    break
                out.append(it)
                spent += t
            used += spent
            return out, spent

        ent_keys = [e for e, _ in self._seeds(a)]
        for e in list(ent_keys):
            for n in sorted(s.g[e], key=lambda v: -idx.idf(v))[:5]:
                if n not in ent_keys:
                    ent_keys.append(n)
        ents = [{"name": s.entity_name(e), "type": s.entity_type(e), "description": s.entity_description(e, 2),
                 "chunks": sorted(s.entity_chunks(e))} for e in ent_keys if e in s.g]
        ctx.entities, spent_e = take(int(token_budget * 0.25), ents,
                                     lambda e: f"{e['name']} {e['type']} {e['description']}")
        rel_ids = list(a.relations)
        paths = self.paths(a) if self.mode in {"path", "mix", "hybrid"} else self.last_paths
        for p in paths:
            for eid in p.edges:
                if eid not in rel_ids:
                    rel_ids.insert(0, eid)
        rels = []
        for eid in rel_ids:
            x, y = edge_ends(eid)
            if s.g.has_edge(x, y):
                rels.append({"source": s.entity_name(x), "target": s.entity_name(y),
                             "keywords": s.relation_keywords(eid), "description": s.relation_description(eid, 1)})
        ctx.relations, spent_r = take(int(token_budget * 0.25), rels,
                                      lambda r: f"{r['source']} {r['target']} {r['keywords']} {r['description']}")
        texts = [self.path_text(p) for p in paths]
        kept, spent_p = take(int(token_budget * 0.2), texts, lambda t: t)
        ctx.paths = list(reversed(kept))  # most reliable last
        texts_by_id = dict(chunk_texts or {})
        if not texts_by_id and self.collection is not None:
            texts_by_id = {c.id: c.text for c in self.collection.get_chunks([h.chunk_id for h in hits])}
        chunks = [{"id": h.chunk_id, "score": h.score, "text": texts_by_id.get(h.chunk_id, "")} for h in hits]
        ctx.chunks, _ = take(token_budget - used, chunks, lambda c: c["text"] or c["id"])
        ctx.tokens = used
        return ctx

    def path_text(self, p: Path) -> str:
        s = self.index.store
        parts = [s.entity_name(p.nodes[0])]
        for x, y in zip(p.nodes, p.nodes[1:]):
            eid = edge_id(x, y)
            kws = [k for k in s.relation_keywords(eid) if k != "co-occurs"][:2] or ["related to"]
            parts.append(f"--[{', '.join(kws)}]--> {s.entity_name(y)}")
        return " ".join(parts)
