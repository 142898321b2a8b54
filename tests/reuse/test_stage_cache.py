"""The stage cache as one run sees it: a prefix one strategy stores is found by another that starts from it on the
same training rows, never by a run whose rows differ; taking it writes its files, log, record and evaluations into
the run as if the run had trained the stage itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from heft.config.load import from_dict
from heft.reuse.stage_cache import StageCache
from heft.run.folder import RunFolder
from heft.run.records import DataFingerprint, EpochRecord, StageRecord
from heft.training.cost import RunTracker

DATA = {"source": "local", "train_path": "t.jsonl", "eval_path": "v.jsonl"}
LORA = {"method": "lora", "scheduler": "constant"}
ROWS = DataFingerprint(train="a" * 20, train_rows=16, eval="b" * 20, eval_rows=8)
LOG = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}, {"step": 3, "loss": 0.5}]


def _configs() -> dict:
    common = {"data": DATA, "eval": {"every_epoch": True}}
    return {"lora": from_dict({**common, "stages": [{**LORA, "epochs": 2}]}),
            "heft": from_dict({**common, "stages": [{**LORA, "epochs": 1}, {"method": "reft"}]})}


def _lora_after_one_epoch(folder: Path, cfg) -> RunFolder:
    """LoRA-only's run folder one step into its second epoch: the stage's log so far, the epoch-1 evaluation."""
    run = RunFolder(folder)
    run.write_train_log(0, cfg.stages[0], LOG)
    run.append_epoch(EpochRecord(stage=0, method="lora", stage_epoch=1, epoch=1, optimizer_steps=2, tokens=100,
                                 train_seconds=1.0, flops=4e6, accuracy=0.5, correct=4, n=8))
    return run


def test_the_plan_says_which_stages_each_strategy_takes_from_the_cache():
    configs = _configs()
    cache = StageCache(Path("unused"), configs)
    assert cache.order(configs) == ["lora", "heft"] and cache.planned_starts(configs) == {"lora": 0, "heft": 1}
    twins = {"a": configs["lora"], "b": configs["lora"]}  # the first trains the prefix, the second takes it whole
    assert StageCache(Path("unused"), twins).planned_starts(twins) == {"a": 0, "b": 1}


def test_a_prefix_is_found_on_the_same_training_rows_only_and_taken_whole(tmp_path):
    configs = _configs()
    cache = StageCache(tmp_path / "stage-cache", configs)
    lora = cache.for_run(configs["lora"], "lora", ROWS)
    assert lora.start is None and lora.wants(1, 1) and not lora.wants(1, 2)  # HEFT starts from epoch 1, nobody from 2
    record = StageRecord(index=0, method="lora", trainable_params=10, optimizer_steps=2, epochs=1.0, train_seconds=1.0,
                         tokens=100, final_loss=0.6, flops=4e6, peak_memory={"gb": 1.0})

    def write_last(dest: Path) -> None:
        dest.mkdir(parents=True)
        (dest / "adapter.safetensors").write_bytes(b"epoch-1 weights")

    lora.store(0, 1.0, _lora_after_one_epoch(tmp_path / "lora", configs["lora"]), [record], 2, write_last)
    assert not lora.wants(1, 1)  # stored once

    heft = cache.for_run(configs["heft"], "heft", ROWS)
    assert heft.has(0) and not heft.has(1) and heft.start.source == "lora (epoch 1 snapshot)"
    assert (heft.files(0) / "adapter.safetensors").read_bytes() == b"epoch-1 weights"
    assert heft.start.stages[0].train_log == LOG[:2]  # the source's log up to the snapshot's step
    assert [e.stage_epoch for e in heft.start.evals] == [1]
    # an edited training file (same row count, other content) never finds the prefix trained on the old rows: the
    # prefix is trained again on the new rows and replaces the entry
    edited = dataclasses.replace(ROWS, train="c" * 20)
    assert cache.for_run(configs["heft"], "heft", edited).start is None
    assert cache.for_run(configs["lora"], "lora", edited).wants(1, 1)
    # other evaluation rows: the stage is the same, its evaluations are not reused
    other_eval = cache.for_run(configs["heft"], "heft", dataclasses.replace(ROWS, eval="d" * 20))
    assert other_eval.has(0) and other_eval.start.evals == []

    run = RunFolder(tmp_path / "heft")
    stage = configs["heft"].stages[0]
    taken = heft.take(0, stage, run, RunTracker(run, configs["heft"], 1000, 4, None, True), main=True)
    assert taken == dataclasses.replace(record, reused_from="lora (epoch 1 snapshot)", peak_memory=None)
    assert run.read_stage(0, stage) == taken
    assert (run.stage_dir(0, stage) / "adapter.safetensors").read_bytes() == b"epoch-1 weights"
    assert run.read_train_log(0, stage) == LOG[:2]
    assert [(e.stage_epoch, e.accuracy, e.reused_from) for e in run.read_epochs()] == [(1, 0.5, "lora (epoch 1 snapshot)")]


def test_an_entry_written_before_heft_recorded_its_rows_is_not_reused_but_replaced(tmp_path):
    configs = _configs()
    cache = StageCache(tmp_path / "stage-cache", configs)
    record = StageRecord(index=0, method="lora", trainable_params=10, optimizer_steps=2, epochs=1.0, train_seconds=1.0,
                         tokens=100, final_loss=0.6, flops=4e6)
    cache.for_run(configs["lora"], "lora", ROWS).store(0, 1.0, _lora_after_one_epoch(tmp_path / "lora", configs["lora"]),
                                                       [record], 2, lambda dest: dest.mkdir(parents=True))
    [entry] = (tmp_path / "stage-cache").glob("*/entry.json")
    raw = json.loads(entry.read_text())
    assert raw["train_rows"] == ROWS.train
    del raw["train_rows"]
    entry.write_text(json.dumps(raw))
    assert cache.for_run(configs["heft"], "heft", ROWS).start is None  # its rows cannot be told: trained again
    assert cache.for_run(configs["lora"], "lora", ROWS).wants(1, 1)
