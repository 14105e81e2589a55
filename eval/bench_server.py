"""Load on loopback: concurrent clients against ``blockrag serve``, retrieve-only and generating requests.

    python -m blockrag.eval.bench_server                      # tiny demo store built in a temp dir
    python -m blockrag.eval.bench_server --store STORE --clients 50 --requests 10 --generate-every 5

Each client sends ``--requests`` requests one after another; every ``--generate-every``-th is a chat
completion (streamed, ``--max-tokens``), the others ``/v1/retrieve``. Reports the count of errors (any
status but 200, or a failed connection) and p50 / p99 latency per kind. Then the isolation check: one
long streamed generation holds the model while retrieve-only requests are timed; they must not wait for it.
Only 127.0.0.1 is contacted; the run is bounded by ``--time-limit``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["Who founded the Veloria Savings Bank?", "What roofs the Merrowgate lighthouse?",
             "When did the Corvane railway open?", "What is the capital of Veloria?",
             "What does the word sennet mean?", "Who opened the copper mine in Ashby?"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


def demo_store(folder: Path) -> str:
    from blockrag.collection import Collection
    from blockrag.demo_corpus import write_demo_corpus
    from blockrag.documents import load_folder

    col = Collection(folder / "store", chunk_tokens=128, overlap=16, progress=False)
    col.build_index("bm25")
    col.build_index("kv")
    col.add_documents(load_folder(write_demo_corpus(folder / "corpus")))
    col.close()
    return str(folder / "store")


async def _client(http, base, model, cid, n, every, max_tokens, out):
    for i in range(n):
        question = QUESTIONS[(cid + i) % len(QUESTIONS)]
        generate = every > 0 and (cid + i) % every == 0
        t = time.perf_counter()
        try:
            if generate:
                body = {"model": model, "stream": True, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": question}]}
                ok, ttft = False, None
                async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
                    status = r.status_code
                    async for line in r.aiter_lines():
                        if ttft is None and '"content": "' in line and '"content": ""' not in line:
                            ttft = time.perf_counter() - t
                        if '"error"' in line:
                            status = 599
                        if line == "data: [DONE]":
                            ok = True
                if status == 200 and not ok:
                    status = 598  # the stream ended without its final event
                out.append(("generate", status, time.perf_counter() - t, ttft))
            else:
                r = await http.post(base + "/v1/retrieve", json={"query": question, "k": 3})
                out.append(("retrieve", r.status_code, time.perf_counter() - t, None))
        except Exception as err:  # noqa: BLE001  (a failed connection counts as an error)
            out.append(("generate" if generate else "retrieve", f"{type(err).__name__}", time.perf_counter() - t, None))


async def load(base: str, model: str, clients: int, requests: int, every: int, max_tokens: int) -> dict:
    import httpx

    rows: list = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t = time.perf_counter()
        await asyncio.gather(*(_client(http, base, model, c, requests, every, max_tokens, rows)
                               for c in range(clients)))
        wall = time.perf_counter() - t
    report = {"clients": clients, "requests_per_client": requests, "wall_s": wall,
              "errors": sum(1 for r in rows if r[1] != 200), "requests": len(rows)}
    for kind in ("retrieve", "generate"):
        lat = [r[2] * 1e3 for r in rows if r[0] == kind and r[1] == 200]
        ttft = [r[3] * 1e3 for r in rows if r[0] == kind and r[3] is not None]
        report[kind] = {"n": sum(1 for r in rows if r[0] == kind), "ok": len(lat),
                        "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "max_ms": max(lat, default=0)}
        if ttft:
            report[kind].update({"ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99)})
    bad = sorted({str(r[1]) for r in rows if r[1] != 200})
    if bad:
        report["error_kinds"] = bad
    return report


async def isolation(base: str, model: str, max_tokens: int, n_retrieve: int = 20) -> dict:
    """Retrieve-only latency while one long generation holds the model."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        first_token = asyncio.Event()
        gen_time = {}

        async def slow():
            body = {"model": model, "stream": True, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": "Tell me everything about Merrowgate."}]}
            t = time.perf_counter()
            async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        first_token.set()
            gen_time["s"] = time.perf_counter() - t

        task = asyncio.create_task(slow())
        await asyncio.wait_for(first_token.wait(), 300)
        lat, during = [], 0
        for i in range(n_retrieve):
            t = time.perf_counter()
            r = await http.post(base + "/v1/retrieve", json={"query": QUESTIONS[i % len(QUESTIONS)], "k": 3})
            lat.append((time.perf_counter() - t) * 1e3)
            during += int(r.status_code == 200 and not task.done())
        await task
    return {"generation_s": gen_time["s"], "generation_tokens": max_tokens, "retrieve_n": n_retrieve,
            "retrieve_ok_while_generating": during, "retrieve_p50_ms": percentile(lat, 50),
            "retrieve_max_ms": max(lat)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=None, help="a store with a kv index (default: the demo corpus, built now)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=10, help="requests per client")
    p.add_argument("--generate-every", type=int, default=5, help="every n-th request generates (0: none)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--slow-tokens", type=int, default=64, help="length of the isolation check's generation")
    p.add_argument("--retriever", default="bm25")
    p.add_argument("--time-limit", type=float, default=900, help="seconds before the run is abandoned")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.clients * args.requests > 5000:
        raise SystemExit("error: at most 5000 requests per run")

    import socket
    import subprocess

    import httpx

    tmp = tempfile.TemporaryDirectory()
    store = args.store or demo_store(Path(tmp.name))
    with socket.socket() as sock:  # a free loopback port for the server process
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the server in its own process (as `blockrag serve` runs), so that the clients' work here does not
    # share its interpreter lock
    cmd = [sys.executable, "-m", "blockrag", "serve", "--store", store, "--host", "127.0.0.1", "--port", str(port),
           "--retriever", args.retriever, "-k", "3", "--queue-size", str(max(64, args.clients + 8)),
           "--timeout", str(args.time_limit), "--max-new-tokens", str(args.max_tokens)]
    t = time.perf_counter()
    log_path = Path(tmp.name) / "server.log"  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        model = None
        while model is None:
            if server.poll() is not None:
                raise SystemExit(f"error: the server exited: {log_path.read_text()[-2000:]}")
            if time.perf_counter() - t > args.time_limit:
                raise SystemExit("error: the server did not start in time")
            try:
                model = httpx.get(base + "/health", timeout=2).json()["model"]
            except httpx.HTTPError:
                time.sleep(0.5)
        print(f"server up in {time.perf_counter() - t:.1f}s (model {model}, loaded and warmed)", file=sys.stderr)

        async def run():
            rep = await load(base, model, args.clients, args.requests, args.generate_every, args.max_tokens)
            rep["isolation"] = await isolation(base, model, args.slow_tokens)
            return rep

        report = asyncio.run(asyncio.wait_for(run(), args.time_limit))
        metrics = httpx.get(base + "/metrics", timeout=10).text
        report["server_metrics"] = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
                                    if line.startswith(("blockrag_kv_cache", "blockrag_queue_rejected",
                                                        "blockrag_generations_cancelled", "blockrag_tokens"))}
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    report.update({"model": model, "retriever": args.retriever, "max_tokens": args.max_tokens,
                   "generate_every": args.generate_every})
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
