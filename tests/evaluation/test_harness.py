"""The lm-evaluation-harness bridge (heft.lm_eval_bridge, `heft lm-eval`) on the tiny model, offline: lm-eval's
requests are built here directly, or come from a local BoolQ-format task whose data is a JSON file.

What must hold: a base run's log-likelihoods equal lm-eval's own `hf` model's; ReFT and HEFT runs give the
predictions of heft's own evaluation; requests split differently over the same tokens get their own scores;
generate_until equals heft's generation; rolling perplexity is refused for ReFT and answered for LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FACTS, tiny_config, write_jsonl

from heft.cli import main

pytest.importorskip("lm_eval")  # in the `test` extra; a bare install without it skips this file

from lm_eval.api.instance import Instance  # noqa: E402

from heft.errors import ConfigError  # noqa: E402
from heft.evaluation.harness import HeftLM, evaluate  # noqa: E402

TASK = "heft_boolq_local"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny model's ops are too small to share (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, boolq_files, tmp_path_factory) -> dict[str, Path]:
    """base (no stages), LoRA-only, ReFT-only and HEFT runs on the fixture BoolQ rows, fp32."""
    root = tmp_path_factory.mktemp("lm-eval-runs")
    stages = {"base": [], "lora": [{"method": "lora", "epochs": 1, "batch_size": 8}],
              "reft": [{"method": "reft", "epochs": 1, "batch_size": 8}],
              "heft": [{"method": "lora", "epochs": 1, "batch_size": 8}, {"method": "reft", "epochs": 1, "batch_size": 8}]}
    out = {}
    for name, st in stages.items():
        cfg = root / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, boolq_files, st, data={"dev_size": 0})))
        assert main(["train", "--config", str(cfg), "--out", str(root / name)]) == 0
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def task_dir(boolq_files, tmp_path_factory) -> Path:
    """lm-eval's BoolQ task (super_glue/boolq: the prompt heft's `passage` format renders) over the runs' own
    evaluation rows, as a local JSON file."""
    folder = tmp_path_factory.mktemp("lm-eval-task")
    rows = [json.loads(x) for x in boolq_files[1].read_text().splitlines()]
    data = write_jsonl(folder / "boolq.jsonl", [{"passage": r["passage"], "question": r["question"],
                                                  "label": int(r["answer"])} for r in rows])
    (folder / "boolq.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "output_type": "multiple_choice", "validation_split": "validation",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
        "doc_to_choice": ["no", "yes"], "metric_list": [{"metric": "acc"}]}))
    return folder


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0, metadata=(TASK, i, 1)) for i, a in enumerate(args)]


PAIRS = [(f"{p}\nQuestion: {q}?\nAnswer:", c) for p, q, _ in FACTS[:6] for c in (" yes", " no", " it is true")]
PAIRS += [("", "Cats are small animals"), ("Question: do cats sleep ", "during the day"),  # empty context, trailing space
          ("Bees make honey", " from the nectar of flowers .")]


def test_base_run_equals_lm_evals_hf_model(runs, tiny_model_dir):
    """(a) loglikelihood and is_greedy of a base run equal lm-eval's `hf` model on the same folder at fp32;
    loglikelihood_rolling too, with a short max_length so that documents span several windows."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=4)
    heft = HeftLM(run=str(runs["base"]), batch_size=5)
    mine, theirs = heft.loglikelihood(requests("loglikelihood", PAIRS)), hf.loglikelihood(requests("loglikelihood", PAIRS))
    for (a, ga), (b, gb) in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    docs = [(f"{p} {p}",) for p, _, _ in FACTS[:5]]
    hf_short = HFLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=4, max_length=8)
    short = HeftLM(run=str(runs["base"]), batch_size=3, max_length=8)
    rolled = short.loglikelihood_rolling(requests("loglikelihood_rolling", docs))
    assert rolled == pytest.approx(hf_short.loglikelihood_rolling(requests("loglikelihood_rolling", docs)), abs=1e-4)
    assert rolled != pytest.approx(heft.loglikelihood_rolling(requests("loglikelihood_rolling", docs)), abs=1e-3)  # windows


