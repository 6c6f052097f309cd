import os

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

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(storage.StorageError, match="s3://nowhere/obj.bin"):
        storage.read_bytes("s3://nowhere/obj.bin")
    s3fs.S3FileSystem.clear_instance_cache()


def test_credentials_are_not_in_error_messages(monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "verysecretvalue")
    with pytest.raises(storage.StorageError) as caught:
        storage.exists("s3://nowhere/obj.bin")
    assert "verysecretvalue" not in str(caught.value)
    assert "AKIDSECRETKEYID" not in str(caught.value)
    s3fs.S3FileSystem.clear_instance_cache()
