"""Sharing run folders on the Hugging Face Hub: `heft push DIR USER/REPO`, `heft pull USER/REPO DIR`, and
`hf://USER/REPO` wherever a run folder is read (eval, predict, `heft.load`).

What is uploaded is what reloads and reproduces the run (heft.run.folder): config.yaml, meta.json,
metrics.json, predictions.jsonl, epochs.jsonl and each stage's adapter files, stage.json and
train_log.jsonl, plus a generated model card (README.md with a `model-index` of the metrics). Never
checkpoints, TensorBoard events, locks or temporary files. An unfinished run is refused. The token is
whatever `huggingface_hub` finds (HF_TOKEN or `hf auth login`); heft never prints or writes it.

When the Hub cannot be used (offline mode, no network, no such repository, not authorised), the call ends
in one HubError line that names the repository, what failed and the fix; a failed download leaves no
partial folder behind.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from heft import __version__
from heft.errors import CheckpointError, ConfigError, HeftError
from heft.run.folder import RunFolder

logger = logging.getLogger(__name__)

PREFIX = "hf://"
_SKIP_DIRS = {"checkpoints", "tensorboard"}
_LOGIN = "log in with `hf auth login` or set HF_TOKEN"


class HubError(HeftError):
    """The Hugging Face Hub could not be reached or refused the request (offline mode, no network, no such
    repository, not authorised); the message names the repository, what failed and the fix."""


def files_to_share(folder: RunFolder) -> list[Path]:
    """The run folder's files worth sharing, relative to it (see the module docstring)."""
    out = []
    for p in sorted(folder.path.rglob("*")):
        rel = p.relative_to(folder.path)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts) or _SKIP_DIRS & set(rel.parts[:-1]):
            continue
        if rel.name == "README.md" and len(rel.parts) == 1:
            continue  # the model card is generated
        out.append(rel)
    return out


def model_card(folder: RunFolder) -> str:
    """README.md for the Hub: what the run is, its metrics (also as `model-index`), how to load it."""
    from huggingface_hub import EvalResult, ModelCardData

    cfg, meta, m = folder.read_config(), folder.read_meta(), folder.read_metrics()
    tasks = m.tasks or {"boolq": {"accuracy": m.accuracy, "n": m.n}}
    results = [EvalResult(task_type="multiple-choice" if t != "gsm8k" else "text-generation", dataset_type=t,
                          dataset_name=t, dataset_split=m.eval_split, metric_type="accuracy",
                          metric_value=round(float(v["accuracy"]), 4)) for t, v in tasks.items()]
    base = meta.get("base_model", cfg.model.name_or_path)
    data = ModelCardData(base_model=base if "/" in base and not base.startswith((".", "/")) else None,
                         library_name="peft", license="apache-2.0", tags=["heft", "lora", "reft", "peft"],
                         model_name=f"heft-{cfg.label()}", eval_results=results)
    stages = "\n".join(f"- stage {i}: `{s.method}`, {s.epochs:g} epoch(s), lr {s.lr:g}" for i, s in enumerate(cfg.stages)) \
        or "- no training stage (the base model)"
    lora_dirs = [str(folder.adapter_dir(i, s).relative_to(folder.path)) for i, s in enumerate(cfg.stages) if s.trains_lora]
    rows = "\n".join(f"| {t} | {100 * v['accuracy']:.1f}% | {v.get('n', m.n)} |" for t, v in tasks.items())
    peft = (f'\nThe LoRA part alone, with PEFT:\n\n```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base, '
            f'"USER/REPO", subfolder="{lora_dirs[0]}")\n```\n') if lora_dirs else ""
    return f"""---
{data.to_yaml()}
---

# heft run: {cfg.label()} on {base}

Trained with [heft](https://github.com/) {meta.get("heft_version", __version__)}: hierarchical
parameter-efficient fine-tuning, a LoRA stage then a LoReFT stage (HEFT, arXiv 2509.09801; ReFT,
arXiv 2404.03592; LoRA, arXiv 2106.09685).

Stages:
{stages}

| task | accuracy | rows |
|---|---|---|
{rows}

Evaluation: the `{m.eval_split}` split as configured in `config.yaml` (majority baseline
{100 * m.majority_baseline:.1f}%). `metrics.json` and `predictions.jsonl` hold every number.

## Load it

```bash
heft pull USER/REPO runs/x && heft eval runs/x      # reproduces predictions.jsonl
```

```python
import heft
model, tokenizer = heft.load("hf://USER/REPO")
```
{peft}
The base model is not included: `config.yaml` names it, and `meta.json` records its fingerprint, which
heft checks on loading. License of this adapter: Apache-2.0; the base model and the training data keep
their own licenses.
"""


def push(path: Path, repo_id: str, *, private: bool = False, api: Any = None) -> str:
    """Upload a finished run folder with its model card; returns the repository id."""
    folder = RunFolder(path)
    folder.require_finished()
    _check_repo(repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with tempfile.TemporaryDirectory(prefix="heft-push-") as tmp:
        stage = Path(tmp)
        for rel in files_to_share(folder):
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder.path / rel, stage / rel)
        (stage / "README.md").write_text(model_card(folder), encoding="utf-8")
        with _hub_call(f"uploading {path} to {repo_id} on the Hub", repo_id, write=True):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(folder_path=str(stage), repo_id=repo_id, repo_type="model",
                              commit_message=f"heft run ({folder.read_config().label()})")
    return repo_id


