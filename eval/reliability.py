"""Reliability suite: kills at every commit point, random kill -9, concurrent writers, checked exactly.

    python -m blockrag.eval.reliability --kills 50 --writers 4 --trials 10 [--dense] [--json out.json]

Every check opens the store afresh and compares it with what the writers were told: the documents (ids
and texts) must be exactly those of the last committed operation (0 lost, 0 ghosts), and every index must
hold exactly the store's chunk ids and answer like an index rebuilt from the store (bm25: the same scores
for every chunk matching a query; dense: the same neighbours and scores within 1e-5).

Writers are subprocesses (``python -m blockrag.eval.reliability worker ...``); a kill at a commit point
uses the test-only ``BLOCKRAG_FAULT`` hook (:mod:`blockrag.faults`). Besides bm25 (and dense with
``--dense``) every store carries an ``inplace`` index: a tiny index saved in place after the commit, like
the kv cache, so that the journal replay path is exercised without loading a language model.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blockrag import registry
from blockrag.documents import Chunk, Document, chunk_id

WORDS = ("river stone lamp orchard copper violin glacier harbor meadow falcon ember lantern quarry "
         "saddle thistle beacon cobalt dune fern granite hollow ivory juniper kettle").split()


# ------------------------------------------------------------------------------------ test index kind
class InPlaceIndex:
    """Chunk ids saved in place (``ids.json``) after the store's commit, deletes deferred to ``save`` (the
    kv cache's pattern). Registered as index kind ``inplace`` when this module is imported."""

    kind = "inplace"

    def __init__(self, name: str = "inplace"):
        self.name = name
        self.ids: set[str] = set()
        self._pending: list[str] = []
        self.folder: Path | None = None

    def attach(self, folder) -> None:
        self.folder = Path(folder)

    def build(self, chunks) -> None:
        self.ids = set()
        self.add(chunks)

    def add(self, chunks) -> None:
        self.ids.update(c.id for c in chunks)

    def delete(self, chunk_ids) -> None:
        self._pending += list(chunk_ids)

    def save(self, folder) -> None:
        self.ids.difference_update(self._pending)
        self._pending = []
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "ids.json.tmp"
        tmp.write_text(json.dumps(sorted(self.ids)))
        os.replace(tmp, folder / "ids.json")

    def reload(self) -> None:
        self._pending = []
        if self.folder is not None and (self.folder / "ids.json").exists():
            self.ids = set(json.loads((self.folder / "ids.json").read_text()))

    @classmethod
    def load(cls, folder) -> "InPlaceIndex":
        from blockrag.fileformat import read_json

        self = cls(Path(folder).name)
        self.attach(folder)
        self.ids = set(read_json(Path(folder) / "ids.json", list, "inplace ids"))
        return self

    def manifest(self) -> dict:
        return {"kind": "inplace", "format_version": 1, "params": {}}

    def retrieve(self, query: str, k: int = 10):
        return []

    def retrieve_batch(self, queries, k: int = 10):
        return [[] for _ in queries]

    def __len__(self) -> int:
        return len(self.ids)


registry.register_index("inplace", "blockrag.eval.reliability:InPlaceIndex")


# ---------------------------------------------------------------------------------- documents, chunks
def simple_chunks(doc: Document, words: int = 6) -> list[Chunk]:
    """Whitespace chunks of ``words`` words (no tokenizer: workers start in a fraction of a second)."""
    toks = doc.full_text.split()
    out = []
    for pos, i in enumerate(range(0, len(toks), words)):
        text = " ".join(toks[i:i + words])
        out.append(Chunk(id=chunk_id(doc.id, pos, text), doc_id=doc.id, position=pos, text=text))
    return out


def make_docs(prefix: str, n: int, seed: int = 0, version: int = 0) -> list[Document]:
    rng = random.Random(f"{prefix}/{seed}/{version}")
    return [Document(id=f"{prefix}-{i}", title=f"{prefix} {i}",
                     text=" ".join([f"key{prefix}x{i}v{version}"] + rng.choices(WORDS, k=rng.randint(8, 30))))
            for i in range(n)]


