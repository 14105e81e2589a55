"""Kill a Ray encoder worker, and the driver, during `blockrag index --ray` runs (N times each); check that
the store opens at the previous or the new state and that a rerun completes with the plain path's store.

    python -m blockrag.eval.ray_kill_check --repeat 5

Per trial: a store holding the first 4 documents (the previous state) indexes the whole corpus on Ray;
``worker``: the encoder actor is SIGKILLed once ``--after`` shards are finished; ``driver``: the
`blockrag index --ray ADDRESS` process is SIGKILLed at that point (plus a random 0-2 s). Then the store is
reopened (documents = previous or new count), the run repeated, and the result compared with a plain build
(chunk ids, dense vectors within 1e-5, KV tensors byte for byte).
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
import threading
import time
from pathlib import Path


def _contents(c) -> tuple:
    from safetensors import safe_open

    ids = c.store.chunk_ids()
    kv = {}
    for f in sorted((c.store.folder / "indexes").glob("kv*/cache/chunks/*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            kv[f.name] = {k: st.get_tensor(k).numpy().tobytes() for k in st.keys()}
    return ids, c.index("dense").index.vectors(ids), kv


def _same(a: tuple, b: tuple) -> bool:
    import numpy as np

    return a[0] == b[0] and np.allclose(a[1], b[1], atol=1e-5) and a[2] == b[2]


def _done(store: Path) -> list[Path]:
    return sorted((store / "staging" / "ray").glob("*/done.json"))


def _wait(store: Path, n: int, alive, limit: float = 300) -> bool:
    end = time.time() + limit
    while len(_done(store)) < n and alive() and time.time() < end:
        time.sleep(0.01)
    return len(_done(store)) >= n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--docs", type=int, default=40)
    p.add_argument("--shard-docs", type=int, default=4)
    p.add_argument("--after", type=int, default=1, help="kill once this many shards are finished")
    p.add_argument("--workdir", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import ray

    from blockrag.collection import Collection
    from blockrag.distributed import ray_index
    from blockrag.eval.bench_ray_index import documents, new_store
    from blockrag.eval.bench_ray_serve import tiny_generator

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ray-kill-"))
    gen = tiny_generator(work / "tiny-llama")
    docs = documents(args.docs, 60, args.seed)
    src = work / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    ref = new_store(work / "plain", gen, 32)
    from blockrag.documents import load_path

    ref.add_documents(list(load_path(src)))
    want = _contents(ref)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    address = ray.get_runtime_context().gcs_address
    rng = random.Random(args.seed)
    rows = []
    for trial in range(args.repeat):
        for what in ("worker", "driver"):
            store = work / f"{what}{trial}"
            c = new_store(store, gen, 32)
            c.add_documents(list(load_path(src))[:4])
            row = {"trial": trial, "killed": what}
            if what == "worker":
                outcome = {}

                def run(c=c, outcome=outcome):
                    try:
                        ray_index(c, list(load_path(src)), workers=1, shard_docs=args.shard_docs, progress=False)
                        outcome["run"] = "completed"
                    except Exception as err:  # noqa: BLE001 - a failed run is an allowed outcome
                        outcome["run"] = f"failed ({type(err).__name__})"

                t = threading.Thread(target=run)
                t.start()
                if _wait(store, args.after, t.is_alive):
                    os.kill(json.loads(_done(store)[0].read_text())["pid"], signal.SIGKILL)
                    row["shards_done_at_kill"] = len(_done(store))
                t.join()
                row["run"] = outcome.get("run")
                c.close()
            else:
                c.close()
                argv_ = ["index", str(src), "--store", str(store), "--index", "bm25", "--index", "dense",
                         "--index", "kv", "--ray", address, "--ray-workers", "1",
                         "--ray-shard-docs", str(args.shard_docs)]
                proc = subprocess.Popen([sys.executable, "-m", "blockrag", *argv_], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                _wait(store, args.after, lambda: proc.poll() is None)
                time.sleep(rng.uniform(0, 2))
                proc.kill()
                proc.wait()
                row["run"] = "killed" if proc.returncode == -signal.SIGKILL else f"exited {proc.returncode}"
                row["shards_done_at_kill"] = len(_done(store))
            reopened = Collection(store, progress=False)
            row["docs_after_kill"] = reopened.store.count_documents()
            row["state_ok"] = row["docs_after_kill"] in (4, args.docs)
            finished = len(_done(store))
            rerun = ray_index(reopened, list(load_path(src)), workers=1, shard_docs=args.shard_docs, progress=False)
            row["rerun"] = rerun.notes[-1]
            row["reused_before_rerun"] = finished
            row["same_as_plain"] = _same(_contents(reopened), want)
            reopened.close()
            rows.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()
    ok = all(r["state_ok"] and r["same_as_plain"] for r in rows)
    print(f"{len(rows)} trials: {'all' if ok else 'NOT all'} opened at the previous or new state and "
          f"matched the plain store after the rerun")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
