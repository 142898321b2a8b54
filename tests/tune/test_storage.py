"""heft.tune.storage: creating Optuna's tables in an empty database races when workers start together."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from heft.tune import storage


def _optuna(failures: list[Exception]) -> tuple[SimpleNamespace, list[str]]:
    """A stand-in for the optuna module whose RDBStorage raises each of `failures` once, then returns the url."""
    calls: list[str] = []

    def rdb(url, engine_kwargs):
        calls.append(url)
        if failures:
            raise failures.pop(0)
        return f"storage of {url}"

    return SimpleNamespace(storages=SimpleNamespace(RDBStorage=rdb)), calls


def test_a_lost_schema_race_is_retried(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    race = Exception('duplicate key value violates unique constraint "pg_type_typname_nsp_index"')
    optuna, calls = _optuna([race, Exception('relation "studies" already exists')])
    assert storage._create_rdb(optuna, "postgresql://h/db", {}) == "storage of postgresql://h/db"
    assert len(calls) == 3


def test_other_errors_and_a_lasting_race_are_raised(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    optuna, calls = _optuna([Exception("connection refused")])
    with pytest.raises(Exception, match="connection refused"):
        storage._create_rdb(optuna, "postgresql://h/db", {})
    assert len(calls) == 1
    optuna, calls = _optuna([Exception("duplicate key")] * 5)
    with pytest.raises(Exception, match="duplicate key"):
        storage._create_rdb(optuna, "postgresql://h/db", {}, attempts=5)
    assert len(calls) == 5
