"""The soak (benchmarks/soak.py) for 60 seconds after the same 60-s warm-up as the ten-minute run, against the
session's Milvus server, with its targets asserted: no errors, RSS growth after the warm-up at most 5%, file
descriptors and threads flat, a graceful stop on SIGTERM. The ten-minute figures are in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.server
@pytest.mark.slow  # about 200 s: 120 s of load and two idle samples
def test_a_one_minute_soak_of_the_service_meets_its_targets(milvus_server_uri, onnx_encoder):
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
    # the session's ONNX export: nothing is exported or quantised inside the minute
    env.update(IMGSEARCH_RUNTIME="onnx", IMGSEARCH_ONNX_CACHE=str(onnx_encoder.model_path.parent))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--uri", milvus_server_uri, "--seconds", "120", "--warmup", "60",
         "--per-class", "5", "--stop-timeout", "5", "--seed", "1", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    endpoints = {row["endpoint"]: row for row in report["endpoints"]}
    for endpoint in ("/search", "/recognize", "/images", "/enroll", "/review", "/duplicates"):
        assert endpoints[endpoint]["requests"] > 0, endpoint  # the mixed workload reached every kind of request
    assert endpoints["all"]["errors"] == 0, (report["failures"], report["failed_answers"])
    # SIGTERM: a graceful stop (service_exit -9: it had not stopped STOP_WAIT_SECONDS after the signal)
    assert report["service_exit"] == 0 and report["service_errors"] == [], (report["service_exit"], report["service_stop_seconds"])
    targets = report["targets"]
    assert all(targets.values()), json.dumps({"targets": targets, "process": report["process"], "rss": report["rss_mib_every_30_s"]})
    print(f"RSS growth after the warm-up: {report['rss_growth_after_warmup']:+.1%}; stopped {report['service_stop_seconds']} s after SIGTERM")
