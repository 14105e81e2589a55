"""A small web QA app: one page with a question box, a JSON endpoint behind it. Standard library only.

    python -m examples.qa_web --store .blockrag/store --port 8080      # then open http://127.0.0.1:8080

POST /ask {"question": "..."} -> {"answer", "citations": [{doc_id, chunk_id, text}], "timings"}
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock

PAGE = """<!doctype html><meta charset="utf-8"><title>blockrag QA</title>
<style>body{font:16px system-ui;max-width:46rem;margin:2rem auto}input{width:80%}li{margin:.4rem 0}
.t{color:#666;font-size:13px}</style>
<h1>blockrag</h1><form id=f><input id=q placeholder="Ask a question" autofocus> <button>Ask</button></form>
<p id=a></p><ol id=c></ol><p class=t id=t></p>
<script>
f.onsubmit=async e=>{e.preventDefault();a.textContent='…';c.innerHTML='';
 const r=await fetch('/ask',{method:'POST',body:JSON.stringify({question:q.value})});const j=await r.json();
 if(j.error){a.textContent='Error: '+j.error;return}
 a.textContent=j.answer??'(no generator)';
 for(const x of j.citations){const li=document.createElement('li');li.textContent='['+x.doc_id+'] '+x.text;c.appendChild(li)}
 t.textContent=Object.entries(j.timings).map(([k,v])=>k+'='+(+v).toFixed(1)).join('  ')}
</script>"""


def make_handler(pipe):
    lock = Lock()  # one generation at a time: the model is not re-entrant

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, kind: str):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self):
            if self.path != "/ask":
                return self._send(404, b"not found", "text/plain")
            try:
                length = int(self.headers.get("Content-Length", "0"))
                question = json.loads(self.rfile.read(length) or b"{}").get("question", "").strip()
            except (ValueError, AttributeError):
                return self._send(400, b'{"error": "expected JSON {\\"question\\": ...}"}', "application/json")
            if not question:
                return self._send(400, b'{"error": "empty question"}', "application/json")
            with lock:
                answer = pipe.ask(question)
            body = {"answer": answer.text, "timings": answer.timings,
                    "citations": [{"doc_id": c.doc_id, "chunk_id": c.id, "text": html.unescape(c.text[:300])}
                                  for c in answer.chunks]}
            self._send(200, json.dumps(body).encode(), "application/json")

        def log_message(self, fmt, *args):
            pass

    return Handler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=".blockrag/store")
    p.add_argument("--retriever", default="hybrid")
    p.add_argument("--mode", default="turbo", choices=["full", "turbo", "block", "blend"])
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)

    from blockrag.collection import Collection
    from blockrag.pipeline import Pipeline

    collection = Collection(args.store)
    generator = None
    if not args.no_generate:
        from blockrag.attention_kv import Generator

        generator = Generator(None, cache_dir=f"{args.store}/kv")
    pipe = Pipeline(collection, args.retriever, k=4, generator=generator, mode=args.mode)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(pipe))
    print(f"serving on http://{args.host}:{args.port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
