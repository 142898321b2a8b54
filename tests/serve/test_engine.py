"""The continuous-batching engine on the tiny runs: batched greedy outputs equal `heft.generate` one request at a
time (ReFT on and off) while requests join and leave, ReFT edits really reach the prompt, seeded sampling does not
depend on the batch, stops, cancel, the queue bound, shutdown, echo log-probabilities and errors that stay local.
Every wait has a timeout."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import FACTS

import heft
from heft.serve.engine import Engine
from heft.serve.kv_batch import why_not_mergeable
from heft.serve.text import first_stop, safe_end
from heft.serve.types import (
    EngineClosed,
    Finished,
    GenerationRequest,
    QueueFull,
    TokenEvent,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WAIT = 300.0  # seconds: generous, the tests share a loaded machine; a hang still fails


class Collect:
    """An `on_event` callback that keeps the events and signals the Finished."""

    def __init__(self, log: list | None = None, name: int = 0):
        self.events: list[TokenEvent | Finished] = []
        self.done = threading.Event()
        self.log, self.name = log, name

    def __call__(self, event: TokenEvent | Finished) -> None:
        self.events.append(event)
        if self.log is not None:
            self.log.append((self.name, type(event).__name__))
        if isinstance(event, Finished):
            self.done.set()

    def wait(self) -> Finished:
        assert self.done.wait(WAIT), "no Finished within the timeout"
        finished = self.events[-1]
        assert isinstance(finished, Finished) and sum(isinstance(e, Finished) for e in self.events) == 1
        return finished

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, TokenEvent)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TokenEvent))


def prompts(n: int) -> list[str]:
    """`n` prompts of mixed lengths (a question alone, or after one or two passages)."""
    out = []
    for i in range(n):
        question = FACTS[i % len(FACTS)][1]
        context = " ".join(FACTS[(i + k) % len(FACTS)][0] for k in range(i % 3))
        out.append(f"{context} Question: {question} ?\nAnswer:".strip())
    return out


def request(model, text: str, **kw) -> GenerationRequest:
    enc = model.encode(text)
    return GenerationRequest(enc.prompt, enc.content_start, **kw)


@pytest.fixture(scope="module")
def loaded(heft_run, lora_run, first_only_run):
    """Each run loaded once: {"heft": (model, tokenizer), "lora": ..., "first": ...}."""
    return {name: heft.load(run) for name, run in (("heft", heft_run), ("lora", lora_run), ("first", first_only_run))}


@pytest.fixture
def engine_of(loaded):
    """engine_of(name, **limits): a started engine on a loaded run, shut down after the test."""
    engines = []

    def make(name: str, start: bool = True, **kw) -> Engine:
        model, tok = loaded[name]
        engines.append(Engine(model, tok, **kw))
        if start:
            engines[-1].start()
        return engines[-1]

    yield make
    for e in engines:
        e.shutdown(drain=False, timeout=WAIT)


@pytest.mark.parametrize("name", ["heft", "lora"])
def test_batched_greedy_equals_one_at_a_time(loaded, engine_of, name):
    """16 requests in three waves, each wave sent while the earlier ones decode: the same texts as heft.generate on
    each prompt alone, and some request is admitted between another's first token and its end."""
    model, tok = loaded[name]
    engine = engine_of(name, max_concurrent=6)
    texts = prompts(16)
    budgets = [12 if i % 5 == 0 else 3 + i % 6 for i in range(16)]
    log: list = []
    got = [Collect(log, i) for i in range(16)]
    for wave in ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]):
        for i in wave:
            engine.submit(request(model, texts[i], max_new_tokens=budgets[i]), got[i])
        assert _wait_until(lambda first=got[wave[0]]: len(first.events) >= 1)  # the next wave joins while this one decodes
    finished = [g.wait() for g in got]
    expected = [heft.generate(model, tok, [t], max_new_tokens=b)[0] for t, b in zip(texts, budgets)]
    assert [f.text for f in finished] == expected
    assert [g.text for g in got] == expected  # the events carry the whole text
    assert all(f.finish_reason == "length" and f.completion_tokens == b for f, b in zip(finished, budgets))
    assert [f.prompt_tokens for f in finished] == [len(model.encode(t).prompt) for t in texts]
    assert len(set(expected)) > 4  # the outputs differ: a shuffled row would show
    started = {i: log.index((i, "TokenEvent")) for i in range(16)}
    ended = {i: log.index((i, "Finished")) for i in range(16)}
    assert any(started[a] < started[b] < ended[a] for a in range(16) for b in range(16) if a != b)
    assert engine.stats()["running"] == 0 and engine.stats()["finished"] == {"length": 16}


def _wait_until(cond, timeout: float = WAIT) -> bool:
    stop = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if cond():
            return True
        stop.wait(0.01)
    return False


