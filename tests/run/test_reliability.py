"""The tables of docs/reliability.md, each row through the CLI: the exact message the user gets, nothing
written for the refused run, no lock file left, and a finished run next to it left byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import boolq_rows, tiny_config, write_jsonl
from heft.cli import main

STAGES = [{"method": "lora", "epochs": 1, "lr": 1e-2}, {"method": "reft", "epochs": 1, "lr": 1e-2}]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, boolq_files, tmp_path_factory):
    """A finished run that every bad attempt below must leave untouched."""
    tmp = tmp_path_factory.mktemp("saved")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, boolq_files, STAGES)))
    assert main(["train", "--config", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def _bad_train_file(tmp: Path, kind: str) -> Path:
    good = [json.dumps(r) for r in boolq_rows(6)]
    lines = {
        "malformed": good[:2] + ['{"question": "is it", "passage": "x", "label": tr'] + good[2:],
        "missing": good[:3] + [json.dumps({"passage": "A passage.", "label": True})],
        "empty": good[:1] + [json.dumps({"question": "is it", "passage": "   ", "label": True})],
        "nonbool": good[:4] + [json.dumps({"question": "is it", "passage": "A passage.", "answer": "maybe"})],
        "nothing": [],
        "latin1": good[:2] + [json.dumps({"question": "is it", "passage": "Caf\u00e9 au lait.", "label": True},
                                         ensure_ascii=False)] + good[2:],
    }[kind]
    path = tmp / f"{kind}.jsonl"
    path.write_bytes("".join(line + "\n" for line in lines).encode("latin-1" if kind == "latin1" else "utf-8"))
    return path


def _bad_model(tmp: Path, kind: str) -> Path:
    """A model folder transformers cannot load as it is: custom code (auto_map) or an unknown model_type."""
    folder = tmp / f"{kind}-model"
    folder.mkdir()
    config = {"custom": {"model_type": "my-net", "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                                                              "AutoModelForCausalLM": "modeling_my.MyModel"}},
              "unknown": {"model_type": "no-such-architecture", "hidden_size": 64}}[kind]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _locks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.lock"))


CASES = {
    # name: (how to make it, expected exit code, text the user must see)
    "malformed JSON line": ("data:malformed", 2, "malformed.jsonl:3: malformed JSON line"),
    "missing field": ("data:missing", 2, "missing.jsonl:4: missing field `question`"),
    "empty field": ("data:empty", 2, "empty.jsonl:2: field `passage` must be non-empty text"),
    "non-boolean answer": ("data:nonbool", 2, "nonbool.jsonl:5: field `answer` must be a boolean (true/false/yes/no, any case), got 'maybe'"),
    "empty dataset": ("data:nothing", 2, "nothing.jsonl: the file holds no rows"),
    "non-UTF-8 bytes": ("data:latin1", 2, "latin1.jsonl:3: not UTF-8 text (byte 0xe9 at byte 38 of the line); save the "
                        "file as UTF-8"),
    "empty YAML config": ("config:empty", 2, "is empty; a run config needs at least `stages:`"),
    "YAML config without stages": ("config:nostages", 2, "has no `stages:`; list the training stages"),
    "model with custom code": ("model:custom", 2, "needs custom model code: its config.json has model_type 'my-net' and "
                               "an auto_map to Python files in that folder, which transformers runs only when allowed. "
                               "Set model.trust_remote_code: true only if you trust the code in that folder"),
    "unknown model_type": ("model:unknown", 2, "has model_type 'no-such-architecture', which transformers"),
    "unknown config key": ("--stages.0.learning_rate=0.1", 2, "stages[0].learning_rate: unknown field"),
    "wrong type": ("--lora.r=eight", 2, "lora.r: expected an integer, got 'eight'"),
    "out-of-range layers": ("--reft.layers=[1, 7]", 2, "reft.layers: [7] out of range; the model has 4 decoder layers (0..3)"),
    "rank larger than hidden size": ("--reft.rank=100", 2, "reft.rank: 100 is larger than the model's hidden size 64"),
    "positions that do not fit": ("--reft.positions.first=40", 2, "reft.positions: first + last = 42 positions do not fit in max_length 32"),
    "missing model path": ("--model.name_or_path=/no/such/model", 2, "model.name_or_path: '/no/such/model' is not a folder on this machine"),
    "wrong layers path": ("--model.layers_path=model.nothing", 2, "model.layers_path: 'model.nothing' is not a list of layers"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly_and_loses_nothing(name, saved_run, tiny_model_dir, boolq_files, tmp_path, capsys):
    how, code, message = CASES[name]
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES, data={"max_length": 32})
    overrides = []
    if how.startswith("data:"):
        raw["data"]["train_path"] = str(_bad_train_file(tmp_path, how[5:]))
    elif how.startswith("model:"):
        raw["model"]["name_or_path"] = str(_bad_model(tmp_path, how[6:]))
    elif not how.startswith("config:"):
        overrides.append(how)
    cfg = tmp_path / "cfg.yaml"
    texts = {"config:empty": "\n", "config:nostages": "model: {name_or_path: x}\n"}
    cfg.write_text(texts[how] if how in texts else yaml.safe_dump(raw))
    before = _digest(saved_run)
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out", str(out), *overrides]) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("heft: error: ")]) == 1, err
    if ":" in how[:7]:  # a bad file: the message is one line (a bad config lists every bad field, one per line)
        assert any(line.startswith("heft: error: ") and message in line for line in err.splitlines()), err
    assert not out.exists(), "a refused run writes nothing"
    assert _locks(tmp_path) == [], "no lock file is left"
    assert _digest(saved_run) == before
    # The same mistake aimed at the finished run's folder (as a resume) is refused too, and changes nothing.
    main(["train", "--config", str(cfg), "--out", str(saved_run), *overrides, "--resume"])
    assert _digest(saved_run) == before


def test_dataset_smaller_than_one_batch_trains(tiny_model_dir, boolq_files, tmp_path):
    train = write_jsonl(tmp_path / "tiny.jsonl", boolq_rows(5))
    raw = tiny_config(tiny_model_dir, (train, boolq_files[1]), STAGES, data={"dev_size": 2})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_rows"] == 3 and [s["optimizer_steps"] for s in metrics["stages"]] == [1, 1]


def test_passages_far_longer_than_max_length_are_truncated(tiny_model_dir, boolq_files, tmp_path):
    rows = boolq_rows(12)
    for r in rows[:4]:
        r["passage"] = " ".join([r["passage"]] * 60)  # hundreds of tokens
    train = write_jsonl(tmp_path / "long.jsonl", rows)
    val = write_jsonl(tmp_path / "long_val.jsonl", rows[:6])
    raw = tiny_config(tiny_model_dir, (train, val), STAGES, data={"dev_size": 2, "max_length": 48})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [p["truncated"] for p in preds] == [True] * 4 + [False] * 2


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, boolq_files, tmp_path,
                                                                               monkeypatch, capsys):
    import torch

    from heft.training import checkpoint
    from heft.training import loop as train

    real = train.answer_loss
    calls = {"n": 0}

    def poisoned(logits, targets, reduction="mean"):
        calls["n"] += 1
        loss = real(logits, targets, reduction)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(train, "answer_loss", poisoned)
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES[:1], checkpoint_every=1, log_every=5)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at optimizer step 4" in err
    ck = checkpoint.latest(tmp_path / "run" / "stages" / "00-lora" / "checkpoints")
    assert ck is not None and ck.name == "step-000003", "the last good checkpoint is kept"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(ck / "trainable.safetensors")).values())


def test_four_bit_on_cpu_is_a_clear_error(tiny_model_dir, boolq_files, tmp_path, capsys):
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES[:1], model={"quantization": "4bit"}, lora={"merge": False})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "model.quantization: 4bit (QLoRA through bitsandbytes) needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_four_bit_with_merge_is_refused(tiny_model_dir, boolq_files, tmp_path, capsys):
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES[:1], model={"quantization": "4bit"})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "lora.merge: a LoRA stage cannot be merged into 4-bit weights" in capsys.readouterr().err


def test_reloading_onto_a_different_base_model_or_a_corrupt_adapter_is_a_clear_error(saved_run, tmp_path, capsys):
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    # A base model with another vocabulary and depth under the same path the run names.
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    other = tmp_path / "other-model"
    shutil.copytree(cfg["model"]["name_or_path"], other, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    cfg["model"]["name_or_path"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "trained on a base model with vocab_size=" in err and "num_layers=4" in err and "num_layers=2" in err
    # The right base model, but a truncated LoRA adapter file.
    shutil.rmtree(run)
    shutil.copytree(saved_run, run)
    weights = run / "stages" / "00-lora" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", str(run)]) == 2
    assert "cannot load the LoRA adapter" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the way in and the way out of a run


def _cfg(tmp: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _quick(tiny_model_dir, boolq_files, tmp: Path, name: str = "quick.yaml") -> Path:
    """The cheapest run there is: the base model evaluated (no stage)."""
    return _cfg(tmp, tiny_config(tiny_model_dir, boolq_files, []), name)


def _hidden(folder: Path) -> list[str]:
    """What heft may leave next to a run folder: lock files and aside folders of a replacement."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def test_a_folder_holding_only_a_killed_writes_temporary_file_counts_as_empty(tiny_model_dir, boolq_files, tmp_path):
    """SIGKILL inside the first atomic write (config.yaml) leaves only `.config.yaml.XXXX.tmp`: the next run takes
    the folder as empty, with or without --overwrite, and clears the leftover."""
    for flags in ([], ["--overwrite"]):
        run = tmp_path / f"run{len(flags)}"
        run.mkdir()
        (run / ".config.yaml.k1ll3d.tmp").write_text("model: {name_or_")
        assert main(["train", "--config", str(_quick(tiny_model_dir, boolq_files, tmp_path)), "--out", str(run), *flags]) == 0
        assert not list(run.glob(".*.tmp")) and (run / "metrics.json").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.tmp").write_text("not hidden: the user's")
    assert main(["train", "--config", str(_quick(tiny_model_dir, boolq_files, tmp_path)), "--out", str(tmp_path / "mine")]) == 2


