"""Conformance findings for patient-brought media (R-PDI-1, R-PDI-2, R-PDI-8).

One table (:data:`FINDINGS`) gives every finding code its severity and the
plain-words explanation an operator reads in the import report.  The checks in
this module are pure: they look at names and File IDs, never at the medium.

Rules checked (PS3.10 and the general purpose media profiles of PS3.11):

* PS3.10 §8.2: a File ID has 1 to 8 components; each component is 1 to 8
  characters.
* PS3.10 §8.5: File ID characters are upper-case A-Z, digits 0-9 and ``_``
  (a subset of ISO 646 G0); consequently no extensions such as ``.dcm``.
* PS3.10 §8.3 and PS3.3 Annex F: the DICOMDIR sits at the root of the file-set
  and its records reference files by File ID relative to that root.
* IHE RAD TF-1 §15 (PDI): executables and viewers may be present on the media
  but an importer never runs them; R-PDI-2 says they are listed, not imported.

Messages never contain patient data; they may contain paths on the medium.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    """How much a finding matters to the import."""

    #: Worth knowing; nothing is lost.
    INFO = "info"
    #: The medium does not follow the standard but the content is still readable.
    WARNING = "warning"
    #: Something on the medium cannot be imported (it is skipped and reported).
    ERROR = "error"


class FindingCode(StrEnum):
    """Stable identifiers of conformance findings (see :data:`FINDINGS`)."""

    DICOMDIR_MISSING = "DICOMDIR_MISSING"
    DICOMDIR_NAME_CASE = "DICOMDIR_NAME_CASE"
    DICOMDIR_DUPLICATE = "DICOMDIR_DUPLICATE"
    DICOMDIR_UNREADABLE = "DICOMDIR_UNREADABLE"
    DICOMDIR_NOT_DIRECTORY_SOP = "DICOMDIR_NOT_DIRECTORY_SOP"
    DICOMDIR_TRANSFER_SYNTAX = "DICOMDIR_TRANSFER_SYNTAX"
    DICOMDIR_TOO_LARGE = "DICOMDIR_TOO_LARGE"
    EXTRA_DICOMDIR = "EXTRA_DICOMDIR"
    RECORD_BROKEN = "RECORD_BROKEN"
    RECORD_BAD_OFFSET = "RECORD_BAD_OFFSET"
    RECORD_LOOP = "RECORD_LOOP"
    RECORD_ORPHANED = "RECORD_ORPHANED"
    RECORD_OUT_OF_PLACE = "RECORD_OUT_OF_PLACE"
    RECORD_FILE_MISSING = "RECORD_FILE_MISSING"
    RECORD_FILE_MISMATCH = "RECORD_FILE_MISMATCH"
    FILE_ID_HOSTILE = "FILE_ID_HOSTILE"
    FILE_ID_TOO_DEEP = "FILE_ID_TOO_DEEP"
    FILE_ID_COMPONENT_TOO_LONG = "FILE_ID_COMPONENT_TOO_LONG"
    FILE_ID_LOWERCASE = "FILE_ID_LOWERCASE"
    FILE_ID_BAD_CHARACTERS = "FILE_ID_BAD_CHARACTERS"
    FILE_ID_EXTENSION = "FILE_ID_EXTENSION"
    FILE_ID_CASE_MISMATCH = "FILE_ID_CASE_MISMATCH"
    FILE_ID_AMBIGUOUS = "FILE_ID_AMBIGUOUS"
    FILE_ID_NOT_A_FILE = "FILE_ID_NOT_A_FILE"
    UNREFERENCED_DICOM_FILE = "UNREFERENCED_DICOM_FILE"
    NON_DICOM_FILE = "NON_DICOM_FILE"
    NO_PREAMBLE = "NO_PREAMBLE"
    MALFORMED_DICOM = "MALFORMED_DICOM"
    TRUNCATED_DICOM = "TRUNCATED_DICOM"
    DUPLICATE_SOP_INSTANCE = "DUPLICATE_SOP_INSTANCE"
    FILE_TOO_LARGE = "FILE_TOO_LARGE"
    READ_ERROR = "READ_ERROR"
    SYMLINK = "SYMLINK"
    SPECIAL_FILE = "SPECIAL_FILE"
    EXECUTABLE = "EXECUTABLE"
    AUTORUN = "AUTORUN"
    SCRIPT = "SCRIPT"
    VIEWER_FOLDER = "VIEWER_FOLDER"
    UNREADABLE_ENTRY = "UNREADABLE_ENTRY"
    MEDIA_CHANGED = "MEDIA_CHANGED"


@dataclass(frozen=True, slots=True)
class FindingKind:
    """One row of the findings table."""

    severity: Severity
    summary: str


#: The findings table: severity and operator-facing summary per code.
FINDINGS: dict[FindingCode, FindingKind] = {
    FindingCode.DICOMDIR_MISSING: FindingKind(
        Severity.WARNING,
        "There is no DICOMDIR at the top of the medium; every file was examined instead.",
    ),
    FindingCode.DICOMDIR_NAME_CASE: FindingKind(
        Severity.WARNING, "The DICOMDIR file name is not written in capital letters."
    ),
    FindingCode.DICOMDIR_DUPLICATE: FindingKind(
        Severity.WARNING, "More than one DICOMDIR-like file is at the top of the medium."
    ),
    FindingCode.DICOMDIR_UNREADABLE: FindingKind(
        Severity.WARNING,
        "The DICOMDIR cannot be read; every file was examined instead.",
    ),
    FindingCode.DICOMDIR_NOT_DIRECTORY_SOP: FindingKind(
        Severity.WARNING, "The DICOMDIR is not marked as a Media Storage Directory."
    ),
    FindingCode.DICOMDIR_TRANSFER_SYNTAX: FindingKind(
        Severity.INFO, "The DICOMDIR is not written in Explicit VR Little Endian."
    ),
    FindingCode.DICOMDIR_TOO_LARGE: FindingKind(
        Severity.ERROR, "The DICOMDIR is larger than the configured limit and was not read."
    ),
    FindingCode.EXTRA_DICOMDIR: FindingKind(
        Severity.INFO,
        "Another directory file (DICOMDIR) is on the medium; only the one at the top is used.",
    ),
    FindingCode.RECORD_BROKEN: FindingKind(
        Severity.WARNING, "A DICOMDIR entry is damaged and was ignored."
    ),
    FindingCode.RECORD_BAD_OFFSET: FindingKind(
        Severity.WARNING, "A DICOMDIR entry points to a position where there is no entry."
    ),
    FindingCode.RECORD_LOOP: FindingKind(
        Severity.WARNING, "DICOMDIR entries point at each other in a loop; the loop was cut."
    ),
    FindingCode.RECORD_ORPHANED: FindingKind(
        Severity.WARNING, "A DICOMDIR entry is not linked into the patient/study/series tree."
    ),
    FindingCode.RECORD_OUT_OF_PLACE: FindingKind(
        Severity.WARNING, "A DICOMDIR entry is at the wrong level of the tree."
    ),
    FindingCode.RECORD_FILE_MISSING: FindingKind(
        Severity.ERROR, "The DICOMDIR lists a file that is not on the medium."
    ),
    FindingCode.RECORD_FILE_MISMATCH: FindingKind(
        Severity.WARNING, "A file's own identifiers differ from its DICOMDIR entry."
    ),
    FindingCode.FILE_ID_HOSTILE: FindingKind(
        Severity.ERROR,
        "A file reference tries to leave the medium ('..' or an absolute path); refused.",
    ),
    FindingCode.FILE_ID_TOO_DEEP: FindingKind(
        Severity.WARNING, "A file path has more than 8 folder levels (PS3.10 8.2)."
    ),
    FindingCode.FILE_ID_COMPONENT_TOO_LONG: FindingKind(
        Severity.WARNING, "A file or folder name is longer than 8 characters (PS3.10 8.2)."
    ),
    FindingCode.FILE_ID_LOWERCASE: FindingKind(
        Severity.WARNING, "A file or folder name uses lower-case letters (PS3.10 8.5)."
    ),
    FindingCode.FILE_ID_BAD_CHARACTERS: FindingKind(
        Severity.WARNING,
        "A file or folder name uses characters other than A-Z, 0-9 and _ (PS3.10 8.5).",
    ),
    FindingCode.FILE_ID_EXTENSION: FindingKind(
        Severity.WARNING, "A file name has an extension such as .dcm (not allowed by PS3.10)."
    ),
    FindingCode.FILE_ID_CASE_MISMATCH: FindingKind(
        Severity.WARNING,
        "The DICOMDIR spells a file name in different letter case than the medium.",
    ),
    FindingCode.FILE_ID_AMBIGUOUS: FindingKind(
        Severity.ERROR,
        "A DICOMDIR file reference matches several files that differ only in letter case.",
    ),
    FindingCode.FILE_ID_NOT_A_FILE: FindingKind(
        Severity.ERROR, "A DICOMDIR file reference points to a folder, link or device."
    ),
    FindingCode.UNREFERENCED_DICOM_FILE: FindingKind(
        Severity.WARNING, "A DICOM file on the medium is not listed in the DICOMDIR."
    ),
    FindingCode.NON_DICOM_FILE: FindingKind(
        Severity.INFO, "A file on the medium is not DICOM and is not imported."
    ),
    FindingCode.NO_PREAMBLE: FindingKind(
        Severity.WARNING,
        "A DICOM file lacks the 128-byte preamble and 'DICM' marker (PS3.10 7.1).",
    ),
    FindingCode.MALFORMED_DICOM: FindingKind(
        Severity.ERROR, "A DICOM file is damaged and cannot be imported."
    ),
    FindingCode.TRUNCATED_DICOM: FindingKind(
        Severity.ERROR, "A DICOM file is cut short (incomplete copy) and cannot be imported."
    ),
    FindingCode.DUPLICATE_SOP_INSTANCE: FindingKind(
        Severity.WARNING, "Two files on the medium carry the same SOP Instance UID."
    ),
    FindingCode.FILE_TOO_LARGE: FindingKind(
        Severity.ERROR, "A file is larger than the configured limit and was not read."
    ),
    FindingCode.READ_ERROR: FindingKind(
        Severity.ERROR, "A file could not be read from the medium."
    ),
    FindingCode.SYMLINK: FindingKind(
        Severity.WARNING, "A symbolic link is on the medium; links are never followed."
    ),
    FindingCode.SPECIAL_FILE: FindingKind(
        Severity.WARNING, "A device, pipe or socket is on the medium; it is never read."
    ),
    FindingCode.EXECUTABLE: FindingKind(
        Severity.WARNING, "A program is on the medium; it is never run or imported."
    ),
    FindingCode.AUTORUN: FindingKind(
        Severity.WARNING, "An autorun file is on the medium; it is never run or imported."
    ),
    FindingCode.SCRIPT: FindingKind(
        Severity.WARNING, "A script is on the medium; it is never run or imported."
    ),
    FindingCode.VIEWER_FOLDER: FindingKind(
        Severity.INFO, "A viewer program folder is on the medium; its files are not imported."
    ),
    FindingCode.UNREADABLE_ENTRY: FindingKind(
        Severity.WARNING, "An entry of the medium's file system could not be listed."
    ),
    FindingCode.MEDIA_CHANGED: FindingKind(
        Severity.ERROR, "A file changed on the medium after it was examined; it was skipped."
    ),
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One conformance observation about the medium, for the import report.

    ``path`` is the relative POSIX path on the medium (or the File ID as written
    in the DICOMDIR) the finding is about; ``message`` is plain words for an
    operator and never contains patient data.
    """

    code: FindingCode
    severity: Severity
    path: str | None
    message: str

    def to_dict(self) -> dict[str, str | None]:
        return {
            "code": self.code.value,
            "severity": self.severity.value,
            "path": self.path,
            "message": self.message,
        }


