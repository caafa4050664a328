"""The run directory's one path layer: a local (or NFS) path, or a bucket on an object
store (`gs://bucket/run`, the usual MODEL_DIR of a TPU run).

Every file a run keeps goes through here or through orbax, which uses the same path
library (etils.epath): config.gin, metrics.jsonl, TensorBoard events, the run lock,
evaluation and inference outputs; orbax writes the checkpoints' arrays with tensorstore.

- The backend of `gs://` paths is fsspec's gcsfs. etils.epath would pick TensorFlow's
  tf.io.gfile whenever TensorFlow is installed (it always is here: seqio needs it), but
  TensorFlow's GCS file system has its endpoints compiled in
  (`https://www.googleapis.com/storage/v1/`, read from libtensorflow_framework.so.2's
  strings: there is no variable that moves it), so it cannot be tested against an
  emulator; gcsfs, google-cloud-storage and tensorstore all can. `EPATH_USE_TF=false` is
  therefore set (unless the user set EPATH_USE_TF) before any path is opened.
- An object has no append: `open_append` keeps the object's text in memory and uploads
  it whole at each flush, as TensorFlow's GCS file system does for its appendable files.
- An object store has no file lock: `ObjectLock` is a lease held by a generation-matched
  create (`ifGenerationMatch=0`: the upload succeeds only if no such object exists) and
  renewed by a heartbeat; see its docstring.

Tested against fake-gcs-server (tests/test_object_store.py); no real bucket could be
reached from here, so the behaviour against Google Cloud Storage itself is from its
documentation (request preconditions: cloud.google.com/storage/docs/request-preconditions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import socket
import threading
import time
from typing import Any

os.environ.setdefault("EPATH_USE_TF", "false")  # before etils picks a backend (see above)

from etils import epath  # noqa: E402

log = logging.getLogger("t5x_like.training.rundir")

LEASE_ENV = "T5X_LIKE_RUN_LOCK_LEASE_S"
DEFAULT_LEASE_S = 300.0


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is on an object store (it has a scheme: gs://, s3://, ...)."""
    return "://" in os.fspath(path)


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an epath.Path; a relative local path becomes absolute (orbax needs that)."""
    if is_remote(p):
        return epath.Path(os.fspath(p))
    return epath.Path(os.path.abspath(os.fspath(p)))


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/names...` as a string, for a local path or a URL alike."""
    if not is_remote(base):
        return os.path.join(os.fspath(base), *names)
    return os.fspath(epath.Path(os.fspath(base)).joinpath(*names))


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
    return path(p).is_dir()


def makedirs(p: str | os.PathLike) -> None:
    """A directory, with its parents (an object store has none to make: a no-op there
    apart from the check gcsfs does)."""
    path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text(encoding="utf-8")


def write_text(p: str | os.PathLike, text: str) -> None:
    """Writes `p` whole: locally through a temporary file and a rename, so a reader never
    sees half a file; an object upload is whole (or nothing) by itself."""
    write_bytes(p, text.encode("utf-8"))


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    target = path(p)
    if is_remote(p):
        target.write_bytes(data)
        return
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(os.fspath(tmp), os.fspath(target))


@contextlib.contextmanager
def atomic_writer(p: str | os.PathLike):
    """A text file to write `p` with, which appears only when the block ends without an
    error: locally `p.tmp` renamed to `p`; on an object store one upload at the end."""
    if not is_remote(p):
        tmp = os.fspath(p) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, os.fspath(p))
        return
    buffer = io.StringIO()
    yield buffer
    write_text(p, buffer.getvalue())


# ---------------------------------------------------------------------------
# Appending


class _ObjectAppender:
    """An appendable file on an object store: the whole object is uploaded again at each
    flush (the old contents are read back first, so a resumed run appends to them)."""

    def __init__(self, p: epath.Path, binary: bool):
        self._path, self._binary = p, binary
        self._parts = [p.read_bytes()] if p.exists() else []
        self._dirty = not self._parts  # the object exists from the first flush on
        self.closed = False

    def write(self, data: str | bytes) -> int:
        self._parts.append(data if self._binary else data.encode("utf-8"))
        self._dirty = True
        return len(data)

    def flush(self) -> None:
        if self._dirty:
            self._path.write_bytes(b"".join(self._parts))
            self._dirty = False

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


def open_append(p: str | os.PathLike, *, binary: bool = False):
    """A file open for appending (text, or bytes with `binary`), with write/flush/close;
    locally a real file."""
    if not is_remote(p):
        os.makedirs(os.path.dirname(os.fspath(p)) or ".", exist_ok=True)
        return open(p, "ab") if binary else open(p, "a", encoding="utf-8")
    return _ObjectAppender(path(p), binary)


# ---------------------------------------------------------------------------
# Google Cloud Storage specifics (what epath has no call for)


def _gcs_parts(url: str) -> tuple[str, str]:
    bucket, _, name = os.fspath(url).removeprefix("gs://").partition("/")
    return bucket, name


def _gcs_client():
    from google.cloud import storage  # gcsfs's dependency; only gs:// run dirs need it

    return storage.Client()


def check_writable(p: str | os.PathLike, flag: str = "MODEL_DIR", *, lock: bool = True) -> None:
    """Before anything is written: a directory on an object store must be in a bucket
    that exists and, for a run directory (`lock`), on a store this layer can lock (gs://).
    Local paths pass."""
    if not is_remote(p):
        return
    url = os.fspath(p)
    if lock and not url.startswith("gs://"):
        raise ValueError(
            f"{flag}={url!r} is on an object store this project cannot lock: a run "
            "directory is locked with a generation-matched create, which only gs:// "
            "(Google Cloud Storage) is wired for here. Use a gs:// bucket, or a local or "
            "NFS path (locked with flock).")
    if not url.startswith("gs://"):
        return  # another store (s3://, ...): its own client reports a missing bucket
    bucket, _ = _gcs_parts(url)
    if not bucket or _gcs_client().lookup_bucket(bucket) is None:
        raise FileNotFoundError(
            f"{flag}={url!r}: the bucket gs://{bucket} does not exist (or these "
            "credentials cannot see it); nothing was written. Create it first (`gcloud "
            f"storage buckets create gs://{bucket} --location=<the TPUs' region>`), or "
            f"fix the name in {flag}.")


class LockHeldError(RuntimeError):
    """The lock object exists and its holder renewed it within the lease."""

    def __init__(self, holder: str, age_s: float, lease_s: float):
        super().__init__(holder)
        self.holder, self.age_s, self.lease_s = holder, age_s, lease_s


@dataclasses.dataclass
class _Held:
    generation: int


class ObjectLock:
    """A lease on `url` (a gs:// object), for one trainer per run directory.

    Taking it: create the object with `ifGenerationMatch=0` (only if absent). If it
    exists, its holder's last renewal (the object's `updated` time) decides: within
    `lease_s` the lock is held (LockHeldError, nothing changes); older, its holder is
    taken to be dead (killed, its machine gone) and the lock is taken over by a write
    matched to the generation that was read, so of two trainers racing for it one wins.
    A thread renews it every lease/3 (again generation-matched: a holder whose lock was
    taken over stops renewing and logs an error). Released by deleting it. A run killed
    with SIGKILL leaves the object behind: the next run takes over once the lease has
    passed (`T5X_LIKE_RUN_LOCK_LEASE_S`, default 300 s), or at once if it is deleted.
    """

    def __init__(self, url: str, lease_s: float | None = None):
        if not os.fspath(url).startswith("gs://"):
            raise ValueError(f"{url}: only gs:// objects can be locked here.")
        self.url = os.fspath(url)
        self.lease_s = float(lease_s or os.environ.get(LEASE_ENV) or DEFAULT_LEASE_S)
        self._held: _Held | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _blob(self, client=None):
        bucket, name = _gcs_parts(self.url)
        return (client or _gcs_client()).bucket(bucket).blob(name)

    def _record(self) -> str:
        return json.dumps({"holder": f"process {os.getpid()} on {socket.gethostname()}",
                           "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "lease_s": self.lease_s})

    def acquire(self) -> None:
        """Takes the lock, or raises LockHeldError (nothing changed)."""
        from google.api_core import exceptions

        client = _gcs_client()
        blob = self._blob(client)
        try:
            try:
                blob.upload_from_string(self._record(), if_generation_match=0)
            except exceptions.PreconditionFailed:
                self._take_over_if_stale(client, blob)
        except exceptions.PreconditionFailed:  # another trainer won the same race
            raise LockHeldError("another trainer that took it at the same moment", 0.0,
                                self.lease_s) from None
        self._held = _Held(blob.generation)
        self._thread = threading.Thread(target=self._renew, args=(client,), daemon=True,
                                        name="t5x_like-run-lock")
        self._thread.start()

    def _take_over_if_stale(self, client, blob) -> None:
        current = blob.bucket.get_blob(blob.name, client=client)
        if current is None:  # released between the two calls
            blob.upload_from_string(self._record(), if_generation_match=0)
            return
        age = time.time() - current.updated.timestamp()
        holder = _holder_of(current.download_as_text())
        if age < self.lease_s:
            raise LockHeldError(holder, age, self.lease_s)
        log.warning("%s: taking over the lock of %s, not renewed for %.0f s (lease %.0f s)",
                    self.url, holder, age, self.lease_s)
        blob.upload_from_string(self._record(), if_generation_match=current.generation)

    def _renew(self, client) -> None:
        from google.api_core import exceptions

        while not self._stop.wait(self.lease_s / 3):
            blob = self._blob(client)
            try:
                blob.upload_from_string(self._record(),
                                        if_generation_match=self._held.generation)
                self._held = _Held(blob.generation)
            except exceptions.PreconditionFailed:
                log.error("%s was taken over by another trainer: this run no longer holds "
                          "its run directory. Stop one of them.", self.url)
                return
            except Exception as e:  # a passing network error: try again next period
                log.warning("%s: renewing the run lock failed (%s); retrying", self.url, e)

    def release(self) -> None:
        from google.api_core import exceptions

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._held is not None:
            try:  # only our own generation (GCS honours the precondition on delete)
                self._blob().delete(if_generation_match=self._held.generation)
            except (exceptions.NotFound, exceptions.PreconditionFailed):
                pass
            self._held = None


def _holder_of(text: str) -> str:
    try:
        record: dict[str, Any] = json.loads(text)
        return f"{record['holder']} since {record['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"