def test_a_second_train_into_the_same_out_is_refused_at_once_naming_the_holder(tiny_model_dir, boolq_files, tmp_path,
                                                                               capsys):
    """A real second process: `python -m heft train` holds the folder; ours is refused at once, naming it. Killed
    with SIGKILL, it leaves its lock file behind, which the next run takes over (its process is gone)."""
    slow = _cfg(tmp_path, tiny_config(tiny_model_dir, boolq_files, [{"method": "lora", "epochs": 500, "lr": 1e-3}]), "slow.yaml")
    run, lock = tmp_path / "run", tmp_path / ".run.lock"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.err", "wb") as first_err:
        first = subprocess.Popen([sys.executable, "-m", "heft", "train", "--config", str(slow), "--out", str(run)],
                                 stdout=subprocess.DEVNULL, stderr=first_err, env=env)
    try:
        deadline = time.monotonic() + 180
        while _holder(lock).get("pid") != first.pid:
            assert first.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.02)
        capsys.readouterr()
        t0 = time.monotonic()
        assert main(["train", "--config", str(_quick(tiny_model_dir, boolq_files, tmp_path)), "--out", str(run)]) == 2
        waited = time.monotonic() - t0
        err = capsys.readouterr().err
        assert first.poll() is None, "the first run was still running when the second was refused"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (f"heft: error: {run}: another heft process is writing this run folder (PID {first.pid} on host "
            f"{socket.gethostname()}, started ") in err and "; wait for it to finish, stop it, or choose another --out" in err
    assert waited < 10, f"refused at once, not after waiting ({waited:.1f} s)"
    # SIGKILL: the lock file stays, its holder is dead; the next run takes it over and removes it when done
    assert _holder(lock)["pid"] == first.pid
    assert main(["train", "--config", str(_quick(tiny_model_dir, boolq_files, tmp_path)), "--out", str(run), "--overwrite"]) == 0
    assert (run / "metrics.json").is_file() and _hidden(tmp_path) == []


