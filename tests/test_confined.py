"""sidecar/confined.py: writes and deletes stay inside one folder and never go through a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.confined import ConfinedFolder, UnsafeEntryError


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder outside the confined one, with a file that must stay as it is."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "precious.txt").write_bytes(b"keep me")
    return folder


@pytest.fixture
def root(tmp_path: Path):
    with ConfinedFolder.open(tmp_path / "root", create=True) as opened:
        yield opened


def untouched(victim: Path) -> bool:
    return (
        sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
        and (victim / "precious.txt").read_bytes() == b"keep me"
    )


def test_a_sub_folder_is_made_or_opened_but_never_followed(root: ConfinedFolder, victim: Path) -> None:
    with root.folder("made") as made:
        assert made.path == root.path / "made" and (root.path / "made").is_dir()
    (root.path / "link").symlink_to(victim)
    (root.path / "file").write_bytes(b"x")
    with pytest.raises(UnsafeEntryError, match=r"link` is a symbolic link \(to .*victim\)"):
        root.folder("link")
    with pytest.raises(UnsafeEntryError, match=r"file` is a file, not a folder"):
        root.folder("file")
    with pytest.raises(UnsafeEntryError), root.folders(("link", "deeper")):
        pass
    assert untouched(victim)


def test_own_opens_the_last_folder_without_following_it(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "state").symlink_to(victim)
    with pytest.raises(UnsafeEntryError):
        ConfinedFolder.own(tmp_path / "state")
    assert untouched(victim)


def test_write_atomic_replaces_a_planted_link_instead_of_writing_through_it(
    root: ConfinedFolder, victim: Path
) -> None:
    (root.path / "daemon.json").symlink_to(victim / "precious.txt")
    root.write_atomic("daemon.json", lambda handle: handle.write(b"{}"))
    assert root.kind("daemon.json") == "file"
    assert (root.path / "daemon.json").read_bytes() == b"{}"
    assert untouched(victim)
    assert root.entries() == ["daemon.json"]  # no temp file left


def test_a_file_written_in_place_is_never_a_link_of_either_kind(root: ConfinedFolder, victim: Path) -> None:
    (root.path / "soft.lock").symlink_to(victim / "precious.txt")
    os.link(victim / "precious.txt", root.path / "hard.lock")
    with pytest.raises(UnsafeEntryError, match="symbolic link"):
        root.open_file("soft.lock", os.O_RDWR)
    with pytest.raises(UnsafeEntryError, match="has 2 hard links"):
        root.open_file("hard.lock", os.O_RDWR)
    with pytest.raises(UnsafeEntryError, match="has 2 hard links"):
        root.require_plain_file("hard.lock")
    assert untouched(victim)


def test_remove_tree_removes_links_never_their_targets(root: ConfinedFolder, victim: Path) -> None:
    with root.folder("tree") as tree, tree.folder("inner") as inner:
        (inner.path / "data").write_bytes(b"x")
        (inner.path / "to-victim").symlink_to(victim)
    (root.path / "top-link").symlink_to(victim)
    root.remove_tree("tree")
    root.remove_tree("top-link")
    root.remove_tree("missing")
    assert root.entries() == []
    assert untouched(victim)


def test_a_hard_link_is_made_of_files_only(root: ConfinedFolder, victim: Path) -> None:
    with root.folder("a") as a, root.folder("b") as b:
        (a.path / "image.png").write_bytes(b"png")
        b.link_atomic(a, "image.png", "copy.png")
        assert (b.path / "copy.png").stat().st_ino == (a.path / "image.png").stat().st_ino
        (a.path / "planted.png").symlink_to(victim / "precious.txt")
        with pytest.raises(UnsafeEntryError):
            b.link_atomic(a, "planted.png", "other.png")
        assert b.entries() == ["copy.png"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_names_are_one_path_component(root: ConfinedFolder, name: str) -> None:
    with pytest.raises(ValueError, match="one path component"):
        root.unlink(name)