def finding(code: FindingCode, path: str | None = None, detail: str | None = None) -> Finding:
    """Build a finding from the table, optionally adding a detail sentence."""
    kind = FINDINGS[code]
    message = kind.summary if not detail else f"{kind.summary} {detail}"
    return Finding(code=code, severity=kind.severity, path=path, message=message)


# --- File IDs (PS3.10 §8.2, §8.5) -------------------------------------------------

_COMPONENT_OK = re.compile(r"[A-Z0-9_]{1,8}")
_ALLOWED = re.compile(r"[A-Z0-9_]*")
_DRIVE = re.compile(r"^[A-Za-z]:")


def file_id_components(value: str | Sequence[str]) -> list[str]:
    """Split a Referenced File ID (CS, multi-valued with ``\\``) into components.

    pydicom gives a multi-valued CS as a list; a single value may still carry
    backslashes when read raw.  Trailing padding spaces are not part of names.
    """
    if isinstance(value, str):
        parts = value.split("\\")
    else:
        parts = []
        for item in value:
            parts.extend(str(item).split("\\"))
    return [p.rstrip(" ") for p in parts]


def hostile_reason(components: Sequence[str]) -> str | None:
    """Why a File ID would leave the file-set root, or ``None`` if it stays inside.

    Refused (R-PDI-8): empty components (a leading ``\\`` makes the path
    absolute), ``.`` and ``..``, ``/`` inside a component (a second separator),
    drive letters, NUL and other control characters.
    """
    if not components:
        return "it is empty"
    for comp in components:
        if comp == "":
            return "it starts with a separator or has an empty folder name"
        if comp in (".", ".."):
            return "it contains '.' or '..'"
        if "/" in comp:
            return "it contains '/' (an absolute path or a hidden folder change)"
        if _DRIVE.match(comp):
            return "it names a drive"
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in comp):
            return "it contains control characters"
    return None