@pytest.mark.parametrize("state", ["reaped", "zombie"])
def test_a_stale_lock_of_a_dead_process_is_taken_over(state, tiny_model_dir, boolq_files, tmp_path):
    """A lock file whose holder on this host is dead (reaped, or a zombie its parent has not reaped yet)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        if state == "reaped":
            dead.wait()
        else:
            deadline = time.monotonic() + 30
            while Path(f"/proc/{dead.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                assert time.monotonic() < deadline
                time.sleep(0.01)
        lock = tmp_path / ".run.lock"
        lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 3600,
                                    "start_ticks": None, "command": "heft train"}) + "\n")
        assert main(["train", "--config", str(_quick(tiny_model_dir, boolq_files, tmp_path)), "--out", str(tmp_path / "run")]) == 0
    finally:
        dead.wait()
    assert (tmp_path / "run" / "metrics.json").is_file() and _hidden(tmp_path) == []


def test_a_lock_held_on_another_host_is_refused_naming_the_file_to_delete(tiny_model_dir, boolq_files, tmp_path, capsys):
    lock, run = tmp_path / ".run.lock", tmp_path / "run"
    record = json.dumps({"pid": 4242, "host": "gpu-node-7", "started": 1700000000.0, "command": "heft train"}) + "\n"
    lock.write_text(record)
    cfg = _quick(tiny_model_dir, boolq_files, tmp_path)
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 2
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1700000000.0))
    assert (f"heft: error: {run}: locked by PID 4242 on host gpu-node-7, started {started}, on another machine, which "
            f"heft cannot check from here (shared filesystem); if that process is gone, delete {lock}\n") in capsys.readouterr().err
    assert lock.read_text() == record and not run.exists(), "the other machine's lock is left as it was"
    lock.unlink()  # as the message says
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    assert _hidden(tmp_path) == []


def _long_question_file(tmp: Path, name: str, google: bool) -> Path:
    """Ten good rows; the third asks a question longer than max_length on its own."""
    rows = boolq_rows(10, google=google)
    rows[2]["question"] = "is it " * 40 + "blue"
    return write_jsonl(tmp / name, rows)


@pytest.mark.parametrize("where", ["--overwrite onto a finished run", "eval file", "new folder"])
def test_a_row_that_cannot_fit_stops_the_run_before_anything_is_written(where, saved_run, tiny_model_dir, boolq_files,
                                                                        tmp_path, monkeypatch, capsys):
    """data.prompt_format: question-only cannot cut a passage to make room: a question longer than max_length
    stops the run, before anything is deleted, trained or written."""
    from heft.run import pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("training started before every row was checked")

    monkeypatch.setattr(pipeline, "train_stage", no_training)
    in_eval = where == "eval file"
    bad = _long_question_file(tmp_path, "val.jsonl" if in_eval else "train.jsonl", google=in_eval)
    files = (boolq_files[0], bad) if in_eval else (bad, boolq_files[1])
    raw = tiny_config(tiny_model_dir, files, STAGES[:1], data={"prompt_format": "question-only", "dev_size": 0})
    cfg = _cfg(tmp_path, raw)
    out = tmp_path / "out"
    if where.startswith("--overwrite"):
        shutil.copytree(saved_run, out)
    before = _digest(out) if out.exists() else None
    assert main(["train", "--config", str(cfg), "--out", str(out)] + (["--overwrite"] if before else [])) == 2
    err = capsys.readouterr().err
    split = "validation" if in_eval else "train"
    assert (f"heft: error: {bad}:3 ({split} split): the question alone needs 133 tokens, more than data.max_length=64; "
            "raise data.max_length to at least 133 or shorten that question\n") in err, err
    if before is not None:
        assert _digest(out) == before, "the old run is byte-identical"
    else:
        assert not out.exists(), "no folder is left behind"
    assert _hidden(tmp_path) == [], "no lock file, no aside folder"
    if where == "new folder":  # the fixed file in the same --out: a plain re-run, nothing to clear first
        monkeypatch.undo()
        write_jsonl(bad, boolq_rows(10))
        assert main(["train", "--config", str(cfg), "--out", str(out)]) == 0


def _missing_inputs(tiny_model_dir, boolq_files, tmp: Path) -> Path:
    """A config whose data and model do not exist: an --out error must come before either is looked at."""
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES)
    raw["model"]["name_or_path"] = str(tmp / "no-model")
    raw["data"]["train_path"] = raw["data"]["eval_path"] = str(tmp / "no-data.jsonl")
    return _cfg(tmp, raw)


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only (simulated)", "read-only (chmod)"])
def test_an_out_that_cannot_be_written_is_refused_before_data_and_model_load(case, tiny_model_dir, boolq_files, tmp_path,
                                                                             monkeypatch, capsys):
    cfg = _missing_inputs(tiny_model_dir, boolq_files, tmp_path)
    (tmp_path / "file.txt").write_text("not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    out, expected = {
        "a file": (tmp_path / "file.txt", f"--out: {tmp_path / 'file.txt'} is a file, not a folder; choose a folder path"),
        "under a file": (tmp_path / "file.txt" / "run", f"--out: {tmp_path / 'file.txt'} is a file, so "
                         f"{tmp_path / 'file.txt' / 'run'} cannot be created under it; choose another --out"),
    }.get(case, (locked / "run", f"--out: cannot write {locked / 'run'}: {locked} is not writable by this user; "
                                 "choose another --out"))
    if case == "read-only (chmod)":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder; the simulated case checks the message")
        locked.chmod(0o555)  # restored below
    elif case == "read-only (simulated)":  # what os.access says for a read-only folder to a user who is not root
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    try:
        assert main(["train", "--config", str(cfg), "--out", str(out)]) == 2
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert f"heft: error: {expected}\n" == err, err
    assert not (locked / "run").exists() and _hidden(tmp_path) == [] and _hidden(locked) == []
    assert (tmp_path / "file.txt").read_text() == "not a folder"


@pytest.fixture(scope="module")
def other_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama's twin: same config and tokenizer, other random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("other-base") / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_model_dir)).save_pretrained(folder)
    return folder


def test_a_run_pointed_at_another_base_model_of_the_same_shape_is_refused(saved_run, other_base, tiny_model_dir, tmp_path,
                                                                          capsys):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = str(other_base)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    expected = (f"heft: error: {run}: the base model differs from the one this run was trained on (weights differ): "
                f"trained on {str(tiny_model_dir)!r}, now loading {str(other_base)!r}; point model.name_or_path in "
                f"{run / 'config.yaml'} at the original base model, or pass --allow-other-base to apply the adapters "
                "to this one anyway\n")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    assert expected in capsys.readouterr().err
    assert main(["predict", str(run), "--question", "is the sky blue", "--passage", "The sky is blue."]) == 2
    assert expected in capsys.readouterr().err
    # Allowed: the adapters run on the other base (its predictions may differ from the saved ones: exit 1, said so)
    assert main(["eval", str(run), "--allow-other-base"]) in (0, 1)
    assert "accuracy" in capsys.readouterr().out
    assert main(["predict", str(run), "--question", "is the sky blue", "--passage", "The sky is blue.",
                 "--allow-other-base"]) == 0
    assert "p_yes=" in capsys.readouterr().out


@pytest.mark.parametrize("umask, keep", [(0o022, False), (0o027, True)], ids=["umask 022", "umask 027 keep_checkpoints"])
def test_a_finished_run_has_the_users_modes_and_no_leftovers(umask, keep, tiny_model_dir, boolq_files, tmp_path):
    """Files as open() and mkdir() make them under the user's umask (mkstemp alone would give 0600/0700), no
    temporary files, and no checkpoints unless keep_checkpoints (then the last one each stage wrote)."""
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES, checkpoint_every=1, keep_checkpoints=keep,
                      data={"train_size": 16})
    cfg, run = _cfg(tmp_path, raw), tmp_path / "run"
    old = os.umask(umask)
    try:
        assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    finally:
        os.umask(old)
    assert [p for p in run.rglob("*") if p.name.endswith(".tmp")] == [] and _hidden(tmp_path) == []
    kept = sorted(str(p.relative_to(run)) for p in run.glob("stages/*/checkpoints/*"))
    if keep:  # a stage's last optimizer step is saved as its adapter, not as a checkpoint: the last one is step 1 of 2
        assert kept == ["stages/00-lora/checkpoints/latest", "stages/00-lora/checkpoints/step-000001",
                        "stages/01-reft/checkpoints/latest", "stages/01-reft/checkpoints/step-000001"]
    else:
        assert kept == [] and not list(run.rglob("checkpoints"))
    wrong = [f"{p.relative_to(run)} {oct(p.stat().st_mode & 0o777)}" for p in [run, *run.rglob("*")]
             if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask]
    assert wrong == [], f"umask {oct(umask)}"  # safetensors files included (it writes 0600; heft widens them)


def test_eval_of_an_unfinished_run_says_how_to_finish_it(saved_run, tmp_path, capsys):
    """A run killed before metrics.json: eval and predict refuse and name `--resume`; following the advice finishes
    it, and the finished run holds no temporary file or checkpoint the killed one left."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    (run / "metrics.json").unlink()
    (run / "stages" / "01-reft" / ".reft.safetensors.x1y2.tmp").write_bytes(b"half a file")
    (run / "stages" / "00-lora" / "checkpoints" / "step-000005").mkdir(parents=True)
    (run / "stages" / "00-lora" / "checkpoints" / "step-000005" / "trainable.safetensors").write_bytes(b"x")
    expected = (f"heft: error: {run}: the run is unfinished (no metrics.json; it was stopped or is still running); "
                f"`heft train --out {run} --resume` finishes it\n")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    assert capsys.readouterr().err == expected
    assert main(["predict", str(run), "--question", "is it"]) == 2
    assert capsys.readouterr().err == expected
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert (run / "metrics.json").read_bytes() != b"" and not list(run.rglob("*.tmp")) and not list(run.rglob("checkpoints"))
    assert main(["eval", str(run)]) == 0
    assert "predictions identical to the saved ones" in capsys.readouterr().out
    assert _hidden(tmp_path) == []