def open_store(folder, kinds=("bm25", "inplace"), create: bool = False, lock_timeout: float | None = None):
    from blockrag.collection import Collection

    c = Collection(folder, chunk_tokens=None, overlap=0, progress=False, lock_timeout=lock_timeout)
    if create:
        for kind in kinds:
            if kind not in c.indexes:
                c.build_index(kind)
    return c


# ------------------------------------------------------------------------------------------- checks
def index_ids(index) -> set[str]:
    kind = getattr(index, "kind", None) or type(index).__name__
    if kind == "bm25":
        return set(index.ids)
    if kind == "inplace":
        return set(index.ids) - set(index._pending)
    if type(index).__name__ == "DenseRetriever":
        return set(index.index.rows) if index.index is not None else set()
    if type(index).__name__ == "GraphIndex":
        return set(index.store.chunk_doc)
    if type(index).__name__ == "KVIndex":
        return set(index.store._index) - set(index._pending_delete)
    raise TypeError(f"no id listing for {type(index).__name__}")


def _close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


def equal_to_rebuild(collection, name: str, queries: list[str]) -> bool:
    """Does index ``name`` answer ``queries`` like the same kind rebuilt from the store's chunks?"""
    from blockrag.collection import index_class

    index = collection.indexes[name]
    chunks = list(collection.store.chunks())
    kind = collection.store.manifest(name)["kind"]
    if kind == "inplace":
        return True  # nothing to query: its ids are compared exactly
    fresh = index_class(kind)(name="rebuild")
    if kind == "dense":
        fresh = index_class(kind)(model_name=index.model_name, name="rebuild")
    fresh.build(chunks)
    n = max(1, len(chunks))
    for q in queries:
        got = {h.chunk_id: h.score for h in index.retrieve(q, n)}
        want = {h.chunk_id: h.score for h in fresh.retrieve(q, n)}
        if not _close(got, want):
            return False
    return True


def check_store(folder, expected: list[dict], kinds=("bm25", "inplace")) -> dict:
    """Open ``folder`` afresh; ``expected``: acceptable {doc id: text} states. Returns the findings; ``ok``
    when the documents equal one expected state and every index equals the store (and a rebuild)."""
    c = open_store(folder)
    docs = {d: c.store.document(d).text for d in c.store.document_ids()}
    match = next((e for e in expected if e == docs), None)
    nearest = match or min(expected, key=lambda e: len(set(e) ^ set(docs)))
    lost = sorted(set(nearest) - set(docs))
    ghosts = sorted(set(docs) - set(nearest))
    changed = sorted(d for d in set(docs) & set(nearest) if docs[d] != nearest[d])
    store_ids = set(c.store.chunk_ids())
    rng = random.Random(len(store_ids))
    queries = [" ".join(rng.sample(WORDS, 2)) for _ in range(3)] + \
        [t.split()[0] for t in list(docs.values())[:3]]
    out = {"documents": len(docs), "lost": lost, "ghosts": ghosts, "changed": changed, "indexes": {}}
    ok = match is not None
    for kind in kinds:
        if kind not in c.indexes:
            out["indexes"][kind] = "missing"
            ok = False
            continue
        ids = index_ids(c.indexes[kind])
        eq = equal_to_rebuild(c, kind, queries)
        out["indexes"][kind] = {"missing": len(store_ids - ids), "extra": len(ids - store_ids), "equal_to_rebuild": eq}
        ok = ok and ids == store_ids and eq
    leftovers = [p.name for p in (Path(folder) / "indexes").iterdir()
                 if p.name not in {m["params"].get("folder", m["name"]) for m in c.store.manifests()}] \
        if (Path(folder) / "indexes").exists() else []
    out["unreferenced_folders"] = leftovers
    c.close()
    out["ok"] = ok
    return out


def state_of(docs_by_id: dict, ops) -> dict:
    """Apply ``ops`` ([("add", [docs]), ("del", [ids])]) to a {doc id: text} state."""
    state = dict(docs_by_id)
    for op, arg in ops:
        if op == "add":
            state.update({d.id: d.text for d in arg})
        else:
            for d in arg:
                state.pop(d, None)
    return state


