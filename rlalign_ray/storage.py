"""Where a run's files go: ``trainer.output_dir``, a local folder or a URI.

A URI (``s3://bucket/run``, ``gs://bucket/run``, or any other filesystem fsspec knows) is
reached through fsspec with ``trainer.storage_options`` (e.g. ``endpoint_url`` for an
S3-compatible store); credentials come from the backend's own environment variables or
the node's cloud role. Every process writes the files it makes on its own node, into a
node-local staging folder (``trainer.staging_dir``, default the system temp folder), and
uploads them from there:

    who                    writes
    the driver             metrics.jsonl, completions.jsonl, samples.jsonl, tensorboard/,
                           checkpoints/step_N/{trainer_state.json, driver_rng.pt,
                           generators_rng.pt}, checkpoints/latest
    learner rank 0         checkpoints/step_N/ (the policy as a Hugging Face folder), final/
    every learner rank     checkpoints/step_N/learner/ds/: its DeepSpeed files, rng_rank<r>.pt
    every critic rank      checkpoints/step_N/critic/ds/: the same

and reads back on resume what it loads (each rank only its own shard files, ``keep``). A
local ``output_dir`` is written in place; when learner or critic ranks run on another node
than the driver it must be a folder every node sees at the same path (a shared volume),
which ``answer_probe`` lets the driver prove before any training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCAL_PROTOCOLS = (None, "file", "local")


def protocol(path: str | Path) -> str | None:
    """``s3`` for ``s3://bucket/key`` (the first of a chained URL), None for a plain path."""
    text = str(path)
    if "://" not in text and "::" not in text:
        return None
    import fsspec

    found = fsspec.core.split_protocol(text.split("::")[0])[0]
    return None if found == "file" else found


def is_remote(path: str | Path) -> bool:
    return protocol(path) not in LOCAL_PROTOCOLS


def local_path(path: str | Path) -> str:
    """A plain local path (``file://`` dropped), absolute: actors on the same node may run
    in another working directory than the driver."""
    text = str(path)
    return os.path.abspath(text[len("file://") :] if text.startswith("file://") else text)