@pytest.mark.parametrize("strategy", ["reft", "heft"])
def test_reft_runs_predict_as_heft_evaluates(runs, task_dir, strategy):
    """(b) a BoolQ-format lm-eval task gives, row for row, heft's own evaluation (the run's predictions, which
    `heft eval` reproduces): the same prediction and the same yes-no log-likelihood margin."""
    run = runs[strategy]
    saved = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert not any(p["truncated"] for p in saved)  # the rows fit the run's max_length: the same prompts
    results = evaluate(HeftLM(run=str(run), batch_size=8), [TASK], include_path=task_dir)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(saved) == 20
    for s, p in zip(samples, saved):
        ll_no, ll_yes = [r[0] for r in s["filtered_resps"]]  # (log-likelihood, is_greedy) of " no", " yes"
        assert (ll_yes > ll_no) == p["pred"]
        assert ll_yes - ll_no == pytest.approx(p["lp_yes"] - p["lp_no"], abs=1e-5)
    base = evaluate(HeftLM(run=str(runs["base"]), batch_size=8), [TASK], include_path=task_dir)
    plain = sorted(base["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in plain] != [s["filtered_resps"] for s in samples]  # the adapters are on


def test_same_tokens_split_differently_get_their_own_scores(runs):
    """(c) two requests over the same context+continuation tokens, split at different places, in one call: each
    gets the score of its own split (ReFT's last positions on its own context), equal to a plain forward pass."""
    lm = HeftLM(run=str(runs["heft"]), batch_size=4)
    a = ("Question: do cats sleep during", " the day")
    b = ("Question: do cats sleep", " during the day")
    ea, eb = lm.encode_request(*a), lm.encode_request(*b)
    assert ea.prompt + ea.answers[0] == eb.prompt + eb.answers[0] and len(ea.prompt) != len(eb.prompt)
    together = lm.loglikelihood(requests("loglikelihood", [a, b, a]))
    assert together[0] == together[2]
    reft = lm.session.reft
    for got, e in zip(together, (ea, eb)):
        ids = torch.tensor([e.prompt + e.answers[0]])
        with torch.no_grad():
            logits = reft(ids, torch.tensor([0]), torch.tensor([len(e.prompt)])).logits[0].log_softmax(-1)
        n, cont = len(e.prompt), e.answers[0]
        want = sum(float(logits[n - 1 + k, t]) for k, t in enumerate(cont))
        assert got[0] == pytest.approx(want, abs=1e-5)
        alone = lm.loglikelihood(requests("loglikelihood", [a if e is ea else b]))[0]
        # alone the row is padded differently: equal up to float rounding (some CPUs' kernels round by 1 ulp)
        assert alone[0] == pytest.approx(got[0], abs=1e-5) and alone[1] == got[1]
    # the shared tokens (" the day") are scored differently: b's edits end before " during", a's after it
    during = lm.loglikelihood(requests("loglikelihood", [("Question: do cats sleep", " during")]))[0][0]
    assert abs((together[1][0] - during) - together[0][0]) > 1e-4


def test_generate_until_equals_heft_generation(runs):
    """(d) greedy generate_until on 20 prompts equals heft.api.generate (ReFT edits on each prompt), cut at `until`."""
    import heft

    lm = HeftLM(run=str(runs["heft"]), batch_size=6)
    prompts = [f"{p}\nQuestion: {q}?\nAnswer:" for p, q, _ in FACTS] + [f"Question: {q}?\nAnswer:" for _, q, _ in FACTS[:8]]
    assert len(prompts) == 20
    want = heft.generate(lm.model, lm.tokenizer, prompts, max_new_tokens=6, batch_size=7)
    got = lm.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 6, "do_sample": False})
                                                         for p in prompts]))
    assert got == want and any(w.strip() for w in want)
    cut = lm.generate_until(requests("generate_until", [(p, {"until": ["."], "max_gen_toks": 6}) for p in prompts]))
    assert cut == [w.split(".")[0] for w in want]


