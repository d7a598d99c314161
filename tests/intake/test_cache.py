"""sidecar/intake/cache.py: hashed private copies of whole checkpoints, made before the trainer prunes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import sidecar.intake.cache as cache_module
from sidecar.confined import UnsafeEntryError
from sidecar.errors import SidecarError
from sidecar.intake.cache import (
    PARTIAL_SUFFIX,
    ChangedWhileCopying,
    CheckpointCache,
    combined_hash,
    content_hash,
    unusable_fingerprint,
)
from sidecar.intake.trust import OutsideWatchedFolder


def write_lora(path: Path, *, rows: int = 64, fill: float = 1.0) -> bytes:
    """A small real safetensors file; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "lora_unet_down.lora_down.weight": np.full((rows, 16), fill, dtype=np.float32),
        "lora_unet_down.lora_up.weight": np.zeros((16, rows), dtype=np.float32),
    }
    save_file(tensors, str(path))
    return path.read_bytes()


def signature(path: Path) -> tuple[int, int]:
    """(size, mtime_ns), as the readiness tracker saw the file when it judged it whole."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class DuringCopy:
    """A stand-in for `hashlib` whose digest runs `action` once, after the first chunk is copied.

    With a small chunk size this is "the trainer did something while sidecar was copying",
    without threads or sleeps.
    """

    def __init__(self, action) -> None:
        self.action = action

    def sha256(self, *args: bytes):
        real = hashlib.sha256(*args)
        outer = self

        class Digest:
            def update(self, chunk: bytes) -> None:
                real.update(chunk)
                if outer.action is not None:
                    action, outer.action = outer.action, None
                    action()

            def hexdigest(self) -> str:
                return real.hexdigest()

        return Digest()


@pytest.fixture
def cache(tmp_path: Path) -> CheckpointCache:
    return CheckpointCache(tmp_path / "samples" / ".sidecar" / "cache")


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "COPY_CHUNK_BYTES", 256)


def leftovers(cache: CheckpointCache) -> list[str]:
    return sorted(entry.name for entry in cache.folder.iterdir())


# ------------------------------------------------------------------ content hash


def test_content_hash_streams_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    data = write_lora(path)
    assert content_hash(path, chunk_bytes=7) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ copy_in


def test_copy_in_hashes_what_it_copies(tmp_path: Path, cache: CheckpointCache) -> None:
    original = tmp_path / "run" / "my_lora_000000500.safetensors"
    data = write_lora(original)
    expected = signature(original)

    copy = cache.copy_in(original, expected)

    digest = hashlib.sha256(data).hexdigest()
    assert copy.content_hash == digest
    assert copy.path == cache.folder / digest / original.name
    assert copy.path.read_bytes() == data
    assert (copy.size_bytes, copy.mtime_ns) == expected
    assert leftovers(cache) == [digest]  # no partial copy left behind


def test_the_same_content_twice_is_one_copy(tmp_path: Path, cache: CheckpointCache) -> None:
    first = tmp_path / "a" / "my_lora.safetensors"
    second = tmp_path / "b" / "my_lora.safetensors"
    write_lora(first)
    write_lora(second)
    one = cache.copy_in(first, signature(first))
    two = cache.copy_in(second, signature(second))
    assert one.content_hash == two.content_hash and one.path == two.path
    assert leftovers(cache) == [one.content_hash]


def test_a_file_changed_since_it_was_judged_whole_is_refused(tmp_path: Path, cache: CheckpointCache) -> None:
    original = tmp_path / "my_lora_000000500.safetensors"
    write_lora(original)
    size, mtime_ns = signature(original)
    with pytest.raises(ChangedWhileCopying):
        cache.copy_in(original, (size, mtime_ns - 1))
    assert leftovers(cache) == []


def test_a_file_rewritten_while_it_is_copied_is_refused(
    tmp_path: Path, cache: CheckpointCache, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer rewrites the checkpoint in place, same size, new content, mid-copy."""
    original = tmp_path / "my_lora_000000500.safetensors"
    write_lora(original, fill=1.0)
    expected = signature(original)
    replacement = write_lora(tmp_path / "next" / original.name, fill=2.0)
    assert len(replacement) == expected[0]

    def rewrite() -> None:
        with original.open("r+b") as handle:  # in place: the copy's open handle sees it
            handle.write(replacement)
        os.utime(original, ns=(expected[1] + 10**9, expected[1] + 10**9))

    monkeypatch.setattr(cache_module, "hashlib", DuringCopy(rewrite))
    with pytest.raises(ChangedWhileCopying):
        cache.copy_in(original, expected)
    assert original.read_bytes() == replacement  # the rewrite happened mid-copy
    assert leftovers(cache) == []  # the partial copy is removed


