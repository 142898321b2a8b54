"""Where a study lives, so that any number of workers share it: an Optuna storage named by `--storage`.

    (none)              OUT/optuna.journal, a journal file in the tune folder (one machine)
    journal:PATH        an Optuna journal file (one machine, or a filesystem the machines share)
    postgresql://...    a database (many machines); also sqlite:///FILE, mysql://... with their drivers

A storage that cannot be opened or reached is reported in one line, with the URL's password hidden,
before any trial runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from heft.errors import ConfigError

DATABASES = ("postgresql", "sqlite", "mysql")


def describe(spec: str) -> str:
    """The storage as logs and reports show it: a database URL without its password."""
    if spec.startswith("journal:"):
        return spec
    try:
        from sqlalchemy.engine import make_url

        return make_url(spec).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can read: shown without anything after a `:` before the host
        return spec.split("@")[-1]


def open_storage(spec: str) -> Any:
    """The Optuna storage for `spec` (`journal:PATH` or a database URL), reachable and ready."""
    import optuna

    if spec.startswith("journal:"):
        path = Path(spec.removeprefix("journal:")).expanduser()
        if not spec.removeprefix("journal:"):
            raise ConfigError("--storage: `journal:` needs a file path, e.g. journal:runs/tune/optuna.journal")
        if path.is_dir():
            raise ConfigError(f"--storage: {path} is a folder; name the journal file in it, e.g. journal:{path / 'optuna.journal'}")
        folder = path.parent
        if not folder.is_dir():
            raise ConfigError(f"--storage: the folder {folder} of the journal file does not exist; create it or choose another path")
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.R_OK | os.W_OK)):
            raise ConfigError(f"--storage: cannot write the journal file {path} (permissions); choose another path")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    scheme = spec.split(":", 1)[0].split("+", 1)[0]
    if "://" not in spec or scheme not in DATABASES:
        raise ConfigError(f"--storage: {describe(spec)!r} is neither journal:PATH nor a database URL "
                          "(postgresql://USER:PASSWORD@HOST:PORT/DB, sqlite:///FILE, mysql://...)")
    kwargs: dict[str, Any] = {}
    url = spec
    if scheme == "postgresql":
        kwargs = {"connect_args": {"connect_timeout": 10}}  # an unreachable host fails in seconds, not minutes
        url = _with_driver(spec)
    try:
        return _create_rdb(optuna, url, kwargs)
    except ImportError as e:
        missing = getattr(e.__cause__, "name", None) or getattr(e, "name", None) or "?"
        raise ConfigError(f"--storage: {describe(spec)} needs a database driver that is not installed ({missing}); for "
                          "PostgreSQL: pip install 'heft[tune]'") from None
    except Exception as e:  # sqlalchemy's errors (refused, unknown host, bad password, no such database)
        raise ConfigError(f"--storage: cannot reach {describe(spec)}: {_reason(e)}") from None


def _create_rdb(optuna: Any, url: str, kwargs: dict[str, Any], attempts: int = 5) -> Any:
    """Optuna's RDBStorage, created again when another worker created the tables of an empty database at the same
    moment (the loser sees a duplicate key or an existing table; the second attempt finds the schema in place)."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as e:
            text = str(e).lower()
            if attempt + 1 == attempts or not ("duplicate key" in text or "already exists" in text):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _with_driver(url: str) -> str:
    """A plain `postgresql://` URL with the driver that is installed: SQLAlchemy 2.0 reads it as psycopg2, 2.1 as
    psycopg (3), and the `tune` extra installs psycopg2. A URL that names its driver (`postgresql+...://`) is kept."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return dialect + url.removeprefix("postgresql")
    return url  # SQLAlchemy's own error names the driver it wants


def _reason(e: BaseException) -> str:
    """The driver's own first line (`connection refused`, `password authentication failed`, ...)."""
    inner = getattr(e, "orig", None) or e
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return lines[0] if lines else type(inner).__name__
