"""`heft serve` as a real process (`python -m heft serve RUN --port 0`) with the real engine, called with the
`openai` client, plain HTTP and lm-evaluation-harness's `local-completions` model.

What must hold: greedy answers equal `heft.generate` one request at a time (fp32), for 16 concurrent clients too,
with a malformed request among them; streamed deltas add up to the non-streamed text; echo + logprobs give the
prompt's scores; stop strings cut the text; a seed repeats a sampled answer; a client that leaves mid-stream frees
its slot; SIGTERM lets the requests in flight finish and exits 0; lm-eval through the API on a run whose ReFT edits
only first positions gives heft's own accuracy. Every wait is bounded."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import heft

pytestmark = pytest.mark.usefixtures("one_thread")

START_S = 600.0  # importing torch and loading the run in a fresh process: minutes on a busy 2-core machine

PROMPTS = [
    "Cats are small animals that often sleep during the day .\nQuestion: do cats sleep during the day?\nAnswer:",
    "Bees make honey .\nQuestion: do bees make honey?\nAnswer:",
    ("The moon has no air , so sound cannot travel there . It is noted here . It is noted here .\n"
     "Question: can sound travel on the moon?\nAnswer:"),
    "Paris\nQuestion: is paris the capital of france?\nAnswer:",
]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str       # http://127.0.0.1:PORT
    log: Path      # the server's stderr

    def client(self, timeout: float = 120.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", timeout=timeout, max_retries=0)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()


@contextmanager
def serving(run: Path, tmp_path: Path, *flags: str) -> Iterator[Server]:
    """`heft serve RUN --port 0 FLAGS` in a subprocess until the block ends (then SIGTERM, then kill)."""
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "heft", "serve", str(run), "--port", "0", *flags],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + START_S
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line.startswith("heft serve: listening on "):
                url = line.split()[-1]
        assert url is not None, f"no listening line in {START_S:.0f}s; server log:\n{log.read_text()[-3000:]}"
        yield Server(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


@pytest.fixture(scope="module")
def heft_server(heft_run, tmp_path_factory) -> Iterator[Server]:
    with serving(heft_run, tmp_path_factory.mktemp("serve"), "--model-name", "tiny", "--max-concurrent", "8") as s:
        yield s


@pytest.fixture(scope="module")
def reference(heft_run):
    """heft.generate one request at a time (fp32): what every greedy answer of the server must equal."""
    model, tok = heft.load(heft_run)

    def generate(prompt: str, n: int) -> str:
        return heft.generate(model, tok, [prompt], max_new_tokens=n, batch_size=1)[0]
    return model, tok, generate


def test_completions_text_ids_and_lists(heft_server, reference):
    model, _, generate = reference
    client = heft_server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.choices[0].text == generate(PROMPTS[0], 12)
    assert got.usage.prompt_tokens == len(model.encode(PROMPTS[0], None, "t").prompt)
    many = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [generate(p, 8) for p in PROMPTS[:3]]
    ids = [list(model.encode(p, None, "t").prompt) for p in PROMPTS[:2]]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    if model.session.cfg.reft.positions.first_from != "content":  # token ids: ReFT's first positions from 0
        assert [c.text for c in by_ids.choices] == [generate(p, 8) for p in PROMPTS[:2]]


def test_streaming_equals_the_whole_answer(heft_server):
    client = heft_server.client()
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    parts, reason = [], None
    for chunk in client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True):
        parts.append(chunk.choices[0].text)
        reason = chunk.choices[0].finish_reason or reason
    assert "".join(parts) == whole.choices[0].text and reason == whole.choices[0].finish_reason


def test_echo_logprobs_score_the_prompt(heft_server, reference):
    """echo + logprobs + max_tokens 0 gives log p(token | earlier tokens) of every prompt token but the first:
    the run's forward pass over the whole prompt (ReFT on that prompt's positions)."""
    model, _, _ = reference
    ids = list(model.encode(PROMPTS[1], None, "t").prompt)
    got = heft_server.client().completions.create(model="tiny", prompt=[ids], max_tokens=0, echo=True, logprobs=1)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    with torch.no_grad():
        x = torch.tensor([ids])
        logits = model(x, attention_mask=torch.ones_like(x)).logits[0].log_softmax(-1)
    want = [float(logits[k - 1, t]) for k, t in enumerate(ids) if k]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])


def test_stop_strings_and_seeds(heft_server, reference):
    _, _, generate = reference
    client = heft_server.client()
    full = generate(PROMPTS[0], 16)
    words = full.split()
    if len(words) >= 3:
        stop = words[2]
        cut = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    a, b, c = (client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=1.0, seed=s)
               for s in (7, 7, 8))
    assert a.choices[0].text == b.choices[0].text
    assert c.choices[0].text != a.choices[0].text  # 16 tokens sampled at temperature 1 from a random model


def test_sixteen_clients_at_once(heft_server, reference):
    """16 threads, mixed prompt lengths and max_tokens, and one malformed request among them: every greedy answer
    equals heft.generate alone, nothing is dropped, the malformed one gets 400 and the server keeps serving."""
    _, _, generate = reference
    jobs = [(PROMPTS[i % len(PROMPTS)] + " yes" * (i % 3), 4 + 3 * (i % 5)) for i in range(16)]
    results: dict[int, object] = {}

    def call(i: int) -> None:
        client = heft_server.client()
        try:
            if i == 8:
                r = httpx.post(f"{heft_server.url}/v1/completions", json={"model": "tiny", "prompt": {"bad": 1}},
                               timeout=120)
                results[i] = r.status_code
                return
            p, n = jobs[i]
            results[i] = client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text
        except Exception as e:  # noqa: BLE001 - recorded: the assertion below names it
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(16))
    assert results.pop(8) == 400
    for i, got in results.items():
        assert got == generate(*jobs[i]), (i, got)


def test_chat_needs_a_template(heft_server):
    r = httpx.post(f"{heft_server.url}/v1/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "user", "content": "do bees make honey"}]}, timeout=60)
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_chat_run(tiny_model_dir, tmp_path_factory, tmp_path):
    """A chat run: /v1/chat/completions gives heft.generate(messages=...), streamed or not."""
    from conftest import FACTS, tiny_config, write_jsonl
    from helpers import chat_model_dir

    root = tmp_path_factory.mktemp("serve-chat")
    system = "Please answer the question with yes or no ."
    rows = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": q},
                          {"role": "assistant", "content": "yes" if a else "no"}]} for _, q, a in FACTS[:8]]
    files = (write_jsonl(root / "train.jsonl", rows), write_jsonl(root / "eval.jsonl", rows[:4]))
    cfg = tiny_config(chat_model_dir(tiny_model_dir, root / "model"), files,
                      [{"method": "lora", "epochs": 1, "batch_size": 4}, {"method": "reft", "epochs": 1, "batch_size": 4}],
                      data={"format": "chat", "dev_size": 0},
                      reft={"rank": 2, "layers": "all", "positions": {"first": 2, "last": 2, "first_from": "content"},
                            "init": "random"})
    run = heft.train(cfg, root / "run")
    model, tok = heft.load(run)
    msgs = [{"role": "user", "content": "do bees make honey"}]
    want = heft.generate(model, tok, messages=[msgs], max_new_tokens=10)[0]
    with serving(run, tmp_path) as server:
        client = server.client()
        got = client.chat.completions.create(model="run", messages=msgs, max_tokens=10, temperature=0)
        assert got.choices[0].message.content == want
        deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="run", messages=msgs, max_tokens=10, temperature=0, stream=True) if c.choices]
        assert "".join(deltas) == want


def test_faults_client_gone_and_sigterm(heft_run, tmp_path):
    """--max-concurrent 1. A streaming client that closes its connection after two chunks has its request cancelled
    (the engine counts it cancelled, with fewer than its 480 tokens generated), and the next request runs. Then
    SIGTERM with three streams in flight (one running, two waiting): a new request gets 503 (or no connection),
    the three finish with all their tokens, and the process exits 0."""
    with serving(heft_run, tmp_path, "--max-concurrent", "1", "--max-new-tokens", "480") as server:
        ask = {"model": "run", "prompt": PROMPTS[3], "max_tokens": 480, "temperature": 0, "stop": ["<never>"]}
        assert httpx.post(f"{server.url}/v1/completions", json=ask, timeout=300).json()["usage"]["completion_tokens"] == 480
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/completions",
                                                           json={**ask, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]  # two data lines and their blank separators
        assert got[0].startswith("data: ")
        t0 = time.monotonic()
        while sum(server.stats()[k] for k in ("running", "waiting")) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        stats = server.stats()
        assert stats["running"] == 0 and stats["finished"].get("cancelled") == 1, stats
        assert stats["generated_tokens"] < 2 * 480, stats  # the second request stopped early
        done = server.client().completions.create(model="run", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert done.usage.completion_tokens == 4

        results: dict[int, object] = {}
        first_chunk = threading.Event()

        def call(i: int) -> None:
            try:
                with httpx.stream("POST", f"{server.url}/v1/completions", timeout=300,
                                  json={"model": "run", "prompt": PROMPTS[i], "max_tokens": 40, "temperature": 0,
                                        "stop": ["<never>"], "stream": True}) as r:
                    chunks = []
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            chunks.append(json.loads(line[6:]))
                            first_chunk.set()
                results[i] = chunks
            except Exception as e:  # noqa: BLE001 - recorded: the assertion below names it
                results[i] = e

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        assert first_chunk.wait(120)
        t0 = time.monotonic()
        while server.stats()["waiting"] < 2 and time.monotonic() - t0 < 30:  # the other two are queued
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:
            late: object = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPTS[0]},
                                      timeout=30).status_code
        except httpx.TransportError:
            late = "refused"
        for t in threads:
            t.join(300)
        assert server.proc.wait(120) == 0, server.log.read_text()[-3000:]
    assert late in (503, "refused")
    for i in range(3):
        chunks = results[i]
        assert isinstance(chunks, list), chunks
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(bool(c["choices"][0]["text"]) for c in chunks) >= 1


# ----------------------------------------------------------------------------- lm-evaluation-harness


TASK = "heft_serve_boolq"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A BoolQ-format multiple-choice task over 12 fixture rows, as a local JSON file."""
    import yaml
    from conftest import boolq_rows, write_jsonl

    folder = tmp_path_factory.mktemp("serve-task")
    data = write_jsonl(folder / "rows.jsonl", [{"passage": r["passage"], "question": r["question"],
                                                "label": int(r["label"])} for r in boolq_rows(12, offset=2)])
    (folder / "task.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "output_type": "multiple_choice", "validation_split": "validation",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
        "doc_to_choice": ["no", "yes"], "metric_list": [{"metric": "acc"}]}))
    return folder


