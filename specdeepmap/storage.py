"""URIs, rasters and files: the one place that knows about local disks and S3.

Every input and output of the library is a URI: a local path, ``file://…`` or ``s3://bucket/key``.
Rasters are opened through rasterio (GDAL reads S3 objects window by window through ``/vsis3``);
small files go through fsspec/s3fs. Writes are atomic: data is written under a temporary name and
then moved into place (local) or uploaded in one PUT (S3), so no reader ever sees half a file.

The S3 endpoint comes from the environment, as for boto3 and the AWS CLI: ``AWS_ENDPOINT_URL``
(e.g. ``http://127.0.0.1:9000`` for MinIO or moto), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``. Nothing else in the library builds S3 URLs
or touches credentials.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import rasterio
from rasterio.errors import RasterioIOError

from specdeepmap.errors import MissingInputError, UnreadableInputError

#: GDAL block cache in MB. Pinned (GDAL's default is 5 % of RAM) so memory does not grow with
#: the scene size; override with the environment variable of the same name.
DEFAULT_GDAL_CACHEMAX_MB = 256


def is_s3(uri: str) -> bool:
    """Return True for ``s3://`` URIs."""
    return str(uri).startswith("s3://")


def local_path(uri: str) -> str:
    """Turn a local URI (plain path or ``file://``) into a filesystem path."""
    uri = str(uri)
    if uri.startswith("file://"):
        return urlparse(uri).path
    return uri


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (S3) or the OS separator (local)."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(local_path(base), *parts))


def absolute(uri: str) -> str:
    """The URI with a local path made absolute (``s3://`` URIs as they are).

    What is recorded (a dataset in a model, a tag) then names the same place from another folder.
    """
    uri = str(uri)
    if is_s3(uri):
        return uri
    return os.path.abspath(local_path(uri))


def basename(uri: str) -> str:
    """Last path component of a URI."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def stem(uri: str) -> str:
    """File name without its (last) extension: ``s3://b/scene.tiff`` → ``scene``."""
    return Path(basename(uri)).stem


def parent(uri: str) -> str:
    """The folder holding a URI."""
    uri = str(uri).rstrip("/")
    if is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return str(Path(local_path(uri)).parent)


