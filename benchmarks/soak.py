"""A soak: `imgsearch serve` on a Milvus server under a mixed load from Locust, watched for errors and leaks.

    python benchmarks/soak.py --uri http://127.0.0.1:19530 [--seconds 600] [--warmup 60] [--users 16] [--seed N]
                              [--per-class N] [--stop-timeout S] [--check] [--json]

The sample catalog (examples/catalog: 300 labelled products) is ingested into a fresh collection; the service is
started on it as its own process; Locust (benchmarks/soak_locustfile.py, headless) runs --users users for --seconds:
search, recognize (a quarter keep their "unknown" answers for review), upload, enrol, delete (own uploads), review
and duplicates. Printed: per endpoint the requests, p50/p99 and errors; for the service process its RSS, open file
descriptors and threads at the start, after --warmup seconds and at the end, with the malloc heap's live and
kept-free bytes from its /metrics (live bytes flat while RSS grows: fragmentation, not a leak). The last two are taken with no load and
the service idle (its CPU quiet: requests, scans and recalibrations done): the load pauses after the warm-up for that
sample and resumes for the rest of --seconds. Under load one sample moves with whatever requests hold at that second
(up to 20 MiB between neighbouring 30-s samples here), which would hide a leak or invent one; RSS every 30 s under
load is printed beside. --check exits 1 unless there were no errors, RSS grew at most 5% after the warm-up, and
descriptors and threads stayed flat (within 2% or 3 of the warm-up's count). The seed is printed, and --seed repeats
a run's draws. IMGSEARCH_RUNTIME and IMGSEARCH_ONNX_CACHE pass through to the service; every other setting is the soak's own.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imgsearch.processes import die_with_parent  # noqa: E402

# the ingest, the service and Locust end with this script, even on SIGKILL (Locust would otherwise wait for a resume
# file no one will write, and the service would keep its port)
WITH_PARENT = functools.partial(die_with_parent, os.getpid())

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "examples" / "catalog"
RSS_GROWTH_LIMIT = 0.05
SAMPLE_EVERY_SECONDS = 30
# SIGTERM lets requests in flight finish, and requests queued behind a lock (a duplicates scan, a write) are in
# flight too, though Locust has stopped their users: a one-minute soak in CI once took over 60 s to stop
STOP_WAIT_SECONDS = 180
IDLE_WAIT_SECONDS = 300  # a duplicates scan started just before the pause can take minutes under this load
TRIM_WAIT_SECONDS = 2  # the service trims its heap 1 s after its last request (api/limits.py IdleTrim)


def process_stats(pid: int) -> dict[str, int]:
    """RSS (bytes; also split into anonymous memory and mapped files), open file descriptors and threads of a live
    process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss": int(fields["VmRSS"].split()[0]) * 1024,
        "rss_anon": int(fields["RssAnon"].split()[0]) * 1024,
        "rss_file": int(fields["RssFile"].split()[0]) * 1024,  # libraries and models mapped as a code path first runs
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def service_metrics(url: str) -> dict[str, float]:
    """The service's own gauges from its /metrics: requests in flight (less the scrape reading them) and, with glibc
    2.33, the malloc heap's live and kept-free bytes (0 where it does not say)."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("imgsearch_requests_in_flight ", "imgsearch_heap_bytes{")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    if "imgsearch_requests_in_flight" not in values:
        raise SystemExit("the service's /metrics has no imgsearch_requests_in_flight")
    return {
        "in_flight": values["imgsearch_requests_in_flight"] - 1,
        "heap_in_use": values.get('imgsearch_heap_bytes{state="in_use"}', 0.0),
        "heap_free": values.get('imgsearch_heap_bytes{state="free"}', 0.0),
    }


def idle_stats(pid: int, url: str, quiet_seconds: int = 3, limit: float = IDLE_WAIT_SECONDS) -> tuple[dict[str, int], float, bool]:
    """The process's stats once no request is in flight and it has used under 5% of a core in each of
    `quiet_seconds` consecutive seconds (after `limit` seconds they are taken anyway), the seconds that took, and
    whether it got there. A request the load gave up on can still be waiting for the store's write lock with the CPU
    idle, holding its upload: hence the count as well as the CPU. The stats are read TRIM_WAIT_SECONDS after that,
    once the service's idle trim (api/limits.py IdleTrim, 1 s after the last request: the scrapes count) has run."""
    started = time.monotonic()
    quiet, before = 0, cpu_seconds(pid)
    while quiet < quiet_seconds and time.monotonic() - started < limit:
        time.sleep(1)
        now = cpu_seconds(pid)
        quiet, before = (quiet + 1 if now - before < 0.05 and service_metrics(url)["in_flight"] == 0 else 0), now
    time.sleep(TRIM_WAIT_SECONDS)
    return service_stats(pid, url), round(time.monotonic() - started, 1), quiet >= quiet_seconds