def _through_api(server: Server, tiny_model_dir: Path, task_dir: Path) -> dict:
    import lm_eval

    from heft.evaluation.harness import task_manager

    args = {"model": "run", "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(tiny_model_dir), "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1}
    return lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[TASK], log_samples=True,
                                   task_manager=task_manager([TASK], task_dir))


def _own(run: Path, task_dir: Path) -> dict:
    from heft.evaluation.harness import HeftLM, evaluate

    return evaluate(HeftLM(run=str(run), batch_size=4), [TASK], include_path=task_dir)


def _scores(results: dict) -> list[list[float]]:
    return [[r[0] for r in s["filtered_resps"]] for s in sorted(results["samples"][TASK], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("which", ["first_only_run", "heft_run"])
def test_lm_eval_local_completions(which, request, tiny_model_dir, task_dir, tmp_path):
    """first positions only: lm-eval through the API gives heft's own accuracy and scores. With last positions
    (heft_run) the API's ReFT edits land on the continuation's last tokens, so scores differ: measured, printed."""
    for module in ("lm_eval", "aiohttp", "tenacity"):  # lm-eval's API models need the last two (lm_eval[api])
        pytest.importorskip(module)
    run = request.getfixturevalue(which)
    own = _own(run, task_dir)
    with serving(run, tmp_path) as server:
        api = _through_api(server, tiny_model_dir, task_dir)
    acc_api, acc_own = api["results"][TASK]["acc,none"], own["results"][TASK]["acc,none"]
    diffs = [abs(a - b) for sa, so in zip(_scores(api), _scores(own)) for a, b in zip(sa, so)]
    print(f"\n{which}: acc through the API {acc_api:.3f}, heft's own {acc_own:.3f}; "
          f"log-likelihood |diff| max {max(diffs):.4f}, mean {sum(diffs) / len(diffs):.4f}")
    if which == "first_only_run":
        assert acc_api == acc_own
        assert max(diffs) < 1e-3
    else:
        assert max(diffs) > 1e-4  # the API's edits sit on other positions: if this passed unchanged, ReFT was off