def check_file_id(components: Sequence[str], shown: str) -> list[Finding]:
    """PS3.10 §8.2/§8.5 checks for a File ID that is known not to be hostile.

    ``shown`` is how the path appears in the findings.  A trailing ``.``
    (ISO 9660 names without extension) has already been stripped by the source.
    """
    out: list[Finding] = []
    if len(components) > 8:
        out.append(
            finding(FindingCode.FILE_ID_TOO_DEEP, shown, f"It has {len(components)} levels.")
        )
    if any(len(c) > 8 for c in components):
        out.append(finding(FindingCode.FILE_ID_COMPONENT_TOO_LONG, shown))
    if any(c != c.upper() for c in components):
        out.append(finding(FindingCode.FILE_ID_LOWERCASE, shown))
    last = components[-1] if components else ""
    if "." in last.strip("."):
        out.append(finding(FindingCode.FILE_ID_EXTENSION, shown))
    upper = [c.upper().replace(".", "") for c in components]
    if any(not _ALLOWED.fullmatch(c) for c in upper):
        out.append(finding(FindingCode.FILE_ID_BAD_CHARACTERS, shown))
    return out


def is_conformant_component(component: str) -> bool:
    """True if one File ID component satisfies PS3.10 §8.2 and §8.5."""
    return bool(_COMPONENT_OK.fullmatch(component))


