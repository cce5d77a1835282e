"""Read-only media sources: folders and ISO images, links, devices, caps (R-PDI-8)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from media_factory import build_media, make_iso, snapshot

from media.settings import MediaSettings
from media.source import EntryKind, FolderSource, IsoSource, normalize_media_path, open_source
from pki.errors import InvalidInputError, MediaImportError, PayloadTooLargeError

SETTINGS = MediaSettings()


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("medium")
    build_media(root)
    (root / "README.TXT").write_text("hello")
    return root


def test_folder_lists_files_and_directories_sorted(medium: Path) -> None:
    with FolderSource(medium, SETTINGS) as src:
        entries = src.entries()
    paths = [e.path for e in entries]
    assert paths == sorted(paths)
    kinds = {e.path: e.kind for e in entries}
    assert kinds["DICOMDIR"] is EntryKind.FILE
    assert kinds["DICOM/ST000001"] is EntryKind.DIRECTORY
    readme = next(e for e in entries if e.path == "README.TXT")
    assert readme.size == 5


def test_folder_reads_a_file_in_chunks(medium: Path) -> None:
    with FolderSource(medium, SETTINGS) as src, src.open("README.TXT") as fp:
        assert fp.read(2) == b"he"
        assert fp.read() == b"llo"
        assert getattr(fp, "name", None) is None  # pydicom must never re-open by name


@pytest.mark.parametrize(
    "bad", ["../etc/passwd", "/etc/passwd", "DICOM/../DICOMDIR", "DICOM//X", "a\\b", ""]
)
def test_paths_leaving_the_medium_are_refused(medium: Path, bad: str) -> None:
    with FolderSource(medium, SETTINGS) as src:
        with pytest.raises(InvalidInputError):
            src.open(bad)
    with pytest.raises(InvalidInputError):
        normalize_media_path(bad)


def test_unlisted_path_is_refused(medium: Path) -> None:
    with FolderSource(medium, SETTINGS) as src:
        with pytest.raises(MediaImportError, match="not on the medium"):
            src.open("NOPE")


def test_symlinks_are_listed_and_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    root = tmp_path / "medium"
    root.mkdir()
    (root / "LINK").symlink_to(outside / "secret")
    (root / "DIRLINK").symlink_to(outside)
    with FolderSource(root, SETTINGS) as src:
        entries = {e.path: e for e in src.entries()}
        assert entries["LINK"].kind is EntryKind.SYMLINK
        assert entries["LINK"].link_target == str(outside / "secret")
        assert entries["DIRLINK"].kind is EntryKind.SYMLINK
        assert "DIRLINK/secret" not in entries  # never descended
        with pytest.raises(MediaImportError, match="symlink"):
            src.open("LINK")


def test_link_swapped_in_after_listing_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("secret")
    root = tmp_path / "medium"
    (root / "DIR").mkdir(parents=True)
    (root / "DIR" / "FILE").write_text("ok")
    with FolderSource(root, SETTINGS) as src:
        (root / "DIR" / "FILE").unlink()
        (root / "DIR" / "FILE").symlink_to(outside)
        with pytest.raises(MediaImportError, match="cannot be opened"):
            src.open("DIR/FILE")


def test_fifo_is_listed_but_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "medium"
    root.mkdir()
    os.mkfifo(root / "PIPE")
    with FolderSource(root, SETTINGS) as src:
        entry = src.entry("PIPE")
        assert entry is not None and entry.kind is EntryKind.OTHER
        with pytest.raises(MediaImportError, match="not a regular file"):
            src.open("PIPE")


def test_size_caps(tmp_path: Path) -> None:
    root = tmp_path / "medium"
    root.mkdir()
    (root / "BIG").write_bytes(b"x" * 2000)
    with FolderSource(root, MediaSettings(max_file_bytes=1000)) as src:
        with pytest.raises(PayloadTooLargeError):
            src.open("BIG")
    with pytest.raises(PayloadTooLargeError, match="bytes of files"):
        FolderSource(root, MediaSettings(max_media_bytes=1000))
    for i in range(5):
        (root / f"F{i}").write_bytes(b"")
    with pytest.raises(PayloadTooLargeError, match="entries"):
        FolderSource(root, MediaSettings(max_entries=3))


def test_a_file_growing_while_read_is_cut_at_the_cap(tmp_path: Path) -> None:
    root = tmp_path / "medium"
    root.mkdir()
    (root / "F").write_bytes(b"x" * 100)
    with FolderSource(root, MediaSettings(max_file_bytes=150, chunk_bytes=64)) as src:
        with src.open("F") as fp:
            (root / "F").write_bytes(b"y" * 400)
            with pytest.raises(PayloadTooLargeError):
                fp.read()


def test_iso_with_rock_ridge_lists_the_same_files(medium: Path, tmp_path: Path) -> None:
    image = make_iso(medium, tmp_path / "m.iso")
    with FolderSource(medium, SETTINGS) as folder, IsoSource(image, SETTINGS) as iso:
        folder_files = {(e.path, e.size) for e in folder.entries() if e.kind is EntryKind.FILE}
        iso_files = {(e.path, e.size) for e in iso.entries() if e.kind is EntryKind.FILE}
        assert folder_files == iso_files
        assert iso.label == "PDI_TEST"
        with iso.open("DICOMDIR") as a, folder.open("DICOMDIR") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("joliet", [False, True])
def test_iso_without_rock_ridge_strips_versions(medium: Path, tmp_path: Path, joliet: bool) -> None:
    image = make_iso(medium, tmp_path / "plain.iso", rock_ridge=False, joliet=joliet)
    with IsoSource(image, SETTINGS) as iso:
        paths = {e.path for e in iso.entries()}
    assert "DICOMDIR" in paths
    assert "DICOM/ST000001/SE000001/IM000001" in paths
    assert not any(";" in p for p in paths)


def test_iso_symlink_is_reported_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "medium"
    root.mkdir()
    (root / "A").write_text("a")
    (root / "LINK").symlink_to("/etc/passwd")
    image = make_iso(root, tmp_path / "l.iso")
    with IsoSource(image, SETTINGS) as iso:
        link = iso.entry("LINK")
        assert link is not None and link.kind is EntryKind.SYMLINK
        assert link.link_target == "etc/passwd" or link.link_target.endswith("etc/passwd")
        with pytest.raises(MediaImportError):
            iso.open("LINK")


def test_not_an_iso_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.iso"
    bogus.write_bytes(b"\x00" * 70000)
    with pytest.raises(MediaImportError, match="ISO 9660"):
        open_source(bogus, SETTINGS)


def test_reading_never_writes(medium: Path, tmp_path: Path) -> None:
    before = snapshot(medium)
    with open_source(medium, SETTINGS) as src:
        for e in src.entries():
            if e.kind is EntryKind.FILE:
                with src.open(e.path) as fp:
                    fp.read()
    assert snapshot(medium) == before
