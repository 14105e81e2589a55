import json
import threading
import urllib.request
from http.server import ThreadingHTTPServer

from blockrag.demo_corpus import write_demo_corpus
from examples.qa_web import make_handler
from blockrag.collection import Collection
from blockrag.documents import load_folder
from blockrag.pipeline import Pipeline


def test_web_app_answers_with_citations(tmp_path):
    collection = Collection(tmp_path / "store", chunk_tokens=128, overlap=16, progress=False)
    collection.build_index("bm25")
    collection.add_documents(load_folder(write_demo_corpus(tmp_path / "corpus")))
    pipe = Pipeline(collection, "bm25", k=2)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(pipe))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert b"blockrag" in urllib.request.urlopen(url + "/", timeout=10).read()
        req = urllib.request.Request(url + "/ask", data=json.dumps({"question": "Who founded the savings bank?"}).encode(),
                                     method="POST")
        body = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert body["citations"][0]["doc_id"] == "bank.md"
        assert "retrieve_ms" in body["timings"]
        bad = urllib.request.Request(url + "/ask", data=b'{"question": ""}', method="POST")
        try:
            urllib.request.urlopen(bad, timeout=10)
            raise AssertionError("expected HTTP 400")
        except urllib.error.HTTPError as err:
            assert err.code == 400
    finally:
        server.shutdown()
