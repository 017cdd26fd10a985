"""Firecracker, a guest kernel and a root file system, from one source.

A microVM needs a VMM, an uncompressed kernel and a root file system; an
initial RAM disk is optional. :func:`fetch_artifacts` brings them into
the cache from one of three sources and returns an :class:`Artifacts`
record holding the path and SHA-256 of every file.

``official``
    The Firecracker release tarball for a pinned version (or ``latest``,
    read from where ``releases/latest`` redirects), checked against its
    published ``.tgz.sha256.txt`` and against the ``SHA256SUMS`` inside
    it, then the newest guest kernel and Ubuntu image that Firecracker's
    CI keeps in the public S3 bucket ``spec.ccfc.min`` under
    ``firecracker-ci/v<major>.<minor>/<arch>/``. When that prefix lists
    nothing, the dated prefixes ``firecracker-ci/<YYYYMMDD>-…/<arch>/``
    (the layout CI builds use from June 2026) are tried, newest date
    first. "Newest" compares version numbers, not strings. The Ubuntu
    squashfs is repacked as an ext4 image of at least 1 GiB.
``mirror``
    The same kind of files served by any HTTP server, so one laptop can
    serve a room: :func:`write_mirror` lays out the folder, and any
    static server serves it (``make mirror``, ``python -m http.server``).
``local``
    The guest built offline by :func:`helpers.images.build_guest`; no
    Firecracker binary (the notebooks then use the emulator).

A mirror, relative to its base URL::

    manifest.json   what the client reads (see below)
    SHA256SUMS      "<sha256>  <path>" per file, for ``sha256sum -c``
    firecracker/v<v>/firecracker-v<v>-<arch>.tgz             (optional)
    firecracker/v<v>/firecracker-v<v>-<arch>.tgz.sha256.txt  (optional)
    guest/vmlinux
    guest/rootfs.ext4
    guest/initrd.img                                         (optional)

``manifest.json`` holds ``format`` (1), ``arch``, ``version`` (of the
Firecracker release, or null), ``kernel_release`` (or null) and
``files``: for each role (``release``, ``kernel``, ``rootfs``,
``initrd``) an object with the relative ``path``, ``sha256`` and
``size``. The client refuses a file whose checksum differs.

Base URLs come from the parameters, else from the environment:
``FCLAB_RELEASE_URL`` (releases page, default GitHub's), ``FCLAB_S3_URL``
(the CI bucket), ``FCLAB_MIRROR`` (a mirror); ``FCLAB_CACHE`` moves the
cache.

Cache: ``cache_dir()/artifacts/official/v<v>-<arch>/``,
``…/mirror/<host>_<port>_<path>/`` and ``…/local/``. A download streams
into a hidden ``.part`` file beside its target and is renamed into place
only once its checksum matches; a failure deletes it. After a complete
fetch a record (``artifacts.json``) lets the next call answer without
the network, as long as no file changed since; ``refresh=True`` skips it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import quote, urljoin, urlsplit

import requests
from tqdm import tqdm as std_tqdm

from helpers.cli import run_json_command
from helpers.errors import LabError
from helpers.paths import cache_dir

log = logging.getLogger(__name__)

SOURCES = ("official", "mirror", "local")
DEFAULT_VERSION = "1.16.1"
DEFAULT_ARCH = "x86_64"

RELEASE_URL = "https://github.com/firecracker-microvm/firecracker/releases"
S3_URL = "https://s3.amazonaws.com/spec.ccfc.min"
RELEASE_URL_ENV = "FCLAB_RELEASE_URL"
S3_URL_ENV = "FCLAB_S3_URL"
MIRROR_ENV = "FCLAB_MIRROR"

# Roles of the files a fetch can return, in the order tables show them.
# "release" is the tarball the binaries and the API description came from.
ROLES = (
    "firecracker", "jailer", "api_spec", "release",
    "kernel", "initrd", "rootfs",
)

# Seconds to wait for a connection, then for each piece of a response:
# patient enough for a crowded classroom network, short enough that a
# server that went away is reported instead of waited for.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0

# Bytes read at a time while streaming and hashing: large enough to keep
# the per-chunk cost negligible, small enough for a smooth progress bar.
CHUNK_BYTES = 1 << 20

# The ext4 root file system is at least 1 GiB: Firecracker's CI Ubuntu
# image did not fit in 400 MiB, and a guest needs room to write files.
MIN_ROOTFS_BYTES = 1 << 30
# Above that, the unpacked content plus a quarter, plus room for the
# journal and metadata, rounded up to whole 64 MiB.
ROOTFS_GROWTH = 1.25
ROOTFS_SLACK_BYTES = 256 << 20
ROOTFS_ROUND_BYTES = 64 << 20
# mkfs.ext4 makes one inode per 16 KiB by default; a tree of many small
# files gets twice as many inodes as it has entries instead.
EXT4_BYTES_PER_INODE = 16384
# ext4 stores files in 4 KiB blocks; size estimates round up to them.
EXT4_BLOCK = 4096

# S3 returns at most 1000 keys per page; a listing that needs more pages
# than this is a server that loops, not a bucket.
MAX_LIST_PAGES = 100
# How many dated CI prefixes to try, newest first, before giving up.
MAX_DATED_PREFIXES = 5

RECORD_NAME = "artifacts.json"
CHECKSUMS_NAME = "checksums.json"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

# Hex digits of a SHA-256 an error message shows (64 bits): enough to
# tell two checksums apart by eye, short enough to fit a slide.
DIGEST_SHOWN = 16

# Where write_mirror puts the guest's files, relative to the mirror root.
MIRROR_GUEST = {
    "kernel": "guest/vmlinux",
    "rootfs": "guest/rootfs.ext4",
    "initrd": "guest/initrd.img",
}

_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_KERNEL_KEY_RE = re.compile(r"/vmlinux-(\d+)\.(\d+)\.(\d+)$")
_UBUNTU_KEY_RE = re.compile(r"/ubuntu-(\d+)\.(\d+)\.squashfs$")
_DATED_PREFIX_RE = re.compile(r"^firecracker-ci/(\d{8})-[^/]+/$")


# e_machine values of the architectures Firecracker runs guests on.
ELF_MACHINES = {0x3E: "x86-64", 0xB7: "AArch64"}

# Feature flags of the ext4 superblock: (field, bit, name as e2fsprogs
# prints it). The fields sit at offsets 0x5C, 0x60 and 0x64.
EXT4_FEATURES: tuple[tuple[str, int, str], ...] = (
    ("compat", 0x1, "dir_prealloc"),
    ("compat", 0x2, "imagic_inodes"),
    ("compat", 0x4, "has_journal"),
    ("compat", 0x8, "ext_attr"),
    ("compat", 0x10, "resize_inode"),
    ("compat", 0x20, "dir_index"),
    ("compat", 0x200, "sparse_super2"),
    ("compat", 0x400, "fast_commit"),
    ("compat", 0x800, "stable_inodes"),
    ("compat", 0x1000, "orphan_file"),
    ("incompat", 0x1, "compression"),
    ("incompat", 0x2, "filetype"),
    ("incompat", 0x4, "needs_recovery"),
    ("incompat", 0x8, "journal_dev"),
    ("incompat", 0x10, "meta_bg"),
    ("incompat", 0x40, "extent"),
    ("incompat", 0x80, "64bit"),
    ("incompat", 0x100, "mmp"),
    ("incompat", 0x200, "flex_bg"),
    ("incompat", 0x400, "ea_inode"),
    ("incompat", 0x1000, "dirdata"),
    ("incompat", 0x2000, "metadata_csum_seed"),
    ("incompat", 0x4000, "large_dir"),
    ("incompat", 0x8000, "inline_data"),
    ("incompat", 0x10000, "encrypt"),
    ("incompat", 0x20000, "casefold"),
    ("ro_compat", 0x1, "sparse_super"),
    ("ro_compat", 0x2, "large_file"),
    ("ro_compat", 0x8, "huge_file"),
    ("ro_compat", 0x10, "uninit_bg"),
    ("ro_compat", 0x20, "dir_nlink"),
    ("ro_compat", 0x40, "extra_isize"),
    ("ro_compat", 0x100, "quota"),
    ("ro_compat", 0x200, "bigalloc"),
    ("ro_compat", 0x400, "metadata_csum"),
    ("ro_compat", 0x1000, "read-only"),
    ("ro_compat", 0x2000, "project"),
    ("ro_compat", 0x4000, "shared_blocks"),
    ("ro_compat", 0x8000, "verity"),
    ("ro_compat", 0x10000, "orphan_present"),
)


class ArtifactError(LabError):
    """A VMM or guest file could not be fetched, checked or unpacked."""


class DownloadError(ArtifactError):
    """An HTTP request failed: no connection, a timeout or an error code."""

    def __init__(self, url: str, reason: str, hint: str = "") -> None:
        """Name the URL and the reason, and suggest the other sources."""
        self.url = url
        self.reason = reason
        advice = hint or (
            "Check the network and the address. Offline, use "
            "source='mirror' with the mirror URL your instructor gives "
            f"(or set {MIRROR_ENV}), or source='local' to build the "
            "guest without any download."
        )
        super().__init__(f"could not download {url}: {reason}. {advice}")


class ChecksumError(ArtifactError):
    """A file's SHA-256 differs from the one published for it.

    The message puts each fact on its own line so it reads on a slide:
    the file, where it came from, the two checksums (shortened, see
    :data:`DIGEST_SHOWN`; :attr:`expected` and :attr:`actual` keep them
    whole), then what to do.
    """

    def __init__(self, url: str, expected: str, actual: str, *,
                 name: str | None = None) -> None:
        """Name the file and its origin *url*, both checksums, the remedy.

        *name* is the file's name, by default the last part of *url*.
        """
        self.url = url
        self.name = name or PurePosixPath(urlsplit(url).path).name or url
        self.expected = expected
        self.actual = actual
        shown = DIGEST_SHOWN
        if expected[:shown].lower() == actual[:shown].lower():
            # Alike in the shortened form: only the whole ones differ.
            shown = max(len(expected), len(actual))
        super().__init__("\n".join([
            f"SHA-256 mismatch for {self.name}",
            f"from {url}",
            f"expected {_shorten(expected, shown)}",
            f"got      {_shorten(actual, shown)}",
            ("The file was not kept. Fetch again; if it fails again, the "
             "server holds a damaged or changed file: ask for the mirror "
             "to be rebuilt (write_mirror), or use source='local'."),
        ]))


def _shorten(digest: str, shown: int) -> str:
    """The first *shown* characters of *digest*, and "…" if cut."""
    return digest if len(digest) <= shown else f"{digest[:shown]}…"


class UnsafeArchiveError(ArtifactError):
    """A tarball holds an entry that could write outside its folder."""


@dataclass(frozen=True)
class Artifacts:
    """The files one fetch produced, with the SHA-256 of each.

    ``version`` is the Firecracker release, None without one (``local``,
    or a mirror of a local guest), as are ``firecracker``, ``jailer`` and
    ``api_spec``. ``checksums`` maps each role of :meth:`files` to its
    SHA-256; ``extra`` notes where the files came from (S3 keys, mirror).
    """

    source: str
    version: str | None
    firecracker: Path | None
    jailer: Path | None
    kernel: Path
    rootfs: Path
    initrd: Path | None
    api_spec: Path | None
    checksums: dict[str, str]
    arch: str = DEFAULT_ARCH
    kernel_release: str | None = None
    release_tarball: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def files(self) -> dict[str, Path]:
        """Return role → path for every file present, in table order."""
        paths = {
            "firecracker": self.firecracker,
            "jailer": self.jailer,
            "api_spec": self.api_spec,
            "release": self.release_tarball,
            "kernel": self.kernel,
            "initrd": self.initrd,
            "rootfs": self.rootfs,
        }
        return {
            role: path for role in ROLES
            if (path := paths[role]) is not None
        }

    def rows(self) -> list[dict[str, Any]]:
        """Return one row per file: role, name, size and SHA-256."""
        return [
            {
                "role": role,
                "file": path.name,
                "bytes": path.stat().st_size,
                "sha256": self.checksums.get(role, ""),
            }
            for role, path in self.files().items()
        ]

    def as_dict(self) -> dict[str, Any]:
        """Return the record with plain strings (JSON-ready)."""
        return {
            "source": self.source,
            "version": self.version,
            "arch": self.arch,
            "kernel_release": self.kernel_release,
            "files": {r: str(p) for r, p in self.files().items()},
            "checksums": dict(self.checksums),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Artifacts:
        """Rebuild a record written by :meth:`as_dict`."""
        files = {r: Path(p) for r, p in data["files"].items()}
        return cls(
            source=data["source"],
            version=data["version"],
            firecracker=files.get("firecracker"),
            jailer=files.get("jailer"),
            kernel=files["kernel"],
            rootfs=files["rootfs"],
            initrd=files.get("initrd"),
            api_spec=files.get("api_spec"),
            checksums=dict(data["checksums"]),
            arch=data.get("arch", DEFAULT_ARCH),
            kernel_release=data.get("kernel_release"),
            release_tarball=files.get("release"),
            extra=dict(data.get("extra", {})),
        )


def normalize_version(version: str) -> str:
    """Return ``1.16.1`` for ``v1.16.1`` or ``1.16.1``; reject the rest."""
    match = _VERSION_RE.match(version.strip())
    if not match:
        raise ArtifactError(
            f"{version!r} is not a Firecracker version: give it as "
            "'1.16.1' (or 'v1.16.1'), or pass 'latest'"
        )
    return ".".join(match.groups())


def sha256_file(path: Path) -> str:
    """Return the SHA-256 of a file as 64 hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def ext4_feature_names(
    compat: int, incompat: int, ro_compat: int
) -> list[str]:
    """Name the feature bits of an ext4 superblock, as dumpe2fs does."""
    fields = {"compat": compat, "incompat": incompat, "ro_compat": ro_compat}
    names = [
        name for field_name, bit, name in EXT4_FEATURES
        if fields[field_name] & bit
    ]
    for field_name, value in fields.items():
        known = sum(b for f, b, _ in EXT4_FEATURES if f == field_name)
        if value & ~known:
            names.append(f"{field_name}:{value & ~known:#x}")
    return names


