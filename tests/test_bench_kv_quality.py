"""Pooling helpers of eval/bench_kv_quality.py on synthetic per-question records (no model)."""
import json
import math

from blockrag.eval.bench_kv_quality import bootstrap_gap, load_runs, parse_seeds, pool_runs, summarize


def _run(seed, lls, kls):
    """A single-seed result: lls/kls = {mode: [per question]}."""
    modes = list(lls)
    examples = [{m: {"ll": lls[m][i], "kl": kls[m][i], "agree": 1.0, "f1": 0.0, "ttft": 1.0, "recomputed": 0.0}
                 for m in modes} for i in range(len(lls["full"]))]
    per = {m: {k: [ex[m][k] for ex in examples] for k in examples[0][m]} for m in modes}
    return {"seed": seed, "summary": summarize(per), "examples": examples}


def test_parse_seeds():
    assert parse_seeds("0") == [0]
    assert parse_seeds("1-7") == [1, 2, 3, 4, 5, 6, 7]
    assert parse_seeds("1,3-4, 9") == [1, 3, 4, 9]


def test_pooled_gap_is_ratio_of_pooled_means():
    a = _run(1, {"full": [-1.0, -2.0], "turbo": [-2.0, -2.0], "blend": [-1.5, -2.0]},
             {"full": [0.0, 0.0], "turbo": [0.4, 0.2], "blend": [0.2, 0.1]})
    b = _run(2, {"full": [-1.0, -1.0, -1.0], "turbo": [-1.5, -1.0, -1.5], "blend": [-1.0, -1.0, -1.5]},
             {"full": [0.0, 0.0, 0.0], "turbo": [0.1, 0.1, 0.1], "blend": [0.0, 0.1, 0.1]})
    assert math.isclose(a["summary"]["blend"]["gap_recovered"], 0.5)
    assert math.isclose(b["summary"]["blend"]["gap_recovered"], 0.5)
    p = pool_runs([a, b])
    assert p["seeds"] == [1, 2] and p["questions"] == 5
    s = p["summary"]
    # sum(blend - turbo) = 0.5 + 0 + 0.5 + 0 + 0 = 1.0; sum(full - turbo) = 1 + 0 + 0.5 + 0 + 0.5 = 2.0
    assert math.isclose(s["blend"]["gap_recovered"], 0.5)
    assert math.isclose(s["full"]["gap_recovered"], 1.0) and math.isclose(s["turbo"]["gap_recovered"], 0.0)
    # KL recovered over pooled means: sums 0.5 (blend) and 0.9 (turbo)
    assert math.isclose(s["blend"]["kl_recovered"], 1 - 0.5 / 0.9)
    lo, hi = s["blend"]["gap_ci90"]
    assert lo <= s["blend"]["gap_recovered"] <= hi


def test_bootstrap_constant_ratio():
    lo, hi = bootstrap_gap([-1.5] * 10, [-2.0] * 10, [-1.0] * 10, n_boot=200)
    assert math.isclose(lo, 0.5) and math.isclose(hi, 0.5)


def test_load_runs_single_and_multi(tmp_path):
    a = _run(1, {"full": [-1.0], "turbo": [-2.0], "blend": [-1.2]}, {"full": [0.0], "turbo": [1.0], "blend": [0.5]})
    b = _run(2, {"full": [-1.0], "turbo": [-2.0], "blend": [-1.8]}, {"full": [0.0], "turbo": [1.0], "blend": [0.5]})
    (tmp_path / "one.json").write_text(json.dumps(a))
    (tmp_path / "multi.json").write_text(json.dumps({"runs": {"seed2": b}}))
    runs = load_runs([tmp_path / "one.json", tmp_path / "multi.json"])
    assert [r["seed"] for r in runs] == [1, 2]
    assert math.isclose(pool_runs(runs)["summary"]["blend"]["gap_recovered"], 0.5)
