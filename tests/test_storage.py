"""Locations without a store: which object URLs are plain, labels from key prefixes, credentials kept out of settings."""

from __future__ import annotations

import json
import sqlite3

import pytest

from imgsearch import storage
from imgsearch.config import load_settings
from imgsearch.errors import UsageError
from imgsearch.ingest.catalog import as_location, manifest_location
from imgsearch.ingest.hashes import HashCache


@pytest.mark.parametrize(
    "url, plain",
    [
        ("s3://shop/catalog/bag/1.jpg", True),
        ("s3://shop/catalog/../secret.jpg", False),
        ("s3://shop/catalog/./bag/1.jpg", False),
        ("s3://shop/catalog//bag/1.jpg", False),
        ("s3://shop/catalog/%2e%2e/secret.jpg", False),
        ("s3://shop/catalog/bag\\..\\1.jpg", False),
        ("s3://shop/catalog/1.jpg?versionId=2", False),
        ("s3://shop/catalog/1.jpg#x", False),
        ("s3://", False),
    ],
)
def test_only_plain_object_urls_name_an_object(url, plain):
    assert (storage.normalised_key(url) == url) is plain


def test_labels_come_from_key_prefixes_as_from_sub_folders():
    assert storage.label_of("s3://shop/catalog/shoes/boots/1.jpg", "s3://shop/catalog") == "shoes/boots"
    assert storage.label_of("s3://shop/catalog/1.jpg", "s3://shop/catalog/") == ""
    assert as_location("s3://shop/x.jpg") == "s3://shop/x.jpg" and str(as_location("/tmp/x.jpg")) == "/tmp/x.jpg"


def test_a_manifest_path_never_names_another_object_than_written():
    assert manifest_location("s3://shop/catalog", "bag/1.jpg") == "s3://shop/catalog/bag/1.jpg"
    assert manifest_location("s3://shop/catalog", "s3://other/x.jpg") == "s3://other/x.jpg"
    assert manifest_location("s3://shop/catalog", "../private/x.jpg") is None
    assert manifest_location("s3://shop/catalog", "bag//x.jpg") is None


@pytest.mark.parametrize("options", [{"secret": "s3cr3t-value"}, {"client_kwargs": {"aws_secret_access_key": "s3cr3t-value"}}, {"token": "s3cr3t-value"}])
def test_credentials_in_storage_options_are_refused_without_being_shown(options):
    with pytest.raises(UsageError) as refused:
        load_settings(storage_options=json.dumps(options))
    assert "credentials" in str(refused.value) and "s3cr3t-value" not in str(refused.value)


def test_storage_options_reach_fsspec_and_info_masks_a_password_in_the_endpoint():
    try:
        load_settings(storage_options='{"endpoint_url": "http://user:pa55word@minio:9000", "anon": false}')
        assert storage.shown_options() == {"endpoint_url": "http://***@minio:9000", "anon": False}
        with pytest.raises(UsageError):
            load_settings(storage_options="[1, 2]")
    finally:
        storage.configure({})


def test_a_hash_cache_written_before_objects_were_stamped_is_upgraded_in_place(tmp_path):
    path = tmp_path / "hashes.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT)")
    old.execute("INSERT INTO files VALUES ('/c/a.png', 10, 5, 7, 'aaa')")
    old.commit()
    old.close()
    cache = HashCache(path)
    local, changed = cache.lookup([("/c/a.png", storage.FileStamp(10, 5, 7))])
    assert local == {"/c/a.png": "aaa"} and changed == {}
    cache.remember([("s3://b/x.png", storage.FileStamp(3, 0, 0, "etag1"), "bbb")])
    assert cache.lookup([("s3://b/x.png", storage.FileStamp(3, 0, 0, "etag1"))])[0] == {"s3://b/x.png": "bbb"}
    assert cache.lookup([("s3://b/x.png", storage.FileStamp(3, 0, 0, "etag2"))]) == ({}, {"s3://b/x.png": "bbb"})
    cache.close()


def test_object_stamps_come_from_the_listing():
    assert storage.FileStamp.of_object({"size": 12, "ETag": '"abc"'}) == storage.FileStamp(12, 0, 0, "abc")