_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def check_scheme(uri: str) -> None:
    """Refuse URIs of schemes this library does not read or write (``http://``, ``gs://``…).

    One clear line, instead of "not found" for a path that looks local.
    """
    found = _SCHEME.match(str(uri))
    if found and found.group(1).lower() not in ("s3", "file"):
        from specdeepmap.errors import InvalidParameterError

        raise InvalidParameterError(
            f"{redact(str(uri))}: {found.group(1)}:// URIs are not supported (local paths, "
            "file:// and s3:// are): download the file or copy it to object storage first"
        )


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for a URI and the path to use with it."""
    check_scheme(uri)
    if is_s3(uri):
        endpoint = _endpoint()
        fs = fsspec.filesystem(
            "s3",
            client_kwargs={"endpoint_url": endpoint} if endpoint else {},
            # retries for throttling and 5xx are botocore's job; keep them bounded
            config_kwargs={"retries": {"max_attempts": 5, "mode": "standard"}},
            # other writers (GDAL, other workers) change buckets: never trust a cached listing
            use_listings_cache=False,
        )
        return fs, str(uri)[len("s3://") :]
    return fsspec.filesystem("file"), local_path(uri)


def gdal_options() -> dict[str, object]:
    """GDAL configuration for reading rasters, including the S3 endpoint from the environment."""
    options: dict[str, object] = {
        "GDAL_CACHEMAX": int(os.environ.get("GDAL_CACHEMAX", DEFAULT_GDAL_CACHEMAX_MB)),
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.vrt,.jp2,.img,.bsq,.dat",
        # a request on a dead connection fails (and is retried) instead of hanging forever
        "GDAL_HTTP_CONNECTTIMEOUT": os.environ.get("GDAL_HTTP_CONNECTTIMEOUT", "20"),
        "GDAL_HTTP_TIMEOUT": os.environ.get("GDAL_HTTP_TIMEOUT", "120"),
    }
    endpoint = _endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        options["AWS_S3_ENDPOINT"] = parsed.netloc or parsed.path
        options["AWS_HTTPS"] = "YES" if parsed.scheme == "https" else "NO"
        options["AWS_VIRTUAL_HOSTING"] = "FALSE"
    if "AWS_DEFAULT_REGION" in os.environ and "AWS_REGION" not in os.environ:
        options["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"]
    return options


def gdal_path(uri: str) -> str:
    """The path GDAL understands: ``/vsis3/bucket/key`` for S3, the plain path otherwise."""
    if is_s3(uri):
        return "/vsis3/" + str(uri)[len("s3://") :]
    return local_path(uri)


@contextlib.contextmanager
def gdal_env() -> Iterator[None]:
    """A rasterio environment configured for this library (S3 endpoint, pinned cache)."""
    with rasterio.Env(**gdal_options()):
        yield


@contextlib.contextmanager
def open_raster(uri: str, threads: int = 1) -> Iterator[rasterio.io.DatasetReader]:
    """Open a raster for windowed reading; errors name the URI and say what went wrong.

    ``threads``: how many threads decode the blocks of one read (``GDAL_NUM_THREADS``, fixed
    when the dataset opens). More than one pays for reads that span many compressed blocks,
    such as the mapper's windows (measured: a 4096² DEFLATE scene's windows read in 0.86 s on
    two threads instead of 1.36 s on one).
    """
    check_scheme(uri)
    with gdal_env():
        if not is_s3(uri) and not os.path.exists(local_path(uri)):
            raise MissingInputError(f"Raster not found: {uri}")
        try:
            with rasterio.Env(GDAL_NUM_THREADS=max(1, threads)):
                dataset = rasterio.open(gdal_path(uri))
        except RasterioIOError as error:
            if is_s3(uri) and _looks_transient(str(error)):
                # a network or server problem, not a bad file: a plain OSError, so that
                # callers (Prefect retries) may try again
                raise OSError(f"Cannot reach {uri}: {error}") from error
            if is_s3(uri) and not exists(uri):
                raise MissingInputError(f"Raster not found: {uri}") from error
            dataset = _reopen_uncached(uri, error) if is_s3(uri) else None
            if dataset is None:
                raise UnreadableInputError(f"Cannot read {uri} as a raster: {error}") from error
        with dataset:
            try:
                yield dataset
            except RasterioIOError as error:
                # (only if GDAL's error chain is about this file, not another one)
                if is_s3(uri) and os.path.basename(uri) in _messages(error):
                    # a block of an object that opened fine could not be fetched: the
                    # network or the server failed mid-read (a ConnectionError, retried)
                    raise ConnectionError(
                        f"Reading {uri} failed mid-way: {_messages(error)}"
                    ) from error
                raise


def _messages(error: BaseException) -> str:
    """The messages of an exception and of the errors that caused it (GDAL chains them)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return " <- ".join(parts)


def _clear_gdal_cache(path: str) -> None:
    """Drop GDAL's cached properties of one /vsis3 path (VSICurlPartialClearCache)."""
    import ctypes
    import glob

    libs = glob.glob(
        os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs", "libgdal*.so*")
    )
    names = libs or ["libgdal.so"]
    for name in names:
        try:
            ctypes.CDLL(name).VSICurlPartialClearCache(path.encode())
            return
        except (OSError, AttributeError):
            continue


