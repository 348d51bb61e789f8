"""Fast paths of atomic outputs: the folder digest without pathlib (same value as before) and the replaced
folder deleted in the background."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from mk_hspc import atomic_io
from mk_hspc.atomic_io import OLD_MARK, remove_leftovers, wait_for_background_removals
from mk_hspc.datasets.atomic import AtomicDataset, content_digest


def pathlib_digest(path: Path) -> str:
    """The digest as it was first written (rglob + sorted Paths): manifests on disk hold these values."""
    sha = hashlib.sha256()
    hidden = lambda file: any(part.startswith(".") for part in file.relative_to(path).parts)  # noqa: E731
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not hidden(p)):
        sha.update(str(file.relative_to(path).as_posix()).encode() + b"\0")
        sha.update(file.read_bytes())
        sha.update(b"\0")
    return sha.hexdigest()


def test_folder_digest_is_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "out"
    files = {
        "a/b.txt": b"1",
        "a-b/c.txt": b"2",  # "-" sorts before "/" as text but after it by components
        "a.b": b"3",
        "a/z/deep.bin": bytes(range(256)),
        "Z.txt": b"4",
        "é.txt": b"5",
        ".hidden": b"ignored",
        "a/.tmp/x": b"ignored",
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f").write_bytes(b"outside")
    os.symlink(tmp_path / "elsewhere", root / "linked_folder")  # not entered, as rglob does not
    os.symlink(root / "a.b", root / "linked_file")  # a link to a file counts, as is_file() follows it
    assert content_digest(root) == pathlib_digest(root)
    (root / "a-b" / "c.txt").write_bytes(b"changed")
    assert content_digest(root) == pathlib_digest(root)


def test_replaced_folder_is_removed_in_the_background(tmp_path: Path) -> None:
    output = AtomicDataset(
        {"type": "mk_hspc.datasets.annotation.AnnotationSiteDataset"},
        str(tmp_path / "site"),
        remove_old_in_background=True,
    )
    started = threading.Event()
    release = threading.Event()
    real_remove = atomic_io.remove_path

    def slow_remove(path: Path) -> None:
        if OLD_MARK in path.name:
            started.set()
            release.wait(10)
        real_remove(path)

    from mk_hspc.export.site import SiteContent

    def site(text: str) -> SiteContent:
        return SiteContent(
            tiles=[], render=lambda outlines: {"cells.json": b'{"cells": {}}', "x.txt": text.encode()}
        )

    output.save(site("first"))
    atomic_io.remove_path = slow_remove
    try:
        output.save(site("second"))  # returns while the first site is still being removed
        assert started.wait(10)
        old = [p for p in tmp_path.iterdir() if OLD_MARK in p.name]
        assert len(old) == 1 and (old[0] / "x.txt").read_text() == "first"
        assert (tmp_path / "site" / "x.txt").read_text() == "second"
        remove_leftovers(tmp_path / "site")  # leaves the folder a background removal is working on
        assert old[0].exists()
    finally:
        release.set()
        atomic_io.remove_path = real_remove
    wait_for_background_removals()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "site.manifest.json"]
    assert output.load().root == tmp_path / "site"


@pytest.mark.parametrize("background", [False, True])
def test_folder_swap_leaves_only_the_new_folder(tmp_path: Path, background: bool) -> None:
    final = tmp_path / "out"
    for content in ("old", "new"):
        tmp = tmp_path / f".out{atomic_io.TMP_MARK}{content}"
        tmp.mkdir()
        (tmp / "f").write_text(content)
        atomic_io.replace_path(tmp, final, remove_old_in_background=background)
    wait_for_background_removals()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "f").read_text() == "new"
