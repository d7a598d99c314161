"""sidecar/intake/trust.py: checkpoints are read only where their real path lies in the watched folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.intake.trust import OutsideWatchedFolder, check_inside, open_checkpoint


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(watched folder, a secret file outside it)."""
    watched = tmp_path / "output"
    watched.mkdir()
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"secret bytes")
    return watched, secret


def test_a_plain_file_and_a_link_inside_the_folder_are_read(layout) -> None:
    watched, _ = layout
    (watched / "sub").mkdir()
    real = watched / "sub" / "a_000000100.safetensors"
    real.write_bytes(b"inside")
    link = watched / "b_000000200.safetensors"
    link.symlink_to(real)
    for path in (real, link):
        check_inside(path, watched)
        with open_checkpoint(path, root=watched) as handle:
            assert handle.read() == b"inside"


def test_a_link_out_of_the_folder_is_refused_naming_both_and_the_option(layout) -> None:
    watched, secret = layout
    link = watched / "a_000000100.safetensors"
    link.symlink_to(secret)
    with pytest.raises(OutsideWatchedFolder) as info:
        check_inside(link, watched)
    message = str(info.value)
    assert str(link) in message and str(secret) in message and "--follow-symlinks" in message
    with pytest.raises(OutsideWatchedFolder), open_checkpoint(link, root=watched):
        pass


def test_follow_symlinks_reads_linked_storage(layout) -> None:
    watched, secret = layout
    link = watched / "a_000000100.safetensors"
    link.symlink_to(secret)
    with open_checkpoint(link, root=None) as handle:
        assert handle.read() == b"secret bytes"


def test_a_watched_folder_named_through_a_link_is_its_real_folder(layout, tmp_path: Path) -> None:
    watched, _ = layout
    alias = tmp_path / "alias"
    alias.symlink_to(watched)
    (watched / "a_000000100.safetensors").write_bytes(b"x")
    check_inside(alias / "a_000000100.safetensors", alias)