def pull(repo_id: str, path: Path, *, download: Any = None) -> Path:
    """Download a run pushed by `heft push` into `path` (new or empty); returns it."""
    _check_repo(repo_id)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"heft pull: {path} is a file; choose a new folder")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"heft pull: {path} is not empty; choose a new folder")
    if download is None:
        from huggingface_hub import snapshot_download as download
    created = not path.exists()
    try:
        with _hub_call(f"downloading {repo_id} from the Hub", repo_id, write=False):
            download(repo_id=repo_id, local_dir=str(path))
    except BaseException:  # an interrupted download as well: a partial folder would block the next pull
        _remove_partial(path, created)
        raise
    folder = RunFolder(path)
    if not folder.is_heft():
        raise CheckpointError(f"{repo_id}: not a heft run (no config.yaml in the repository)")
    folder.require_finished()
    return path


def resolve(run: str | Path) -> Path:
    """A run folder path, downloading `hf://USER/REPO` once into heft's cache."""
    text = str(run)
    if not text.startswith(PREFIX):
        return Path(run)
    from heft.data.assets import cache_root

    repo_id = text[len(PREFIX):]
    _check_repo(repo_id)
    local = cache_root() / "hub-runs" / repo_id.replace("/", "--")
    if RunFolder(local).is_finished():
        return local
    if local.exists():
        shutil.rmtree(local)
    return pull(repo_id, local)


def _check_repo(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"repository {repo_id!r}: give it as USER/REPO")


def _remove_partial(path: Path, created: bool) -> None:
    """Undo a failed download: remove the folder pull created, or empty the empty one it was given."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir() if path.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@contextmanager
def _hub_call(doing: str, repo_id: str, *, write: bool) -> Iterator[None]:
    """Turn the Hub's and the network's failures inside the block into one HubError line; any other error
    (a bug) keeps its traceback. `write`: the call needs write access (push), else read access (pull)."""
    try:
        yield
    except Exception as e:
        reason = _reason(e, repo_id, write)
        if reason is None:
            raise
        logger.debug("%s failed", doing, exc_info=True)
        raise HubError(f"{doing} failed: {reason}") from e


def _reason(error: BaseException, repo_id: str, write: bool) -> str | None:
    """What failed and the fix, from the first error in the cause chain that tells (None: not the Hub's)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    offline = "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to reach the Hub"
    token = f"a token with write access to {repo_id.split('/')[0]}" if write else "a token that can read it"
    chain = list(_causes(error))
    for e in chain:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, OfflineModeIsEnabled):  # a ConnectionError: before the network errors
            return offline
        if isinstance(e, GatedRepoError):  # a RepositoryNotFoundError: before it
            return (f"the repository is gated (HTTP {status}); request access at {constants.ENDPOINT}/{repo_id}, "
                    f"then {_LOGIN} for that account")
        if isinstance(e, RepositoryNotFoundError) or (isinstance(e, HfHubHTTPError) and status == 404):
            # the Hub answers 401 alike for a missing repository and a private one the token cannot read
            return (f"not found on the Hub (HTTP {status}); check the name, or if it is private, {_LOGIN} "
                    f"to {token}")
        if isinstance(e, HfHubHTTPError) and status in (401, 403):
            return f"not authorised (HTTP {status}); {_LOGIN} to {token}"
        if isinstance(e, HfHubHTTPError):
            return f"the Hub answered HTTP {status} ({_first_line(e)}); run the command again later"
        if isinstance(e, LocalTokenNotFoundError):
            return f"not authorised (no token found); {_LOGIN} to {token}"
        if isinstance(e, HFValidationError):
            return f"{repo_id!r} is not a valid repository name ({_first_line(e)}); give it as USER/REPO"
        if isinstance(e, _network_errors()):
            return (f"no network: {constants.ENDPOINT} could not be reached ({type(e).__name__}: {_first_line(e)}); "
                    f"check the connection (and HF_ENDPOINT or the proxy settings), then run the command again")
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        # snapshot_download found neither the Hub nor a local copy and kept no cause that says why
        return offline if constants.HF_HUB_OFFLINE else (
            f"{constants.ENDPOINT} could not be reached; check the connection, then run the command again")
    return None


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """The error, then what caused it (huggingface_hub wraps a network error in LocalEntryNotFoundError)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _network_errors() -> tuple[type[BaseException], ...]:
    """A refused or dropped connection, a failed DNS look-up, a timeout or a proxy error: the transport
    errors of the HTTP client huggingface_hub uses (httpx2 from its 2.x, httpx in 1.x; transformers 5 needs
    1.x or later, so never requests) and the operating system's own."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for client in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(client).TransportError)
        except ImportError:
            pass
    return tuple(found)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