def test_a_bom_and_spreadsheet_booleans_are_accepted(tiny_model_dir, tmp_path):
    answers = ["TRUE", "yes", "No", "false", "True", "NO"]
    rows = [{**r, "answer": a} for r, a in zip(boolq_rows(6, google=True), answers)]
    text = "".join(json.dumps(r) + "\r\n" for r in rows)
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + text.encode())
    val = tmp_path / "val.jsonl"
    val.write_bytes(b"\xef\xbb\xbf" + text.encode())
    cfg = _cfg(tmp_path, tiny_config(tiny_model_dir, (train, val), [], data={"dev_size": 2}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == [True, True, False, False, True, False]


def test_a_config_error_is_reported_before_torch_is_imported(tmp_path):
    bad = tmp_path / "empty.yaml"
    bad.write_text("")
    code = ("import sys; from heft.cli import main; "
            f"rc = main(['train', '--config', {str(bad)!r}, '--out', {str(tmp_path / 'out')!r}]); "
            "assert rc == 2, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (f"heft: error: --config: {bad} is empty; a run config needs at least `stages:` (e.g. "
                           "`stages: [{method: lora, epochs: 1}]`, or `stages: []` to evaluate the base model)\n")
    assert seconds < 3, f"a config error took {seconds:.2f} s"
    assert not (tmp_path / "out").exists()


def test_a_failed_overwrite_leaves_the_old_run_whole(saved_run, tiny_model_dir, boolq_files, tmp_path, monkeypatch):
    """--overwrite writes the new run aside (`.NAME.heft-new`) and swaps it in only when it is finished: a crash
    midway leaves the old run byte-identical, and the next --overwrite clears the aside folder and succeeds."""
    from heft.run import pipeline

    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    before = _digest(run)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash mid-training")

    monkeypatch.setattr(pipeline, "train_stage", crash)
    cfg = _cfg(tmp_path, tiny_config(tiny_model_dir, boolq_files, STAGES[:1], data={"train_size": 8}))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", "--config", str(cfg), "--out", str(run), "--overwrite"])
    assert _digest(run) == before
    assert _hidden(tmp_path) == [".run.heft-new"], "the half-written new run is aside; the lock is released"
    assert sorted(p.name for p in (tmp_path / ".run.heft-new").iterdir()) == ["config.yaml", "meta.json"]
    monkeypatch.undo()
    assert main(["train", "--config", str(cfg), "--out", str(run), "--overwrite"]) == 0
    assert _hidden(tmp_path) == []
    assert json.loads((run / "metrics.json").read_text())["train_rows"] == 8
    assert [s["method"] for s in yaml.safe_load((run / "config.yaml").read_text())["stages"]] == ["lora"]


def test_lock_of_a_dead_holder_kept_open_by_its_child_is_taken_over(tmp_path):
    """A killed run whose leftover child process still has the lock file open (flock is inherited across fork):
    the recorded holder is dead, so the lock is taken over rather than refusing forever."""
    import subprocess
    import sys
    import time

    from heft.run.lock import FolderLock

    folder = tmp_path / "run"
    code = ("import os, sys, time; from heft.run.lock import FolderLock; FolderLock(__import__('pathlib').Path(sys.argv[1])).acquire()\n"
            "if os.fork() == 0:\n    time.sleep(30); os._exit(0)\n"
            "print('locked', flush=True); os._exit(0)")  # the parent dies at once, its child keeps the flock
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.wait()
    start = time.time()
    lock = FolderLock(folder).acquire()
    assert time.time() - start < 10
    lock.release()
    assert not (tmp_path / ".run.lock").exists() and not list(tmp_path.glob(".run.lock.stale-*"))