def test_reft_refuses_what_it_cannot_answer_lora_answers_it(runs):
    """(e) rolling perplexity and sampling name the task and the reason on a ReFT run; a LoRA-only run answers."""
    docs = requests("loglikelihood_rolling", [("Cats are small animals that often sleep during the day .",)])
    with pytest.raises(ConfigError, match=f"task {TASK} .*rolling perplexity over a whole document has no prompt for "
                                          "ReFT's positions"):
        HeftLM(run=str(runs["reft"])).loglikelihood_rolling(docs)
    lm = HeftLM(run=str(runs["heft"]))
    with pytest.raises(ConfigError, match=f"task {TASK} .*sampling.*greedily only"):
        lm.generate_until(requests("generate_until", [("Question: do cats sleep?", {"do_sample": True, "temperature": 0.7})]))
    with pytest.raises(ConfigError, match=r"beam search \(num_beams=2\)"):
        lm.generate_until(requests("generate_until", [("Question: do cats sleep?", {"num_beams": 2})]))
    lora = HeftLM(run=str(runs["lora"]))
    (ll,) = lora.loglikelihood_rolling(docs)
    (whole, _), = lora.loglikelihood(requests("loglikelihood", [("", "Cats are small animals that often sleep during the day .")]))
    assert ll == pytest.approx(whole, abs=1e-5) and ll < 0  # one window: the document after the prefix token
    # the bridge's beam search is Hugging Face's on each prompt alone; on two of these prompts it ends on other
    # tokens than greedy decoding, so the check also fails if num_beams never reaches generate
    prompts = [f"Question: {q}?" for _, q, _ in FACTS[:8]]
    got = HeftLM(run=str(runs["lora"]), batch_size=1).generate_until(
        requests("generate_until", [(p, {"num_beams": 2, "max_gen_toks": 3}) for p in prompts]))
    beams = []
    for p in prompts:
        ids = lora.tokenizer(p, return_tensors="pt")
        seq = lora.model.generate(**ids, num_beams=2, do_sample=False, max_new_tokens=3,
                                  pad_token_id=lora.tokenizer.pad_token_id)
        beams.append(lora.tokenizer.decode(seq[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    greedy = lora.generate_until(requests("generate_until", [(p, {"max_gen_toks": 3}) for p in prompts]))
    assert got == beams and got != greedy


def test_model_args_are_checked_before_loading():
    with pytest.raises(ConfigError, match="unknown option.*pretrained.*run=DIR"):
        HeftLM(run="x", pretrained="gpt2")
    with pytest.raises(ConfigError, match="batch_size='auto'.*positive whole number"):
        HeftLM(run="x", batch_size="auto")
    with pytest.raises(ConfigError, match="give the run folder"):
        HeftLM()


def test_registered_as_heft_and_import_heft_stays_free_of_lm_eval():
    code = ("import sys, heft, heft.cli; assert 'lm_eval' not in sys.modules\n"
            "import heft.lm_eval_bridge\nfrom lm_eval.api.registry import get_model\n"
            "print(get_model('heft').__name__, get_model('hf').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["HeftLM", "HFLM"]


def test_cli_end_to_end_on_a_local_task(runs, task_dir, tmp_path, capsys):
    """(f) `heft lm-eval DIR --tasks T --include-path D --limit 5 --output F`: lm-eval's table and its JSON."""
    out = tmp_path / "res" / "lm-eval.json"
    assert main(["lm-eval", str(runs["heft"]), "--tasks", TASK, "--include-path", str(task_dir), "--limit", "5",
                 "--batch-size", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert TASK in printed and "acc" in printed
    saved = json.loads(out.read_text())
    preds = [json.loads(x) for x in (runs["heft"] / "predictions.jsonl").read_text().splitlines()][:5]
    assert saved["results"][TASK]["acc,none"] == pytest.approx(sum(p["pred"] == p["label"] for p in preds) / 5)
    assert len(saved["samples"][TASK]) == 5


def test_cli_errors(runs, task_dir, monkeypatch, capsys):
    assert main(["lm-eval", str(runs["base"]), "--tasks", "no_such_task", "--include-path", str(task_dir)]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert main(["lm-eval", str(runs["base"]), "--tasks", TASK]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "heft: error: heft lm-eval needs lm-evaluation-harness, an optional extra: pip install 'heft[lm-eval]'"