# ------------------------------------------------------------------------------------------- worker
def _worker(argv) -> int:
    p = argparse.ArgumentParser(prog="reliability worker")
    p.add_argument("--store", required=True)
    p.add_argument("--op", required=True, choices=["ingest", "delete", "loop", "hold", "build"])
    p.add_argument("--prefix", default="w")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--version", type=int, default=0)
    p.add_argument("--replace-base", action="store_true", help="also a new version of document base-0")
    p.add_argument("--ids", nargs="*", default=[])
    p.add_argument("--kind", default="bm25")
    p.add_argument("--seconds", type=float, default=1.0)
    a = p.parse_args(argv)
    c = open_store(a.store)
    if a.op == "ingest":
        docs = make_docs(a.prefix, a.n, version=a.version) + (make_docs("base", 1, version=1) if a.replace_base else [])
        per = max(1, -(-len(docs) // a.batches))
        for i in range(0, len(docs), per):
            c.add_documents(docs[i:i + per], chunks_for=simple_chunks)
    elif a.op == "delete":
        c.delete_documents(a.ids)
    elif a.op == "build":
        c.build_index(a.kind)
    elif a.op == "hold":
        with c.locks.writing():
            print("held", flush=True)
            time.sleep(a.seconds)
    elif a.op == "loop":  # ingest batch i, delete one document of batch i-1, ...; log each op around it
        for i in range(a.batches):
            docs = make_docs(f"{a.prefix}{i}", a.n)
            print(json.dumps({"begin": "add", "batch": i}), flush=True)
            c.add_documents(docs, chunks_for=simple_chunks)
            print(json.dumps({"end": "add", "batch": i}), flush=True)
            if i:
                gone = [f"{a.prefix}{i - 1}-0"]
                print(json.dumps({"begin": "del", "ids": gone}), flush=True)
                c.delete_documents(gone)
                print(json.dumps({"end": "del", "ids": gone}), flush=True)
    c.close()
    return 0


def run_worker(store, *args, fault: str | None = None, wait: bool = True, timeout: float = 300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BLOCKRAG_FAULT", None)
    if fault:
        env["BLOCKRAG_FAULT"] = fault
    cmd = [sys.executable, "-m", "blockrag.eval.reliability", "worker", "--store", str(store), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------- trials
INGEST_POINTS_BEFORE = ["ingest:rows-written", "ingest:indexes-updated", "ingest:saved-uncommitted"]
INGEST_POINTS_AFTER = ["ingest:committed", "save:inplace:written", "save:inplace:recorded", "save:done"]
DELETE_POINTS_BEFORE = ["delete:rows-deleted", "delete:indexes-updated", "delete:saved-uncommitted"]
DELETE_POINTS_AFTER = ["delete:committed", "save:inplace:written", "save:inplace:recorded", "save:done"]


def commit_point_trials(root: Path, kinds=("bm25", "inplace")) -> list[dict]:
    """Kill a writer at every commit point of ingest and delete (and of an index build); check the next open
    and the next run."""
    rows = []
    base = make_docs("base", 6)
    ops = [("ingest", p, p in INGEST_POINTS_AFTER) for p in INGEST_POINTS_BEFORE + INGEST_POINTS_AFTER] + \
          [("delete", p, p in DELETE_POINTS_AFTER) for p in DELETE_POINTS_BEFORE + DELETE_POINTS_AFTER]
    for i, (op, point, after) in enumerate(ops):
        store = root / f"cp{i}"
        c = open_store(store, kinds, create=True)
        c.add_documents(base, chunks_for=simple_chunks)
        c.close()
        old = state_of({}, [("add", base)])
        if op == "ingest":  # two new documents and a new version of base-0, in one add_documents call
            args = ["--op", "ingest", "--prefix", "new", "--n", "2", "--replace-base"]
            new = state_of(old, [("add", make_docs("new", 2) + make_docs("base", 1, version=1))])
        else:
            args = ["--op", "delete", "--ids", "base-1", "base-2"]
            new = state_of(old, [("del", ["base-1", "base-2"])])
        r = run_worker(store, *args, fault=point)
        killed = r.returncode == -signal.SIGKILL
        now = check_store(store, [new if after else old], kinds)
        # the next run: the same operation again, without a fault, gives exactly the new state
        rerun = run_worker(store, *args)
        nxt = check_store(store, [new], kinds)
        nxt["rerun_rc"] = rerun.returncode
        rows.append({"op": op, "point": point, "killed": killed, "after_commit": after,
                     "next_open": now, "next_run": nxt, "ok": killed and now["ok"] and nxt["ok"]})
    # an index build killed before its manifest row: the store is unchanged, the next build completes
    store = root / "cp-build"
    c = open_store(store, ("bm25",), create=True)
    c.add_documents(base, chunks_for=simple_chunks)
    c.close()
    r = run_worker(store, "--op", "build", "--kind", "inplace", fault="build:inplace:built")
    killed = r.returncode == -signal.SIGKILL
    c = open_store(store)
    clean = "inplace" not in c.indexes
    c.close()
    run_worker(store, "--op", "build", "--kind", "inplace")
    nxt = check_store(store, [state_of({}, [("add", base)])], ("bm25", "inplace"))
    rows.append({"op": "build", "point": "build:inplace:built", "killed": killed, "after_commit": False,
                 "next_open": {"ok": clean}, "next_run": nxt, "ok": killed and clean and nxt["ok"]})
    return rows


def writer_trial(root: Path, writers: int, docs: int = 6, batches: int = 3, kinds=("bm25", "inplace")) -> dict:
    """``writers`` processes ingest their own documents into one store at once (``batches`` commits each)."""
    store = root
    open_store(store, kinds, create=True).close()
    procs = [run_worker(store, "--op", "ingest", "--prefix", f"w{i}", "--n", docs, "--batches", batches, wait=False)
             for i in range(writers)]
    codes, errors = [], []
    for p in procs:
        _, err = p.communicate(timeout=3600)
        codes.append(p.returncode)
        if p.returncode:
            errors.append(err.strip().splitlines()[-1] if err.strip() else "")
    expected = state_of({}, [("add", make_docs(f"w{i}", docs)) for i in range(writers)])
    res = check_store(store, [expected], kinds)
    res["exit_codes"] = codes
    res["errors"] = errors
    res["ok"] = res["ok"] and all(c == 0 for c in codes)
    return res


def random_kill_trial(root: Path, rng: random.Random, kinds=("bm25", "inplace"), kill_max: float = 3.0) -> dict:
    """A writer looping over ingests and deletes is killed (-9) at a random moment; the store must be the
    state after its last finished operation or after the one in flight, and the next run must work."""
    store = root
    c = open_store(store, kinds, create=True)
    base = make_docs("base", 4)
    c.add_documents(base, chunks_for=simple_chunks)
    c.close()
    # the loop runs until it is killed (a fixed number of batches could finish before the kill on a fast machine)
    p = run_worker(store, "--op", "loop", "--prefix", "r", "--n", 3, "--batches", 1_000_000, wait=False)
    time.sleep(rng.uniform(0.4, kill_max))
    p.send_signal(signal.SIGKILL)
    out, _ = p.communicate()
    ops, inflight = [], None
    for line in out.splitlines():
        ev = json.loads(line)
        op = ("add", make_docs(f"r{ev['batch']}", 3)) if ev.get("begin") == "add" or ev.get("end") == "add" \
            else ("del", ev["ids"])
        if "begin" in ev:
            inflight = op
        else:
            ops.append(op)
            inflight = None
    start = state_of({}, [("add", base)])
    done = state_of(start, ops)
    candidates = [done] + ([state_of(done, [inflight])] if inflight else [])
    res = check_store(store, candidates, kinds)
    # the next run: one more ingest, then exactly that state plus the new documents
    c = open_store(store)
    now = {d: c.store.document(d).text for d in c.store.document_ids()}
    extra = make_docs("after", 2)
    c.add_documents(extra, chunks_for=simple_chunks)
    c.close()
    nxt = check_store(store, [state_of(now, [("add", extra)])], kinds)
    return {"ops_finished": len(ops), "in_flight": inflight is not None, "killed_rc": p.returncode,
            "next_open": res, "next_run": nxt, "ok": res["ok"] and nxt["ok"]}


def write_big_text(path, megabytes: int = 50, seed: int = 0) -> int:
    """A ``megabytes`` MB plain-text file of random sentences (the memory figure's input); returns its size."""
    rng = random.Random(seed)
    base = "the of and to in is was for on that with as by at from it an be are this which or were have has had " \
           "not but".split()
    syll = ["ka", "lo", "mi", "ra", "ten", "sor", "vel", "qui", "an", "dre", "pho", "nix", "tal", "gor", "bel", "es",
            "um", "ia"]
    words = base * 40 + ["".join(rng.choices(syll, k=rng.randint(1, 4))) for _ in range(30000)]
    size = 0
    with open(path, "w") as f:
        while size < megabytes * 1024 * 1024:
            sent = " ".join(rng.choices(words, k=rng.randint(5, 25))).capitalize() + ". "
            if rng.random() < 0.05:
                sent += "\n\n"
            f.write(sent)
            size += len(sent)
    return size


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return _worker(argv[1:])
    if argv[:1] == ["bigfile"]:  # bigfile PATH [MB]
        print(write_big_text(argv[1], int(argv[2]) if len(argv) > 2 else 50))
        return 0
    p = argparse.ArgumentParser(prog="python -m blockrag.eval.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=50, help="random kill -9 trials")
    p.add_argument("--writers", type=int, default=4, help="most concurrent writers (2 and this many)")
    p.add_argument("--trials", type=int, default=10, help="trials per writer count, and commit-point rounds")
    p.add_argument("--point-rounds", type=int, default=1, help="rounds of the kill-at-every-commit-point trials")
    p.add_argument("--dense", action="store_true", help="also keep a dense index (real MiniLM; slower)")
    p.add_argument("--kill-max", type=float, default=None,
                   help="latest random kill, seconds after the writer starts (default 3; 20 with --dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every trial's findings here")
    a = p.parse_args(argv)
    kinds = ("bm25", "inplace") + (("dense",) if a.dense else ())
    rng = random.Random(a.seed)
    report: dict = {"kinds": list(kinds)}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        points = []
        for r in range(a.point_rounds):
            points += commit_point_trials(root / f"points{r}", kinds)
        report["commit_points"] = {"trials": len(points), "ok": sum(x["ok"] for x in points),
                                   "failed": [x for x in points if not x["ok"]]}
        if points:
            print(f"kill at every commit point: {report['commit_points']['ok']}/{len(points)} trials exact", flush=True)
        writer_counts = sorted({2, a.writers})
        report["writers"] = {}
        for w in writer_counts:
            rows = [writer_trial(root / f"w{w}-{t}", w, kinds=kinds) for t in range(a.trials)]
            report["writers"][w] = {"trials": len(rows), "ok": sum(r["ok"] for r in rows),
                                    "failed": [r for r in rows if not r["ok"]]}
            print(f"{w} concurrent writers: {report['writers'][w]['ok']}/{len(rows)} trials with every document "
                  f"in every index", flush=True)
        kill_max = a.kill_max or (20.0 if a.dense else 3.0)  # a dense writer first loads its model
        kills = [random_kill_trial(root / f"k{t}", rng, kinds, kill_max) for t in range(a.kills)]
        lost = sum(len(k["next_open"]["lost"]) for k in kills)
        ghosts = sum(len(k["next_open"]["ghosts"]) for k in kills)
        report["random_kills"] = {"trials": len(kills), "ok": sum(k["ok"] for k in kills), "lost": lost,
                                  "ghosts": ghosts, "in_flight": sum(k["in_flight"] for k in kills),
                                  "ops_finished": sum(k["ops_finished"] for k in kills),
                                  "failed": [k for k in kills if not k["ok"]]}
        print(f"random kill -9: {report['random_kills']['ok']}/{len(kills)} trials exact, {lost} documents lost, "
              f"{ghosts} ghosts ({report['random_kills']['in_flight']} kills with an operation in flight, "
              f"{report['random_kills']['ops_finished']} operations finished before the kills)", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{report['seconds']} s")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    ok = report["commit_points"]["ok"] == report["commit_points"]["trials"] and \
        all(v["ok"] == v["trials"] for v in report["writers"].values()) and \
        report["random_kills"]["ok"] == report["random_kills"]["trials"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
