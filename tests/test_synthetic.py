from blockrag.eval.synthetic import Question, SyntheticSet, load, make_multihop


def test_deterministic_and_shaped():
    a, b = make_multihop(seed=3, n_people=40, n_companies=10, n_cities=6, n_countries=3,
                         n_distractors=10, n_per_hop=20), \
        make_multihop(seed=3, n_people=40, n_companies=10, n_cities=6, n_countries=3,
                      n_distractors=10, n_per_hop=20)
    assert a.passages == b.passages and a.questions == b.questions
    c = make_multihop(seed=4, n_people=40, n_companies=10, n_cities=6, n_countries=3,
                      n_distractors=10, n_per_hop=20)
    assert c.questions != a.questions
    ids = {p.id for p in a.passages}
    assert len(ids) == len(a.passages) == 40 + 10 + 6 + 10
    for hops in (1, 2, 3):
        qs = a.by_hops(hops)
        assert len(qs) == 20
        for q in qs:
            assert isinstance(q, Question) and q.answer and q.text.endswith("?")
            assert len(q.gold_doc_ids) == hops == len(set(q.gold_doc_ids))
            assert set(q.gold_doc_ids) <= ids


def test_gold_passages_state_the_chain():
    s = make_multihop(seed=0, n_per_hop=30)
    for q in s.questions:
        # each hop's gold passage names both ends of that hop
        for gold, (x, y) in zip(q.gold_doc_ids, zip(q.chain, q.chain[1:])):
            p = s.passage(gold)
            assert x in p.full_text and y in p.full_text, (q, p)
        # the question names only the first entity of the chain
        assert q.chain[0] in q.text and all(e not in q.text for e in q.chain[1:])


def test_roundtrip(tmp_path):
    s = make_multihop(seed=1, n_per_hop=10)
    s.to_jsonl(tmp_path)
    t = load(tmp_path)
    assert isinstance(t, SyntheticSet)
    assert t.passages == s.passages and t.questions == s.questions and t.seed == 1