def _reopen_uncached(uri: str, error: Exception) -> rasterio.io.DatasetReader | None:
    """Open an S3 raster again after dropping GDAL's cached view of it.

    After an outage GDAL remembers the object as missing; s3fs just said it exists, so one
    more try with a clean cache tells a stale cache from a broken file.
    """
    _clear_gdal_cache(gdal_path(uri))
    try:
        return rasterio.open(gdal_path(uri))
    except RasterioIOError:
        return None


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URI masked, so
    URIs can be logged and shown (an MLflow tracking URI may carry basic-auth credentials).
    """
    return re.sub(r"(?<=://)([^/\s:@]+):([^/\s@]+)@", r"\1:***@", text)


def is_transient(error: BaseException) -> bool:
    """True for errors a retry can fix: network failures, timeouts, throttling, S3 5xx.

    Bad input (any :class:`SpecDeepMapError`, a missing key) and programming errors are not.
    """
    from specdeepmap.errors import SpecDeepMapError

    if isinstance(error, SpecDeepMapError | FileNotFoundError | PermissionError):
        return False
    if isinstance(error, TimeoutError | ConnectionError):
        return True
    try:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            ReadTimeoutError,
        )
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        ClientError = ConnectionClosedError = EndpointConnectionError = ReadTimeoutError = ()
    if isinstance(error, EndpointConnectionError | ConnectionClosedError | ReadTimeoutError):
        return True
    if ClientError and isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
    if isinstance(error, FileExistsError | IsADirectoryError | NotADirectoryError):
        return False  # a local path problem: the same on every try
    if isinstance(error, OSError):  # GDAL/curl and socket errors surface as OSError
        return _looks_transient(str(error)) or error.errno in _NETWORK_ERRNOS
    return False


#: errno values of network failures a retry can fix (a full disk, a read-only filesystem or
#: a bad path is not one of them)
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "ETIMEDOUT",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "EPIPE",
        "EAGAIN",
    )
    if hasattr(errno, name)
)


def _looks_transient(message: str) -> bool:
    message = message.lower()
    return any(
        word in message
        for word in (
            "curl",
            "connect",
            "timed out",
            "timeout",
            "http response code: 5",
            "slow down",
            "temporarily",
        )
    )


def fingerprint(uri: str) -> str:
    """A short digest of what identifies a file's content cheaply: its size and its ETag (S3)
    or modification time (local). A file replaced under the same name gets another one.
    """
    import hashlib

    fs, path = filesystem(uri)
    info = fs.info(path)
    stamp = (
        info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    )
    return hashlib.blake2b(f"{info.get('size')}|{stamp}".encode(), digest_size=8).hexdigest()


def exists(uri: str) -> bool:
    """True if a file (or S3 object) exists at the URI."""
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def list_files(folder: str, suffix: str | tuple[str, ...] = "") -> list[str]:
    """URIs of the files directly inside ``folder`` whose names end with ``suffix`` (or one of
    several), sorted.

    Sorted so that every run, on every filesystem, sees the same order (SpecDeepMap used the
    unsorted glob order, which made seeded splits differ between machines).
    """
    fs, path = filesystem(folder)
    if not fs.exists(path):
        return []
    names = [basename(p) for p in fs.ls(path, detail=False)]
    return sorted(
        join(folder, n) for n in names if n.endswith(suffix) and not TEMPORARY_NAME.match(n)
    )


def read_bytes(uri: str) -> bytes:
    """Read a whole (small) file.

    One request (``cat_file``), not open-then-read: on object storage opening takes the
    object's version and a read that follows a concurrent overwrite (another process's
    ``resume.json``, a model replaced) would fail with "file expired"; a single GET returns
    one whole version, the old or the new.
    """
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as error:
        raise MissingInputError(f"File not found: {uri}") from error


def read_text(uri: str) -> str:
    """Read a whole (small) text file as UTF-8 (a byte-order mark is dropped).

    Raises:
        UnreadableInputError: the file is not UTF-8 text (e.g. saved as Latin-1).
    """
    data = read_bytes(uri)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UnreadableInputError(
            f"{uri} is not UTF-8 text (byte {error.start} is 0x{data[error.start]:02x}): save "
            "it as UTF-8"
        ) from None


def check_writable_folder(uri: str, what: str) -> None:
    """Fail before any work when files cannot be written into the folder or prefix ``uri``.

    ``what`` names the output in the message. On S3 the bucket is asked for; locally the folder
    is made and a file is created in it and removed.

    Raises:
        InvalidParameterError: the folder cannot be made or written.
    """
    from specdeepmap.errors import InvalidParameterError

    if is_s3(uri):
        check_bucket(uri)
        return
    folder = os.path.abspath(local_path(uri))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise InvalidParameterError(f"{what} is not writable: {error.strerror or error}") from None


def makedirs(uri: str) -> None:
    """Create a local folder (and parents); S3 has no folders, so nothing to do there."""
    if not is_s3(uri):
        os.makedirs(local_path(uri), exist_ok=True)


#: the temporary files of :func:`atomic_output` (never listed: they are not outputs yet);
#: other names starting with a dot, such as a scene called ``.scene``, are ordinary files
TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp[^/]*$")


@contextlib.contextmanager
def atomic_output(uri: str, suffix: str | None = None) -> Iterator[str]:
    """Yield a local temporary path; on success move (local) or upload (S3) it to ``uri``.

    The temporary file lives beside the target for local outputs (so the final ``os.replace`` is
    atomic on the same filesystem) and in the system temporary folder for S3 outputs (an S3 PUT
    makes the object appear whole). On error the temporary file is removed and the target is
    left as it was.
    """
    suffix = suffix if suffix is not None else Path(basename(uri)).suffix
    if is_s3(uri):
        staging = tempfile.mkdtemp(prefix="specdeepmap-")
        tmp = os.path.join(staging, f"part{suffix}")
        try:
            yield tmp
            upload(tmp, uri)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        target = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        tmp = os.path.join(
            os.path.dirname(os.path.abspath(target)),
            f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp{suffix}",
        )
        try:
            yield tmp
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def upload(local_file: str, uri: str) -> None:
    """Copy a local file to a URI (one PUT for S3; an atomic move-into-place locally)."""
    if is_s3(uri):
        fs, path = filesystem(uri)
        fs.put_file(local_file, path)
    else:
        with atomic_output(uri) as tmp:
            shutil.copyfile(local_file, tmp)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically."""
    with atomic_output(uri) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text(uri: str, text: str) -> None:
    """Write a whole text file (UTF-8) atomically."""
    write_bytes(uri, text.encode("utf-8"))