def _write_atomic(path: Path, text: str) -> None:
    """Replace *path* with *text* in one rename."""
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".part"
    )
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Checksums:
    """SHA-256 of files, remembered by size and modification time."""

    def __init__(self, store: Path) -> None:
        """Load what *store* remembers (nothing if absent or unreadable)."""
        self.store = store
        self._known: dict[str, list[Any]] = {}
        try:
            loaded = json.loads(store.read_text())
        except (OSError, ValueError):
            return
        if isinstance(loaded, dict):
            self._known = loaded

    def fresh(self, path: Path) -> str | None:
        """Return the remembered checksum if the file did not change."""
        entry = self._known.get(str(path))
        try:
            st = path.stat()
        except OSError:
            return None
        if (
            isinstance(entry, list) and len(entry) == 3
            and entry[:2] == [st.st_size, st.st_mtime_ns]
        ):
            return str(entry[2])
        return None

    def sha256(self, path: Path) -> str:
        """Return the file's checksum, hashing it only when it changed."""
        known = self.fresh(path)
        if known is None:
            log.debug("hashing %s", path)
            known = sha256_file(path)
            self.remember(path, known)
        return known

    def remember(self, path: Path, digest: str) -> None:
        """Note the checksum of *path* as it is now."""
        st = path.stat()
        self._known[str(path)] = [st.st_size, st.st_mtime_ns, digest]
        self.store.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.store, json.dumps(self._known, indent=1))


