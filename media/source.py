"""Read-only access to a patient-brought medium (R-PDI-1, R-PDI-8).

A medium is either a mounted folder (CD, DVD, USB stick) or an ISO 9660 image
read without mounting it (``pycdlib``).  Both are seen through one interface,
:class:`MediaSource`: a sorted listing of :class:`MediaEntry` (relative POSIX
path, size, kind) and :meth:`MediaSource.open` to stream one regular file.

Safety rules, enforced here so no caller can forget them (R-PDI-8):

* symbolic links are listed as links and never followed, on a folder
  (``lstat``, ``O_NOFOLLOW`` on every path component) and on an image
  (Rock Ridge ``SL`` entries);
* devices, pipes and sockets are listed and never opened;
* a path to open must be a listed regular file: ``..``, absolute paths and
  anything not in the listing are refused;
* the listing is capped in entries and depth, the total of file sizes is
  capped, and every read is capped at ``max_file_bytes`` even if a file grows;
* nothing is ever written, neither on the medium nor anywhere else.

Image names: Rock Ridge names are preferred, then Joliet, then plain ISO 9660
names with the ``;1`` version and a trailing ``.`` removed (ECMA-119 §7.5).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

from pki.errors import InvalidInputError, MediaImportError, PayloadTooLargeError

from .settings import MediaSettings
from .streams import CappedReader, MediaStream


class EntryKind(StrEnum):
    """What a listed entry is; only ``FILE`` can ever be opened."""

    FILE = "file"
    DIRECTORY = "dir"
    SYMLINK = "symlink"
    DEVICE = "device"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class MediaEntry:
    """One entry of the medium: relative POSIX path, size in bytes and kind."""

    path: str
    size: int
    kind: EntryKind
    #: Target of a symbolic link, as written on the medium (never resolved).
    link_target: str | None = None


class MediaSource(Protocol):
    """A read-only medium.  Use as a context manager to release the image file."""

    #: ``"folder"`` or ``"iso"``.
    kind: str
    #: Volume label of an image, or the folder name.
    label: str

    def entries(self) -> list[MediaEntry]:
        """All entries, sorted by path (directories included)."""
        ...

    def entry(self, path: str) -> MediaEntry | None:
        """The entry at exactly ``path``, or ``None``."""
        ...

    def unlisted(self) -> list[str]:
        """Folders whose content could not be listed (reported, not fatal)."""
        ...

    def open(self, path: str) -> BinaryIO:
        """Open a listed regular file for reading (a context manager)."""
        ...

    def close(self) -> None:
        """Release resources (the image file handle)."""
        ...

    def __enter__(self) -> MediaSource: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def normalize_media_path(path: str) -> str:
    """Validate a relative POSIX path on a medium and return it normalized.

    Refuses (``InvalidInputError``) absolute paths, ``.``/``..`` components,
    empty components, backslashes and NUL: a caller can only name what the
    listing contains, never a way out (R-PDI-8).
    """
    if not isinstance(path, str) or not path:
        raise InvalidInputError("a media path must be a non-empty string")
    if path.startswith("/") or "\\" in path or "\x00" in path:
        raise InvalidInputError("a media path must be relative and use '/' separators")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidInputError("a media path must not contain '.', '..' or empty parts")
    return "/".join(parts)


class _BaseSource:
    """Shared listing bookkeeping and caps."""

    kind = "base"

    def __init__(self, settings: MediaSettings) -> None:
        self._settings = settings
        self._entries: list[MediaEntry] = []
        self._by_path: dict[str, MediaEntry] = {}
        self._unlisted: list[str] = []
        self.label = ""

    def _finish_listing(self, entries: list[MediaEntry]) -> None:
        entries.sort(key=lambda e: e.path)
        total = sum(e.size for e in entries if e.kind is EntryKind.FILE)
        if total > self._settings.max_media_bytes:
            raise PayloadTooLargeError(
                f"the medium holds {total} bytes of files, more than the limit of "
                f"{self._settings.max_media_bytes}"
            )
        self._entries = entries
        self._by_path = {e.path: e for e in entries}

    def _check_count(self, count: int) -> None:
        if count > self._settings.max_entries:
            raise PayloadTooLargeError(
                f"the medium holds more than {self._settings.max_entries} entries"
            )

    def entries(self) -> list[MediaEntry]:
        return list(self._entries)

    def entry(self, path: str) -> MediaEntry | None:
        return self._by_path.get(path)

    def unlisted(self) -> list[str]:
        return list(self._unlisted)

    def _file_entry(self, path: str) -> MediaEntry:
        norm = normalize_media_path(path)
        entry = self._by_path.get(norm)
        if entry is None:
            raise MediaImportError(f"{norm} is not on the medium")
        if entry.kind is not EntryKind.FILE:
            raise MediaImportError(f"{norm} is a {entry.kind.value}, not a regular file")
        if entry.size > self._settings.max_file_bytes:
            raise PayloadTooLargeError(
                f"{norm} is {entry.size} bytes, more than the per-file limit of "
                f"{self._settings.max_file_bytes}"
            )
        return entry

    def __enter__(self) -> _BaseSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        pass


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class FolderSource(_BaseSource):
    """A mounted medium or any folder, listed with ``lstat`` (links never followed).

    Files are opened component by component relative to the root with
    ``O_NOFOLLOW`` so that a link swapped in after the listing is refused too.
    """

    kind = "folder"

    def __init__(self, root: str | os.PathLike[str], settings: MediaSettings) -> None:
        super().__init__(settings)
        # The root itself is chosen by the operator (e.g. /media/cdrom may be a
        # link); only what lies below it is medium content.
        self._root = Path(root).resolve()
        if not self._root.is_dir():
            raise MediaImportError("the media folder does not exist or is not a folder")
        self.label = self._root.name
        self._finish_listing(self._list())

    def _list(self) -> list[MediaEntry]:
        out: list[MediaEntry] = []
        stack: list[tuple[Path, str, int]] = [(self._root, "", 0)]
        while stack:
            folder, prefix, depth = stack.pop()
            try:
                with os.scandir(folder) as it:
                    children = list(it)
            except OSError:
                self._unlisted.append(prefix.rstrip("/") or ".")
                continue
            for child in children:
                rel = f"{prefix}{child.name}"
                self._check_count(len(out) + 1)
                try:
                    st = child.stat(follow_symlinks=False)
                except OSError:
                    out.append(MediaEntry(rel, 0, EntryKind.OTHER))
                    continue
                mode = st.st_mode
                if stat.S_ISLNK(mode):
                    try:
                        target = os.readlink(child.path)
                    except OSError:
                        target = None
                    out.append(MediaEntry(rel, 0, EntryKind.SYMLINK, target))
                elif stat.S_ISDIR(mode):
                    out.append(MediaEntry(rel, 0, EntryKind.DIRECTORY))
                    if depth + 1 < self._settings.max_depth:
                        stack.append((Path(child.path), rel + "/", depth + 1))
                elif stat.S_ISREG(mode):
                    out.append(MediaEntry(rel, st.st_size, EntryKind.FILE))
                elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    out.append(MediaEntry(rel, 0, EntryKind.DEVICE))
                else:
                    out.append(MediaEntry(rel, 0, EntryKind.OTHER))
        return out

    def open(self, path: str) -> BinaryIO:
        entry = self._file_entry(path)
        parts = entry.path.split("/")
        fds: list[int] = []
        try:
            dir_fd = os.open(self._root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
            fds.append(dir_fd)
            for part in parts[:-1]:
                dir_fd = os.open(
                    part,
                    os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC,
                    dir_fd=dir_fd,
                )
                fds.append(dir_fd)
            fd = os.open(
                parts[-1],
                os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_NOCTTY | _O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            raise MediaImportError(
                f"{entry.path} cannot be opened (it may be a link or have changed)"
            ) from exc
        finally:
            for d in fds:
                os.close(d)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise MediaImportError(f"{entry.path} is no longer a regular file")
        raw = os.fdopen(fd, "rb", buffering=0)
        reader = CappedReader(raw, self._settings.max_file_bytes, entry.path)
        return MediaStream(reader, self._settings.chunk_bytes)  # type: ignore[return-value]

    def close(self) -> None:
        pass


def _strip_iso_version(name: str) -> str:
    """``IM000001.;1`` -> ``IM000001`` (ECMA-119 §7.5: version and empty extension)."""
    if ";" in name:
        name = name.split(";", 1)[0]
    if name.endswith(".") and name not in (".", ".."):
        name = name[:-1]
    return name


class IsoSource(_BaseSource):
    """An ISO 9660 image read in place with ``pycdlib`` (never mounted)."""

    kind = "iso"

    def __init__(self, image: str | os.PathLike[str], settings: MediaSettings) -> None:
        super().__init__(settings)
        import pycdlib  # local import: only needed for images
        from pycdlib.pycdlibexception import PyCdlibException

        self._exc_type: type[Exception] = PyCdlibException
        self._iso = pycdlib.PyCdlib()
        try:
            self._iso.open(os.fspath(image))
        except (PyCdlibException, OSError, ValueError, IndexError, struct.error) as exc:
            raise MediaImportError("the image is not a readable ISO 9660 file") from exc
        if self._iso.has_rock_ridge():
            self._namespace = "rr_path"
        elif self._iso.has_joliet():
            self._namespace = "joliet_path"
        else:
            self._namespace = "iso_path"
        self._native: dict[str, str] = {}
        self.label = self._volume_label()
        try:
            entries = self._list()
        except (PayloadTooLargeError, MediaImportError):
            self._iso.close()
            raise
        except Exception as exc:
            self._iso.close()
            raise MediaImportError("the image's directory structure cannot be read") from exc
        self._finish_listing(entries)

    def _volume_label(self) -> str:
        pvd = getattr(self._iso, "pvd", None)
        raw = getattr(pvd, "volume_identifier", b"") if pvd is not None else b""
        return raw.decode("ascii", "replace").strip() if isinstance(raw, bytes) else ""

    def _name_of(self, record: Any) -> str:
        if self._namespace == "rr_path":
            return bytes(record.rock_ridge.name()).decode("utf-8", "surrogateescape")
        ident = bytes(record.file_identifier())
        if self._namespace == "joliet_path":
            return ident.decode("utf-16_be", "replace")
        return ident.decode("ascii", "replace")

    def _list(self) -> list[MediaEntry]:
        out: list[MediaEntry] = []
        stack: list[tuple[str, str, int]] = [("/", "", 0)]
        while stack:
            native_dir, prefix, depth = stack.pop()
            try:
                children = list(self._iso.list_children(**{self._namespace: native_dir}))
            except (self._exc_type, UnicodeError, ValueError, KeyError):
                self._unlisted.append(prefix.rstrip("/") or ".")
                continue
            for record in children:
                if record is None or record.is_dot() or record.is_dotdot():
                    continue
                raw_name = self._name_of(record)
                shown = raw_name
                if self._namespace == "iso_path":
                    shown = _strip_iso_version(raw_name)
                native = native_dir.rstrip("/") + "/" + raw_name
                rel = prefix + shown
                self._check_count(len(out) + 1)
                if record.is_symlink():
                    target = bytes(record.rock_ridge.symlink_path()).decode("utf-8", "replace")
                    out.append(MediaEntry(rel, 0, EntryKind.SYMLINK, target))
                    continue
                mode = self._rr_mode(record)
                if record.is_dir():
                    out.append(MediaEntry(rel, 0, EntryKind.DIRECTORY))
                    if depth + 1 < self._settings.max_depth:
                        stack.append((native, rel + "/", depth + 1))
                elif mode is not None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
                    out.append(MediaEntry(rel, 0, EntryKind.DEVICE))
                elif mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                    out.append(MediaEntry(rel, 0, EntryKind.OTHER))
                else:
                    out.append(MediaEntry(rel, int(record.get_data_length()), EntryKind.FILE))
                    self._native[rel] = native
        return out

    def _rr_mode(self, record: Any) -> int | None:
        rock = getattr(record, "rock_ridge", None)
        if rock is None:
            return None
        try:
            return int(rock.get_file_mode())
        except Exception:
            return None

    def open(self, path: str) -> BinaryIO:
        entry = self._file_entry(path)
        native = self._native[entry.path]
        try:
            handle = self._iso.open_file_from_iso(**{self._namespace: native})
            inner = handle.__enter__()
        except self._exc_type as exc:
            raise MediaImportError(f"{entry.path} cannot be read from the image") from exc

        def _close() -> None:
            handle.__exit__(None, None, None)

        reader = CappedReader(inner, self._settings.max_file_bytes, entry.path, _close)
        return MediaStream(reader, self._settings.chunk_bytes)  # type: ignore[return-value]

    def close(self) -> None:
        try:
            self._iso.close()
        except Exception:  # already closed or never opened
            pass


def open_source(path: str | os.PathLike[str], settings: MediaSettings) -> MediaSource:
    """Open a folder or an ISO 9660 image (chosen by what ``path`` is)."""
    p = Path(path)
    if p.is_dir():
        return FolderSource(p, settings)  # type: ignore[return-value]
    if p.is_file():
        return IsoSource(p, settings)  # type: ignore[return-value]
    raise MediaImportError("the media path is neither a folder nor an image file")


def iter_chunks(stream: BinaryIO, chunk_bytes: int) -> Iterator[bytes]:
    """Yield a stream's content in chunks of at most ``chunk_bytes``."""
    while True:
        chunk = stream.read(chunk_bytes)
        if not chunk:
            return
        yield chunk
