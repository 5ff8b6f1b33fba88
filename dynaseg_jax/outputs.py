"""The output folder of ``dynaseg segment``: lock, config record, results file, resume.

A folder holds the results of ONE config. ``OutputFolder.open``:

1. takes an exclusive lock on ``OUT/.dynaseg.lock`` for the whole run, so two runs
   into one folder cannot interleave or truncate each other's lines;
2. repairs ``results.jsonl``: a run killed in the middle of an append leaves a last
   line without its newline, and the next append would be glued onto it; that torn
   tail is truncated away (under the lock, so never another run's line);
3. compares the config digest of every ``ok`` record with this run's: results of a
   different config are an error unless ``overwrite``.

Several processes of one distributed run (``process = (index, count)``, count > 1) share
the folder: each holds ``.dynaseg.lock`` shared (a one-process run, which holds it
exclusively, cannot start beside them) and ``.dynaseg.<index>.lock`` exclusively, and
appends to its own ``results.<index>.jsonl``, so no two processes write one file. Every
process reads the records of all results files, so resuming works with any process
count. ``merge_results`` writes their union, one record per image, to ``results.jsonl``:
each process does it when it ends (the last one to end writes the complete file), a
later run does it again, and ``dynaseg merge OUT`` does it by hand; it needs no barrier.

Nothing is deleted or written until ``commit()``, which the runner calls once the
inputs are found and the network is built (so a typo or a bad checkpoint never costs
the folder its results): it removes the other config's records and the label maps and
overlays they name, and writes ``config.toml`` (the config as TOML, with its digest and
scale). A folder without ``ok`` results takes any config.

An image is done when an ``ok`` record carries its source (resolved file path or
dataset id) and this config's digest, and its label map exists.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from . import images as imio
from .config import Config, ConfigError, config_digest, to_toml

try:  # POSIX; elsewhere the folder is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

RESULTS = "results.jsonl"
CONFIG = "config.toml"
LOCK = ".dynaseg.lock"
MERGE_LOCK = ".dynaseg.merge.lock"


def process_results_name(index: int) -> str:
    """The results file of process ``index`` of a multi-process run."""
    return f"results.{index}.jsonl"


def results_files(path: Path) -> list[Path]:
    """``results.jsonl`` and every process's ``results.<index>.jsonl`` in ``path``."""
    files = [path / RESULTS]
    files += sorted((p for p in path.glob("results.*.jsonl") if p.name.split(".")[1].isdigit()),
                    key=lambda p: int(p.name.split(".")[1]))
    return [f for f in files if f.exists()]


def read_all_records(path: Path) -> list[dict]:
    """The records of all results files of a folder, in file order."""
    return [r for f in results_files(path) for r in imio.read_jsonl(f)]


class OutputFolderError(ConfigError):
    """An output folder that this run may not write into (exit code 2, like a bad config)."""


def drop_torn_tail(path: str | os.PathLike) -> int:
    """Truncates a file after its last newline; returns the number of bytes dropped.

    Appends write whole lines, so only the last line of a results file can be torn
    (the process died inside ``write``). Call with the folder lock held. (The file is
    read whole: the records are read right after anyway.)
    """
    try:
        with open(path, "rb+") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1  # 0 when there is no newline at all
            if keep == len(data):
                return 0
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            return len(data) - keep
    except FileNotFoundError:
        return 0


