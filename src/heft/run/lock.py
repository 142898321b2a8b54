"""One writer per folder: a lock file next to the folder, held for the whole run.

`FolderLock(path)` guards the folder `path` (which need not exist yet) with the file
`path.parent/.NAME.lock`. Taking it:

1. open (or create) the lock file and take an exclusive, non-blocking `flock` on it. A live holder on
   this machine keeps that flock until it exits, however it exits (SIGKILL included), so failing to
   get it means "in use" and the file's content names the holder; unless that holder is dead and a
   process it started still has the file open: then the file is moved aside and a new one taken;
2. check that the path still names the file we locked (a releasing holder unlinks it; retry if so);
3. read the previous holder's record. flock only proves the previous holder gone on this machine:
   if the record names a process on this host, it is checked to be dead (or its PID reused), and the
   lock is taken over; if it names another host, heft cannot tell (flock is not reliable across
   machines on NFS and similar shared filesystems) and refuses, naming the file to delete if that
   process is known to be gone;
4. write our own record (PID, host, start time, command) and keep the file open.

Releasing unlinks the file, then closes it. Under torchrun / accelerate launch only the main process
takes the lock (the others write nothing).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from heft.errors import HeftError


class LockedError(HeftError):
    """Another process holds the folder."""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, ticks: str | None) -> bool:
    """Whether process `pid` (started at `ticks`, if known) still runs: not gone, not a zombie, not a reused PID."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):  # killed, waiting to be reaped: its files (and our flock) are closed
            return False
    except (OSError, IndexError):
        pass
    mine = _start_ticks(pid)
    return ticks is None or mine is None or mine == ticks


class FolderLock:
    def __init__(self, folder: Path, what: str = "run folder"):
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self.what = what
        self.fd: int | None = None
        self.made: list[Path] = []  # parent folders acquire() created, removed on release if still empty

    def _describe(self, holder: dict) -> str:
        started = holder.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
        return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"

    def acquire(self) -> "FolderLock":
        self.made = [p for p in reversed(self.folder.parents) if not p.exists()]
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                if holder.get("pid") != os.getpid() and holder and self._gone(holder) and self._break(fd):
                    os.close(fd)  # the recorded holder is dead; a process it left behind kept the lock file open
                    continue
                os.close(fd)
                raise LockedError(f"{self.folder}: another heft process is writing this {self.what} ({self._describe(holder)}); "
                                  "wait for it to finish, stop it, or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between our open and our flock: try again
                os.close(fd)
                continue
            holder = self._read(fd)
            if holder and not self._gone(holder):
                os.close(fd)
                if holder.get("host") == socket.gethostname():
                    raise LockedError(f"{self.folder}: another heft process is writing this {self.what} "
                                      f"({self._describe(holder)}); wait for it to finish, stop it, or choose another --out")
                raise LockedError(f"{self.folder}: locked by {self._describe(holder)}, on another machine, which heft cannot "
                                  f"check from here (shared filesystem); if that process is gone, delete {self.path}")
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "start_ticks": _start_ticks(os.getpid()), "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        self.release()
        raise LockedError(f"{self.folder}: could not take the lock {self.path} (it kept changing hands); try again")

    def _break(self, fd: int) -> bool:
        """Move the lock file of a dead holder aside (a new file, and a new flock, take its place on the next try).
        Only the file we examined is moved: if another process replaced it meanwhile, it is put back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else moved it: try again
        if os.stat(aside).st_ino != os.fstat(fd).st_ino:
            os.rename(aside, self.path)  # a newer holder's file: leave it
            return False
        aside.unlink(missing_ok=True)
        return True

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            return json.loads(raw) if raw else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _gone(holder: dict) -> bool:
        """Whether the recorded holder is known to be dead (we hold the flock, so on this host it is)."""
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return True
        for _ in range(30):  # we hold its flock, so it has closed its files: it is exiting; give it 3 s
            if not _alive(pid, holder.get("start_ticks")):
                return True
            time.sleep(0.1)
        return False

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self.fd)
                self.fd = None
        for p in reversed(self.made):
            try:
                p.rmdir()  # only if empty: a run that wrote something keeps it
            except OSError:
                break
        self.made = []

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