@pytest.mark.parametrize("name", ["heft", "first"])
def test_echo_logprobs_are_the_edited_forward(loaded, engine_of, name):
    """echo + logprobs: each prompt token's log-probability is the log_softmax of one forward with the ReFT edits
    on its prompt (and differs from the same model without them: the edits really reach the prompt); the top-N
    holds N tokens led by the most likely; the lm-eval shape (max_tokens 1) adds the generated token's."""
    model, _ = loaded[name]
    text = prompts(3)[2]
    ids = torch.tensor([model.encode(text).prompt])
    with torch.no_grad():  # before the engine runs: the model is the engine thread's once it does
        edited = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        plain = torch.log_softmax(model.session.model(input_ids=ids).logits[0].float(), -1)
    engine = engine_of(name)
    scoring, lm_eval, other = Collect(), Collect(), Collect()
    engine.submit(request(model, text, max_new_tokens=0, echo=True, logprobs=2), scoring)
    engine.submit(request(model, text, max_new_tokens=1, echo=True, logprobs=1), lm_eval)
    engine.submit(request(model, prompts(2)[1], max_new_tokens=3), other)  # batched beside them
    want = edited[:-1].gather(1, ids[0, 1:, None])[:, 0]
    without = plain[:-1].gather(1, ids[0, 1:, None])[:, 0]
    assert (want - without).abs().max() > 1e-3  # the edits change the scores
    f = scoring.wait()
    assert f.finish_reason == "length" and f.completion_tokens == 0 and scoring.tokens == []
    lps = f.prompt_logprobs
    assert [p.token_id for p in lps] == ids[0].tolist() and lps[0].logprob is None and lps[0].top is None
    torch.testing.assert_close(torch.tensor([p.logprob for p in lps[1:]]), want, atol=1e-4, rtol=1e-4)
    for t, p in enumerate(lps[1:]):
        assert len(p.top) == 2 and max(p.top.values()) == pytest.approx(float(edited[t].max()), abs=1e-4)
    g = lm_eval.wait()
    assert [p.logprob for p in g.prompt_logprobs[1:]] == pytest.approx([p.logprob for p in lps[1:]], abs=1e-5)
    (event,) = [e for e in lm_eval.events if isinstance(e, TokenEvent)]
    assert event.token_id == int(edited[-1].argmax()) and event.logprob.logprob == pytest.approx(float(edited[-1].max()), abs=1e-4)
    assert len(event.logprob.top) == 1
    assert other.wait().completion_tokens == 3


def test_reft_changes_generated_text(loaded, engine_of):
    """heft_run's greedy outputs through the engine differ from the same weights without ReFT for some prompt."""
    model, tok = loaded["heft"]
    engine = engine_of("heft")
    texts = prompts(6)
    got = [Collect() for _ in texts]
    for t, c in zip(texts, got):
        engine.submit(request(model, t, max_new_tokens=6), c)
    outs = [c.wait().text for c in got]
    plain = []
    for t in texts:
        ids = torch.tensor([model.encode(t).prompt])
        seq = model.session.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                           do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
        plain.append(tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True))
    assert outs != plain


def test_seeded_sampling_does_not_depend_on_the_batch(loaded, engine_of):
    model, _ = loaded["lora"]
    engine = engine_of("lora")
    text = prompts(2)[1]

    def sample(seed: int, company: int) -> list[int]:
        others = [Collect() for _ in range(company)]
        for i, c in enumerate(others):
            engine.submit(request(model, prompts(company + 2)[i + 2], max_new_tokens=3 + i, temperature=1.3,
                                  seed=100 + i), c)
        mine = Collect()
        engine.submit(request(model, text, max_new_tokens=8, temperature=1.2, top_p=0.9, seed=seed), mine)
        mine.wait()
        for c in others:
            c.wait()
        return mine.tokens

    alone = sample(7, 0)
    assert len(alone) == 8
    assert sample(7, 4) == alone
    assert any(sample(s, 0) != alone for s in (8, 9, 10))  # the seed matters


def test_stop_string_cuts_the_text(loaded, engine_of):
    model, _ = loaded["lora"]
    engine = engine_of("lora")
    text = prompts(4)[3]
    full = Collect()
    engine.submit(request(model, text, max_new_tokens=8), full)
    words = full.wait().text.split(" ")
    stop = " " + words[3]  # a word the greedy text reaches; its first occurrence ends the text
    expected = full.events[-1].text[:full.events[-1].text.index(stop)]
    cut = Collect()
    engine.submit(request(model, text, max_new_tokens=8, stop=["never there", stop]), cut)
    f = cut.wait()
    assert f.finish_reason == "stop" and f.text == expected and cut.text == expected
    assert f.completion_tokens < 8


def test_stop_text_helpers():
    assert first_stop("a b\n\nc", ["\n\n", "c"], 0) == 3
    assert first_stop("a b", ["x"], 0) is None
    assert safe_end("answer: 4\n", ["\n\n"]) == len("answer: 4")  # "\n" could become "\n\n"
    assert safe_end("answer: 4", ["\n\n"]) == len("answer: 4")
    assert safe_end("caf\ufffd", []) == 3  # half a UTF-8 character waits for the rest
    assert safe_end("the end", ["ending", "xx"]) == len("the ")