def test_a_file_growing_while_it_is_copied_is_refused(
    tmp_path: Path, cache: CheckpointCache, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = tmp_path / "my_lora_000000500.safetensors"
    write_lora(original)
    expected = signature(original)

    def append() -> None:
        with original.open("ab") as handle:
            handle.write(b"\0" * 1024)

    monkeypatch.setattr(cache_module, "hashlib", DuringCopy(append))
    with pytest.raises(ChangedWhileCopying):
        cache.copy_in(original, expected)
    assert original.stat().st_size == expected[0] + 1024  # it grew mid-copy
    assert leftovers(cache) == []


def test_a_file_deleted_while_it_is_copied_is_still_copied_whole(
    tmp_path: Path, cache: CheckpointCache, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruned by the trainer mid-copy: the open handle still reads every byte."""
    original = tmp_path / "my_lora_000000500.safetensors"
    data = write_lora(original)
    expected = signature(original)
    monkeypatch.setattr(cache_module, "hashlib", DuringCopy(original.unlink))
    copy = cache.copy_in(original, expected)
    assert not original.exists()
    assert copy.path.read_bytes() == data
    assert copy.content_hash == hashlib.sha256(data).hexdigest()


def test_a_copy_that_is_not_whole_is_refused(tmp_path: Path, cache: CheckpointCache) -> None:
    """Unchanged while copied, but truncated: the tracker's verdict no longer holds."""
    original = tmp_path / "my_lora_000000500.safetensors"
    data = write_lora(original)
    original.write_bytes(data[:-10])
    with pytest.raises(ChangedWhileCopying):
        cache.copy_in(original, signature(original))
    assert leftovers(cache) == []


def test_a_missing_file_raises_file_not_found(tmp_path: Path, cache: CheckpointCache) -> None:
    with pytest.raises(FileNotFoundError):
        cache.copy_in(tmp_path / "gone.safetensors", (1, 1))


# ------------------------------------------------------------------ reading, dropping, cleaning


def test_source_of_prefers_the_copy(tmp_path: Path, cache: CheckpointCache) -> None:
    original = tmp_path / "my_lora_000000500.safetensors"
    write_lora(original)
    copy = cache.copy_in(original, signature(original))
    assert cache.source_of(copy.content_hash, original) == copy.path
    original.unlink()
    assert cache.source_of(copy.content_hash, original) == copy.path
    renamed = tmp_path / "other_name.safetensors"
    assert cache.source_of(copy.content_hash, renamed) == copy.path  # the one copy in the folder


def test_source_of_falls_back_to_the_original_then_fails(tmp_path: Path, cache: CheckpointCache) -> None:
    original = tmp_path / "my_lora_000000500.safetensors"
    write_lora(original)
    assert cache.source_of("0" * 64, original) == original
    assert cache.source_of(None, original) == original
    original.unlink()
    with pytest.raises(SidecarError, match="vanished, and no copy of it was kept"):
        cache.source_of("0" * 64, original)


def test_drop_removes_one_copy(tmp_path: Path, cache: CheckpointCache) -> None:
    original = tmp_path / "my_lora_000000500.safetensors"
    write_lora(original)
    copy = cache.copy_in(original, signature(original))
    cache.drop(copy.content_hash)
    cache.drop(copy.content_hash)  # twice is fine
    assert leftovers(cache) == []


def test_clean_keeps_only_what_pending_jobs_need_and_drops_partial_copies(
    tmp_path: Path, cache: CheckpointCache
) -> None:
    needed_file, done_file = tmp_path / "a_000000100.safetensors", tmp_path / "a_000000200.safetensors"
    write_lora(needed_file, fill=1.0)
    write_lora(done_file, fill=2.0)
    needed = cache.copy_in(needed_file, signature(needed_file))
    done = cache.copy_in(done_file, signature(done_file))
    partial = cache.folder / f".0123abcd{PARTIAL_SUFFIX}"  # a process killed mid-copy left it
    partial.write_bytes(b"half")

    cache.clean([needed.content_hash])

    assert leftovers(cache) == [needed.content_hash]
    assert needed.path.is_file() and not done.path.exists()


# ------------------------------------------------------------------ files that can never render


def test_unusable_fingerprints_tell_files_apart_by_path_and_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a_000000100.safetensors", tmp_path / "a_000000200.safetensors"
    a.write_bytes(b"")
    b.write_bytes(b"")
    first, second = unusable_fingerprint(a), unusable_fingerprint(b)
    assert first is not None and second is not None
    assert first[0] != second[0]  # two empty files are not one checkpoint
    assert first[1:] == signature(a)
    a.write_bytes(b"truncated")
    changed = unusable_fingerprint(a)
    assert changed is not None and changed[0] != first[0]
    assert unusable_fingerprint(a) == changed  # stable for the same bytes
    assert unusable_fingerprint(tmp_path / "gone.safetensors") is None


# ------------------------------------------------------------------ never through a symlink


def test_a_cache_folder_that_is_a_symlink_is_refused_and_left_alone(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_bytes(b"keep me")
    state = tmp_path / "samples" / ".sidecar"
    state.mkdir(parents=True)
    (state / "cache").symlink_to(victim)

    with pytest.raises(UnsafeEntryError, match=r"cache` is a symbolic link \(to .*victim\)"):
        CheckpointCache(state / "cache")

    assert (victim / "precious.txt").read_bytes() == b"keep me"


def test_clean_and_drop_remove_links_in_the_cache_never_what_they_point_to(
    tmp_path: Path, cache: CheckpointCache
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_bytes(b"keep me")
    (cache.folder / "planted").symlink_to(victim)
    (cache.folder / "deadbeef").mkdir()
    (cache.folder / "deadbeef" / "inner").symlink_to(victim)

    cache.drop("deadbeef")
    cache.clean([])

    assert leftovers(cache) == []
    assert (victim / "precious.txt").read_bytes() == b"keep me"


def test_a_checkpoint_linked_out_of_the_watched_folder_is_not_copied(tmp_path: Path, cache) -> None:
    watched = tmp_path / "output"
    watched.mkdir()
    secret = tmp_path / "secret.safetensors"
    write_lora(secret)
    link = watched / "my_lora_000000500.safetensors"
    link.symlink_to(secret)

    with pytest.raises(OutsideWatchedFolder):
        cache.copy_in(link, signature(secret), root=watched)
    assert leftovers(cache) == []
    copy = cache.copy_in(link, signature(secret), root=None)  # --follow-symlinks
    assert copy.path.read_bytes() == secret.read_bytes()


# ------------------------------------------------------------------ a split Wan 2.2 checkpoint


def write_pair(folder: Path, stem: str, *, fill: float = 1.0) -> tuple[Path, Path]:
    """ai-toolkit's two files of one Wan 2.2 step, with different bytes."""
    high, low = folder / f"{stem}_high_noise.safetensors", folder / f"{stem}_low_noise.safetensors"
    write_lora(high, fill=fill)
    write_lora(low, fill=fill + 0.5)
    return high, low


def test_a_split_checkpoint_is_copied_with_its_sibling_into_one_folder(tmp_path: Path, cache) -> None:
    """The renderer reads the high-noise copy and finds its sibling beside it, by its own name."""
    high, low = write_pair(tmp_path / "run", "my_lora_000000500")

    copy = cache.copy_in(high, signature(high), siblings={low: signature(low)})

    digest = combined_hash([content_hash(high), content_hash(low)])
    assert copy.content_hash == digest and leftovers(cache) == [digest]
    assert copy.path == cache.folder / digest / high.name
    assert sorted(path.name for path in copy.path.parent.iterdir()) == [high.name, low.name]
    assert (copy.path.parent / low.name).read_bytes() == low.read_bytes()
    assert copy.size_bytes == high.stat().st_size + low.stat().st_size
    assert copy.mtime_ns == max(signature(high)[1], signature(low)[1])
    # Either file first: the same content. Equal bytes at another step: the same content too.
    assert cache.copy_in(low, signature(low), siblings={high: signature(high)}).content_hash == digest
    again = write_pair(tmp_path / "run", "my_lora_000000750")
    assert (
        cache.copy_in(again[0], signature(again[0]), siblings={again[1]: signature(again[1])}).content_hash
        == digest
    )
    assert copy.content_hash != content_hash(high)  # not the high-noise file alone


def test_a_sibling_changed_or_linked_out_of_the_folder_stops_the_whole_copy(tmp_path: Path, cache) -> None:
    watched = tmp_path / "output"
    high, low = write_pair(watched, "my_lora_000000500")
    size, mtime_ns = signature(low)
    with pytest.raises(ChangedWhileCopying, match="low_noise"):
        cache.copy_in(high, signature(high), siblings={low: (size, mtime_ns - 1)})
    assert leftovers(cache) == []

    secret = tmp_path / "secret.safetensors"
    write_lora(secret)
    low.unlink()
    low.symlink_to(secret)
    with pytest.raises(OutsideWatchedFolder, match=r"my_lora_000000500_low_noise\.safetensors is a symlink"):
        cache.copy_in(high, signature(high), root=watched, siblings={low: signature(secret)})
    assert leftovers(cache) == []


def test_an_unusable_split_checkpoint_is_fingerprinted_with_its_sibling(tmp_path: Path) -> None:
    high, low = write_pair(tmp_path, "my_lora_000000500")
    low.write_bytes(low.read_bytes()[:100])  # truncated
    alone, pair = unusable_fingerprint(high), unusable_fingerprint(high, low)
    assert alone is not None and pair is not None and alone[0] != pair[0]
    assert pair[1:] == (signature(high)[0] + 100, max(signature(high)[1], signature(low)[1]))
    low.write_bytes(b"truncated otherwise")
    assert unusable_fingerprint(high, low)[0] != pair[0]  # type: ignore[index]
    low.unlink()
    assert unusable_fingerprint(high, low) == alone  # a sibling gone meanwhile is left out
