"""Generator replicas on Ray (blockrag.distributed.serving): the router's rules without Ray; with a local
cluster (``ray.init(num_cpus=2)``, 2 replica processes, a tiny random Llama): replicas answer exactly as a
local Generator does, cache-aware routing gets a higher fast-tier hit rate than round-robin on a seeded
Zipf workload, and the HTTP server answers through the pool."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from blockrag.distributed.serving import Router

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------ router (no Ray)
def test_router_sends_a_request_to_the_replica_holding_its_passages():
    r = Router(2)
    first = r.pick(["a", "b"])  # nobody holds anything: the least loaded
    r.done(first, ["a", "b"], ["a", "b"])
    assert r.pick(["b", "c"]) == first  # b is held there
    r.done(first, ["b", "c"], ["a", "b", "c"])
    assert r.pick(["x", "y"]) == 1 - first  # held nowhere: the least used


def test_router_counts_passages_in_flight_and_caps_the_imbalance():
    r = Router(2, max_imbalance=1)
    i = r.pick(["a"])
    assert r.pick(["a"]) == i  # in flight there: it will hold a
    assert r.pick(["a"]) == 1 - i  # i is 2 requests busier than the other: passed over
    r.done(i, ["a"], ["a"])
    assert r.load == [1, 1]


def test_round_robin_alternates():
    r = Router(3, "round-robin")
    assert [r.pick(["a"]) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError):
        Router(2, "random")


# ------------------------------------------------------------------------------ on Ray
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from tiny_models import tiny_llama_folder

    from blockrag.eval.bench_ray_serve import build_store
    from blockrag.models import load_tokenizer

    gen = tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"), load_tokenizer(), layers=2, hidden=32, head_dim=8)
    folder = tmp_path_factory.mktemp("serve") / "store"
    build_store(folder, 60, str(gen)).close()
    return folder


@pytest.fixture(scope="module")
def pool(ray_cluster, store):
    from blockrag.collection import Collection
    from blockrag.distributed.serving import ReplicaPool

    c = Collection(store, progress=False)
    files = list((store / "indexes").glob("kv*/cache/chunks/*.safetensors"))
    tier = int(0.1 * sum(f.stat().st_size for f in files))  # each replica's fast tier: 10% of the corpus
    p = ReplicaPool(str(store), replicas=2, tier_bytes=tier)
    p.chunks = c.get_chunks(c.store.chunk_ids())
    p.local = c.index("kv").generator()
    yield p
    p.close()


def test_replicas_answer_as_the_local_generator(pool):
    for i in range(3):
        chunks = pool.chunks[i * 4:i * 4 + 4]
        want = pool.local.generate("What is copper?", chunks, mode="turbo", max_new_tokens=6)
        got = pool.generate("What is copper?", chunks, mode="turbo", max_new_tokens=6)
        assert got.token_ids == want.token_ids and got.answer == want.answer
        assert got.timings["tier_hits"] + got.timings["tier_misses"] == 4


@pytest.mark.parametrize("workload", ["passages", "topics"])
def test_cache_aware_routing_beats_round_robin(pool, workload):
    """One client (routing decisions deterministic for the seed), 150 requests of 4 passages."""
    from blockrag.eval.bench_ray_serve import WORKLOADS, replay

    w = WORKLOADS[workload](len(pool.chunks), 150, 4, 1.0, seed=0)
    rr = replay(pool, pool.chunks, w, "round-robin", clients=1, max_new_tokens=1)
    ca = replay(pool, pool.chunks, w, "cache-aware", clients=1, max_new_tokens=1)
    assert rr["per_replica"] == [75, 75]
    assert ca["hit_rate"] > rr["hit_rate"] + 0.03, (ca, rr)
    assert min(ca["per_replica"]) >= 30  # still spread over both replicas


def test_server_answers_through_the_pool(pool, store):
    from fastapi.testclient import TestClient

    from blockrag.server import ServerConfig, create_app
    from blockrag.server.engine import Engine

    config = ServerConfig(store=str(store), retriever="bm25", k=2, max_new_tokens=3, warmup=False)
    engine = Engine(config, generator=pool)
    assert len(engine._workers) == 2  # one generation per replica at a time
    with TestClient(create_app(config, engine), base_url="http://127.0.0.1") as client:
        r = client.post("/v1/chat/completions", json={"model": engine.model_id,
                                                      "messages": [{"role": "user", "content": "copper lighthouse"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    engine.close()


def test_serve_ray_without_ray_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from blockrag.cli import main
    from blockrag.collection import Collection

    Collection(tmp_path / "store", progress=False).close()
    assert (tmp_path / "store" / "store.sqlite").exists()
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["serve", "--store", str(tmp_path / "store"), "--ray", "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "blockrag[ray]" in err
