"""`heft push` / `heft pull` / hf:// against a local fake of the Hub (no network): what is uploaded, the model
card, and push -> pull -> `heft eval` reproducing the predictions byte for byte; the fake made to fail as the
Hub and the network do (one line naming the repository, what failed and the fix; no partial folder); and the
real huggingface_hub in offline mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import hf_raise_for_status

from heft.cli import main

try:
    import httpx2 as httpx  # the HTTP client of huggingface_hub 2.x
except ImportError:  # huggingface_hub 1.x
    import httpx

ENDPOINT = "https://huggingface.co"


class FakeHub:
    """create_repo / upload_folder / snapshot_download over a local folder. `fail[name]` makes that call raise
    the given error, the copies after half of their files, as a connection lost mid-transfer leaves them."""

    def __init__(self, root: Path):
        self.root, self.private, self.fail = root, {}, {}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type="model"):
        if "create_repo" in self.fail:
            raise self.fail["create_repo"]
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        self.private[repo_id] = private

    def upload_folder(self, folder_path, repo_id, repo_type="model", commit_message=""):
        self._copy(Path(folder_path), self.root / repo_id, self.fail.get("upload_folder"))

    def snapshot_download(self, repo_id, local_dir):
        if not (self.root / repo_id).is_dir():  # what the Hub answers an anonymous look-up of a missing repo
            raise hub_answer(401, f"{ENDPOINT}/api/models/{repo_id}/revision/main")
        self._copy(self.root / repo_id, Path(local_dir), self.fail.get("snapshot_download"))
        return local_dir

    @staticmethod
    def _copy(src: Path, dst: Path, error: Exception | None) -> None:
        files = sorted(p for p in src.rglob("*") if p.is_file())
        for i, f in enumerate(files):
            if error is not None and i == len(files) // 2:
                raise error
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / f.relative_to(src))
        if error is not None:
            raise error


def hub_answer(status: int, url: str, **headers: str) -> HfHubHTTPError:
    """The error huggingface_hub itself raises when the Hub answers `status` to a request for `url`."""
    response = httpx.Response(status, headers=headers, request=httpx.Request("GET", url))
    with pytest.raises(HfHubHTTPError) as raised:
        hf_raise_for_status(response)
    return raised.value


def lost_connection() -> LocalEntryNotFoundError:
    """What snapshot_download raises when the Hub cannot be reached: the network error as its cause."""
    error = LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub.")
    error.__cause__ = httpx.ConnectError("[Errno -3] Temporary failure in name resolution")
    return error


NO_NETWORK = (f"no network: {ENDPOINT} could not be reached (ConnectError: [Errno -3] Temporary failure in name "
              f"resolution); check the connection (and HF_ENDPOINT or the proxy settings), then run the command again")


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


REVISION_URL = f"{ENDPOINT}/api/models/me/heft-tiny/revision/main"
NOT_FOUND = ("not found on the Hub (HTTP {}); check the name, or if it is private, log in with `hf auth login` or "
             "set HF_TOKEN to a token that can read it")
DOWNLOAD_FAILURES = {
    "no network": (lost_connection, NO_NETWORK),
    "401": (lambda: hub_answer(401, REVISION_URL), NOT_FOUND.format(401)),
    "404": (lambda: hub_answer(404, REVISION_URL, **{"X-Error-Code": "RepoNotFound"}), NOT_FOUND.format(404)),
    "gated": (lambda: hub_answer(403, REVISION_URL, **{"X-Error-Code": "GatedRepo"}),
              (f"the repository is gated (HTTP 403); request access at {ENDPOINT}/me/heft-tiny, then log in with "
               f"`hf auth login` or set HF_TOKEN for that account")),
    "500": (lambda: hub_answer(500, REVISION_URL),
            (f"the Hub answered HTTP 500 (Server error '500 Internal Server Error' for url '{REVISION_URL}'); "
             "run the command again later")),
}


@pytest.mark.parametrize("case", list(DOWNLOAD_FAILURES))
def test_a_failed_download_is_one_line_and_leaves_no_partial_folder(case, run, hub, tmp_path, capsys):
    make_error, reason = DOWNLOAD_FAILURES[case]
    assert main(["push", str(run), "me/heft-tiny"]) == 0
    hub.fail["snapshot_download"] = make_error()  # after half of the files
    line = f"heft: error: downloading me/heft-tiny from the Hub failed: {reason}\n"
    capsys.readouterr()
    assert main(["pull", "me/heft-tiny", str(tmp_path / "new" / "out")]) == 2
    assert capsys.readouterr().err == line
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "empty").mkdir()
    assert main(["pull", "me/heft-tiny", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == line and not list((tmp_path / "empty").iterdir())
    assert main(["eval", "hf://me/heft-tiny"]) == 2
    assert capsys.readouterr().err == line
    assert not list((tmp_path / "cache" / "hub-runs").iterdir())


def test_pulling_a_missing_repository_names_it(hub, tmp_path, capsys):
    assert main(["pull", "nobody/none", str(tmp_path / "out")]) == 2
    reason = NOT_FOUND.format(401)
    assert capsys.readouterr().err == f"heft: error: downloading nobody/none from the Hub failed: {reason}\n"
    assert not (tmp_path / "out").exists()


NOT_AUTHORISED = ("not authorised (HTTP {}); log in with `hf auth login` or set HF_TOKEN to a token with write "
                  "access to me")
UPLOAD_FAILURES = {
    "no network": ("create_repo", lambda: httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
                   NO_NETWORK),
    "401": ("create_repo", lambda: hub_answer(401, f"{ENDPOINT}/api/repos/create"), NOT_AUTHORISED.format(401)),
    "403": ("upload_folder", lambda: hub_answer(403, f"{ENDPOINT}/api/models/me/heft-tiny/preupload/main"),
            NOT_AUTHORISED.format(403)),
    "halfway": ("upload_folder", lambda: httpx.WriteTimeout("The write operation timed out"),
                NO_NETWORK.replace("ConnectError: [Errno -3] Temporary failure in name resolution",
                                   "WriteTimeout: The write operation timed out")),
}


@pytest.mark.parametrize("case", list(UPLOAD_FAILURES))
def test_a_failed_upload_is_one_line_and_leaves_the_run_as_it_was(case, run, hub, tmp_path, monkeypatch, capsys):
    call, make_error, reason = UPLOAD_FAILURES[case]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    hub.fail[call] = make_error()
    assert main(["push", str(run), "me/heft-tiny"]) == 2
    assert capsys.readouterr().err == f"heft: error: uploading {run} to me/heft-tiny on the Hub failed: {reason}\n"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not list((tmp_path / "tmp").iterdir())  # the staged copy is gone
    if case == "halfway":
        assert 0 < len([p for p in (hub.root / "me" / "heft-tiny").rglob("*") if p.is_file()]) < len(before)


def test_offline_mode_of_the_real_huggingface_hub_is_one_line(run, tmp_path):
    """No fake: HF_HUB_OFFLINE=1 stops huggingface_hub before any request. HF_ENDPOINT points at a closed local
    port, so a request that got through would fail as 'no network' here, never reach the internet."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "HEFT_CACHE": str(tmp_path / "cache")}
    env.pop("TRANSFORMERS_OFFLINE", None)
    offline = "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to reach the Hub"
    for args, line in [
        (["pull", "nobody/none", str(tmp_path / "out")], f"downloading nobody/none from the Hub failed: {offline}"),
        (["eval", "hf://nobody/none"], f"downloading nobody/none from the Hub failed: {offline}"),
        (["push", str(run), "x/y"], f"uploading {run} to x/y on the Hub failed: {offline}"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "heft", *args], env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert (proc.returncode, proc.stderr) == (2, f"heft: error: {line}\n"), args
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "hub-runs" / "nobody--none").exists()
