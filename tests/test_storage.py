import http.server
import os
import threading
import time

import pytest
import torch

from ead_dist import storage


@pytest.fixture(params=["local", "file", "memory"])
def base_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "file":
        return f"file://{tmp_path}/run"
    return f"memory://test-{os.getpid()}-{id(request)}"


def test_publish_read_list_round_trip(base_url):
    storage.publish_bytes(storage.join(base_url, "a", "x.bin"), b"hello")
    storage.publish_json(storage.join(base_url, "a", "y.json"), {"k": [1, 2]})
    assert storage.read_bytes(storage.join(base_url, "a", "x.bin")) == b"hello"
    assert storage.read_json(storage.join(base_url, "a", "y.json")) == {"k": [1, 2]}
    listed = storage.list_files(storage.join(base_url, "a"), "*.bin")
    assert [u.rsplit("/", 1)[-1] for u in listed] == ["x.bin"]
    assert storage.exists(listed[0])


def test_tensors_round_trip_with_json_metadata(base_url):
    tensors = {"theta": torch.randn(3, 4), "steps": torch.arange(5)}
    url = storage.join(base_url, "t.safetensors")
    storage.save_tensors(url, tensors, {"eta": 0.01, "shape": [3, 4], "name": "x"})
    loaded, metadata = storage.load_tensors(url)
    assert torch.equal(loaded["theta"], tensors["theta"])
    assert torch.equal(loaded["steps"], tensors["steps"])
    assert metadata == {"eta": 0.01, "shape": [3, 4], "name": "x"}
    assert storage.load_metadata(url) == metadata


def test_published_file_has_the_permissions_of_a_plain_write(tmp_path):
    storage.publish_bytes(str(tmp_path / "published.bin"), b"x")
    (tmp_path / "plain.bin").write_bytes(b"x")
    assert (tmp_path / "published.bin").stat().st_mode == (tmp_path / "plain.bin").stat().st_mode


def test_missing_object_names_the_url(tmp_path):
    url = str(tmp_path / "nothing.bin")
    with pytest.raises(storage.StorageError, match="nothing.bin"):
        storage.read_bytes(url)


def test_corrupt_safetensors_names_the_url(tmp_path):
    url = str(tmp_path / "bad.safetensors")
    storage.publish_bytes(url, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(storage.StorageError, match="bad.safetensors"):
        storage.load_tensors(url)


def test_interrupted_local_write_leaves_old_object_and_no_partial(tmp_path):
    url = str(tmp_path / "obj.bin")
    storage.publish_bytes(url, b"old")

    class Interrupted(Exception):
        pass

    original_replace = os.replace

    def failing_replace(src, dst):
        raise Interrupted("killed between write and publish")

    os.replace = failing_replace
    try:
        with pytest.raises(storage.StorageError, match="obj.bin"):
            storage.publish_bytes(url, b"new" * 1000)
    finally:
        os.replace = original_replace
    assert storage.read_bytes(url) == b"old"
    assert sorted(os.listdir(tmp_path)) == ["obj.bin"]  # the temporary file is gone


@pytest.mark.s3
def test_s3_round_trip_through_http_endpoint(s3_bucket):
    url = storage.join(s3_bucket, "run", "t.safetensors")
    storage.save_tensors(url, {"g_D": torch.ones(7)}, {"count": 60000})
    loaded, metadata = storage.load_tensors(url)
    assert torch.equal(loaded["g_D"], torch.ones(7)) and metadata == {"count": 60000}
    assert storage.list_files(storage.join(s3_bucket, "run")) == [url]


@pytest.mark.s3
def test_unreachable_endpoint_names_the_url(monkeypatch):
    import s3fs

    # One attempt: a refused connection is retried (with backoff) in a real run.
    monkeypatch.setattr(storage, "_S3_OPTIONS", {"retries": 1, "connect_timeout": 1})
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(storage.StorageError, match="s3://nowhere/obj.bin"):
        storage.read_bytes("s3://nowhere/obj.bin")
    s3fs.S3FileSystem.clear_instance_cache()


def test_credentials_are_not_in_error_messages(monkeypatch):
    import s3fs

    # One attempt: a refused connection is retried (with backoff) in a real run.
    monkeypatch.setattr(storage, "_S3_OPTIONS", {"retries": 1, "connect_timeout": 1})
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "verysecretvalue")
    with pytest.raises(storage.StorageError) as caught:
        storage.exists("s3://nowhere/obj.bin")
    assert "verysecretvalue" not in str(caught.value)
    assert "AKIDSECRETKEYID" not in str(caught.value)
    s3fs.S3FileSystem.clear_instance_cache()


class _FailingS3(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with one error, and counts them."""

    status, code, requests = 503, "SlowDown", []

    def _answer(self):
        type(self).requests.append(self.command)
        body = f"<Error><Code>{self.code}</Code><Message>{self.code}</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_s3(monkeypatch):
    import s3fs

    for name, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    storage.configure()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("status,code,attempts", [(503, "SlowDown", 3), (500, "InternalError", 3),
                                                  (403, "AccessDenied", 1)])
def test_s3_retries_transient_errors_with_backoff_and_permanent_ones_never(
        failing_s3, status, code, attempts):
    _FailingS3.status, _FailingS3.code, _FailingS3.requests = status, code, []
    storage.configure({"endpoint_url": failing_s3, "retries": 2, "connect_timeout": 2})
    url = "s3://bucket/run/eval.json"
    with pytest.raises(storage.StorageError, match="s3://bucket/run/eval.json"):
        storage.publish_json(url, {"a": 1})
    # botocore's attempts (1 + storage.retries), not multiplied by s3fs's own loop.
    assert 1 <= len(_FailingS3.requests) <= attempts * storage.S3FS_ATTEMPTS
    if attempts == 1:
        assert len(_FailingS3.requests) == 1


def test_s3_options_come_from_the_storage_section():
    from ead_dist.config import StorageConfig

    storage.configure(storage.options_of(StorageConfig(retries=7, connect_timeout=3.0)))
    try:
        config = storage.s3_options()["config_kwargs"]
        assert config["retries"] == {"max_attempts": 7, "mode": "adaptive"}
        assert config["connect_timeout"] == 3.0
    finally:
        storage.configure()
    assert storage.s3_options()["config_kwargs"]["retries"]["max_attempts"] == 10


@pytest.mark.s3
def test_missing_bucket_fails_at_once_naming_the_url(s3_endpoint):
    storage.configure({"endpoint_url": s3_endpoint})  # default retries: 10
    try:
        started = time.perf_counter()
        for action in (lambda u: storage.read_json(u), lambda u: storage.publish_json(u, {})):
            with pytest.raises(storage.StorageError) as caught:
                action("s3://no-such-bucket-here/run/eval.json")
            message = str(caught.value)
            assert "s3://no-such-bucket-here/run/eval.json" in message and "\n" not in message
        assert time.perf_counter() - started < 5
    finally:
        storage.configure()
