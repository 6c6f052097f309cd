"""One way to reach objects on any fsspec URL: open, list, publish whole, tensors as safetensors.

URLs are local paths, ``file://``, ``s3://bucket/key`` or ``memory://`` (tests). S3 endpoint
and credentials come from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) or from :func:`configure`;
they are passed to s3fs explicitly and never logged.

Every write is published whole: local files go to a temporary name in the same directory and
are renamed into place; object stores get one PUT of the finished bytes. A reader never sees a
partial object, and an interrupted write leaves nothing under the final name.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from typing import TYPE_CHECKING, Any

import fsspec

if TYPE_CHECKING:  # torch loads on the first tensor read or write, not with the CLI's --help
    import torch

_S3_OPTIONS: dict[str, Any] = {}
DEFAULT_RETRIES = 10  # as config.StorageConfig: a multi-hour run outlives a throttled minute
DEFAULT_CONNECT_TIMEOUT = 10.0
# s3fs retries on its own too, around each botocore call (5 times by default), which would
# multiply botocore's attempts: one more try there is kept for what botocore cannot see, a
# response body cut off mid-read.
S3FS_ATTEMPTS = 2
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class StorageError(RuntimeError):
    """An object could not be read or written; the message names the URL."""


def configure(s3: dict[str, Any] | None = None) -> None:
    """Set S3 options (``endpoint_url``, ``key``, ``secret``, ``region``, ``retries``,
    ``connect_timeout``) for this process.

    Values given here win over the environment. They hold in this process only: a Ray task or
    actor applies them again (:func:`apply_settings`, or :func:`configure` with
    :func:`current_options` carried from the driver) before it touches storage.
    """
    _S3_OPTIONS.clear()
    _S3_OPTIONS.update({k: v for k, v in (s3 or {}).items() if v is not None})


def options_of(settings: Any) -> dict[str, Any]:
    """The S3 options a run's ``storage`` config section gives (``storage.s3_endpoint_url``,
    ``storage.retries``, ``storage.connect_timeout``)."""
    return {"endpoint_url": settings.s3_endpoint_url, "retries": settings.retries,
            "connect_timeout": settings.connect_timeout}


def apply_settings(settings: Any) -> None:
    """Configure this process from a run's ``storage`` config section. Every stage, Ray task,
    actor and Ray Train worker calls it first, from the config it receives."""
    configure(options_of(settings))


def current_options() -> dict[str, Any]:
    """The options :func:`configure` set in this process, to carry into Ray tasks."""
    return dict(_S3_OPTIONS)


def s3_options() -> dict[str, Any]:
    """The keyword arguments for ``s3fs.S3FileSystem``, from :func:`configure` and the env."""
    endpoint = (
        _S3_OPTIONS.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    options: dict[str, Any] = {}
    if endpoint:
        options["endpoint_url"] = endpoint
    key = _S3_OPTIONS.get("key") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = _S3_OPTIONS.get("secret") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options["key"], options["secret"] = key, secret
    region = _S3_OPTIONS.get("region") or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION"
    )
    if region:
        options["client_kwargs"] = {"region_name": region}
    # botocore retries what is transient (throttling, 5xx, timeouts, dropped connections) with
    # exponential backoff, slowing down further when throttled ("adaptive"); a permanent error
    # (no such bucket or key, access denied) is not retried and fails at once.
    options["config_kwargs"] = {
        "connect_timeout": _S3_OPTIONS.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        "read_timeout": 60,
        "retries": {"max_attempts": _S3_OPTIONS.get("retries", DEFAULT_RETRIES),
                    "mode": "adaptive"},
    }
    return options


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it.

    Made afresh in the calling process (s3fs instances are not fork-safe), cached by fsspec.
    """
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = s3_options() if protocol in ("s3", "s3a") else {}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as error:
        raise StorageError(f"cannot open storage URL {url!r}: {error}") from error
    if protocol in ("s3", "s3a"):
        fs.retries = S3FS_ATTEMPTS
    return fs, path


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers run in other directories); URLs unchanged."""
    if not url or "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/', keeping the scheme."""
    return posixpath.join(url.rstrip("/"), *parts)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except Exception as error:  # botocore/aiohttp raise many kinds; name the URL.
        raise StorageError(f"cannot reach {url}: {error}") from error


def list_files(url: str, pattern: str = "*") -> list[str]:
    """Sorted full URLs of the objects directly under ``url`` that match ``pattern``."""
    fs, path = filesystem(url)
    protocol = fsspec.core.split_protocol(url)[0]
    try:
        fs.invalidate_cache(path)
        found = fs.glob(posixpath.join(path.rstrip("/"), pattern))
    except FileNotFoundError:
        return []
    except Exception as error:
        raise StorageError(f"cannot list {url}: {error}") from error
    if protocol in (None, "file"):
        return sorted(found)
    return sorted(f"{protocol}://{p.split('://', 1)[-1]}" for p in found)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as error:
        raise StorageError(f"missing object: {url}") from error
    except Exception as error:
        raise StorageError(f"cannot read {url}: {error}") from error


def open_read(url: str):
    """A binary file object for streaming reads (shards); the caller closes it."""
    fs, path = filesystem(url)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError as error:
        raise StorageError(f"missing object: {url}") from error
    except Exception as error:
        raise StorageError(f"cannot read {url}: {error}") from error


def publish_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` whole: readers see the old object, or all of the new one."""
    fs, path = filesystem(url)
    try:
        if fs.protocol in ("file", "local") or "file" in fs.protocol:
            directory = os.path.dirname(path) or "."
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; publish as open() would
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            # One PUT (or one completed multipart upload): atomic on object stores.
            fs.pipe_file(path, data)
            fs.invalidate_cache(path)
    except StorageError:
        raise
    except Exception as error:
        raise StorageError(f"cannot write {url}: {error}") from error


def remove(url: str) -> None:
    """Delete the object or the whole folder at ``url``; nothing there is no error."""
    fs, path = filesystem(url)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
            fs.invalidate_cache(path)
    except Exception as error:
        raise StorageError(f"cannot delete {url}: {error}") from error


def read_json(url: str) -> Any:
    raw = read_bytes(url)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise StorageError(f"{url} is not valid JSON: {error}") from error


def publish_json(url: str, value: Any) -> None:
    publish_bytes(url, json.dumps(value, indent=2, sort_keys=True).encode())


def save_tensors(url: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Publish tensors as safetensors; metadata values are stored as JSON strings."""
    from safetensors.torch import save as safetensors_save  # torch on first use only

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    encoded = {k: json.dumps(v) for k, v in metadata.items()}
    publish_bytes(url, safetensors_save(flat, metadata=encoded))


def load_metadata(url: str) -> dict[str, Any]:
    """The JSON-decoded metadata of a safetensors object, reading only its header."""
    try:
        with open_read(url) as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        return {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}
    except StorageError:
        raise
    except Exception as error:
        raise StorageError(f"{url} is not a valid safetensors file: {error}") from error


def load_tensors(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON-decoded metadata of a safetensors object (never unpickles)."""
    from safetensors.torch import load as safetensors_load  # torch on first use only

    raw = read_bytes(url)
    try:
        tensors = safetensors_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        metadata = {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}
    except Exception as error:
        raise StorageError(f"{url} is not a valid safetensors file: {error}") from error
    return tensors, metadata