def _progress(total: int | None, desc: str, enabled: bool) -> std_tqdm:
    """Return a progress bar: a widget in notebooks when possible."""
    options: dict[str, Any] = {
        "total": total, "desc": desc, "unit": "B", "unit_scale": True,
        "unit_divisor": 1024,
    }
    # The notebook widget needs ipywidgets; without it, plain text.
    if enabled and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm as auto_tqdm

        return auto_tqdm(**options)
    return std_tqdm(disable=not enabled, **options)


class _Http:
    """One HTTP session: small texts, and checked, atomic downloads."""

    def __init__(self, checksums: _Checksums, progress: bool) -> None:
        """Open a session; *checksums* remembers what was downloaded."""
        self.session = requests.Session()
        self.checksums = checksums
        self.progress = progress

    def close(self) -> None:
        """Close the session's connections."""
        self.session.close()

    def _get(
        self, url: str, hint: str = "", **kwargs: Any
    ) -> requests.Response:
        """GET *url*; turn any failure or error status into DownloadError."""
        log.debug("GET %s %s", url, kwargs.get("params", ""))
        try:
            resp = self.session.get(
                url, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), **kwargs
            )
        except requests.RequestException as exc:
            raise DownloadError(url, _reason(exc), hint) from exc
        if resp.status_code >= 400:
            resp.close()
            raise DownloadError(
                resp.url or url, f"HTTP {resp.status_code} {resp.reason}",
                hint,
            )
        return resp

    def content(
        self, url: str, params: dict[str, str] | None = None, hint: str = ""
    ) -> bytes:
        """Return the body of a small resource (a listing, a manifest)."""
        resp = self._get(url, hint, params=params)
        try:
            return resp.content
        except requests.RequestException as exc:
            raise DownloadError(url, _reason(exc), hint) from exc
        finally:
            resp.close()

    def text(self, url: str, hint: str = "") -> str:
        """Return a small text resource, read as UTF-8."""
        return self.content(url, hint=hint).decode("utf-8", "replace")

    def location(self, url: str) -> str:
        """Return where *url* redirects to (or its own URL if it doesn't)."""
        resp = self._get(url, allow_redirects=False, stream=True)
        resp.close()
        target = resp.headers.get("Location")
        return urljoin(url, target) if target else resp.url

    def download(
        self,
        url: str,
        dest: Path,
        *,
        sha256: str | None = None,
        size: int | None = None,
        hint: str = "",
    ) -> str:
        """Stream *url* to *dest* once verified; return its SHA-256.

        A *dest* already present is kept when it matches *sha256* (or,
        lacking one, *size*). Otherwise the body goes to a hidden
        ``.part`` file in the same folder, renamed to *dest* only when
        size and checksum match; on any failure the part is deleted.
        """
        expected = sha256.lower() if sha256 else None
        if dest.is_file():
            have = self.checksums.sha256(dest)
            if expected == have or (
                expected is None
                and (size is None or dest.stat().st_size == size)
            ):
                log.debug("reusing %s", dest)
                return have

        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual, count = self._stream(url, out, dest.name, hint)
            if expected is not None and actual != expected:
                raise ChecksumError(url, expected, actual)
            if size is not None and count != size:
                raise DownloadError(
                    url, f"received {count} bytes, expected {size}", hint
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.checksums.remember(dest, actual)
        log.info("downloaded %s (%d bytes)", dest.name, count)
        return actual

    def _stream(
        self, url: str, out: IO[bytes], name: str, hint: str
    ) -> tuple[str, int]:
        """Copy the body of *url* to *out*; return its SHA-256 and size."""
        digest = hashlib.sha256()
        count = 0
        resp = self._get(url, hint, stream=True)
        total = resp.headers.get("Content-Length")
        bar = _progress(
            int(total) if total and total.isdigit() else None,
            name, self.progress,
        )
        try:
            for chunk in resp.iter_content(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                count += len(chunk)
                bar.update(len(chunk))
        except requests.RequestException as exc:
            raise DownloadError(url, _reason(exc), hint) from exc
        finally:
            bar.close()
            resp.close()
        return digest.hexdigest(), count


def _reason(exc: BaseException) -> str:
    """Return a short reason for a requests exception."""
    if isinstance(exc, requests.ConnectionError):
        return f"no connection ({type(exc).__name__})"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _parse_sha256_line(text: str, name: str, url: str) -> str:
    """Return the checksum for *name* in ``<hex>  <name>`` lines."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and _SHA256_RE.match(parts[0]):
            listed = parts[1].lstrip("*")
            if PurePosixPath(listed).name == name:
                return parts[0].lower()
    raise ArtifactError(
        f"{url} lists no SHA-256 for {name}; the release page may have "
        "changed its format: download the tarball and its checksum by hand"
    )


# -- tarballs ------------------------------------------------------------


def _member_parts(name: str, archive: Path) -> tuple[str, ...]:
    """Return a member's path parts; refuse absolute paths and ``..``."""
    path = PurePosixPath(name)
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if path.is_absolute() or ".." in parts or not parts:
        raise UnsafeArchiveError(
            f"{archive.name} holds the entry {name!r}, which would land "
            "outside the folder it is unpacked to; it was not unpacked. "
            "Delete the file and fetch it from a trusted source."
        )
    return parts


def _check_inside(
    folder: Path, dest: Path, name: str, archive: Path
) -> None:
    """Refuse to write into a folder that links lead out of *dest*."""
    real = folder.resolve()
    if real != dest.resolve() and dest.resolve() not in real.parents:
        raise UnsafeArchiveError(
            f"{archive.name}: the entry {name!r} would be written to "
            f"{real}, outside {dest}; it was not unpacked"
        )


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a tarball's files, folders and inner symlinks into *dest*.

    Absolute names, ``..``, symlinks that are absolute or climb with
    ``..``, hard links and device files are refused with
    UnsafeArchiveError; links without ``..`` cannot lead outside.
    """
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = _member_parts(member.name, archive)
            target = dest.joinpath(*parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                _check_inside(target.parent, dest, member.name, archive)
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has data
                with source, target.open("xb") as out:
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
                target.chmod(0o755 if member.mode & 0o111 else 0o644)
            elif member.issym():
                link = PurePosixPath(member.linkname)
                if link.is_absolute() or ".." in link.parts:
                    raise UnsafeArchiveError(
                        f"{archive.name}: the link {member.name!r} points "
                        f"to {member.linkname!r}, outside its folder; it "
                        "was not unpacked. Fetch the tarball from a "
                        "trusted source."
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(member.linkname, target)
            else:
                raise UnsafeArchiveError(
                    f"{archive.name}: the entry {member.name!r} is neither "
                    "a file, a folder nor an inner link; it was not "
                    "unpacked. Fetch the tarball from a trusted source."
                )


def verify_sums(folder: Path, origin: str) -> dict[str, str]:
    """Check every file a folder's ``SHA256SUMS`` lists; return them."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise ArtifactError(
            f"{origin} has no SHA256SUMS in {folder.name}/; the files "
            "cannot be checked: fetch the release again"
        )
    found: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or not _SHA256_RE.match(parts[0]):
            continue
        name = parts[1].lstrip("*")
        rel = _member_parts(name, sums)
        if rel[0] == folder.name and len(rel) > 1:
            rel = rel[1:]
        path = folder.joinpath(*rel)
        if not path.is_file():
            raise ArtifactError(
                f"{origin}: SHA256SUMS lists {name}, which is missing; "
                "fetch the release again"
            )
        actual = sha256_file(path)
        if actual != parts[0].lower():
            listed = f"{name}, listed in the tarball's SHA256SUMS"
            raise ChecksumError(origin, parts[0], actual, name=listed)
        found[PurePosixPath(*rel).as_posix()] = actual
    return found


def _unpack_release(
    tarball: Path, version: str, arch: str, origin: str
) -> tuple[Path, dict[str, str]]:
    """Unpack a release tarball beside itself; return folder and sums.

    The folder appears by one rename after SHA256SUMS checked out; an
    existing one is checked again and reused.
    """
    top = f"release-v{version}-{arch}"
    final = tarball.parent / top
    if final.is_dir():
        try:
            return final, verify_sums(final, origin)
        except ArtifactError:
            log.warning("%s changed since unpacked; unpacking again", final)
            shutil.rmtree(final)

    with tempfile.TemporaryDirectory(
        dir=tarball.parent, prefix=".unpack-"
    ) as work:
        safe_extract(tarball, Path(work))
        unpacked = Path(work) / top
        if not unpacked.is_dir():
            names = sorted(p.name for p in Path(work).iterdir())
            raise ArtifactError(
                f"{origin} unpacks to {names}, not to {top}/; is it a "
                "Firecracker release tarball for this version and "
                "architecture?"
            )
        sums = verify_sums(unpacked, origin)
        try:
            os.rename(unpacked, final)
        except OSError:
            # Another process unpacked the same release meanwhile.
            if not final.is_dir():
                raise
            log.debug("%s appeared meanwhile; keeping it", final)
    return final, sums


def _release_files(
    folder: Path,
    sums: dict[str, str],
    version: str,
    arch: str,
    checksums: _Checksums,
) -> dict[str, tuple[Path, str]]:
    """Return role → (path, sha256) for the binaries and the API spec.

    Checksums verified against SHA256SUMS are remembered as they are.
    """
    names = {
        "firecracker": f"firecracker-v{version}-{arch}",
        "jailer": f"jailer-v{version}-{arch}",
        "api_spec": f"firecracker_spec-v{version}.yaml",
    }
    out: dict[str, tuple[Path, str]] = {}
    for role, name in names.items():
        path = folder / name
        if not path.is_file():
            if role == "firecracker":
                raise ArtifactError(
                    f"{folder} holds no {name}; the release tarball is "
                    "incomplete: fetch it again or use another source"
                )
            log.info("the release has no %s", name)
            continue
        digest = sums.get(name)
        if digest:
            checksums.remember(path, digest)
        else:
            digest = checksums.sha256(path)
        out[role] = (path, digest)
    return out


# -- the S3 bucket of Firecracker's CI -----------------------------------


def _local_tag(element: ET.Element) -> str:
    """Return an XML tag without its ``{namespace}``."""
    return element.tag.rsplit("}", 1)[-1]


def _child_text(element: ET.Element, name: str) -> str:
    """Return the text of the first child called *name* (any namespace)."""
    for child in element:
        if _local_tag(child) == name:
            return child.text or ""
    return ""


def list_bucket(
    http: _Http, s3_url: str, prefix: str, delimiter: str = ""
) -> tuple[dict[str, int | None], list[str]]:
    """List keys (with sizes) and common prefixes under *prefix*.

    Follows ``IsTruncated`` / ``NextContinuationToken`` page by page.
    """
    keys: dict[str, int | None] = {}
    prefixes: list[str] = []
    token = ""
    for _ in range(MAX_LIST_PAGES):
        params = {"list-type": "2", "prefix": prefix}
        if delimiter:
            params["delimiter"] = delimiter
        if token:
            params["continuation-token"] = token
        url = s3_url + "/"
        try:
            root = ET.fromstring(http.content(url, params))
        except ET.ParseError as exc:
            raise DownloadError(url, f"the listing is not XML ({exc})")
        for item in root:
            tag = _local_tag(item)
            if tag == "Contents":
                size = _child_text(item, "Size")
                keys[_child_text(item, "Key")] = (
                    int(size) if size.isdigit() else None
                )
            elif tag == "CommonPrefixes":
                prefixes.append(_child_text(item, "Prefix"))
        if _child_text(root, "IsTruncated").lower() != "true":
            return keys, prefixes
        token = _child_text(root, "NextContinuationToken")
        if not token:
            raise DownloadError(
                url, "a truncated listing carries no continuation token"
            )
    raise DownloadError(
        s3_url, f"the listing of {prefix} runs past {MAX_LIST_PAGES} pages"
    )


def newest_key(
    keys: dict[str, int | None], pattern: re.Pattern[str]
) -> str | None:
    """Return the key whose numbers in *pattern* are highest, if any."""
    versions = {
        key: tuple(int(g) for g in m.groups())
        for key in keys
        if (m := pattern.search(key))
    }
    return max(versions, key=lambda k: versions[k]) if versions else None


GuestKeys = tuple[tuple[str, "int | None"], tuple[str, "int | None"]]


def _guest_keys(
    http: _Http, s3_url: str, prefix: str
) -> GuestKeys | None:
    """Return the newest kernel and Ubuntu image under *prefix*."""
    kernels, _ = list_bucket(http, s3_url, prefix + "vmlinux-")
    images, _ = list_bucket(http, s3_url, prefix + "ubuntu-")
    kernel = newest_key(kernels, _KERNEL_KEY_RE)
    image = newest_key(images, _UBUNTU_KEY_RE)
    if kernel is None or image is None:
        return None
    return (kernel, kernels[kernel]), (image, images[image])


def find_ci_guest(
    http: _Http, s3_url: str, version: str, arch: str
) -> GuestKeys:
    """Return ``((kernel key, size), (squashfs key, size))`` to download.

    The versioned prefix ``firecracker-ci/v<major>.<minor>/<arch>/`` comes
    first; when it is empty, the newest dated prefixes follow.
    """
    major, minor, _ = version.split(".")
    versioned = f"firecracker-ci/v{major}.{minor}/{arch}/"
    found = _guest_keys(http, s3_url, versioned)
    if found:
        return found

    log.info("nothing under %s; trying the dated CI prefixes", versioned)
    _, prefixes = list_bucket(http, s3_url, "firecracker-ci/", "/")
    dated = sorted(
        (p for p in prefixes if _DATED_PREFIX_RE.match(p)), reverse=True
    )
    for prefix in dated[:MAX_DATED_PREFIXES]:
        found = _guest_keys(http, s3_url, f"{prefix}{arch}/")
        if found:
            return found
    raise DownloadError(
        f"{s3_url}/?prefix={versioned}",
        "the bucket lists no guest kernel and Ubuntu image for "
        f"Firecracker v{major}.{minor} ({arch})",
        "Pin a version CI built guests for (VERSION), or use "
        "source='local' to build the guest offline.",
    )


# -- squashfs to ext4 ------------------------------------------------------


def _run(cmd: list[str], ok: tuple[int, ...] = (0,)) -> None:
    """Run a command; raise ArtifactError with its output if it fails."""
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"{cmd[0]} is not installed: apt-get install squashfs-tools "
            "e2fsprogs"
        ) from exc
    if proc.returncode not in ok:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-10:]
        raise ArtifactError(
            f"{' '.join(cmd)} exited with {proc.returncode}:\n"
            + "\n".join(tail)
        )


