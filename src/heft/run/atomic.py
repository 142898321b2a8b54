"""Small file helpers: every file heft writes goes through a temporary file and an atomic rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_mode(path: Path, directory: bool = False) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (always private: 0600/0700) the mode an ordinary
    open()/mkdir() would give it under the user's umask, so other users can read a shared run."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def is_partial(path: Path) -> bool:
    """A temporary file of an atomic write (write_text's `.NAME.XXXX.tmp`) that a killed process left behind."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        user_mode(Path(tmp))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[Any]:
    """Every complete JSON line of `path` ([] if there is no file); a last line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """Append one JSON line per row (an append-only log: a crash can cut only the last line short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        f.flush()


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    user_mode(tmp, directory=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                user_mode(f)  # some writers (safetensors) create private 0600 files whatever the umask
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir():
                user_mode(f, directory=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(path: Path) -> Path:
    """A temporary path next to `path` for a writer that takes a file name; publish it with `os.replace`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    user_mode(Path(tmp))
    return Path(tmp)
