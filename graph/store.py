"""The entity/relation graph: a networkx graph whose every node and edge remembers which chunks support it.

Entities merge by normalised name (:func:`graph.extract.normalise_name`); each keeps every source chunk
id and one description per chunk. Relations are undirected edges between entity keys; each keeps, per
supporting chunk, its weight, keywords and description. Removing a chunk removes exactly what only it
supported, so deleting a document never needs a rebuild.

Persisted as one JSON document of plain data (strings, numbers, lists, objects), written atomically
(temp file + rename). Nothing in the file can name code: loading builds the graph from those values and
refuses anything that is not this format (earlier releases wrote a pickle; such files are refused, never
read).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import networkx as nx

from .extract import Entity, Relation, normalise_name

FORMAT_VERSION = 2  # 1 was a pickle (refused)
FORMAT_NAME = "blockrag-graph"
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
    def to_data(self) -> dict:
        """The graph as plain JSON-able data; adjacency order is kept so a reload ranks ties identically."""
        g = self.g
        nodes = [[k, {"names": dict(d["names"]), "types": dict(d["types"]), "chunks": d["chunks"],
                      "desc": d["desc"]}] for k, d in g.nodes(data=True)]
        edges = [[a, b, {c: [w, list(kws), desc] for c, (w, kws, desc) in d["support"].items()}]
                 for a, b, d in g.edges(data=True)]
        adjacency = [[k, list(g.adj[k])] for k in g.nodes]
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "nodes": nodes, "edges": edges,
                "adjacency": adjacency, "chunk_entities": self.chunk_entities, "chunk_edges": self.chunk_edges,
                "chunk_doc": self.chunk_doc}

    @classmethod
    def from_data(cls, state, source: str = "graph") -> "GraphStore":
        """Inverse of :meth:`to_data`; anything else raises ``ValueError`` naming ``source``."""
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise ValueError(f"{source}: not a blockrag graph file")
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source}: graph format {state.get('format_version')!r}, this blockrag reads "
                             f"{FORMAT_VERSION}; rebuild the graph index")
        self = cls()
        try:
            g = self.g
            for key, d in state["nodes"]:
                g.add_node(str(key), names=Counter({str(n): int(c) for n, c in d["names"].items()}),
                           types=Counter({str(t): int(c) for t, c in d["types"].items()}),
                           chunks={str(c): float(w) for c, w in d["chunks"].items()},
                           desc={str(c): str(t) for c, t in d["desc"].items()})
            data = {}
            for a, b, sup in state["edges"]:
                if a not in g or b not in g:
                    raise ValueError(f"edge end {a!r}/{b!r} is not a node")
                data[edge_id(a, b)] = {"support": {str(c): (float(w), [str(k) for k in kws], str(desc))
                                                   for c, (w, kws, desc) in sup.items()}}
            # networkx keeps one attribute dict per edge, shared by both ends; refilling the adjacency in its
            # saved order (rather than add_edge in some order) reproduces neighbour iteration exactly
            for key, nbrs in state["adjacency"]:
                adj = g._adj[key]
                for n in nbrs:
                    adj[n] = data[edge_id(key, n)]
            if sum(len(v) for v in g._adj.values()) != 2 * len(data) - sum(a == b for a, b, _ in state["edges"]):
                raise ValueError("adjacency does not match the edge list")
            self.chunk_entities = {str(c): [str(k) for k in ks] for c, ks in state["chunk_entities"].items()}
            self.chunk_edges = {str(c): [str(e) for e in es] for c, es in state["chunk_edges"].items()}
            self.chunk_doc = {str(c): str(d) for c, d in state["chunk_doc"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"{source}: corrupt graph file ({err})") from None
        for c, d in self.chunk_doc.items():
            self.doc_chunks.setdefault(d, set()).add(c)
        return self

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_data(), fh, ensure_ascii=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "GraphStore":
        path = Path(path)
        with open(path, "rb") as fh:
            head = fh.read(1)
            if head != b"{":  # a pickle (format 1) or anything else: refused without being parsed
                raise ValueError(f"{path}: not a blockrag graph file (format {FORMAT_VERSION} is JSON); "
                                 f"rebuild the graph index")
            fh.seek(0)
            try:
                state = json.loads(fh.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}: corrupt graph file ({err})") from None
        return cls.from_data(state, str(path))

    def stats(self) -> dict:
        return {"entities": self.num_entities(), "relations": self.num_relations(),
                "chunks": len(self.chunk_doc), "documents": len(self.doc_chunks)}


def iter_supported(store: GraphStore, keys: Iterable[str]) -> Iterable[tuple[str, dict]]:
    for k in keys:
        if k in store.g:
            yield k, store.g.nodes[k]
