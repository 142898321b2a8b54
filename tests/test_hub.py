"""`heft push` / `heft pull` / hf:// against a local fake of the Hub (no network): what is uploaded, the model
card, and push -> pull -> `heft eval` reproducing the predictions byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from heft.cli import main


class FakeHub:
    """create_repo / upload_folder / snapshot_download over a local folder."""

    def __init__(self, root: Path):
        self.root, self.private = root, {}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type="model"):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        self.private[repo_id] = private

    def upload_folder(self, folder_path, repo_id, repo_type="model", commit_message=""):
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)

    def snapshot_download(self, repo_id, local_dir):
        shutil.copytree(self.root / repo_id, local_dir, dirs_exist_ok=True)
        return local_dir


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setenv("HEFT_CACHE", str(tmp_path / "cache"))
    return fake


@pytest.fixture(scope="module")
def run(tiny_model_dir, boolq_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-run")
    cfg = root / "heft.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, boolq_files, [
        {"method": "lora", "epochs": 1, "batch_size": 8}, {"method": "reft", "epochs": 1, "batch_size": 8}],
        keep_checkpoints=True, checkpoint_every=2, tensorboard=True)))
    assert main(["train", "--config", str(cfg), "--out", str(root / "run")]) == 0
    return root / "run"


def test_push_uploads_what_reloads_the_run_and_a_model_card(run, hub, capsys):
    from huggingface_hub import ModelCard

    assert main(["push", str(run), "me/heft-tiny", "--private"]) == 0
    repo = hub.root / "me" / "heft-tiny"
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert "config.yaml" in files and "meta.json" in files and "predictions.jsonl" in files
    assert "stages/00-lora/adapter/adapter_model.safetensors" in files and "stages/01-reft/reft.safetensors" in files
    assert (run / "stages" / "00-lora" / "checkpoints").is_dir() and (run / "tensorboard").is_dir()
    assert not [f for f in files if "checkpoints" in f or "tensorboard" in f or "/." in f or f.startswith(".")]
    card = ModelCard((repo / "README.md").read_text())
    results = card.data.eval_results
    assert results and results[0].metric_type == "accuracy"
    metrics = __import__("json").loads((run / "metrics.json").read_text())
    assert results[0].metric_value == round(metrics["accuracy"], 4)
    assert "subfolder=\"stages/00-lora/adapter\"" in card.text and hub.private["me/heft-tiny"] is True


def test_pull_then_eval_reproduces_the_predictions(run, hub, tiny_model_dir, tmp_path, capsys):
    assert main(["push", str(run), "me/heft-tiny"]) == 0
    out = tmp_path / "pulled"
    assert main(["pull", "me/heft-tiny", str(out)]) == 0
    assert (out / "predictions.jsonl").read_bytes() == (run / "predictions.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "predictions identical to the saved ones" in capsys.readouterr().out
    assert main(["eval", "hf://me/heft-tiny"]) == 0  # downloaded once into heft's cache
    assert "predictions identical" in capsys.readouterr().out
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = PeftModel.from_pretrained(base, str(out), subfolder="stages/00-lora/adapter")  # PEFT alone
    assert any("lora_A" in n for n, _ in lora.named_parameters())


def test_unfinished_runs_and_bad_names_are_refused(run, hub, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    (partial / "metrics.json").unlink()
    assert main(["push", str(partial), "me/x"]) == 2
    assert "the run is unfinished" in capsys.readouterr().err and not (hub.root / "me" / "x").exists()
    assert main(["push", str(run), "no-slash"]) == 2
    assert "give it as USER/REPO" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["pull", "me/heft-tiny", str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
