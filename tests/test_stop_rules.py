"""Generator stopping rules (stop strings, repetition guard, token budget) on a scripted decoder: the model's
prefill/step are replaced by a fixed token script, so the decode loop itself is what is tested, in the
cached modes' and full mode's shared loop."""
import pytest
import torch

from blockrag.attention_kv.generate import Generator, apply_stops, held_back, repeats


def test_apply_stops_skips_leading_whitespace():
    assert apply_stops("Alda Venn\nQuestion: x", ("\n",)) == ("Alda Venn", True)
    assert apply_stops("\n\n Alda Venn\nmore", ("\n",)) == ("\n\n Alda Venn", True)
    assert apply_stops("no stop here", ("\n", "###")) == ("no stop here", False)
    assert apply_stops("a ### b\nc", ("\n", "###")) == ("a ", True)  # the earliest of several
    assert apply_stops("anything", ()) == ("anything", False)
    # a line ending with a colon announces the answer: the newline after it does not stop
    assert apply_stops("The answer is:\nKelp bread\nmore", ("\n",)) == ("The answer is:\nKelp bread", True)
    assert apply_stops("The answer is:\n", ("\n",)) == ("The answer is:\n", False)


def test_held_back_and_repeats():
    assert held_back("answer #", ("###",)) == 1 and held_back("answer ##", ("###",)) == 2
    assert held_back("answer", ("###",)) == 0 and held_back("x\n", ("\n",)) == 0
    assert repeats([1, 2, 3, 9, 1, 2, 3], 3) and not repeats([1, 2, 3, 9, 1, 2, 4], 3)
    assert not repeats([1, 2, 1, 2], 0) and not repeats([5, 5, 5], 2) and repeats([5, 5, 5, 5], 2)


class _Scripted(Generator):
    """A Generator whose prefill/step emit ``script`` token by token (no model)."""

    def __init__(self, tokenizer, script, **rules):
        self.tokenizer, self.script = tokenizer, list(script)
        self.device = torch.device("cpu")
        self.stop, self.repetition_guard = tuple(rules.get("stop", ())), rules.get("repetition_guard", 0)
        self.eos_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.steps, self._epoch, self._graphs = 0, 0, {}

    def _logits(self, i):
        out = torch.zeros(len(self.tokenizer))
        out[self.script[min(i, len(self.script) - 1)]] = 1.0
        return out

    def prefill(self, question, chunks, mode, *args, **kwargs):
        info = {"cache": None, "length": 10, "n_context": 8, "n_question": 2, "n_recomputed": 0, "bucket": None}
        return self._logits(0)[None], info

    def _step(self, mode, cache, token, pos):
        self.steps += 1
        return self._logits(self.steps)


def _run(tokenizer, text, max_new_tokens=64, **rules):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    gen = _Scripted(tokenizer, ids, **rules)
    stream = gen.generate("q", [], mode="full", max_new_tokens=max_new_tokens, stream=True)
    pieces = list(stream)
    return pieces, stream.result, gen.steps


def test_newline_stop_cuts_the_answer_and_the_stream(tokenizer):
    pieces, res, steps = _run(tokenizer, "Alda Venn\nQuestion: who built the tower?", stop=("\n",))
    assert res.answer == "Alda Venn" and "".join(pieces).strip() == "Alda Venn"
    assert res.timings["stopped_by"] == "stop"
    n_answer = len(tokenizer("Alda Venn\n", add_special_tokens=False)["input_ids"])
    assert steps <= n_answer  # decoding ended at the newline, not at the end of the script
    # without the rule the whole script is decoded, up to the end-of-turn token
    _, plain, _ = _run(tokenizer, "Alda Venn\nQuestion: who built the tower?")
    assert plain.answer == "Alda Venn\nQuestion: who built the tower?" and plain.timings["stopped_by"] == "eos"


def test_a_leading_newline_does_not_empty_the_answer(tokenizer):
    _, res, _ = _run(tokenizer, "\nKelp bread\nmore", stop=("\n",))
    assert res.answer == "Kelp bread"


def test_multi_character_stop_is_never_streamed(tokenizer):
    pieces, res, _ = _run(tokenizer, "412 kilometres ### Question", stop=("###",))
    assert res.answer == "412 kilometres" and "#" not in "".join(pieces)


def test_repetition_guard_drops_the_loop(tokenizer):
    text = "The Veloria Bank is a bank that sells the Veloria Bank is a bank that sells the Veloria Bank"
    pieces, res, _ = _run(tokenizer, text, repetition_guard=4)
    assert res.timings["stopped_by"] == "repetition"
    # " Veloria Bank is a" (4 tokens) comes back: decoding ends there and the repeat is dropped
    assert res.answer == "The Veloria Bank is a bank that sells the"
    assert "".join(pieces).strip() == res.answer  # the repeated window was held back, never streamed


def test_token_budget(tokenizer):
    pieces, res, _ = _run(tokenizer, "one two three four five six seven eight nine ten", max_new_tokens=3,
                          stop=("\n",), repetition_guard=4)
    assert len(res.token_ids) == 3 and res.timings["stopped_by"] == "budget"
    assert "".join(pieces).strip() == res.answer == tokenizer.decode(res.token_ids).strip()
