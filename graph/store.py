"""The entity/relation graph: a networkx graph whose every node and edge remembers which chunks support it.

Entities merge by normalised name (:func:`graph.extract.normalise_name`); each keeps every source chunk
id and one description per chunk. Relations are undirected edges between entity keys; each keeps, per
supporting chunk, its weight, keywords and description. Removing a chunk removes exactly what only it
supported, so deleting a document never needs a rebuild.

Persisted as one pickle (reloads in milliseconds), written atomically (temp file + rename). Only load
graph files you wrote yourself: pickle executes code from untrusted files.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import networkx as nx

from .extract import Entity, Relation, normalise_name

FORMAT_VERSION = 1
MAX_DESCRIPTIONS = 8  # descriptions kept when rendering an entity (all chunks are kept for support)


def edge_id(a: str, b: str) -> str:
    a, b = sorted((a, b))
    return f"{a}\x1f{b}"


def edge_ends(eid: str) -> tuple[str, str]:
    a, b = eid.split("\x1f", 1)
    return a, b


class GraphStore:
    def __init__(self):
        self.g = nx.Graph()
        self.chunk_entities: dict[str, list[str]] = {}
        self.chunk_edges: dict[str, list[str]] = {}
        self.chunk_doc: dict[str, str] = {}
        self.doc_chunks: dict[str, set[str]] = {}
        self.version = 0  # bumped on every change (caches key on it)

    # ---------------------------------------------------------------- write
    def add_chunk(self, chunk_id: str, doc_id: str, entities: list[Entity],
                  relations: list[Relation]) -> tuple[set[str], set[str]]:
        """Merge one chunk's extraction. Returns (new entity keys, new edge ids)."""
        if chunk_id in self.chunk_doc:
            self.remove_chunk(chunk_id)
        g = self.g
        new_nodes, new_edges = set(), set()
        ent_keys = []
        for e in entities:
            key = normalise_name(e.name)
            if not key:
                continue
            if key not in g:
                g.add_node(key, names=Counter(), types=Counter(), chunks={}, desc={})
                new_nodes.add(key)
            d = g.nodes[key]
            d["names"][e.name.strip()] += 1
            d["types"][e.type or "CONCEPT"] += 1
            d["chunks"][chunk_id] = d["chunks"].get(chunk_id, 0) + max(1.0, float(e.weight))
            if e.description and chunk_id not in d["desc"]:
                d["desc"][chunk_id] = e.description
            ent_keys.append(key)
        edges = []
        for r in relations:
            a, b = normalise_name(r.source), normalise_name(r.target)
            if not a or not b or a == b:
                continue
            for key, name in ((a, r.source), (b, r.target)):
                if key not in g:  # relation endpoint the extractor did not list as an entity
                    g.add_node(key, names=Counter({name.strip(): 1}), types=Counter({"CONCEPT": 1}),
                               chunks={}, desc={})
                    new_nodes.add(key)
                d = g.nodes[key]
                if chunk_id not in d["chunks"]:
                    d["chunks"][chunk_id] = 1.0
                    ent_keys.append(key)
            if not g.has_edge(a, b):
                g.add_edge(a, b, support={})
                new_edges.add(edge_id(a, b))
            sup = g.edges[a, b]["support"]
            w, kws, desc = sup.get(chunk_id, (0.0, [], ""))
            kws = kws + [k for k in r.keywords if k and k not in kws]
            sup[chunk_id] = (w + float(r.weight), kws[:12], desc or r.description)
            edges.append(edge_id(a, b))
        self.chunk_entities[chunk_id] = list(dict.fromkeys(ent_keys))
        self.chunk_edges[chunk_id] = list(dict.fromkeys(edges))
        self.chunk_doc[chunk_id] = doc_id
        self.doc_chunks.setdefault(doc_id, set()).add(chunk_id)
        self.version += 1
        return new_nodes, new_edges

    def add_empty_chunk(self, chunk_id: str, doc_id: str) -> None:
        """A chunk with nothing extracted: remembered so that its document can still be deleted."""
        self.add_chunk(chunk_id, doc_id, [], [])

    def remove_chunk(self, chunk_id: str) -> tuple[set[str], set[str]]:
        """Forget one chunk. Returns (removed entity keys, removed edge ids): those only it supported."""
        if chunk_id not in self.chunk_doc:
            return set(), set()
        g = self.g
        gone_nodes, gone_edges = set(), set()
        for eid in self.chunk_edges.pop(chunk_id, []):
            a, b = edge_ends(eid)
            if g.has_edge(a, b):
                sup = g.edges[a, b]["support"]
                sup.pop(chunk_id, None)
                if not sup:
                    g.remove_edge(a, b)
                    gone_edges.add(eid)
        for key in self.chunk_entities.pop(chunk_id, []):
            if key in g:
                d = g.nodes[key]
                d["chunks"].pop(chunk_id, None)
                d["desc"].pop(chunk_id, None)
                if not d["chunks"]:
                    gone_edges.update(edge_id(key, n) for n in g.neighbors(key))
                    g.remove_node(key)
                    gone_nodes.add(key)
        doc = self.chunk_doc.pop(chunk_id)
        chunks = self.doc_chunks.get(doc)
        if chunks is not None:
            chunks.discard(chunk_id)
            if not chunks:
                del self.doc_chunks[doc]
        self.version += 1
        return gone_nodes, gone_edges

    def remove_document(self, doc_id: str) -> tuple[set[str], set[str]]:
        nodes, edges = set(), set()
        for c in list(self.doc_chunks.get(doc_id, ())):
            n, e = self.remove_chunk(c)
            nodes |= n
            edges |= e
        return nodes, edges

    # ----------------------------------------------------------------- read
    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self.chunk_doc

    def num_entities(self) -> int:
        return self.g.number_of_nodes()

    def num_relations(self) -> int:
        return self.g.number_of_edges()

    def entity_name(self, key: str) -> str:
        names = self.g.nodes[key]["names"]
        return names.most_common(1)[0][0] if names else key

    def entity_type(self, key: str) -> str:
        types = self.g.nodes[key]["types"]
        named = [(t, n) for t, n in types.most_common() if t != "CONCEPT"]
        return (named or types.most_common(1) or [("CONCEPT", 0)])[0][0]

    def entity_chunks(self, key: str) -> dict[str, float]:
        return self.g.nodes[key]["chunks"] if key in self.g else {}

    def entity_description(self, key: str, limit: int = MAX_DESCRIPTIONS) -> str:
        descs = list(dict.fromkeys(self.g.nodes[key]["desc"].values()))
        return " ".join(descs[:limit])

    def entity_text(self, key: str) -> str:
        """What is embedded for an entity: its name and type."""
        t = self.entity_type(key)
        return f"{self.entity_name(key)}" + ("" if t == "CONCEPT" else f" ({t.lower()})")

    def relation_support(self, eid: str) -> dict:
        a, b = edge_ends(eid)
        return self.g.edges[a, b]["support"] if self.g.has_edge(a, b) else {}

    def relation_weight(self, a: str, b: str) -> float:
        return sum(w for w, _, _ in self.g.edges[a, b]["support"].values())

    def relation_keywords(self, eid: str) -> list[str]:
        kws = Counter()
        for _, ks, _ in self.relation_support(eid).values():
            kws.update(ks)
        return [k for k, _ in kws.most_common(8)]

    def relation_description(self, eid: str, limit: int = 3) -> str:
        descs = list(dict.fromkeys(d for _, _, d in self.relation_support(eid).values() if d))
        return " ".join(descs[:limit])

    def relation_text(self, eid: str) -> str:
        """What is embedded for a relation: both names and the keywords."""
        a, b = edge_ends(eid)
        kws = [k for k in self.relation_keywords(eid) if k != "co-occurs"]
        return f"{self.entity_name(a)} {', '.join(kws) or 'related to'} {self.entity_name(b)}"

    def documents(self) -> list[str]:
        return list(self.doc_chunks)

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format_version": FORMAT_VERSION, "graph": self.g, "chunk_entities": self.chunk_entities,
                 "chunk_edges": self.chunk_edges, "chunk_doc": self.chunk_doc}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "GraphStore":
        with open(path, "rb") as fh:
            state = pickle.load(fh)
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: graph format {state.get('format_version')}, expected {FORMAT_VERSION}")
        self = cls()
        self.g = state["graph"]
        self.chunk_entities, self.chunk_edges = state["chunk_entities"], state["chunk_edges"]
        self.chunk_doc = state["chunk_doc"]
        for c, d in self.chunk_doc.items():
            self.doc_chunks.setdefault(d, set()).add(c)
        return self

    def stats(self) -> dict:
        return {"entities": self.num_entities(), "relations": self.num_relations(),
                "chunks": len(self.chunk_doc), "documents": len(self.doc_chunks)}


def iter_supported(store: GraphStore, keys: Iterable[str]) -> Iterable[tuple[str, dict]]:
    for k in keys:
        if k in store.g:
            yield k, store.g.nodes[k]
