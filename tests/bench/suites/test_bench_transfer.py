"""The transfer benchmark on a small plan: real cloud processes, raw TCP, a cut and resumed download
and eight edge fetchers. Checks the result's shape and invariants, never its timings."""

import json

from bench.__main__ import SUITES
from bench.suites import transfer
from common.files import atomic_write_json, sha256_file
from common.wire import CHUNK_BYTES

PLAN = {"variant_mib": 3, "others_mib": (1,), "repeats": 1, "edges": 8}


def test_transfer_bench_shape_and_invariants(tmp_path):
    assert SUITES["transfer"] == transfer.__name__
    result = transfer.run(quick=True, data_dir=None, work=tmp_path / "work", plan=PLAN)
    atomic_write_json(tmp_path / "transfer.json", result)  # JSON all the way down
    summary = json.loads((tmp_path / "transfer.json").read_text())["summary"]
    assert set(summary) == {
        "grpc_mb_s",
        "tls_mb_s",
        "raw_tcp_mb_s",
        "grpc_vs_raw",
        "resume_resent_bytes",
        "resume_wire_extra_bytes",
        "resume_cancel_wire_extra_bytes",
        "fanout_8_s",
        "targets",
    }
    assert all(summary[k] > 0 for k in ("grpc_mb_s", "tls_mb_s", "raw_tcp_mb_s", "grpc_vs_raw", "fanout_8_s"))
    assert abs(summary["grpc_vs_raw"] - summary["grpc_mb_s"] / summary["raw_tcp_mb_s"]) < 0.01
    size = result["variant_bytes"]
    assert size == 3 << 20 and len(result["grpc_seconds"]) == len(result["tls_seconds"]) == 1
    resume = result["resume"]
    # on the wire: one transfer is the file plus framing; a cut and resumed download carries it all
    # again, plus what was lost at the cut (never more than what followed the cut, and the framing)
    framing = 64 << 10
    assert size < resume["wire_one_transfer_bytes"] < size + framing
    for name, key in (("link", "resume_wire_extra_bytes"), ("cancel", "resume_cancel_wire_extra_bytes")):
        cut = resume[name]
        assert cut["verified"] and 0 < cut["cut_at_bytes"] < size
        assert (
            summary[key]
            == cut["wire_extra_bytes"]
            == cut["wire_cut_and_resume_bytes"] - resume["wire_one_transfer_bytes"]
        )
        assert 0 <= summary[key] <= size - cut["cut_at_bytes"] + framing
        # the cloud's count: every byte taken by gRPC once, no more than what followed the cut twice
        assert 0 <= cut["cloud_resent_bytes"] == cut["cloud_sent_bytes"] - size <= size - cut["cut_at_bytes"]
    # a dead link loses only the chunk it broke: every whole chunk that crossed before it is kept, and
    # the file bytes sent twice are the broken chunk's bytes that had crossed
    link = resume["link"]
    assert link["cut_at_bytes"] % CHUNK_BYTES == 0
    assert resume["wire_one_transfer_bytes"] // 2 - CHUNK_BYTES < link["cut_at_bytes"] <= size // 2
    assert link["whole_chunks_crossed"] * CHUNK_BYTES == link["cut_at_bytes"]
    broken = link["cut_chunk"]["data_bytes_crossed"] if link["cut_chunk"] else 0
    if link["cut_chunk"]:
        assert link["cut_chunk"]["offset"] == link["cut_at_bytes"]
    assert link["file_bytes_crossed_before_cut"] == link["cut_at_bytes"] + broken
    assert summary["resume_resent_bytes"] == link["file_resent_bytes"] == broken < CHUNK_BYTES
    assert link["wire_extra_bytes"] >= broken  # what crossed twice, and the framing around it
    assert summary["targets"]["resume_resent_bytes <= one chunk"]
    store = transfer.PortfolioStore(tmp_path / "work" / "store")
    for i in range(PLAN["edges"]):  # every edge holds every variant, verified
        for entry in store.manifest().variants:
            path = tmp_path / "work" / "fanout" / f"edge-{i}" / f"{entry.variant_id}.safetensors"
            assert sha256_file(path) == entry.variant_id
