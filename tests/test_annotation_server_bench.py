"""bench/annotation_server_bench.py on a few posts: its post-kill check recognises the stored events."""

from __future__ import annotations

import json

from tests.conftest import load_bench_script


def test_every_acknowledged_label_present_recognises_stored_page_event_ids(tmp_path):
    """A short run (all posts acknowledged, server SIGKILLed after): every acknowledged event IS in the store,
    so ``every_acknowledged_label_present`` must be True. The store keeps page clicks under
    ``page_event_id(annotator, id)`` = ``page:["bench","bench-00000"]`` (since 173f00e); the bench strips
    ``<prefix>:`` and looks up ``'["bench","bench-00000"]'``, which never equals ``bench-00000``."""
    bench = load_bench_script("annotation_server_bench")
    out = tmp_path / "annotation_server.json"
    bench.main(["--posts", "6", "--rate", "50", "--work-dir", str(tmp_path / "work"), "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["acknowledged"] == 6 and result["refused"] == 0
    assert result["every_acknowledged_label_present"] is True