def join(base: str | Path, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.join(str(base), *parts)


def basename(path: str | Path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def default_staging() -> str:
    return os.path.join(tempfile.gettempdir(), "rlalign-ray-staging")


@dataclass(frozen=True)
class Storage:
    """How this process reaches run files: fsspec ``options`` for URIs, and the node-local
    ``staging`` folder that files pass through on their way to or from a URI. Plain data:
    the driver and every rank build the same one from the config (``from_config``)."""

    options: dict[str, Any] = field(default_factory=dict)
    staging: str = ""  # "": default_staging()

    @classmethod
    def from_config(cls, trainer: Any) -> Storage:
        return cls(dict(trainer.storage_options), trainer.staging_dir or "")

    def fs(self, url: str) -> tuple[Any, str]:
        """The fsspec filesystem of the URI ``url`` and the path in it."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(url), **self.options)
        return fs, path

    # ---- single files and listings --------------------------------------------------------
    def exists(self, url: str) -> bool:
        if not is_remote(url):
            return os.path.exists(url)
        fs, path = self.fs(url)
        fs.invalidate_cache(path)  # other processes write here too
        return fs.exists(path)

    def is_file(self, url: str) -> bool:
        if not is_remote(url):
            return os.path.isfile(url)
        fs, path = self.fs(url)
        fs.invalidate_cache(path)
        return fs.isfile(path)

    def listdir(self, url: str) -> list[str]:
        """Names of the entries in ``url`` ([] when there is none)."""
        if not is_remote(url):
            return sorted(os.listdir(url)) if os.path.isdir(url) else []
        fs, path = self.fs(url)
        fs.invalidate_cache(path)
        try:
            found = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({basename(p) for p in found if p.rstrip("/") != path.rstrip("/")})

    def read_text(self, url: str) -> str:
        if not is_remote(url):
            return Path(url).read_text()
        fs, path = self.fs(url)
        return fs.cat_file(path).decode()

    def write_text(self, url: str, text: str) -> None:
        """Written whole or not at all: a local file is written aside and renamed; an object
        store's single PUT is atomic."""
        if not is_remote(url):
            tmp = f"{url}.tmp"
            Path(tmp).write_text(text)
            os.replace(tmp, url)
            return
        fs, path = self.fs(url)
        fs.pipe_file(path, text.encode())

    def remove(self, url: str) -> None:
        """``url`` and everything under it; nothing when it is absent."""
        if not is_remote(url):
            if os.path.isdir(url):
                shutil.rmtree(url, ignore_errors=True)
            elif os.path.exists(url):
                os.unlink(url)
            return
        fs, path = self.fs(url)
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    # ---- staged writes and reads ----------------------------------------------------------
    def stage(self, url: str, owner: str) -> Path:
        """An empty node-local folder for ``owner``'s (a process's) files of ``url``."""
        digest = hashlib.sha1(str(url).encode()).hexdigest()[:16]
        folder = Path(self.staging or default_staging()) / f"{digest}-{owner}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    @contextmanager
    def writing(self, dest: str, owner: str) -> Iterator[Path]:
        """A local folder to write ``dest``'s files into: ``dest`` itself when it is local;
        for a URI a staging folder on this node, uploaded into ``dest`` (next to what other
        processes put there) when the block ends without an error, then removed."""
        if not is_remote(dest):
            Path(dest).mkdir(parents=True, exist_ok=True)
            yield Path(dest)
            return
        folder = self.stage(dest, owner)
        try:
            yield folder
            self.upload(folder, dest)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextmanager
    def reading(
        self, src: str, owner: str, keep: Callable[[str], bool] | None = None
    ) -> Iterator[Path]:
        """A local folder holding ``src``'s files: ``src`` itself when it is local; for a URI
        the files whose relative path ``keep`` accepts, downloaded to a staging folder on
        this node that is removed when the block ends."""
        if not is_remote(src):
            yield Path(src)
            return
        folder = self.stage(src, owner)
        try:
            self.download(src, folder, keep)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def upload(self, folder: Path, dest: str, files: list[str] | None = None) -> list[str]:
        """Every file under ``folder`` (or the relative paths ``files``) to ``dest``/same
        relative path; returns the relative paths sent."""
        rels = files if files is not None else _files(folder)
        if rels:
            fs, path = self.fs(dest)
            fs.put([str(folder / r) for r in rels], [f"{path}/{r}" for r in rels])
        return rels

    def download(
        self,
        src: str,
        folder: Path,
        keep: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """The files under the URI ``src`` whose relative path ``keep`` accepts, into
        ``folder``; returns their relative paths."""
        fs, path = self.fs(src)
        fs.invalidate_cache(path)
        try:
            found = fs.find(path)
        except FileNotFoundError:
            found = []
        base = path.rstrip("/") + "/"
        rels = [p[len(base) :] for p in found if p.startswith(base)]
        rels = [r for r in rels if keep is None or keep(r)]
        for r in rels:
            (folder / r).parent.mkdir(parents=True, exist_ok=True)
        if rels:
            fs.get([base + r for r in rels], [str(folder / r) for r in rels])
        return rels


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---- the driver's run logs -----------------------------------------------------------------
class RunLogs:
    """The folder the driver writes its logs in (metrics.jsonl, completions.jsonl,
    samples.jsonl, tensorboard/, the W&B / MLflow run ids): ``output_dir`` itself, or for a
    URI a staging folder whose changed files ``push`` uploads. ``checkpoints/`` and
    ``final/`` are written by their own writers, never through this folder."""

    SKIP = ("checkpoints/", "final/")

    def __init__(self, storage: Storage, output_dir: str):
        self.storage, self.output_dir = storage, output_dir
        self.remote = is_remote(output_dir)
        self.folder = storage.stage(output_dir, "driver") if self.remote else Path(output_dir)
        self._sent: dict[str, tuple[int, int]] = {}
        self._pushed_at = time.monotonic()

    def pull(self) -> None:
        """A resumed run's logs from the URI (the run continues them)."""
        if self.remote:
            self.storage.download(self.output_dir, self.folder, self._is_log)
            self._sent = self._stamps()

    def push(self, every_s: float = 0.0) -> None:
        """Upload the logs changed since the last push (and remove those deleted here, e.g.
        an old run's W&B id), if ``every_s`` seconds have passed."""
        if not self.remote or time.monotonic() - self._pushed_at < every_s:
            return
        stamps = self._stamps()
        changed = [r for r, s in stamps.items() if self._sent.get(r) != s]
        self.storage.upload(self.folder, self.output_dir, changed)
        for gone in set(self._sent) - set(stamps):
            self.storage.remove(join(self.output_dir, gone))
        self._sent = {r: stamps[r] for r in stamps}
        self._pushed_at = time.monotonic()

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _is_log(self, rel: str) -> bool:
        return not rel.startswith(self.SKIP) and not basename(rel).startswith(PROBE)

    def _stamps(self) -> dict[str, tuple[int, int]]:
        out = {}
        for rel in _files(self.folder):
            st = (self.folder / rel).stat()
            out[rel] = (st.st_size, st.st_mtime_ns)
        return out


# ---- does every node see output_dir? -------------------------------------------------------
PROBE = ".rlalign-probe-"


def write_probe(storage: Storage, output_dir: str, token: str) -> str:
    """The driver's probe file in ``output_dir``: the file every rank must see."""
    url = join(output_dir, PROBE + token)
    if not is_remote(output_dir):
        os.makedirs(output_dir, exist_ok=True)
    storage.write_text(url, token)
    return url


def answer_probe(storage: Storage, output_dir: str, token: str, who: str) -> tuple:
    """Run by a rank (``who``, e.g. ``learner1``) on its node: (node IP, node id, ``who``,
    None or what is wrong); None when it reads the driver's probe in ``output_dir`` and
    writes its own beside it (``PROBE<token>-<who>``)."""
    import ray

    ip, node = ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()
    try:
        if not is_remote(output_dir):
            url = join(output_dir, PROBE + token)
            if not os.path.isfile(url) or Path(url).read_text() != token:
                return ip, node, who, f"{url} is not there"
        storage.write_text(join(output_dir, f"{PROBE}{token}-{who}"), who)
        return ip, node, who, None
    except Exception as e:  # a missing credential, a read-only mount ...
        return ip, node, who, f"{type(e).__name__}: {e}"


def probe_answered(storage: Storage, output_dir: str, token: str, who: str) -> bool:
    """The driver sees the probe ``who`` wrote."""
    return storage.is_file(join(output_dir, f"{PROBE}{token}-{who}"))


def remove_probes(storage: Storage, output_dir: str, token: str) -> None:
    for name in storage.listdir(output_dir):
        if name.startswith(PROBE + token):
            storage.remove(join(output_dir, name))
