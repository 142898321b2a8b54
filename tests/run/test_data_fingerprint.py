"""A run records the rows it trained on and was evaluated on (meta.json's `data_fingerprint`), and neither a
resume nor a study's reuse of a finished run goes on with other rows: the refusal names the file and the fix.
A folder written before heft recorded the fingerprint goes on, with a warning."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest
import yaml

from conftest import boolq_rows, tiny_config, write_jsonl
from heft.cli import main
from heft.config.load import load
from heft.data.rows import Example, load_splits
from heft.run.records import DataFingerprint

LORA = [{"method": "lora", "epochs": 1, "lr": 1e-2, "batch_size": 8}]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _data(tmp: Path, n_train: int = 40) -> tuple[Path, Path]:
    return (write_jsonl(tmp / "train.jsonl", boolq_rows(n_train)),
            write_jsonl(tmp / "validation.jsonl", boolq_rows(8, offset=5, google=True)))


def _flip_labels(train: Path, n: int) -> None:
    """Rewrite the training file in place: its first `n` rows, every label flipped."""
    write_jsonl(train, [{**r, "label": not r["label"]} for r in boolq_rows(n)])


def _strip_fingerprint(meta: Path) -> None:
    """As a folder written before heft recorded the data's fingerprint."""
    raw = json.loads(meta.read_text())
    del raw["data_fingerprint"]
    meta.write_text(json.dumps(raw))


def test_the_fingerprint_follows_the_rows_content_and_order_not_where_they_were_read():
    rows = [Example("is it", "a passage", True, 0, source="a.jsonl:1"), Example("is it not", "b passage", False, 1, source="a.jsonl:2")]
    before = DataFingerprint.of(rows, rows[:1])
    moved = [dataclasses.replace(r, source=f"b.parquet:row {r.idx}") for r in rows]
    assert DataFingerprint.of(moved, moved[:1]) == before
    assert before.train_rows == 2 and before.eval_rows == 1
    flipped = [dataclasses.replace(r, label=not r.label) for r in rows]
    assert before.differences(DataFingerprint.of(flipped, rows[:1])) == {"train": "2 then and now, with other content"}
    assert before.differences(DataFingerprint.of(rows[::-1], rows[:1])) == {"train": "2 then and now, with other content"}
    assert before.differences(DataFingerprint.of(rows[:1], rows)) == {"train": "2 then, 1 now", "eval": "1 then, 2 now"}
    assert before.differences(DataFingerprint.of(list(rows), list(rows[:1]))) == {}
    # a field left at its default is not part of the content: a field a newer heft adds keeps old fingerprints
    assert DataFingerprint.of([dataclasses.replace(rows[0], task="boolq")], []).train == DataFingerprint.of(rows[:1], []).train
    assert DataFingerprint.of([dataclasses.replace(rows[0], task="piqa")], []).train != DataFingerprint.of(rows[:1], []).train


def test_meta_records_the_fingerprint_of_the_rows_as_split(tiny_model_dir, tmp_path):
    files = _data(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, files, [], data={"train_size": 20, "eval_size": 6})))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    recorded = json.loads((tmp_path / "run" / "meta.json").read_text())["data_fingerprint"]
    splits = load_splits(load(cfg).data)
    assert recorded == DataFingerprint.of(splits.train, splits.eval).to_json()
    assert (recorded["train_rows"], recorded["eval_rows"]) == (20, 6)  # after dev_size, train_size and eval_size


@pytest.mark.parametrize("change, counts", [("labels flipped", "32 then and now, with other content"),
                                            ("labels flipped, 40 rows cut to 30", "32 then, 22 now")])
def test_a_resume_on_changed_rows_is_refused_naming_the_file_and_the_fix(change, counts, tiny_model_dir, tmp_path, capsys):
    train, valid = _data(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, (train, valid), LORA, keep_checkpoints=True)))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 0
    for name in ("metrics.json", "predictions.jsonl", "stages/00-lora/stage.json"):
        (out / name).unlink()  # as if stopped inside the stage
    before = _digest(out)
    _flip_labels(train, 30 if "cut" in change else 40)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert (f"{out}: the data changed since this run was trained: the training rows of data.train_path ({train}) "
            f"differ from the run's ({counts}). heft does not resume a run on changed data; pass --overwrite to train it "
            "afresh, or choose a new --out") in err
    assert _digest(out) == before
    assert main(["train", "--config", str(cfg), "--out", str(out), "--overwrite"]) == 0  # the fix the message names


def test_a_resume_on_the_same_rows_goes_on_and_a_folder_without_a_fingerprint_with_a_warning(tiny_model_dir, tmp_path,
                                                                                              caplog):
    files = _data(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, files, LORA)))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 0
    (out / "metrics.json").unlink()
    with caplog.at_level(logging.WARNING, logger="heft"):
        assert main(["train", "--out", str(out), "--resume"]) == 0
    assert not [r for r in caplog.records if "fingerprint" in r.getMessage()]
    (out / "metrics.json").unlink()
    _strip_fingerprint(out / "meta.json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heft"):
        assert main(["train", "--out", str(out), "--resume"]) == 0
    assert (f"{out}: written before heft recorded the fingerprint of its data, so its rows cannot be checked against "
            f"data.train_path ({files[0]}); going on as if they were the same (pass --overwrite if the data changed)"
            ) in caplog.text
    assert (out / "metrics.json").is_file()


def test_a_study_does_not_reuse_a_finished_run_of_changed_rows(tiny_model_dir, tmp_path, capsys, caplog):
    """`heft run` over a finished study after every training label was flipped: the base strategy's majority
    baseline comes from the training labels, so reusing it would report the old majority."""
    train, valid = _data(tmp_path)
    common = tiny_config(tiny_model_dir, (train, valid), [])
    del common["stages"]
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"common": common, "strategies": {"base": []}}))
    out = tmp_path / "study"
    assert main(["run", "--config", str(suite), "--out", str(out)]) == 0
    old = json.loads((out / "summary.json").read_text())
    before = _digest(out)
    _flip_labels(train, 40)
    capsys.readouterr()
    assert main(["run", "--config", str(suite), "--out", str(out)]) == 2
    assert (f"{out / 'base'}: the data changed since this run was trained: the training rows of data.train_path ({train}) "
            "differ from the run's (32 then and now, with other content). heft does not reuse a run on changed data; "
            "pass --overwrite to train it afresh, or choose a new --out") in capsys.readouterr().err
    assert _digest(out) == before
    assert main(["run", "--config", str(suite), "--out", str(out), "--overwrite"]) == 0
    new = json.loads((out / "summary.json").read_text())
    assert new["majority_label"] != old["majority_label"]  # the flipped labels' majority, not the old one
    # a study folder from before heft recorded fingerprints is reused as it is, with a warning
    _strip_fingerprint(out / "base" / "meta.json")
    with caplog.at_level(logging.INFO, logger="heft"):
        assert main(["run", "--config", str(suite), "--out", str(out)]) == 0
    assert f"{out / 'base'}: written before heft recorded the fingerprint of its data" in caplog.text
    assert "base: reusing the finished run" in caplog.text
    assert json.loads((out / "summary.json").read_text()) == new
