"""Which files of a folder are slides, and what each is called: the one rule every stage shares.

A slide is a file whose suffix is ``.czi`` in any letter case (``LAB01.CZI`` too), at any depth below the
folder. Its name is the file stem (``sub/LAB01.CZI`` -> ``LAB01``): names join slides to the slide sheet,
tile ids and cell ids, so two files whose stems are equal, also when they differ only in letter case, are
an error rather than one slide silently shadowing the other.
"""

from __future__ import annotations

from pathlib import Path

from mk_hspc.errors import UserError

SLIDE_SUFFIX = ".czi"


class DuplicateSlideNameError(UserError, ValueError):
    """Two slide files would get the same name (equal stems, ignoring letter case)."""


def is_slide_file(path: Path) -> bool:
    """True for a file whose suffix is ``.czi`` in any letter case."""
    return path.suffix.lower() == SLIDE_SUFFIX and path.is_file()


def find_slides(folder: str | Path) -> dict[str, Path]:
    """Every slide below ``folder`` (recursively), keyed by slide name (the file stem), sorted by name.

    A folder that does not exist holds no slides.

    Raises:
        DuplicateSlideNameError: two files have equal stems (case-insensitively); the message names both
            files of every such pair.
        ValueError: a file's stem is only dots (``...czi`` would be slide ``..``), naming the file.

    Example:
        >>> find_slides("data/01_raw/slides")  # doctest: +SKIP
        {'LAB01': PosixPath('data/01_raw/slides/LAB01.CZI'), 'lab02': PosixPath('data/01_raw/slides/b/lab02.czi')}
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    by_key: dict[str, Path] = {}
    clashes: list[str] = []
    for path in sorted(folder.rglob("*")):
        if not is_slide_file(path):
            continue
        if path.stem.strip(".") == "":
            # "..czi" / "...czi": the name would be "." or "..", and tile files named after it would leave the
            # tile store's folder.
            raise ValueError(
                f"{path}: a slide needs a name (its file stem), not {path.stem!r}; rename the file"
            )
        key = path.stem.casefold()
        if key in by_key:
            clashes.append(f"{by_key[key]} and {path}")
            continue
        by_key[key] = path
    if clashes:
        raise DuplicateSlideNameError(
            f"Slide names must be unique (a slide is named by its file stem, ignoring letter case) but in "
            f"{folder} these files would share a name: {'; '.join(clashes)}. Rename or move one of each pair."
        )
    return {path.stem: path for path in sorted(by_key.values(), key=lambda p: p.stem)}
