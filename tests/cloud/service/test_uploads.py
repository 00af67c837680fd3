"""Uploaded stores on a real directory, from the pieces the operator's client sends: a complete store
lands under its computed id in one step; every broken upload is refused naming the problem and leaves
nothing behind that could be served."""

import hashlib
import json

import pytest
from helpers import variant_store

from cloud.admin.upload_client import pieces
from cloud.build.store import PortfolioStore
from cloud.service.catalog import check_store
from cloud.service.store_checks import StoreLimits
from cloud.service.uploads import STAGING, UploadError, Uploads
from protos import coordinator_pb2


@pytest.fixture
def store(tmp_path):
    return variant_store(tmp_path / "store", widths=(0.25, 0.125))  # one file over a 1 MiB piece


def _uploads(tmp_path, max_bytes=1 << 30) -> Uploads:
    return Uploads(tmp_path / "uploads", StoreLimits(), max_bytes)


def _left(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "uploads").iterdir())


def test_an_upload_lands_whole_under_the_id_its_members_make(store, tmp_path):
    uploads = _uploads(tmp_path)
    sent = list(pieces(store.root))
    assert len(sent) > 3 and all(len(p.data) <= 1 << 20 for p in sent)
    directory, size = uploads.receive(iter(sent))
    served = check_store(PortfolioStore(directory))
    assert directory.name == served.portfolio_id == store.manifest().portfolio_id
    assert size == sum(len(p.data) for p in sent) and _left(tmp_path) == [directory.name]
    assert uploads.receive(iter(sent)) == (directory, size)  # again: the same store, nothing else left
    assert _left(tmp_path) == [directory.name]


def _altered(sent, index, **changes):
    altered = coordinator_pb2.UploadPiece()
    altered.CopyFrom(sent[index])
    for name, value in changes.items():
        setattr(altered, name, value)
    return [*sent[:index], altered, *sent[index + 1 :]]


def test_broken_uploads_are_refused_naming_the_problem_and_leave_nothing(store, tmp_path):
    sent = list(pieces(store.root))
    manifest = json.dumps([1, 2]).encode()
    cases = [
        (sent[1:], "starts with manifest.json"),
        (sent[:-1], "did not come"),
        (_altered(sent, len(sent) - 1, data=b"\0" * len(sent[-1].data)), "hashes otherwise"),
        (_altered(sent, 0, size=len(manifest), sha256="0" * 64, data=manifest), "hashes otherwise"),
        ([*sent, sent[1]], "no member file of the manifest still to come"),
        ([coordinator_pb2.UploadPiece(data=b"x")], "names its file"),
    ]
    for broken, words in cases:
        with pytest.raises(UploadError, match=words):
            _uploads(tmp_path).receive(iter(broken))
        assert _left(tmp_path) == []


def test_a_manifest_that_is_no_object_or_too_large_a_store_is_refused_before_any_file(store, tmp_path):
    listed = json.dumps([store.manifest().to_json()]).encode()
    first = coordinator_pb2.UploadPiece(
        path="manifest.json", size=len(listed), sha256=hashlib.sha256(listed).hexdigest(), data=listed
    )
    with pytest.raises(UploadError, match="JSON list, not the JSON object"):
        _uploads(tmp_path).receive(iter([first]))
    with pytest.raises(UploadError, match="takes uploads of at most 1048576"):
        _uploads(tmp_path, max_bytes=1 << 20).receive(pieces(store.root))
    assert _left(tmp_path) == []


def test_staging_a_dead_cloud_left_is_cleared_when_the_next_one_starts(tmp_path):
    left = tmp_path / "uploads" / f"{STAGING}abc"
    (left / "variants").mkdir(parents=True)
    (left / "manifest.json").write_text("{}")
    assert _uploads(tmp_path).clear_staging() == [left] and _left(tmp_path) == []