def _tree_usage(tree: Path) -> tuple[int, int]:
    """Return the bytes a tree needs in 4 KiB blocks, and its entries."""
    total = 0
    entries = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            size = os.lstat(os.path.join(dirpath, name)).st_size
            total += -(-max(size, 1) // EXT4_BLOCK) * EXT4_BLOCK
            entries += 1
    return total, entries


def ext4_size(content_bytes: int, min_bytes: int | None = None) -> int:
    """Return the image size for *content_bytes* of files, with margin.

    *min_bytes* defaults to MIN_ROOTFS_BYTES.
    """
    if min_bytes is None:
        min_bytes = MIN_ROOTFS_BYTES
    wanted = int(content_bytes * ROOTFS_GROWTH) + ROOTFS_SLACK_BYTES
    rounded = -(-wanted // ROOTFS_ROUND_BYTES) * ROOTFS_ROUND_BYTES
    return max(min_bytes, rounded)


def squashfs_to_ext4(
    squashfs: Path,
    dest: Path,
    *,
    min_bytes: int | None = None,
    label: str = "rootfs",
) -> Path:
    """Repack a squashfs image as a sparse ext4 image at *dest*.

    Unpacks with ``unsquashfs -d`` and fills the new file system with
    ``mkfs.ext4 -d``. As root, owners and permissions carry over. Without
    root, xattrs and device files are skipped and every file belongs to
    the calling user, which a guest's services may dislike: convert as
    root for a faithful image.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        dir=dest.parent, prefix=".unpack-"
    ) as work:
        tree = Path(work) / "root"
        cmd = ["unsquashfs", "-n", "-d", str(tree)]
        ok: tuple[int, ...] = (0,)
        if os.geteuid() != 0:
            log.warning(
                "not root: %s will not keep owners, device files or "
                "xattrs; convert as root for a faithful image", dest.name,
            )
            # Exit code 2 means errors unsquashfs was told to skip.
            cmd += ["-no-xattrs", "-ignore-errors"]
            ok = (0, 2)
        _run(cmd + [str(squashfs)], ok)

        content, entries = _tree_usage(tree)
        size = ext4_size(content, min_bytes)
        inodes = max(2 * entries, size // EXT4_BYTES_PER_INODE)
        fd, tmp_name = tempfile.mkstemp(
            dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.truncate(size)
            _run([
                "mkfs.ext4", "-q", "-F", "-L", label, "-N", str(inodes),
                "-d", str(tree), str(tmp),
            ])
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    log.info(
        "%s: %d MiB ext4 from %d MiB of files",
        dest.name, size >> 20, content >> 20,
    )
    return dest


# -- the three sources -----------------------------------------------------


def _env_url(given: str | None, env: str, default: str = "") -> str:
    """Return a base URL: the argument, else the variable, else default."""
    return (given or os.environ.get(env) or default).rstrip("/")


def _url_key(url: str) -> str:
    """Return a folder name for a base URL: ``<host>_<port>_<path>``."""
    parts = urlsplit(url)
    raw = f"{parts.hostname}_{parts.port or ''}_{parts.path}"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", raw).strip("_")


def _load_record(folder: Path, checksums: _Checksums) -> Artifacts | None:
    """Return the record of a complete fetch if no file changed since."""
    try:
        record = Artifacts.from_dict(
            json.loads((folder / RECORD_NAME).read_text())
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for role, path in record.files().items():
        if checksums.fresh(path) != record.checksums.get(role):
            log.info("%s changed since it was fetched", path)
            return None
    return record


def _save_record(folder: Path, artifacts: Artifacts) -> None:
    """Write the record that lets the next fetch skip the network."""
    _write_atomic(
        folder / RECORD_NAME, json.dumps(artifacts.as_dict(), indent=2)
    )


def resolve_latest(http: _Http, release_url: str, remember: Path) -> str:
    """Return the version ``releases/latest`` redirects to.

    The answer is remembered in *remember*; without network, the last one
    is used with a warning.
    """
    url = release_url + "/latest"
    try:
        target = http.location(url)
    except DownloadError:
        if remember.is_file():
            version = normalize_version(remember.read_text())
            log.warning(
                "cannot reach %s; using the last known latest, v%s",
                url, version,
            )
            return version
        raise
    tag = urlsplit(target).path.rstrip("/").rsplit("/", 1)[-1]
    try:
        version = normalize_version(tag)
    except ArtifactError as exc:
        raise DownloadError(
            url, f"it leads to {target}, which names no release tag",
            "Pass a version such as '1.16.1' instead of 'latest'.",
        ) from exc
    remember.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(remember, version + "\n")
    log.info("latest release: v%s", version)
    return version


def _fetch_official(
    version: str,
    arch: str,
    release_url: str,
    s3_url: str,
    root: Path,
    progress: bool,
    refresh: bool,
) -> Artifacts:
    """Fetch a release tarball and the CI guest; see the module doc."""
    base = root / "official"
    base.mkdir(parents=True, exist_ok=True)
    checksums = _Checksums(base / CHECKSUMS_NAME)
    with closing(_Http(checksums, progress)) as http:
        if version == "latest":
            version = resolve_latest(http, release_url, base / "latest")
        folder = base / f"v{version}-{arch}"
        if not refresh and (record := _load_record(folder, checksums)):
            log.info("using the cached v%s from %s", version, folder)
            return record

        # The release: its checksum first, then the tarball, then its
        # own SHA256SUMS while unpacking.
        name = f"firecracker-v{version}-{arch}.tgz"
        url = f"{release_url}/download/v{version}/{name}"
        hint = (
            f"Is v{version} a Firecracker release for {arch}? Offline, "
            "use source='mirror' or source='local'."
        )
        expected = _parse_sha256_line(
            http.text(url + ".sha256.txt", hint=hint), name, url
        )
        folder.mkdir(parents=True, exist_ok=True)
        tarball = folder / name
        tar_sha = http.download(url, tarball, sha256=expected, hint=hint)
        unpacked, sums = _unpack_release(tarball, version, arch, url)
        release = _release_files(
            unpacked, sums, version, arch, checksums
        )

        # The guest: the newest CI kernel and Ubuntu image.
        (kkey, ksize), (ukey, usize) = find_ci_guest(
            http, s3_url, version, arch
        )
        guest = folder / "guest"
        kernel = guest / PurePosixPath(kkey).name
        squashfs = guest / PurePosixPath(ukey).name
        kernel_sha = http.download(
            f"{s3_url}/{quote(kkey)}", kernel, size=ksize
        )
        http.download(f"{s3_url}/{quote(ukey)}", squashfs, size=usize)

    # The ext4 image is rebuilt when missing, changed or older than the
    # squashfs it came from.
    rootfs = squashfs.with_suffix(".ext4")
    if (
        checksums.fresh(rootfs) is None
        or rootfs.stat().st_mtime_ns < squashfs.stat().st_mtime_ns
    ):
        squashfs_to_ext4(squashfs, rootfs)
    match = _KERNEL_KEY_RE.search(kkey)
    artifacts = Artifacts(
        source="official",
        version=version,
        firecracker=release["firecracker"][0],
        jailer=release["jailer"][0] if "jailer" in release else None,
        kernel=kernel,
        rootfs=rootfs,
        initrd=None,
        api_spec=release["api_spec"][0] if "api_spec" in release else None,
        checksums={
            **{role: sha for role, (_, sha) in release.items()},
            "release": tar_sha,
            "kernel": kernel_sha,
            "rootfs": checksums.sha256(rootfs),
        },
        arch=arch,
        kernel_release=".".join(match.groups()) if match else None,
        release_tarball=tarball,
        extra={"kernel_key": kkey, "rootfs_key": ukey},
    )
    _save_record(folder, artifacts)
    return artifacts


def _manifest_path(value: object, url: str) -> str:
    """Return a manifest's relative path after checking it stays inside."""
    if not isinstance(value, str):
        raise ArtifactError(f"{url}: a file entry has no path")
    try:
        parts = _member_parts(value, Path(MANIFEST_NAME))
    except UnsafeArchiveError as exc:
        raise ArtifactError(
            f"{url} names the path {value!r}, which leaves the mirror; "
            "rebuild the mirror with write_mirror"
        ) from exc
    return PurePosixPath(*parts).as_posix()


def _read_manifest(
    body: bytes, url: str, arch: str, version: str
) -> tuple[dict[str, Any], dict[str, tuple[str, str, int | None]]]:
    """Check a mirror's manifest; return it and role → (path, sha, size).

    The manifest must match *arch* and *version*, list a kernel and a
    root file system, and give each file a SHA-256 and a path inside the
    mirror.
    """
    rebuild = "rebuild the mirror with write_mirror (`make mirror`)"
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise ArtifactError(f"{url} is not JSON: {rebuild}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{url} is not a manifest: {rebuild}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(
            f"{url} has format {manifest.get('format')!r}; this lab reads "
            f"format {MANIFEST_FORMAT}: {rebuild}"
        )
    if manifest.get("arch") != arch:
        raise ArtifactError(
            f"{url} describes {manifest.get('arch')} files, not {arch}"
        )
    held = manifest.get("version")
    if held is not None:
        held = manifest["version"] = normalize_version(str(held))
        if version not in ("latest", held):
            raise ArtifactError(
                f"the mirror at {url} holds Firecracker v{held}, not "
                f"v{version}: set VERSION = {held!r}, or ask for a "
                "mirror of the version you need"
            )

    files = manifest.get("files")
    entries: dict[str, tuple[str, str, int | None]] = {}
    for role, entry in (files if isinstance(files, dict) else {}).items():
        if role not in ("release", "kernel", "rootfs", "initrd"):
            log.debug("ignoring the mirror's %s", role)
            continue
        if role == "release" and held is None:
            continue
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise ArtifactError(
                f"{url} gives no SHA-256 for its {role}: {rebuild}"
            )
        size = entry.get("size")
        entries[role] = (
            _manifest_path(entry.get("path"), url),
            sha.lower(),
            size if isinstance(size, int) else None,
        )
    for role in ("kernel", "rootfs"):
        if role not in entries:
            raise ArtifactError(f"{url} lists no {role}: {rebuild}")
    return manifest, entries


def _fetch_mirror(
    version: str, arch: str, base_url: str, root: Path,
    progress: bool, refresh: bool,
) -> Artifacts:
    """Fetch the files a mirror's manifest lists; see the module doc."""
    folder = root / "mirror" / _url_key(base_url)
    folder.mkdir(parents=True, exist_ok=True)
    checksums = _Checksums(folder / CHECKSUMS_NAME)
    record = None if refresh else _load_record(folder, checksums)
    if (
        record is not None
        and record.arch == arch
        and (record.version is None or version in ("latest", record.version))
    ):
        log.info("using the cached mirror files in %s", folder)
        return record

    url = f"{base_url}/{MANIFEST_NAME}"
    with closing(_Http(checksums, progress)) as http:
        manifest, entries = _read_manifest(
            http.content(url), url, arch, version
        )
        held = manifest["version"]
        paths: dict[str, Path] = {}
        sums: dict[str, str] = {}
        for role, (rel, sha, size) in entries.items():
            dest = folder.joinpath(*rel.split("/"))
            sums[role] = http.download(
                f"{base_url}/{quote(rel)}", dest, sha256=sha, size=size
            )
            paths[role] = dest

    release: dict[str, tuple[Path, str]] = {}
    if "release" in paths and held is not None:
        unpacked, inner = _unpack_release(
            paths["release"], held, arch, f"{base_url} release"
        )
        release = _release_files(unpacked, inner, held, arch, checksums)
    artifacts = Artifacts(
        source="mirror",
        version=held if release else None,
        firecracker=release["firecracker"][0] if release else None,
        jailer=release["jailer"][0] if "jailer" in release else None,
        kernel=paths["kernel"],
        rootfs=paths["rootfs"],
        initrd=paths.get("initrd"),
        api_spec=release["api_spec"][0] if "api_spec" in release else None,
        checksums={
            **{role: sha for role, (_, sha) in release.items()},
            **sums,
        },
        arch=arch,
        kernel_release=manifest.get("kernel_release"),
        release_tarball=paths.get("release") if release else None,
        extra={"mirror": base_url},
    )
    _save_record(folder, artifacts)
    return artifacts


def _fetch_local(root: Path, cache: Path | None, force: bool) -> Artifacts:
    """Build (or reuse) the offline guest and checksum its files."""
    # Imported here: building pulls in a lot the other sources never use.
    from helpers.images import build_guest

    images = build_guest(cache, force=force)
    folder = root / "local"
    folder.mkdir(parents=True, exist_ok=True)
    checksums = _Checksums(folder / CHECKSUMS_NAME)
    return Artifacts(
        source="local",
        version=None,
        firecracker=None,
        jailer=None,
        kernel=images.kernel,
        rootfs=images.rootfs,
        initrd=images.initrd,
        api_spec=None,
        checksums={
            "kernel": checksums.sha256(images.kernel),
            "initrd": checksums.sha256(images.initrd),
            "rootfs": checksums.sha256(images.rootfs),
        },
        kernel_release=images.kernel_release,
    )


def fetch_artifacts(
    source: str,
    *,
    version: str = DEFAULT_VERSION,
    base_url: str | None = None,
    s3_url: str | None = None,
    cache: Path | None = None,
    arch: str = DEFAULT_ARCH,
    progress: bool | None = None,
    refresh: bool = False,
) -> Artifacts:
    """Bring a VMM, kernel and root file system from *source*.

    *source* is ``official``, ``mirror`` or ``local`` (module doc).
    *version* pins the Firecracker release (``1.16.1``, ``v1.16.1`` or
    ``latest``). *base_url* is the releases page for ``official`` and
    the mirror's root for ``mirror``; *s3_url* the CI bucket. *cache*
    replaces ``cache_dir()``. *progress* shows download bars; by default
    only on a terminal or in a notebook. *refresh* ignores the record of
    the last complete fetch (and, for ``local``, rebuilds).
    """
    if source not in SOURCES:
        raise ArtifactError(
            f"unknown source {source!r}: choose one of {', '.join(SOURCES)}"
        )
    if version != "latest":
        version = normalize_version(version)
    cache = Path(cache) if cache is not None else None
    root = (cache or cache_dir()) / "artifacts"
    if progress is None:
        progress = sys.stderr.isatty() or "ipykernel" in sys.modules

    if source == "local":
        return _fetch_local(root, cache, refresh)
    if source == "mirror":
        mirror = _env_url(base_url, MIRROR_ENV)
        if not mirror:
            raise ArtifactError(
                "no mirror given: pass base_url='http://<host>:<port>' "
                f"or set {MIRROR_ENV}; the instructor's `make mirror` "
                "prints the address"
            )
        return _fetch_mirror(version, arch, mirror, root, progress, refresh)
    return _fetch_official(
        version, arch,
        _env_url(base_url, RELEASE_URL_ENV, RELEASE_URL),
        _env_url(s3_url, S3_URL_ENV, S3_URL),
        root, progress, refresh,
    )


# -- laying out a mirror ---------------------------------------------------


def _copy_sparse(source: Path, dest: Path) -> str:
    """Copy a file, leaving 4 KiB blocks of zeros as holes; return SHA-256.

    Ext4 images are mostly empty: the copy takes no more disk than the
    original (and a mirror of a 1 GiB image costs megabytes).
    """
    digest = hashlib.sha256()
    zeros = bytes(EXT4_BLOCK)
    with source.open("rb") as src, dest.open("wb") as out:
        while chunk := src.read(CHUNK_BYTES):
            digest.update(chunk)
            view = memoryview(chunk)
            for start in range(0, len(view), EXT4_BLOCK):
                block = view[start:start + EXT4_BLOCK]
                if block == zeros[:len(block)]:
                    out.seek(len(block), os.SEEK_CUR)
                else:
                    out.write(block)
        out.truncate()
    return digest.hexdigest()


def _pack_release(artifacts: Artifacts, dest: Path) -> None:
    """Write a release-style tarball from unpacked binaries."""
    version, arch = artifacts.version, artifacts.arch
    top = f"release-v{version}-{arch}"
    members = [
        p for p in (
            artifacts.firecracker, artifacts.jailer, artifacts.api_spec,
        ) if p is not None
    ]
    lines = "".join(f"{sha256_file(p)}  {p.name}\n" for p in members)
    with tempfile.TemporaryDirectory() as work:
        sums = Path(work) / "SHA256SUMS"
        sums.write_text(lines)
        with tarfile.open(dest, "w:gz") as tar:
            for path in [*members, sums]:
                tar.add(path, arcname=f"{top}/{path.name}")


def _iter_mirror_files(
    artifacts: Artifacts,
) -> Iterator[tuple[str, Path, str]]:
    """Yield (role, source path, mirror path) for each file to serve."""
    for role, rel in MIRROR_GUEST.items():
        path = artifacts.files().get(role)
        if path is not None:
            yield role, path, rel


def write_mirror(dest_dir: Path, artifacts: Artifacts) -> Path:
    """Lay out a mirror folder from fetched artifacts; return its manifest.

    Files are copied (sparse where they hold zeros) and checked against
    the checksums in *artifacts*. A release tarball is copied when the
    artifacts came with one, or packed from the binaries otherwise.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}

    def entry(role: str, path: Path, digest: str) -> None:
        """Note one file of the mirror."""
        files[role] = {
            "path": path.relative_to(dest).as_posix(),
            "sha256": digest,
            "size": path.stat().st_size,
        }

    if artifacts.firecracker is not None and artifacts.version:
        name = f"firecracker-v{artifacts.version}-{artifacts.arch}.tgz"
        target = dest / "firecracker" / f"v{artifacts.version}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if artifacts.release_tarball is not None:
            digest = _copy_sparse(artifacts.release_tarball, target)
            want = artifacts.checksums.get("release")
            if want and want != digest:
                target.unlink()
                raise ChecksumError(
                    str(artifacts.release_tarball), want, digest
                )
        else:
            _pack_release(artifacts, target)
            digest = sha256_file(target)
        (target.parent / (name + ".sha256.txt")).write_text(
            f"{digest}  {name}\n"
        )
        entry("release", target, digest)

    for role, path, rel in _iter_mirror_files(artifacts):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = _copy_sparse(path, target)
        want = artifacts.checksums.get(role)
        if want and want != digest:
            target.unlink()
            raise ChecksumError(str(path), want, digest)
        entry(role, target, digest)

    manifest = {
        "format": MANIFEST_FORMAT,
        "arch": artifacts.arch,
        "version": artifacts.version if "release" in files else None,
        "kernel_release": artifacts.kernel_release,
        "source": artifacts.source,
        "files": files,
    }
    _write_atomic(
        dest / "SHA256SUMS",
        "".join(f"{f['sha256']}  {f['path']}\n" for f in files.values()),
    )
    _write_atomic(dest / MANIFEST_NAME, json.dumps(manifest, indent=2))
    log.info("mirror written to %s (%d files)", dest, len(files))
    return dest / MANIFEST_NAME


def main(argv: list[str] | None = None) -> int:
    """Fetch artifacts, or lay out a mirror folder, from the command line."""
    parser = argparse.ArgumentParser(
        prog="fclab-artifacts", description=main.__doc__
    )
    parser.add_argument("command", choices=("fetch", "mirror"))
    parser.add_argument("dest", nargs="?", type=Path,
                        help="mirror folder (for 'mirror')")
    parser.add_argument("--source", choices=SOURCES, default="local")
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--base-url", help="releases page or mirror URL")
    parser.add_argument("--cache", type=Path, help="cache folder")
    parser.add_argument("--refresh", action="store_true")

    def fetch(args: argparse.Namespace) -> dict[str, Any]:
        """Fetch the artifacts; lay out the mirror when asked to."""
        if args.command == "mirror" and args.dest is None:
            parser.error("'mirror' needs a destination folder")
        artifacts = fetch_artifacts(
            args.source, version=args.version, base_url=args.base_url,
            cache=args.cache, refresh=args.refresh,
        )
        if args.command == "mirror":
            write_mirror(args.dest, artifacts)
        return artifacts.as_dict()

    return run_json_command(parser, argv, fetch, log)


if __name__ == "__main__":
    raise SystemExit(main())