@dataclasses.dataclass
class OutputFolder:
    """An open, locked output folder. Use ``OutputFolder.open``; ``close()`` unlocks."""

    path: Path
    digest: str
    records: list          # this config's records already in results.jsonl
    dropped_bytes: int     # size of the torn tail removed on open (0 if none)
    stale: list            # ok records of another config, replaced by commit() (overwrite)
    header: str            # config.toml's comment header
    config: Config
    process: tuple = (0, 1)  # (index, count) of this process in a distributed run
    _lock_fds: tuple = ()

    @property
    def results_path(self) -> Path:
        """The file this process appends to."""
        index, count = self.process
        return self.path / (RESULTS if count == 1 else process_results_name(index))

    @classmethod
    def open(cls, out_dir: str | os.PathLike, config: Config, scale: float = 1.0,
             overwrite: bool = False, resolved: Config | None = None,
             process: tuple[int, int] = (0, 1)) -> "OutputFolder":
        """Creates/locks/repairs the folder and checks that it holds this config's results.

        Args:
          out_dir: the output folder (created with its parents).
          config: the run's Config (its digest keys the resume).
          scale: the run's ``--scale`` (part of the digest).
          overwrite: replace results of another config (at ``commit()``) instead of
            refusing; results of the same config are kept and resumed.
          resolved: optionally the backend-resolved config, noted in config.toml.
          process: (index, count) of this process in a distributed run (module docstring).

        Raises:
          OutputFolderError: ``out_dir`` is a file, cannot be written, is locked by
            another run, or holds results of another config (without ``overwrite``).
        """
        index, count = process
        if count > 1 and overwrite:
            raise OutputFolderError(f"--out {out_dir}: --overwrite needs a one-process run (it deletes "
                                    f"results every process would read)")
        path = Path(out_dir)
        if path.exists() and not path.is_dir():
            raise OutputFolderError(f"--out {path}: exists and is not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputFolderError(f"--out {path}: cannot create folder ({e.strerror})") from None
        locks = [(LOCK, True)] if count == 1 else [(LOCK, False), (f".dynaseg.{index}.lock", True)]
        lock_fds = ()
        try:
            for name, exclusive in locks:
                lock_fds += (_lock(path, name, exclusive),)
        except (PermissionError, OutputFolderError) as e:
            for fd in lock_fds:
                _unlock(fd)
            if isinstance(e, PermissionError):
                raise OutputFolderError(f"--out {path}: cannot write into the folder ({e.strerror})") from None
            raise
        try:
            digest = config_digest(config, scale)
            own = path / (RESULTS if count == 1 else process_results_name(index))
            try:
                dropped = drop_torn_tail(own)
            except PermissionError as e:
                raise OutputFolderError(f"--out {path}: cannot write {own.name} ({e.strerror})") from None
            records = read_all_records(path)
            stale = [r for r in records if r.get("status") == "ok" and r.get("config") != digest]
            if stale and not overwrite:
                old = ", ".join(sorted({r.get("config") or "none (older dynaseg)" for r in stale}))
                raise OutputFolderError(
                    f"--out {path}: holds results of another config (digest {old}; this run: "
                    f"{digest}{'; see ' + str(path / CONFIG) if (path / CONFIG).is_file() else ''}); "
                    f"use --overwrite to replace them, "
                    f"or another --out")
            header = (f"Written by dynaseg segment: the config of every result in this folder.\n"
                      f"config digest: {digest}\n"
                      f"scale: {float(scale)!r} (--scale; part of the digest)\n")
            if resolved is not None:
                auto = ", ".join(f"{k} = {resolved.get(k)!r}" for k in
                                 ("engine.strategy", "model.conv_impl", "engine.batch", "engine.sync_every"))
                header += f"resolved on the machine that wrote it: {auto}\n"
            mine = [r for r in records if r.get("config") == digest]
            return cls(path, digest, mine, dropped, stale, header, config, (index, count), lock_fds)
        except BaseException:
            for fd in lock_fds:
                _unlock(fd)
            raise

    def commit(self) -> None:
        """Makes the folder this config's: removes the other config's results (the
        ``overwrite`` case), then writes ``config.toml``. Call before appending."""
        if self.stale:  # overwrite: one process only (open)
            _delete_outputs(self.path, self.stale)
            lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
            imio.write_text_atomic(self.path / RESULTS, lines)
            for f in results_files(self.path):
                if f.name != RESULTS:  # their records of this config are in results.jsonl now
                    f.unlink()
            self.stale = []
        imio.write_text_atomic(self.path / CONFIG, to_toml(self.config, self.header))

    def done_sources(self) -> dict[str, str]:
        """{source: stem} of images finished under this config whose label map exists."""
        return {r["source"]: r["stem"] for r in self.records
                if r.get("status") == "ok" and r.get("config") == self.digest
                and r.get("source") and (self.path / f"{r.get('stem')}.png").exists()}

    def append(self, record: dict) -> None:
        """Appends one record (with this folder's config digest) and flushes it to disk."""
        imio.append_jsonl(self.results_path, {**record, "config": self.digest})

    def close(self) -> None:
        for fd in self._lock_fds:
            _unlock(fd)
        self._lock_fds = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _delete_outputs(path: Path, records: list) -> None:
    """Deletes the label maps and overlays the records name."""
    for r in records:
        stem = r.get("stem")
        if isinstance(stem, str) and stem and "/" not in stem and stem not in (".", ".."):
            for name in (f"{stem}.png", f"{stem}_overlay.png"):
                (path / name).unlink(missing_ok=True)


def one_record_per_image(records: list[dict]) -> list[dict]:
    """One record per image (by source): its last ``ok`` record if it has one, else its
    last record; in order of first appearance."""
    best: dict = {}
    for r in records:
        key = r.get("source") or r.get("file")
        if r.get("status") == "ok" or best.get(key, {}).get("status") != "ok":
            best[key] = r
    return list(best.values())


def merge_results(out_dir: str | os.PathLike) -> int:
    """Writes the union of a folder's results files to ``results.jsonl``, one record per
    image (its ``ok`` record if it has one, else its last), sorted by source; returns
    the number of records. Idempotent, and safe beside the processes of a multi-process
    run: it holds ``.dynaseg.lock`` shared, as they do (so never beside a one-process
    run, which appends to results.jsonl itself), and ``.dynaseg.merge.lock`` while it
    reads and replaces the file atomically.

    Raises:
      OutputFolderError: a one-process run is writing into the folder.
    """
    path = Path(out_dir)
    shared = _lock(path, LOCK, exclusive=False)
    fd = _lock(path, MERGE_LOCK, exclusive=True, wait=True)
    try:
        records = sorted(one_record_per_image(read_all_records(path)),
                         key=lambda r: str(r.get("source") or r.get("file")))
        imio.write_text_atomic(path / RESULTS,
                               "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        return len(records)
    finally:
        _unlock(fd)
        _unlock(shared)


def _lock(path: Path, name: str, exclusive: bool, wait: bool = False) -> int | None:
    if fcntl is None:
        return None
    fd = os.open(path / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        raise OutputFolderError(f"--out {path}: another dynaseg run is writing into this folder "
                                f"(it holds {path / name}); wait for it or choose another --out") from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock
