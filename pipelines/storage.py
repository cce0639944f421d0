"""Storage access and its retry policy: the one place the project resolves a URI, reads, writes, lists and copies.

Storage faults are weather. A run over object storage meets throttling (S3 ``SlowDown``, HTTP 503), 5xx answers,
connection resets, refused connections while an endpoint restarts, and timeouts; each is retried here, with
exponential backoff and jitter, until it passes or a total deadline runs out. They never end a run or reset its
position. Errors that no retry can fix (a bad bucket name, missing credentials, access denied, a path that does not
exist, a full disk) are raised at once, a storage setting error naming the setting to change.

* :func:`is_transient` classifies an error (its type, errno and, for pyarrow's S3 and GCS file systems, the service's
  error code in the message; the whole exception chain is looked at).
* :func:`retry` calls a function until it succeeds, raises a non-transient error, or :class:`RetryPolicy`'s deadline
  (``IBOT_STORAGE_RETRY_S``, default 600 s) is spent: then :class:`StorageUnavailableError`, still transient (a
  worker group restarted by Ray Train retries again from its checkpoint).
* :func:`resolve` turns a local path or URI (``s3://``, ``gs://``, ``file://``) into ``(filesystem, path)``. A remote
  file system comes back wrapped in :class:`RetryingFileSystem`: every operation on it, by this project or by Ray
  (Ray Train's checkpoint-manager snapshot, checkpoint downloads, Ray Data read tasks) is retried. Its reads resume at
  the byte where a connection broke; its writes are spooled and uploaded whole at close, so an upload can be
  repeated and a reader never sees half an object. A local file system is not wrapped (no local error is transient).
  An error of a setting met by any operation on it (access denied, no such bucket, bad credentials) is raised as
  :class:`StorageConfigError` naming the setting the file system was opened for.
* The operations the project needs beyond a file system's own: :func:`read_bytes` and :func:`read_text` (None when
  missing), :func:`write_bytes` and :func:`write_text` (whole, atomic), :func:`delete`, :func:`copy_to` (a local file
  or folder to storage, each file's upload retried whole), :func:`copy_from`, :func:`upload_checkpoint` (Ray Train's
  ``checkpoint_upload_fn``) and :func:`local_checkpoint` (a checkpoint as a local folder).

The policy is per operation: a single read, listing page or upload waits out an outage of up to the deadline; the
backoff starts at 0.5 s and doubles to at most 30 s between attempts, each delay drawn uniformly from [50 %, 100 %]
of that (jitter: many workers retrying do not hit the service in step). Retries are logged as one warning per
operation (and another every minute while it lasts), never per attempt.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Environment variable: the retry deadline of one storage operation, in seconds (default :data:`DEADLINE_S`).
RETRY_DEADLINE_ENV = "IBOT_STORAGE_RETRY_S"
#: How long one storage operation is retried before :class:`StorageUnavailableError` (seconds).
DEADLINE_S = 600.0
#: The first backoff and the cap of the exponential backoff between attempts (seconds).
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: While an operation keeps failing, a warning at most this often (seconds).
WARN_EVERY_S = 60.0
#: Writes to a remote file system are spooled in memory up to this size, then in a local temporary file.
SPOOL_MEMORY_BYTES = 16 * 2**20
#: Copy chunk of uploads and downloads (bytes).
COPY_CHUNK_BYTES = 64 * 2**20


class StorageConfigError(ValueError):
    """A storage setting is wrong (bad URI or bucket, no credentials, access denied); no retry can fix it. The
    message starts with the setting to change (``data.source: ...``, ``--storage: ...``)."""


class StorageUnavailableError(OSError):
    """Storage stayed unreachable (transient errors only) for a whole retry deadline. Still transient: nothing was
    lost, and a restart (of the worker group, or of the command) continues from the last checkpoint."""


# ---- classification ----------------------------------------------------------------------------------------------

_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                               errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EPIPE,
                               errno.EAGAIN})
#: Service error codes and transport failures in the messages of pyarrow's S3 (AWS SDK) and GCS file systems.
_TRANSIENT_MESSAGE = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTLING|REQUEST_TIMEOUT)\b"
    r"|HTTP status (429|5\d\d)\b"
    r"|curlCode: (6|7|18|28|52|55|56)\b"
    r"|google::cloud::Status\((UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|INTERNAL)\b"
    r"|Connection reset by peer|Connection refused|Broken pipe|timed out|Timeout was reached")
#: Errors of a setting: credentials, permissions, a bucket that does not exist.
_CONFIG_MESSAGE = re.compile(
    r"AWS Error (ACCESS_DENIED|NO_SUCH_BUCKET|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|"
    r"REQUEST_TIME_TOO_SKEWED|INVALID_BUCKET_NAME|MISSING_AUTHENTICATION_TOKEN)\b"
    r"|HTTP status (400|401|403|404)\b"
    r"|google::cloud::Status\((PERMISSION_DENIED|UNAUTHENTICATED|NOT_FOUND|INVALID_ARGUMENT)\b")
_NEVER_TRANSIENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
                    StorageConfigError)


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and what it wraps: ``__cause__`` / ``__context__``, and Ray's wrappers (``cause``, ``_base_exc``)."""
    seen: set[int] = set()
    todo = [e]
    while todo and len(seen) < 8:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [getattr(x, "_base_exc", None), getattr(x, "cause", None), x.__cause__, x.__context__]


def is_transient(e: BaseException) -> bool:
    """Whether a storage error may pass when retried: an unreachable endpoint, throttling, a 5xx answer, a reset
    connection, a timeout, or :class:`StorageUnavailableError`. Not transient: a path that does not exist, access
    denied, missing credentials, a bad bucket name, a full disk, and any error that is not about storage."""
    for x in _chain(e):
        if isinstance(x, StorageUnavailableError):
            return True
        if isinstance(x, _NEVER_TRANSIENT):
            return False
        text = str(x)
        if isinstance(x, OSError) and _CONFIG_MESSAGE.search(text):
            return False
        if isinstance(x, (ConnectionError, TimeoutError)):
            return True
        if isinstance(x, OSError) and (x.errno in _TRANSIENT_ERRNOS or _TRANSIENT_MESSAGE.search(text)):
            return True
    return False


def config_problem(e: BaseException) -> Optional[str]:
    """What a non-transient storage error says about the settings (credentials, access, a missing bucket or path),
    in a few words for a message; None when it is not one of those."""
    for x in _chain(e):
        text = str(x)
        if isinstance(x, FileNotFoundError) or "NO_SUCH_BUCKET" in text or "HTTP status 404" in text:
            return "it does not exist (check the bucket and path)"
        if isinstance(x, PermissionError) or re.search(r"ACCESS_DENIED|PERMISSION_DENIED|HTTP status 403", text):
            return ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE, the node's instance "
                    "role, GOOGLE_APPLICATION_CREDENTIALS) and the bucket's permissions")
        if re.search(r"INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|MISSING_AUTHENTICATION_TOKEN|UNAUTHENTICATED"
                     r"|HTTP status 401", text):
            return "the credentials are missing or invalid (AWS_ACCESS_KEY_ID / AWS_PROFILE, the instance role)"
        if "REQUEST_TIME_TOO_SKEWED" in text:
            return "this machine's clock is off (sync it with NTP)"
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return "no space left on the device"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# ---- the retry policy ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter and a total deadline, per storage operation."""

    deadline_s: float = DEADLINE_S
    first_backoff_s: float = FIRST_BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S

    @classmethod
    def current(cls) -> RetryPolicy:
        """The default policy, with the deadline from ``IBOT_STORAGE_RETRY_S`` when set."""
        raw = os.environ.get(RETRY_DEADLINE_ENV)
        return cls(deadline_s=float(raw)) if raw else cls()

    def backoff(self, attempt: int) -> float:
        """The wait before retry ``attempt`` (0-based): ``first * 2**attempt`` capped, times a uniform [0.5, 1)."""
        return min(self.max_backoff_s, self.first_backoff_s * 2.0 ** min(attempt, 30)) * random.uniform(0.5, 1.0)


def retry(fn: Callable[[], T], what: str, *, policy: Optional[RetryPolicy] = None,
          on_retry: Optional[Callable[[BaseException], None]] = None) -> T:
    """``fn()``, retried while it raises transient storage errors (:func:`is_transient`) for up to the policy's
    deadline; a non-transient error is raised at once. ``what`` names the operation in logs and errors
    (``"read s3://bucket/key"``). ``on_retry(error)`` runs before each new attempt (e.g. reopen a stream)."""
    policy = policy or RetryPolicy.current()
    start = time.monotonic()
    attempt = 0
    warned = None
    while True:
        try:
            result = fn()
        except Exception as e:
            if not is_transient(e) or isinstance(e, StorageUnavailableError):  # the latter spent a deadline already
                raise
            waited = time.monotonic() - start
            if waited >= policy.deadline_s:
                raise StorageUnavailableError(
                    f"{what}: storage still unavailable after {waited:.0f} s of retries "
                    f"({RETRY_DEADLINE_ENV}={policy.deadline_s:g}); last error {_first_line(e)}") from e
            if warned is None or time.monotonic() - warned >= WARN_EVERY_S:
                log.warning("storage: %s failed (%s); retrying with backoff for up to %.0f s more", what,
                            _first_line(e), policy.deadline_s - waited)
                warned = time.monotonic()
            time.sleep(max(0.0, min(policy.backoff(attempt), policy.deadline_s - waited)))
            attempt += 1
            if on_retry is not None:
                on_retry(e)
            continue
        if attempt:
            log.warning("storage: %s succeeded after %d retries (%.1f s)", what, attempt, time.monotonic() - start)
        return result


# ---- the retrying file system --------------------------------------------------------------------------------------


class _ResumableReader(io.RawIOBase):
    """A remote file read at explicit offsets (``read_at``): a read that fails transiently is retried from the same
    offset on a reopened file, so a broken connection costs the bytes in flight, never the bytes already read."""

    def __init__(self, handler: _RetryingHandler, path: str) -> None:
        super().__init__()
        self._handler, self._fs, self._path, self._name = handler, handler.fs, path, handler._name(path)
        self._file = handler._retry(lambda: self._fs.open_input_file(path), f"open {self._name}")
        self._size = self._file.size()
        self._pos = 0

    def _reopen(self, _e: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        self._file = self._handler._retry(lambda: self._fs.open_input_file(self._path), f"reopen {self._name}")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + int(offset))
        return self._pos

    def size(self) -> int:
        return self._size

    def read(self, nbytes: int = -1):
        n = self._size - self._pos if nbytes is None or nbytes < 0 else min(int(nbytes), self._size - self._pos)
        if n <= 0:
            return b""
        pos = self._pos
        data = retry(lambda: self._file.read_at(n, pos), f"read {self._name} at byte {pos}", on_retry=self._reopen)
        self._pos += len(data)
        return data

    def readall(self):
        return self.read(-1)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._file.close()
        super().close()


class _SpooledUpload(io.RawIOBase):
    """A remote file written locally first (in memory, then a temporary file) and uploaded whole at ``close``, with
    retries: each attempt uploads the complete object again, and an object store shows a new object only once
    complete, so a reader never sees part of it."""

    def __init__(self, handler: _RetryingHandler, path: str, metadata: Any) -> None:
        super().__init__()
        self._handler, self._fs, self._path, self._metadata = handler, handler.fs, path, metadata
        self._name = handler._name(path)
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        self._written = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, data) -> int:
        n = self._spool.write(data)
        self._written += n
        return n

    def _upload(self) -> None:
        self._spool.seek(0)
        out = self._fs.open_output_stream(self._path, metadata=self._metadata)
        try:
            while chunk := self._spool.read(COPY_CHUNK_BYTES):
                out.write(chunk)
        except BaseException:
            with contextlib.suppress(Exception):
                out.close()
            raise
        out.close()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._handler._retry(self._upload, f"write {self._name}")
        finally:
            self._spool.close()
            super().close()


