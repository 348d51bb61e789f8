"""Fast paths of atomic outputs: the folder digest without pathlib (the first scheme's value unchanged), the
listing digest from the writer's own hashes, the replaced folder deleted in the background."""

from __future__ import annotations

import hashlib
import os
import subprocess
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
    # Manifests without a digest scheme (written before the listing digest) are checked as they were made.
    assert content_digest(root, scheme=None) == pathlib_digest(root)
    assert content_digest(root) == coreutils_digest(root)
    (root / "a-b" / "c.txt").write_bytes(b"changed")
    assert content_digest(root, scheme=None) == pathlib_digest(root)
    assert content_digest(root) == coreutils_digest(root)


def coreutils_digest(folder: Path) -> str:
    """The README's check of a folder output's digest, run by the shell (find, sort, sha256sum)."""
    result = subprocess.run(
        ["bash", "-c", README_CHECK],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    return result.stdout.split()[0]


README_CHECK = (
    "find . \\( -type f -o -xtype f \\) ! -path '*/.*' -printf '%P\\0' | LC_ALL=C sort -z "
    "| xargs -0r sha256sum -- | sha256sum"
)


def test_the_listing_digest_escapes_names_as_sha256sum_does(tmp_path: Path) -> None:
    """A name with a newline cannot forge another file's line (two different folders, one digest), and names
    with a backslash, newline or carriage return, and an empty folder, digest as coreutils does."""
    forged, honest = tmp_path / "forged", tmp_path / "honest"
    honest.mkdir()
    (honest / "x").write_bytes(b"1")
    (honest / "y").write_bytes(b"2")
    forged.mkdir()
    (forged / f"x\n{hashlib.sha256(b'2').hexdigest()}  y").write_bytes(b"1")
    assert content_digest(forged) != content_digest(honest)
    odd = tmp_path / "odd"
    odd.mkdir()
    assert content_digest(odd) == coreutils_digest(odd) == hashlib.sha256(b"").hexdigest()
    for name in ("back\\slash", "new\nline", "carriage\rreturn", "plain", "--help"):
        (odd / name).write_bytes(name.encode())
    assert content_digest(odd) == coreutils_digest(odd)


def test_the_readme_gives_the_folder_digest_check() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert README_CHECK in readme


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [".site.save.lock", "site", "site.manifest.json"]
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


def _site(files: dict[str, bytes]):
    from mk_hspc.export.site import SiteContent

    return SiteContent(tiles=[], render=lambda outlines: {"cells.json": b'{"cells": {}}', **files})


def test_replaced_site_is_kept_and_overwritten_by_the_next_save(tmp_path: Path) -> None:
    final = tmp_path / "site"
    output = AtomicDataset(
        {"type": "mk_hspc.datasets.annotation.AnnotationSiteDataset"},
        str(final),
        reuse_replaced=True,
        remove_old_in_background=True,
    )
    first = {
        "crops/t1/a.jpg": b"a" * 5000,
        "crops/t1/b.jpg": b"b" * 10,
        "crops/t2/c.jpg": b"c",
        "old.txt": b"o",
    }
    output.save(_site(first))
    inodes = {name: (final / name).stat().st_ino for name in first}
    output.save(_site({"x.txt": b"second"}))  # the first site becomes the spare
    spare = atomic_io.spare_sibling(final)
    assert (spare / "old.txt").read_bytes() == b"o"
    # Shorter, longer and equal contents over the first site's files; two of its files and a folder dropped.
    third = {"crops/t1/a.jpg": b"A" * 3, "crops/t1/b.jpg": b"B" * 9000, "crops/t3/d.jpg": b"d"}
    output.save(_site(third))
    wait_for_background_removals()
    expected = {"cells.json": b'{"cells": {}}', **third}
    on_disk = {
        p.relative_to(final).as_posix(): p.read_bytes() for p in sorted(final.rglob("*")) if p.is_file()
    }
    assert on_disk == expected
    assert sorted(p.name for p in (final / "crops").iterdir()) == ["t1", "t3"]
    for name in ("crops/t1/a.jpg", "crops/t1/b.jpg"):
        assert (final / name).stat().st_ino == inodes[name]  # overwritten in place, not created anew
    assert (spare / "x.txt").read_bytes() == b"second"  # the second site waits to be reused in turn
    assert output.load().root == final  # the manifest's digest matches what the reused folder holds
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".site.save.lock",
        ".site.spare",
        "site",
        "site.manifest.json",
    ]