def test_eos_from_the_generation_config_stops(loaded, engine_of):
    """A token the generation config lists as eos ends the request ("stop"), and adds no text; its event (with
    its log-probability) is the last one."""
    model, tok = loaded["lora"]
    text = prompts(1)[0]
    probe = Collect()
    engine_of("lora").submit(request(model, text, max_new_tokens=6), probe)
    probe.wait()
    k = next(k for k in range(1, 6) if probe.tokens[k] not in probe.tokens[:k])  # the first new token after the 1st
    config = model.session.model.generation_config
    before = config.eos_token_id
    config.eos_token_id = [tok.eos_token_id, probe.tokens[k]]
    try:
        engine = engine_of("lora")
    finally:
        config.eos_token_id = before
    got = Collect()
    engine.submit(request(model, text, max_new_tokens=6, logprobs=0), got)
    f = got.wait()
    assert f.finish_reason == "stop" and f.completion_tokens == k + 1 and got.tokens == probe.tokens[:k + 1]
    assert f.text == got.text == tok.decode(probe.tokens[:k], skip_special_tokens=True)
    assert got.events[-2].logprob is not None  # the eos token's event, for logprobs


def test_cancel_frees_the_slot(loaded, engine_of):
    model, _ = loaded["lora"]
    engine = engine_of("lora", max_concurrent=1)
    long, short = Collect(), Collect()
    handle = engine.submit(request(model, prompts(1)[0], max_new_tokens=400), long)
    engine.submit(request(model, prompts(2)[1], max_new_tokens=2), short)
    assert _wait_until(lambda: len(long.events) >= 2)
    assert not short.done.is_set()  # one slot: the short request waits
    handle.cancel()
    f = long.wait()
    assert f.finish_reason == "cancelled" and f.completion_tokens < 400
    assert short.wait().finish_reason == "length"
    handle.cancel()  # after the end: nothing happens
    assert _wait_until(lambda: engine.stats()["running"] == 0)  # a row leaves the batch just after its Finished
    assert engine.stats()["finished"] == {"cancelled": 1, "length": 1}


def test_queue_bound_and_closed_engine(loaded, engine_of):
    model, _ = loaded["lora"]
    engine = engine_of("lora", start=False, max_queue=2)
    got = [Collect() for _ in range(2)]
    for c in got:
        engine.submit(request(model, prompts(1)[0], max_new_tokens=2), c)
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit(request(model, prompts(1)[0], max_new_tokens=2), Collect())
    assert engine.stats()["waiting"] == 2
    engine.shutdown(drain=False)
    assert [c.wait().finish_reason for c in got] == ["cancelled", "cancelled"]
    with pytest.raises(EngineClosed):
        engine.submit(request(model, prompts(1)[0]), Collect())


def test_shutdown_drains_admitted_and_queued_requests(loaded, engine_of):
    model, _ = loaded["heft"]
    engine = engine_of("heft", max_concurrent=2)
    got = [Collect() for _ in range(5)]
    for i, c in enumerate(got):
        engine.submit(request(model, prompts(5)[i], max_new_tokens=4), c)
    engine.shutdown(drain=True, timeout=WAIT)
    assert all(c.done.is_set() for c in got)  # shutdown returned after every request ended
    assert [(c.events[-1].finish_reason, c.events[-1].completion_tokens) for c in got] == [("length", 4)] * 5
    with pytest.raises(EngineClosed, match="shutting down"):
        engine.submit(request(model, prompts(1)[0]), Collect())


def test_errors_fail_their_requests_only(loaded, engine_of):
    """A request the model cannot run (a token id past the vocabulary) ends with "error"; the thread goes on, and a
    callback that raises cancels only its own request."""
    model, tok = loaded["lora"]
    engine = engine_of("lora")
    bad = Collect()
    engine.submit(GenerationRequest([1, len(tok) + 1000], max_new_tokens=3), bad)
    f = bad.wait()
    assert f.finish_reason == "error" and "Error" in f.error
    mixed = [Collect() for _ in range(3)]  # a bad request prefilled with good ones fails alone
    engine.submit(request(model, prompts(1)[0], max_new_tokens=2), mixed[0])
    engine.submit(GenerationRequest([1, len(tok) + 1000], max_new_tokens=3), mixed[1])
    engine.submit(request(model, prompts(2)[1], max_new_tokens=2), mixed[2])
    assert [c.wait().finish_reason for c in mixed] == ["length", "error", "length"]

    def broken(event):
        raise RuntimeError("client went away")

    engine.submit(request(model, prompts(1)[0], max_new_tokens=5), broken)
    good = Collect()
    engine.submit(request(model, prompts(2)[1], max_new_tokens=3), good)
    assert good.wait().finish_reason == "length"
    with pytest.raises(ValueError, match="top_p: must be in"):
        engine.submit(request(model, prompts(1)[0], top_p=0.0), Collect())


def test_a_sliding_window_cache_is_not_merged():
    from transformers.cache_utils import DynamicCache

    k = torch.zeros(1, 2, 3, 4)
    assert why_not_mergeable(DynamicCache(ddp_cache_data=[(k, k)])) is None
    reason = why_not_mergeable(DynamicCache(ddp_cache_data=[(k, k, torch.tensor(8))]))
    assert reason is not None and "DynamicSlidingWindowLayer" in reason