def service_stats(pid: int, url: str) -> dict[str, int]:
    """process_stats, and the heap's live and kept-free bytes as the service reports them."""
    gauges = service_metrics(url)
    return {**process_stats(pid), "heap_in_use": int(gauges["heap_in_use"]), "heap_free": int(gauges["heap_free"])}


def rss_trend(trajectory: list[tuple[int, float]], warm_at: float) -> dict[str, float] | None:
    """A least-squares line through the RSS samples from the warm-up on: its rise over the run as a fraction of its
    value at the warm-up. Two single samples (the target's figure) move with whatever a request holds at that
    second (up to 20 MiB between neighbouring samples here); the line shows whether RSS keeps climbing."""
    import numpy as np

    points = [(at, mib) for at, mib in trajectory if at >= warm_at - SAMPLE_EVERY_SECONDS / 2]
    if len(points) < 3:
        return None
    seconds, mib = np.array(points, dtype=float).T
    slope, intercept = np.polyfit(seconds, mib, 1)
    first, last = slope * seconds[0] + intercept, slope * seconds[-1] + intercept
    return {"growth": float(last / first - 1), "mib_per_minute": float(slope * 60)}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"imgsearch serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"imgsearch serve did not become healthy within {timeout:.0f} s")


def endpoint_rows(stats_csv: Path) -> list[dict[str, object]]:
    rows = []
    with open(stats_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({
                "endpoint": row["Name"] if row["Name"] != "Aggregated" else "all",
                "method": row["Type"],
                "requests": int(row["Request Count"]),
                "errors": int(row["Failure Count"]),
                "p50_ms": float(row["50%"] or 0),
                "p99_ms": float(row["99%"] or 0),
            })
    return rows


def drop_collection(uri: str, collection: str) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        if client.has_collection(collection):
            client.drop_collection(collection)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", required=True, help="a Milvus server (http://host:port): the service's store")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--warmup", type=float, default=60, help="seconds of load before the baseline sample")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--per-class", type=int, default=0, help="ingest only this many images of each sample class (default: all 30)")
    parser.add_argument("--stop-timeout", type=int, default=30, help="seconds the users get to finish their requests at the end")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the targets are met")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    if args.warmup >= args.seconds:
        parser.error("--warmup must be shorter than --seconds")
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    collection = f"soak_{seed}_{uuid.uuid4().hex[:6]}"
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(f"soak: seed {seed}, {args.users} users, {args.seconds:.0f} s (warm-up {args.warmup:.0f} s), collection {collection} at {args.uri}")

    kept = ("IMGSEARCH_RUNTIME", "IMGSEARCH_ONNX_CACHE")  # the only settings taken from this environment
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_") or key in kept}
    env.update(IMGSEARCH_MILVUS_URI=args.uri, IMGSEARCH_COLLECTION=collection, IMGSEARCH_DEVICE="cpu")
    with tempfile.TemporaryDirectory(prefix="imgsearch-soak-") as tmp:
        tmp = Path(tmp)
        env["IMGSEARCH_UPLOAD_DIR"] = str(tmp / "uploads")
        env["IMGSEARCH_HASH_CACHE"] = str(tmp / "hashes.sqlite")
        catalog = CATALOG
        if args.per_class:
            catalog = tmp / "catalog"
            for folder in sorted(path for path in CATALOG.iterdir() if path.is_dir()):
                (catalog / folder.name).mkdir(parents=True)
                for image in sorted(folder.glob("*.png"))[: args.per_class]:
                    shutil.copy(image, catalog / folder.name / image.name)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "imgsearch.cli", "ingest", str(catalog), "--json"], env=env, check=True, preexec_fn=WITH_PARENT,
                       stdout=subprocess.DEVNULL)
        images = sorted(str(path) for path in catalog.rglob("*.png"))
        say(f"ingested {len(images)} catalog images in {time.perf_counter() - started:.1f} s")
        (tmp / "images.txt").write_text("\n".join(images))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        service = subprocess.Popen([sys.executable, "-m", "imgsearch.cli", "serve", "--port", str(port)], env=env, preexec_fn=WITH_PARENT,
                                   stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "w"), start_new_session=True)
        samples: list[tuple[float, dict[str, int]]] = []
        trajectory: list[tuple[int, float]] = []  # (seconds into the load, RSS in MiB): a plateau or a leak
        pauses: list[dict[str, object]] = []  # when the load stopped for an idle sample, and how long the service took
        try:
            wait_healthy(url, service)
            samples.append((0.0, service_stats(service.pid, url)))
            resume = tmp / "resume"  # the load shape (soak_locustfile.py) waits for it after the warm-up
            load_env = {**env, "SOAK_SEED": str(seed), "SOAK_IMAGES": str(tmp / "images.txt"), "SOAK_USERS": str(args.users),
                        "SOAK_WARMUP": str(args.warmup), "SOAK_SECONDS": str(args.seconds), "SOAK_RESUME_FILE": str(resume),
                        "SOAK_FAILED_ANSWERS": str(tmp / "failed_answers.txt")}
            load = subprocess.Popen(
                [sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "soak_locustfile.py"), "--headless",
                 "--host", url, "--csv", str(tmp / "load"), "--only-summary", "--exit-code-on-error", "0",
                 "--loglevel", "WARNING", "--stop-timeout", str(args.stop_timeout)],
                env=load_env, stdout=subprocess.DEVNULL, stderr=open(tmp / "locust.log", "w"), preexec_fn=WITH_PARENT,
            )
            load_started = time.monotonic()
            warm, next_sample = None, SAMPLE_EVERY_SECONDS
            while load.poll() is None:
                time.sleep(1)
                at = time.monotonic() - load_started
                if warm is None and at >= args.warmup:
                    stats, waited, idle = idle_stats(service.pid, url)
                    warm = (at + waited, stats)
                    samples.append(warm)
                    pauses.append({"at": round(at), "idle_after": waited, "idle": idle})
                    resume.touch()
                    say(f"warm-up sample: {stats['rss'] / 2**20:.1f} MiB, the service idle {waited:.0f} s after the load paused")
                elif at >= next_sample:
                    trajectory.append((round(at), round(process_stats(service.pid)["rss"] / 2**20, 1)))
                    next_sample = (at // SAMPLE_EVERY_SECONDS + 1) * SAMPLE_EVERY_SECONDS
            if load.returncode != 0:
                raise SystemExit(f"locust exited with {load.returncode}: {(tmp / 'locust.log').read_text()[-2000:]}")
            at = time.monotonic() - load_started
            stats, waited, idle = idle_stats(service.pid, url)
            samples.append((at + waited, stats))
            pauses.append({"at": round(at), "idle_after": waited, "idle": idle})
            rows = endpoint_rows(tmp / "load_stats.csv")
            failures = (tmp / "load_failures.csv").read_text() if (tmp / "load_failures.csv").exists() else ""
            answers = tmp / "failed_answers.txt"
            failed_answers = answers.read_text().splitlines()[:20] if answers.exists() else []
        finally:
            stop_seconds = None
            if service.poll() is None:
                os.killpg(service.pid, signal.SIGTERM)  # graceful: in-flight requests finish
                stopping = time.monotonic()
                try:
                    service.wait(timeout=STOP_WAIT_SECONDS)
                    stop_seconds = round(time.monotonic() - stopping, 1)
                except subprocess.TimeoutExpired:
                    os.killpg(service.pid, signal.SIGKILL)
                    service.wait()
            served_log = (tmp / "serve.log").read_text()
            drop_collection(args.uri, collection)
    (_, start), (warm_at, warm), (end_at, end) = samples
    growth = (end["rss"] - warm["rss"]) / warm["rss"]
    trend = rss_trend(trajectory, warm_at)
    result = {
        "seed": seed, "users": args.users, "seconds": args.seconds, "warmup": args.warmup, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "endpoints": rows, "process": {"start": start, "warm": warm, "end": end}, "rss_growth_after_warmup": growth,
        "rss_trend_after_warmup": trend,
        "rss_mib_every_30_s": trajectory, "idle_samples": pauses,
        "failures": failures.splitlines()[1:21], "failed_answers": failed_answers, "service_exit": service.returncode, "service_stop_seconds": stop_seconds,
        "service_errors": [line for line in served_log.splitlines() if "Traceback" in line or "ERROR" in line][:20],
    }
    errors = sum(row["errors"] for row in rows if row["endpoint"] != "all")
    flat = lambda key: end[key] <= max(warm[key] + 3, warm[key] * 1.02)  # noqa: E731
    result["targets"] = {
        "zero errors": errors == 0 and not result["service_errors"],
        f"RSS growth after warm-up <= {RSS_GROWTH_LIMIT:.0%}": growth <= RSS_GROWTH_LIMIT,
        "file descriptors flat": flat("fds"),
        "threads flat": flat("threads"),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\n{'endpoint':<16}{'requests':>10}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}")
        for row in rows:
            print(f"{row['method'] + ' ' + row['endpoint'] if row['method'] else row['endpoint']:<16}"[:16].ljust(16)
                  + f"{row['requests']:>10}{row['errors']:>8}{row['p50_ms']:>9.0f}{row['p99_ms']:>9.0f}")
        print(f"\n{'service (idle)':<24}{'RSS MiB':>9}{'anon':>7}{'files':>7}{'heap live':>10}{'heap free':>10}{'fds':>6}{'threads':>9}")
        for name, stats in (("start", start), (f"after warm-up ({warm_at:.0f} s)", warm), (f"end ({end_at:.0f} s)", end)):
            print(f"{name:<24}{stats['rss'] / 2**20:>9.1f}{stats['rss_anon'] / 2**20:>7.1f}{stats['rss_file'] / 2**20:>7.1f}"
                  f"{stats['heap_in_use'] / 2**20:>10.1f}{stats['heap_free'] / 2**20:>10.1f}{stats['fds']:>6}{stats['threads']:>9}")
        print(f"RSS growth after warm-up: {growth:+.1%}")
        if trend is not None:
            print(f"RSS trend after warm-up (a line fitted to the 30-s samples; not a target): {trend['growth']:+.1%}, "
                  f"{trend['mib_per_minute']:+.2f} MiB/min")
        print("RSS MiB every 30 s under load:", ", ".join(f"{at} s {mib:.0f}" for at, mib in trajectory))
        for name, pause in zip(("warm-up", "end"), pauses):
            print(f"{name} sample: load stopped at {pause['at']} s, the service "
                  + (f"idle {pause['idle_after']:.0f} s later" if pause["idle"] else f"still busy after {pause['idle_after']:.0f} s"))
        print(f"service stopped {stop_seconds} s after SIGTERM, exit {service.returncode}")
        for line in result["failures"]:
            print("failure:", line)
        for line in result["failed_answers"]:
            print("answered:", line)
        for line in result["service_errors"]:
            print("service log:", line)
        for target, met in result["targets"].items():
            print(f"{'met' if met else 'NOT MET'}: {target}")
    return 1 if args.check and not all(result["targets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
