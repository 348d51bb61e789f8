"""Load test of `kedro annotate` on loopback: 2,000 label posts at a steady rate, fsync on (synchronous=FULL).

One client on a keep-alive connection posts one click per request (what the page does when labels are
given one by one) at ``--rate`` posts per second, cycling through the site's cells and labels, and records
each request's latency (send to acknowledged reply). Afterwards the server is stopped and the SQLite store
is read directly: every acknowledged event must be in the history, and each cell's current label must be
the last acknowledged one. The server, its project and its store live under ``bench/work/`` (a disk, not
tmpfs, so fsync costs what it costs).

Usage: ``python bench/annotation_server_bench.py [--posts 2000] [--rate 100] [--output bench/results/annotation_server.json]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mk_hspc.annotate.app import page_event_id  # noqa: E402
from mk_hspc.labels.store import LabelStore  # noqa: E402
from tests.annotate_server import Server, command_env, free_port, project_with_site  # noqa: E402

LABELS = ("yes", "no", "unsure")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posts", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0, help="posts per second")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "work" / "annotation_server")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "annotation_server.json")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    project, study = project_with_site(args.work_dir)
    cells = sorted(study.cells["cell_id"])
    server = Server(project, command_env(args.work_dir), free_port()).start()
    latencies_ms: list[float] = []
    acked: dict[str, tuple[str, str]] = {}  # event id -> (cell, label)
    last_label: dict[str, str] = {}
    refused = 0
    load_before = os.getloadavg()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        interval = 1.0 / args.rate
        start = time.perf_counter()
        for number in range(args.posts):
            time.sleep(max(0.0, start + number * interval - time.perf_counter()))
            cell, label = cells[number % len(cells)], LABELS[(number // len(cells)) % 3]
            event_id = f"bench-{number:05d}"
            body = json.dumps(
                {"annotator": "bench", "events": [{"event_id": event_id, "cell_id": cell, "label": label}]}
            )
            sent = time.perf_counter()
            connection.request("POST", "/api/labels", body, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            payload = json.loads(reply.read())
            latencies_ms.append((time.perf_counter() - sent) * 1000)
            if reply.status == 200 and payload["acked"] == [event_id]:
                acked[event_id] = (cell, label)
                last_label[cell] = label
            else:
                refused += 1
        duration_s = time.perf_counter() - start
        connection.close()
    finally:
        load_after = os.getloadavg()
        server.kill()  # no clean shutdown: what was acknowledged must already be on disk
    db_path = project / "data" / "05_model_input" / "labels.sqlite3"
    db = sqlite3.connect(db_path)
    # Stored under the server's own id of a page click (annotator and the page's id), looked up the same way.
    stored = {row[0]: (row[1], row[2]) for row in db.execute("SELECT event_id, cell_id, label FROM events")}
    latest = dict(db.execute("SELECT cell_id, label FROM latest WHERE annotator = 'bench'").fetchall())
    journal = db.execute("PRAGMA journal_mode").fetchone()[0]  # WAL is recorded in the file itself
    db.close()
    # synchronous is per connection: read it from a connection the label store opens, as the server's is.
    store = LabelStore(db_path)
    synchronous = store._db.execute("PRAGMA synchronous").fetchone()[0]
    store.close()
    ordered = sorted(latencies_ms)
    result = {
        "what": "label posts to `kedro annotate` over loopback, one click per request, steady rate, SIGKILL at the end",
        "posts": args.posts,
        "rate_per_s": args.rate,
        "achieved_rate_per_s": round(args.posts / duration_s, 1),
        "acknowledged": len(acked),
        "refused": refused,
        "click_latency_ms_p50": round(statistics.median(ordered), 2),
        "click_latency_ms_p99": round(ordered[int(0.99 * (len(ordered) - 1))], 2),
        "click_latency_ms_max": round(ordered[-1], 2),
        "click_latency_ms_p99_goal": 50,
        "every_acknowledged_label_present": all(
            stored.get(page_event_id("bench", e)) == v for e, v in acked.items()
        ),
        "latest_is_last_acknowledged": latest == last_label,
        "sqlite": {"journal_mode": journal, "synchronous": {2: "FULL"}.get(synchronous, synchronous)},
        "conditions": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
            "filesystem": "ext4 (bench/work)",
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in load_after],
            "python": platform.python_version(),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