class _RetryingHandler(pafs.FileSystemHandler):
    """:class:`RetryingFileSystem`'s handler: every call on the wrapped file system goes through :func:`retry`, and
    an error of a setting (access denied, no such bucket, bad credentials) becomes a :class:`StorageConfigError`
    naming the setting the file system was opened for."""

    def __init__(self, fs: pafs.FileSystem, scheme: str, setting: str = "the storage setting") -> None:
        self.fs = fs
        self.scheme = scheme  # "s3://": prefixed to paths in messages
        self.setting = setting

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        try:
            return retry(fn, what)
        except OSError as e:
            if isinstance(e, (FileNotFoundError, StorageUnavailableError)) or not _CONFIG_MESSAGE.search(str(e)):
                raise
            raise StorageConfigError(f"{self.setting}: {what} failed: {config_problem(e)} ({_first_line(e)})") from e

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RetryingHandler) and self.fs.equals(other.fs)

    def __hash__(self) -> int:
        return hash(self.scheme)

    def _name(self, path: str) -> str:
        return f"{self.scheme}{path}"

    def get_type_name(self) -> str:
        return f"retrying-{self.fs.type_name}"

    def equals(self, other: pafs.FileSystem) -> bool:
        return isinstance(other, pafs.PyFileSystem) and self == other.handler

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._retry(lambda: self.fs.get_file_info(paths), f"stat {self._name(paths[0]) if paths else ''}")

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retry(lambda: self.fs.get_file_info(selector), f"list {self._name(selector.base_dir)}")

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry(lambda: self.fs.create_dir(path, recursive=recursive), f"create {self._name(path)}")

    def _idempotent(self, fn: Callable[[], None], what: str) -> None:
        """A delete or move retried after an attempt whose answer was lost may find its work done: not an error."""
        attempts = [0]

        def once() -> None:
            attempts[0] += 1
            try:
                fn()
            except FileNotFoundError:
                if attempts[0] == 1:
                    raise

        self._retry(once, what)

    def delete_dir(self, path: str) -> None:
        self._idempotent(lambda: self.fs.delete_dir(path), f"delete {self._name(path)}")

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
              f"empty {self._name(path)}")

    def delete_root_dir_contents(self) -> None:
        self._retry(lambda: self.fs.delete_dir_contents("/", accept_root_dir=True), "empty the root")

    def delete_file(self, path: str) -> None:
        self._idempotent(lambda: self.fs.delete_file(path), f"delete {self._name(path)}")

    def move(self, src: str, dest: str) -> None:
        self._idempotent(lambda: self.fs.move(src, dest), f"move {self._name(src)}")

    def copy_file(self, src: str, dest: str) -> None:
        self._retry(lambda: self.fs.copy_file(src, dest), f"copy {self._name(src)}")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_ResumableReader(self, path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_ResumableReader(self, path), mode="r")

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return pa.PythonFile(_SpooledUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self._retry(lambda: self.fs.open_append_stream(path, metadata=metadata), f"append to {self._name(path)}")


class RetryingFileSystem(pafs.PyFileSystem):
    """A remote pyarrow file system whose every operation is retried by :func:`retry` (module doc). Picklable: it
    travels to Ray Data read tasks and Ray Train's controller and workers, and compares equal to any other wrapper
    of an equal file system (Ray Train checks that a checkpoint lives on the run's storage file system)."""

    def __init__(self, handler: _RetryingHandler) -> None:
        super().__init__(handler)

    @classmethod
    def wrap(cls, fs: pafs.FileSystem, scheme: str, setting: str = "the storage setting") -> pafs.FileSystem:
        if isinstance(fs, (cls, pafs.LocalFileSystem)):
            return fs
        return cls(_RetryingHandler(fs, scheme, setting))

    @property
    def inner(self) -> pafs.FileSystem:
        """The wrapped file system (for bulk copies that retry per file, :func:`copy_to`)."""
        return self.handler.fs

    def __reduce__(self):
        return (self.__class__, (self.handler,))


def _inner(fs: pafs.FileSystem) -> pafs.FileSystem:
    return fs.inner if isinstance(fs, RetryingFileSystem) else fs


# ---- resolving URIs ---------------------------------------------------------------------------------------------


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names object storage or another remote file system (not a local path or ``file://``)."""
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str, *, setting: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or any URI pyarrow knows (``file://``, ``s3://``, ``gs://``): a local
    path is made absolute; a remote file system is wrapped in :class:`RetryingFileSystem`. Opening an ``s3://`` URI
    may ask the service for the bucket's region: transient errors there are retried too. A URI that cannot be opened
    raises :class:`StorageConfigError` naming ``setting``."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        fs, path = retry(lambda: pafs.FileSystem.from_uri(uri), f"open {uri}")
    except StorageUnavailableError:
        raise
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        why = config_problem(e)
        raise StorageConfigError(f"{setting}: cannot open {uri!r}: {why or e}") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return fs, path
    return RetryingFileSystem.wrap(fs, uri.split("://", 1)[0] + "://", setting), path.rstrip("/") or "/"


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """The URI of ``path`` on ``fs`` for messages (``s3://bucket/key``; a local path as it is)."""
    if isinstance(fs, RetryingFileSystem):
        return f"{fs.handler.scheme}{path}"
    return path


# ---- the operations the project needs -------------------------------------------------------------------------------


def read_bytes(uri: str, *, setting: str = "the path") -> Optional[bytes]:
    """The bytes of a local or remote file, or None when it does not exist."""
    fs, path = resolve(uri, setting=setting)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_text(uri: str, *, setting: str = "the path") -> Optional[str]:
    """The text (UTF-8) of a local or remote file, or None when it does not exist."""
    data = read_bytes(uri, setting=setting)
    return None if data is None else data.decode()


def write_bytes(uri: str, data: bytes, *, setting: str = "the path") -> None:
    """Write a whole file, replacing any old one: a reader sees the old or the new content, never a mix (a
    temporary file moved in place locally; one upload, retried whole, on object storage)."""
    fs, path = resolve(uri, setting=setting)
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    with fs.open_output_stream(path) as f:  # (object storage has no folders to create)
        f.write(data)


def write_text(uri: str, text: str, *, setting: str = "the path") -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(uri, text.encode(), setting=setting)


def delete(uri: str, *, setting: str = "the path") -> None:
    """Delete a file (a missing one is not an error)."""
    fs, path = resolve(uri, setting=setting)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def copy_to(local: str, fs: pafs.FileSystem, path: str) -> None:
    """Copy a local file or folder to ``path`` on ``fs``, file by file, each file's upload retried whole (a remote
    file system's native stream is used, not a spool: a checkpoint is not written twice on the local disk)."""
    target = _inner(fs)
    again = fs.handler._retry if isinstance(fs, RetryingFileSystem) else retry
    name = uri_of(fs, path)
    if os.path.isdir(local):
        files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names)
        again(lambda: target.create_dir(path, recursive=True), f"create {name}")
    else:
        files = [None]
    for rel in files:
        src = local if rel is None else os.path.join(local, rel)
        dst = path if rel is None else f"{path}/{rel.replace(os.sep, '/')}"
        if rel is not None and "/" in rel.replace(os.sep, "/"):
            again(lambda dst=dst: target.create_dir(dst.rsplit("/", 1)[0], recursive=True), f"create {name}")
        again(lambda src=src, dst=dst: pafs.copy_files(src, dst, destination_filesystem=target,
                                                        chunk_size=COPY_CHUNK_BYTES, use_threads=False),
              f"upload {src} to {uri_of(fs, dst)}")


def copy_from(fs: pafs.FileSystem, path: str, local: str) -> None:
    """Copy a file or folder on ``fs`` (from :func:`resolve`) to a local path; on a remote file system every read
    is retried and resumes at the byte where a connection broke, so no file is handed on truncated."""
    pafs.copy_files(path, local, source_filesystem=fs, chunk_size=COPY_CHUNK_BYTES)


def upload_checkpoint(checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """Ray Train's ``checkpoint_upload_fn`` (``ray.train.report(..., checkpoint_upload_fn=upload_checkpoint)``):
    the checkpoint folder to the run's storage, each file retried whole by :func:`copy_to`; returns the persisted
    ``ray.train.Checkpoint``. (Ray's own upload retries 3 times within ~3 s, and only on some AWS error codes: an
    outage of a minute fails the worker group, and its repeats end the run.)"""
    import ray.train

    storage = ray.train.get_context().get_storage()
    target = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    copy_to(checkpoint.path, storage.storage_filesystem, target)
    return ray.train.Checkpoint(path=target, filesystem=storage.storage_filesystem)


@contextlib.contextmanager
def local_checkpoint(checkpoint: Any) -> Iterator[str]:
    """A ``ray.train.Checkpoint`` as a local folder: ``checkpoint.as_directory()`` (on a node, one process downloads
    and the others share its copy) on the run's storage file system, which retries every read of a remote
    checkpoint (``pipelines/pretrain.py`` hands Ray Train a :class:`RetryingFileSystem`); one that reached us on a
    bare remote file system is wrapped first."""
    fs = checkpoint.filesystem
    if not isinstance(fs, (pafs.LocalFileSystem, RetryingFileSystem)):
        checkpoint = type(checkpoint)(path=checkpoint.path, filesystem=RetryingFileSystem.wrap(fs, ""))
    with checkpoint.as_directory() as d:
        yield d


__all__ = [
    "DEADLINE_S",
    "RETRY_DEADLINE_ENV",
    "RetryPolicy",
    "RetryingFileSystem",
    "StorageConfigError",
    "StorageUnavailableError",
    "config_problem",
    "copy_from",
    "copy_to",
    "delete",
    "is_remote",
    "is_transient",
    "local_checkpoint",
    "read_bytes",
    "read_text",
    "resolve",
    "retry",
    "upload_checkpoint",
    "uri_of",
    "write_bytes",
    "write_text",
]
