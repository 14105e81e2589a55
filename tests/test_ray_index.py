"""Distributed indexing on Ray (blockrag.distributed): the same store contents as the plain path (chunk ids,
BM25 scores, dense vectors within 1e-5, KV tensors byte for byte), a killed Ray worker and a killed driver
leave the previous or the new state, and a rerun completes, reusing the shards finished before.

One local cluster (``ray.init(num_cpus=2)``) for the module; skipped without the ``ray`` extra (except the
test of the one-line error that its absence gives)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from blockrag.collection import Collection
from blockrag.documents import Document

HERE = Path(__file__).resolve().parent
WORDS = ("amber river stone copper lighthouse kelp bread harbor mountain valley glass iron tide lantern "
         "salt orchard quarry falcon meadow cedar").split()
QUERIES = ["copper lighthouse", "kelp bread harbor", "falcon over the quarry"]


def corpus(n: int = 32, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    return [Document(id=f"d{i:03d}", title=f"Doc {i}",
                     text=" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 80)))) for i in range(n)]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    """A random 2-layer Llama (tests/tiny_models.py) with SmolLM2's tokenizer, as a local model folder."""
    sys.path.insert(0, str(HERE))
    from tiny_models import tiny_llama_folder

    from blockrag.models import load_tokenizer

    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"), load_tokenizer(), layers=2, hidden=32, head_dim=8)


def new_store(folder, generator) -> Collection:
    c = Collection(folder, chunk_tokens=32, overlap=4, progress=False)
    c.build_index("bm25")
    c.build_index("dense")
    c.build_index("kv", model_name=generator)
    return c


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_generator):
    """The reference: the whole corpus through the plain add_documents path."""
    c = new_store(tmp_path_factory.mktemp("plain") / "store", tiny_generator)
    c.add_documents(corpus())
    return contents(c)


def contents(c: Collection) -> dict:
    from safetensors import safe_open

    ids = c.store.chunk_ids()
    chunks = c.store.get_chunks(ids)
    bm25 = c.index("bm25")
    kv = {}
    for f in sorted((c.store.folder / "indexes").glob("kv*/cache/chunks/*.safetensors")):
        with safe_open(str(f), framework="pt") as st:  # tensors byte for byte, header fields as a dict
            kv[f.name] = ({k: st.get_tensor(k).numpy().tobytes() for k in st.keys()}, st.metadata())
    return {"ids": ids, "chunks": [(ch.doc_id, ch.position, ch.text, list(ch.token_ids)) for ch in chunks],
            "bm25": [[(h.chunk_id, round(h.score, 9)) for h in bm25.retrieve(q, 20)] for q in QUERIES],
            "dense": c.index("dense").index.vectors(ids), "kv": kv, "docs": c.store.count_documents()}


def assert_same(got: dict, want: dict) -> None:
    assert got["ids"] == want["ids"] and got["chunks"] == want["chunks"]
    assert got["bm25"] == want["bm25"]
    np.testing.assert_allclose(got["dense"], want["dense"], atol=1e-5, rtol=0)
    assert got["kv"].keys() == want["kv"].keys() and len(got["kv"]) == len(want["ids"])
    for name, (tensors, meta) in want["kv"].items():
        assert got["kv"][name][0] == tensors, name
        assert got["kv"][name][1] == meta, name


def staged_done(store: Path) -> list[Path]:
    return sorted((store / "staging" / "ray").glob("*/done.json"))