# --- Things that are never imported (R-PDI-2) ------------------------------------

#: Windows and cross-platform program file extensions.
EXECUTABLE_EXTENSIONS = frozenset(
    {
        "exe", "com", "dll", "msi", "msp", "scr", "pif", "cpl", "ocx", "sys", "drv",
        "jar", "app", "apk", "dmg", "pkg", "deb", "rpm", "bin", "run", "elf", "so",
        "dylib", "lnk", "url",
    }
)  # fmt: skip
#: Script and document-macro extensions that a desktop may run when opened.
SCRIPT_EXTENSIONS = frozenset(
    {
        "bat", "cmd", "ps1", "psm1", "vbs", "vbe", "js", "jse", "wsf", "wsh", "hta",
        "sh", "bash", "command", "py", "pl", "rb", "reg", "inf", "scf", "applescript",
    }
)  # fmt: skip
#: Folder names commonly used for the viewer shipped on hospital CDs.
VIEWER_FOLDER_NAMES = frozenset(
    {
        "VIEWER", "VIEWERS", "DICOMVIEWER", "DICOM_VIEWER", "VIEWER_WIN", "VIEWER_MAC",
        "EFILM", "EFILMLT", "KPACS", "K-PACS", "IMAGEJ", "RADIANT", "MICRODICOM",
        "SYNAPSE", "OSIRIX", "WEASIS", "PROGRAM", "PROGRAMS", "BIN", "APP", "APPS",
    }
)  # fmt: skip

#: Leading bytes of native programs: PE/DOS, ELF, Mach-O (both byte orders, fat).
EXECUTABLE_MAGIC = (
    b"MZ",
    b"\x7fELF",
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",
)


def classify_name(path: str) -> FindingCode | None:
    """Classify a file by name: autorun, program or script; ``None`` otherwise."""
    name = path.rsplit("/", 1)[-1]
    lower = name.lower()
    if lower in ("autorun.inf", "autorun.exe", "autoplay.inf", "desktop.ini"):
        return FindingCode.AUTORUN
    ext = lower.rsplit(".", 1)[-1] if "." in lower.strip(".") else ""
    if ext in EXECUTABLE_EXTENSIONS:
        return FindingCode.EXECUTABLE
    if ext in SCRIPT_EXTENSIONS:
        return FindingCode.SCRIPT
    return None


def classify_content(prefix: bytes) -> FindingCode | None:
    """Classify a file by its first bytes: native program or ``#!`` script."""
    if any(prefix.startswith(magic) for magic in EXECUTABLE_MAGIC):
        return FindingCode.EXECUTABLE
    if prefix.startswith(b"#!"):
        return FindingCode.SCRIPT
    return None


def viewer_folders(directories: Iterable[str], program_paths: Iterable[str]) -> list[str]:
    """Folders that hold a viewer: a well-known name, or a folder holding a program.

    Only top-most folders are returned; everything below them is part of the
    viewer and is listed but neither examined nor imported (R-PDI-2).
    """
    candidates: set[str] = set()
    for directory in directories:
        if directory.rsplit("/", 1)[-1].upper() in VIEWER_FOLDER_NAMES:
            candidates.add(directory)
        elif directory.lower().endswith(".app"):
            candidates.add(directory)
    for program in program_paths:
        if "/" in program:
            candidates.add(program.rsplit("/", 1)[0])
    top: list[str] = []
    for folder in sorted(candidates, key=lambda p: (p.count("/"), p)):
        if not any(folder == t or folder.startswith(t + "/") for t in top):
            top.append(folder)
    return sorted(top)


def under_any(path: str, folders: Iterable[str]) -> bool:
    """True if ``path`` lies inside (or is) one of ``folders``."""
    return any(path == f or path.startswith(f + "/") for f in folders)