def remove(uri: str) -> None:
    """Delete a file or S3 object (nothing when it is not there)."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def move(source: str, target: str) -> None:
    """Move a file within one store (a rename locally; a copy, then a delete, on S3).

    The target's folder is created; an existing target is replaced.
    """
    fs, path = filesystem(source)
    _, target_path = filesystem(target)
    if not is_s3(target):
        os.makedirs(os.path.dirname(target_path) or ".", exist_ok=True)
        os.replace(path, target_path)
        return
    fs.copy(path, target_path)
    fs.rm_file(path)


def download(uri: str, local_file: str) -> str:
    """Copy a URI to a local file (atomically) and return the local path."""
    os.makedirs(os.path.dirname(os.path.abspath(local_file)), exist_ok=True)
    tmp = f"{local_file}.{uuid.uuid4().hex[:8]}.part"
    fs, path = filesystem(uri)
    try:
        fs.get_file(path, tmp)
        os.replace(tmp, local_file)
    except FileNotFoundError as error:
        raise MissingInputError(f"File not found: {uri}") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return local_file


def cached_local_copy(uri: str, cache_dir: str) -> str:
    """Local path of ``uri``: the path itself when local, else a copy cached under ``cache_dir``.

    The cache key is the S3 path, so later epochs (and later runs) read the local copy. A key
    that would lead outside ``cache_dir`` (``..`` parts) is cached under its hash instead.
    """
    if not is_s3(uri):
        return local_path(uri)
    root = os.path.abspath(cache_dir)
    target = os.path.abspath(os.path.join(root, str(uri)[len("s3://") :]))
    if os.path.commonpath([root, target]) != root or target == root:
        target = os.path.join(root, "by-hash", _hash(uri) + "-" + basename(uri)[-64:])
    if not os.path.exists(target):
        download(uri, target)
    return target


def private_cache_dir(name: str) -> str:
    """A cache folder only this user can read (``$SPECDEEPMAP_CACHE`` or
    ``~/.cache/specdeepmap``, then ``name``): created with mode 0700, refused when another
    user owns it or others may write to it (files placed there would be trusted later).
    """
    import stat

    base = os.environ.get("SPECDEEPMAP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "specdeepmap",
    )
    folder = os.path.join(base, name)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for path in (base, folder):
        info = os.stat(path)
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            from specdeepmap.errors import InvalidParameterError

            raise InvalidParameterError(
                f"Cache folder {path} is not private (owner uid {info.st_uid}, mode "
                f"{stat.filemode(info.st_mode)}): make it yours with mode 0700, or set "
                "SPECDEEPMAP_CACHE to a private folder"
            )
    os.chmod(folder, 0o700)
    return folder


def content_key(path: str) -> str:
    """A cache key for a local file's content: the first 20 hex digits of its SHA-256."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def cached_version(uri: str, cache_dir: str) -> str:
    """Local copy of a remote file, re-downloaded when the object changes: the cache key is the
    object's identity (URI hash + :func:`fingerprint`: size and ETag), never a path built from
    the key, so every key stays inside ``cache_dir``. Local paths are returned as they are.
    """
    if not is_s3(uri):
        return local_path(uri)
    suffix = os.path.splitext(basename(uri))[1][:16]
    target = os.path.join(cache_dir, f"{_hash(uri)}-{fingerprint(uri)}{suffix}")
    if not os.path.exists(target):
        download(uri, target)
        os.chmod(target, 0o600)
    return target


def _hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:24]


def check_bucket(uri: str) -> None:
    """Fail at once when the bucket of an ``s3://`` URI does not exist or is not ours.

    Asks the store directly (``HeadBucket``): an unreachable endpoint raises its connection
    error (transient: retried by tasks), not a misleading "no such bucket".
    """
    from specdeepmap.errors import MissingInputError

    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise MissingInputError(f"{redact(uri)}: bucket {bucket} does not exist") from None
    except PermissionError as error:
        raise PermissionError(f"{redact(uri)}: no access to bucket {bucket} ({error})") from None