# ----------------------------------------------------------------------------------------------- tests
def test_without_ray_the_flag_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from blockrag.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    (tmp_path / "a.txt").write_text("some text")
    assert main(["index", str(tmp_path / "a.txt"), "--store", str(tmp_path / "s"), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "blockrag[ray]" in err
    assert not (tmp_path / "s").exists()  # nothing created


def test_ray_path_builds_the_same_store(ray_cluster, plain, tiny_generator, tmp_path):
    from blockrag.distributed import ray_index

    c = new_store(tmp_path / "store", tiny_generator)
    report = ray_index(c, corpus(), workers=2, shard_docs=8, progress=False)
    assert report.documents_added == 32 and "4 encoded, 0 reused" in report.notes[-1]
    assert_same(contents(c), plain)
    assert not staged_done(c.store.folder)  # staging removed after the commit
    again = ray_index(c, corpus(), workers=2, progress=False)  # unchanged: nothing staged, nothing added
    assert again.documents_unchanged == 32 and "0 shards" in again.notes[-1]


@pytest.mark.slow  # ~1 min on 2 busy cores: `-m "not slow"` leaves the kill tests out
def test_killed_worker_then_rerun(ray_cluster, plain, tiny_generator, tmp_path):
    """SIGKILL the encoder actor once it has finished a shard: the run fails or Ray replaces the actor; the
    store is at the previous or the new state; a rerun completes with the plain path's contents."""
    from blockrag.distributed import ray_index

    docs = corpus()
    c = new_store(tmp_path / "store", tiny_generator)
    c.add_documents(docs[:4])  # the previous state
    outcome = {}

    def run():
        try:
            outcome["report"] = ray_index(c, docs, workers=1, shard_docs=4, progress=False)
        except Exception as err:  # noqa: BLE001 - a failed run is one allowed outcome
            outcome["error"] = err

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 120
    while not staged_done(c.store.folder) and time.time() < deadline and t.is_alive():
        time.sleep(0.01)
    done = staged_done(c.store.folder)
    assert done, "no shard finished"
    import json

    os.kill(json.loads(done[0].read_text())["pid"], signal.SIGKILL)
    finished_at_kill = len(staged_done(c.store.folder))
    t.join(300)
    assert not t.is_alive()
    assert finished_at_kill < 7  # killed while shards were still being encoded
    reopened = Collection(tmp_path / "store", progress=False)
    assert reopened.store.count_documents() in (4, 32)
    finished = len(staged_done(c.store.folder))
    rerun = ray_index(reopened, docs, workers=1, shard_docs=4, progress=False)
    assert_same(contents(reopened), plain)
    if "error" in outcome:  # the rerun reused the shards finished before the kill
        assert finished >= 1 and f"{finished} reused" in rerun.notes[-1]


def write_jsonl(path: Path) -> Path:
    import json

    path.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in corpus()))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("when", ["encoding", "ingest:indexes-updated"])
def test_killed_driver_then_rerun(ray_cluster, plain, tiny_generator, tmp_path, when, capsys):
    """kill -9 the driver (`blockrag index --ray ADDRESS`) while shards are encoded (from outside) or inside
    the commit's transaction (the store's fault point): the store opens at the previous state; the rerun
    (through the CLI) reuses the finished shards and ends with the plain path's contents."""
    from blockrag.cli import main

    store = tmp_path / "store"
    c = new_store(store, tiny_generator)
    c.add_documents(corpus()[:4])
    c.close()
    argv = ["index", str(write_jsonl(tmp_path / "docs.jsonl")), "--store", str(store), "--index", "bm25",
            "--index", "dense", "--index", "kv", "--chunk-tokens", "32", "--overlap", "4", "--ray", ray_cluster,
            "--ray-workers", "1", "--ray-shard-docs", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if when != "encoding":
        env["BLOCKRAG_FAULT"] = when
    proc = subprocess.Popen([sys.executable, "-m", "blockrag", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if when == "encoding":
        deadline = time.time() + 180
        while not staged_done(store) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert staged_done(store), proc.communicate()[1][-2000:]
        proc.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    reopened = Collection(store, progress=False)
    assert reopened.store.count_documents() == 4  # the previous state
    reopened.close()
    finished = len(staged_done(store))
    assert finished >= 1
    capsys.readouterr()
    assert main(argv) == 0
    assert f"encoded, {finished} reused" in capsys.readouterr().out
    assert_same(contents(Collection(store, progress=False)), plain)