def test_a_failed_save_over_the_spare_keeps_the_published_site(tmp_path: Path) -> None:
    from kedro.io import DatasetError

    from mk_hspc.export.site import SiteContent

    final = tmp_path / "site"
    output = AtomicDataset(
        {"type": "mk_hspc.datasets.annotation.AnnotationSiteDataset"}, str(final), reuse_replaced=True
    )
    output.save(_site({"x.txt": b"first"}))
    output.save(_site({"x.txt": b"second"}))

    def fail(outlines: dict) -> dict:
        raise RuntimeError("render failed")

    with pytest.raises(DatasetError, match="render failed"):
        output.save(SiteContent(tiles=[], render=fail))
    assert (final / "x.txt").read_bytes() == b"second" and output.load().root == final
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".site.save.lock",
        "site",
        "site.manifest.json",
    ]  # spare spent
    output.save(_site({"x.txt": b"third"}))
    assert (final / "x.txt").read_bytes() == b"third" and output.load().root == final


def test_reuse_needs_a_dataset_that_rewrites_its_whole_folder(tmp_path: Path) -> None:
    from kedro.io import DatasetError

    with pytest.raises(DatasetError, match="rewrites its whole folder"):
        AtomicDataset(
            {"type": "partitions.PartitionedDataset", "dataset": "json.JSONDataset"},
            str(tmp_path / "parts"),
            reuse_replaced=True,
        )


def test_a_page_drafting_error_fails_the_save(tmp_path: Path) -> None:
    from kedro.io import DatasetError

    from mk_hspc.export.site import SiteContent

    def draft() -> None:
        raise ValueError("draft failed")

    output = AtomicDataset(
        {"type": "mk_hspc.datasets.annotation.AnnotationSiteDataset"}, str(tmp_path / "site")
    )
    content = SiteContent(tiles=[], render=lambda outlines: {"cells.json": b"{}"}, prepare=draft)
    with pytest.raises(DatasetError, match="draft failed"):
        output.save(content)
    assert not (tmp_path / "site").exists()


def test_synced_digest_syncs_and_hashes_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mk_hspc.datasets import atomic

    for name in ("a.txt", "b/c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    synced = []
    monkeypatch.setattr(atomic, "fsync_tree", synced.append)
    assert atomic.synced_digest(tmp_path) == content_digest(tmp_path) == coreutils_digest(tmp_path)
    assert atomic.synced_digest(tmp_path / "a.txt") == content_digest(tmp_path / "a.txt")
    assert synced == [tmp_path, tmp_path / "a.txt"]


def test_a_spare_is_dropped_once_reuse_is_turned_off(tmp_path: Path) -> None:
    final = tmp_path / "site"
    site = {"type": "mk_hspc.datasets.annotation.AnnotationSiteDataset"}
    for _ in range(2):
        AtomicDataset(site, str(final), reuse_replaced=True).save(_site({"x.txt": b"x"}))
    assert atomic_io.spare_sibling(final).is_dir()
    AtomicDataset(site, str(final)).save(_site({"x.txt": b"y"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".site.save.lock", "site", "site.manifest.json"]


def test_the_listing_digest_takes_the_writers_hashes_and_still_lists_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mk_hspc.datasets import atomic

    files = {"a.txt": b"a", "b/c.txt": b"c", "b/d.txt": b"d"}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    expected = coreutils_digest(tmp_path)
    known = {
        name: hashlib.sha256(content).hexdigest() for name, content in files.items() if name != "b/d.txt"
    }
    read_back = []
    real_file_sha256 = atomic._file_sha256
    monkeypatch.setattr(atomic, "_file_sha256", lambda file: read_back.append(file) or real_file_sha256(file))
    assert atomic.listing_digest(tmp_path, known) == expected
    assert read_back == [os.path.join(tmp_path, "b", "d.txt")]  # only the file the writer did not report
    with pytest.raises(FileNotFoundError, match="reported are not there.*gone.txt"):
        atomic.listing_digest(tmp_path, {**known, "gone.txt": known["a.txt"]})


def test_a_manifest_of_the_first_folder_digest_still_verifies_and_an_unknown_scheme_is_refused(
    tmp_path: Path,
) -> None:
    import json

    from mk_hspc.datasets.atomic import StaleOutputError, manifest_path

    final = tmp_path / "site"
    output = AtomicDataset({"type": "mk_hspc.datasets.annotation.AnnotationSiteDataset"}, str(final))
    output.save(_site({"index.html": b"<p>x</p>"}))
    manifest = json.loads(manifest_path(final).read_text())
    assert manifest["digest_scheme"] == "sha256-listing"
    assert manifest["digest"] == coreutils_digest(final)
    # As a version before the listing digest wrote it:
    manifest_path(final).write_text(json.dumps({"digest": pathlib_digest(final), "lineage": {}}))
    assert AtomicDataset({"type": "mk_hspc.datasets.annotation.AnnotationSiteDataset"}, str(final))._exists()
    manifest_path(final).write_text(json.dumps({**manifest, "digest_scheme": "blake3-listing"}))
    with pytest.raises(StaleOutputError, match="unknown digest scheme 'blake3-listing'"):
        AtomicDataset(
            {"type": "mk_hspc.datasets.annotation.AnnotationSiteDataset"}, str(final)
        ).verified_manifest()
