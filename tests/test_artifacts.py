"""Fetching artifacts from a release site, an S3 bucket and a mirror.

Everything runs against a real HTTP server on 127.0.0.1 that serves a
release tarball, its checksum and an S3-style listing built here; a
guard refuses any connection that is not loopback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from httpfixtures import (  # noqa: F401 (fixtures)
    LoopbackServer,
    loopback_only,
    loopback_server,
)

from helpers import artifacts
from helpers.artifacts import (
    ArtifactError,
    Artifacts,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    fetch_artifacts,
    normalize_version,
    safe_extract,
    squashfs_to_ext4,
    write_mirror,
)

VERSION = "1.16.1"
ARCH = "x86_64"
S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
CI = f"firecracker-ci/v1.16/{ARCH}/"

# Keys of the fake bucket. A string sort would pick 6.1.9 and 22.04's
# neighbour wrongly; a numeric one picks 6.1.141 and 24.04.
KERNEL_KEYS = ("vmlinux-5.10.239", "vmlinux-6.1.9", "vmlinux-6.1.141")
NEWEST_KERNEL = "vmlinux-6.1.141"
DATED_OLD = f"firecracker-ci/20260601-0a1b2c3/{ARCH}/"
DATED_NEW = f"firecracker-ci/20260615-4d5e6f7/{ARCH}/"
DATED_ARM_ONLY = "firecracker-ci/20260620-8a9b0c1/aarch64/"

# Keys per listing page: small, so listings need continuation tokens.
PAGE_SIZE = 2

# A closed loopback port: a base URL no test overrides still fails here.
NOWHERE = "http://127.0.0.1:9"


def sha(data: bytes) -> str:
    """Return the SHA-256 of *data*."""
    return hashlib.sha256(data).hexdigest()


def release_members(version: str) -> dict[str, tuple[bytes, int]]:
    """Return name → (content, mode) of a small fake release."""
    script = f'#!/bin/sh\necho "Firecracker v{version}"\n'.encode()
    return {
        f"firecracker-v{version}-{ARCH}": (script, 0o755),
        f"jailer-v{version}-{ARCH}": (b"#!/bin/sh\necho jailer\n", 0o755),
        f"firecracker_spec-v{version}.yaml": (
            f"swagger: '2.0'\ninfo:\n  version: {version}\n".encode(), 0o644
        ),
        f"seccomp-filter-v{version}-{ARCH}.json": (b"{}\n", 0o644),
    }


def make_tarball(
    members: dict[str, tuple[bytes, int]],
    top: str,
    *,
    sums: str | None = None,
    raw: list[tarfile.TarInfo] | None = None,
) -> bytes:
    """Return a .tgz holding *members* under *top*/ and a SHA256SUMS."""
    if sums is None:
        sums = "".join(f"{sha(d)}  {n}\n" for n, (d, _) in members.items())
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        folder = tarfile.TarInfo(top)
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o755
        tar.addfile(folder)
        entries = {**members, "SHA256SUMS": (sums.encode(), 0o644)}
        for name, (data, mode) in entries.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
        for info in raw or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    return out.getvalue()


def publish_release(www: Path, version: str, tgz: bytes) -> Path:
    """Put a tarball and its .sha256.txt where GitHub would serve them."""
    name = f"firecracker-v{version}-{ARCH}.tgz"
    folder = www / "releases" / "download" / f"v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(tgz)
    (folder / f"{name}.sha256.txt").write_text(f"{sha(tgz)}  {name}\n")
    return folder / name


@pytest.fixture(scope="session")
def squashfs_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, tiny squashfs image made with mksquashfs."""
    work = tmp_path_factory.mktemp("squashfs")
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("fclab-ci\n")
    (tree / "usr" / "bin").mkdir(parents=True)
    hello = tree / "usr" / "bin" / "hello"
    hello.write_text("#!/bin/sh\necho hello\n")
    hello.chmod(0o755)
    (tree / "bin").symlink_to("usr/bin")
    (tree / "tmp").mkdir()
    image = work / "ubuntu-24.04.squashfs"
    subprocess.run(
        ["mksquashfs", str(tree), str(image), "-noappend", "-quiet",
         "-all-root"],
        check=True, capture_output=True,
    )
    return image


class FakeBucket:
    """S3's ListObjectsV2 for the keys under ``www/bucket``, in pages."""

    def __init__(self, root: Path) -> None:
        """Serve the objects stored under *root*."""
        self.root = root
        self.tokens_seen: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        """Store one object."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def keys(self) -> list[str]:
        """Return every stored key, sorted as S3 sorts them."""
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*") if p.is_file()
        )

    def __call__(self, handler: object, query: dict[str, list[str]]) -> None:
        """Answer one listing request with up to PAGE_SIZE entries."""
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        token = query.get("continuation-token", [""])[0]
        if token:
            self.tokens_seen.append(token)
        entries: list[tuple[str, str]] = []
        for key in self.keys():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter)[0] + delimiter
                if ("prefix", common) not in entries:
                    entries.append(("prefix", common))
            else:
                entries.append(("key", key))
        # Tokens carry characters that must be URL-encoded on the way back.
        start = int(token.split("+")[1].rstrip("/=")) if token else 0
        page = entries[start:start + PAGE_SIZE]
        more = start + PAGE_SIZE < len(entries)
        body = [f'<ListBucketResult xmlns="{S3_NS}">',
                "<Name>spec.ccfc.min</Name>",
                f"<Prefix>{escape(prefix)}</Prefix>",
                f"<KeyCount>{len(page)}</KeyCount>",
                f"<IsTruncated>{str(more).lower()}</IsTruncated>"]
        if more:
            body.append(
                f"<NextContinuationToken>tok+{start + PAGE_SIZE}/="
                "</NextContinuationToken>"
            )
        for kind, value in page:
            if kind == "key":
                size = (self.root / value).stat().st_size
                body.append(
                    f"<Contents><Key>{escape(value)}</Key>"
                    f"<Size>{size}</Size></Contents>"
                )
            else:
                body.append(
                    f"<CommonPrefixes><Prefix>{escape(value)}</Prefix>"
                    "</CommonPrefixes>"
                )
        body.append("</ListBucketResult>")
        handler.send_body(  # type: ignore[attr-defined]
            200, "".join(body).encode(), "application/xml"
        )


@dataclass
class Site:
    """The served release page and bucket, and what the test expects."""

    server: LoopbackServer
    bucket: FakeBucket
    cache: Path
    tarball: bytes
    kernels: dict[str, bytes]

    def fetch(self, **kwargs: object) -> Artifacts:
        """Fetch from the official source into the test's cache."""
        options: dict[str, object] = {
            "cache": self.cache, "progress": False, **kwargs,
        }
        return fetch_artifacts("official", **options)  # type: ignore

    def files(self) -> list[Path]:
        """Every file in the cache, hidden ones included."""
        return sorted(p for p in self.cache.rglob("*") if not p.is_dir())


@pytest.fixture(autouse=True)
def offline(
    monkeypatch: pytest.MonkeyPatch, loopback_only: list[str],  # noqa: F811
    tmp_path: Path,
) -> Iterator[list[str]]:
    """Point every base URL at a closed port and allow only loopback."""
    for name in ("FCLAB_RELEASE_URL", "FCLAB_S3_URL", "FCLAB_MIRROR"):
        monkeypatch.setenv(name, NOWHERE)
    monkeypatch.setenv("FCLAB_CACHE", str(tmp_path / "default-cache"))
    # Small ext4 images keep hashing fast; one test checks the real size.
    monkeypatch.setattr(artifacts, "MIN_ROOTFS_BYTES", 0)
    monkeypatch.setattr(artifacts, "ROOTFS_SLACK_BYTES", 32 << 20)
    yield loopback_only
    assert all(h in ("127.0.0.1", "::1") for h in loopback_only)


@pytest.fixture
def site(
    loopback_server: LoopbackServer,  # noqa: F811
    squashfs_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Site:
    """Serve releases v1.16.1 and v1.17.0 and a CI bucket on loopback."""
    www = loopback_server.root
    url = loopback_server.url
    tgz = make_tarball(release_members(VERSION), f"release-v{VERSION}-{ARCH}")
    publish_release(www, VERSION, tgz)
    publish_release(www, "1.17.0", make_tarball(
        release_members("1.17.0"), f"release-v1.17.0-{ARCH}"
    ))
    loopback_server.route(
        "/releases/latest",
        lambda h, q: h.redirect(f"{url}/releases/tag/v{VERSION}"),
    )

    bucket = FakeBucket(www / "bucket")
    kernels = {k: f"\x7fELF kernel {k}".encode() for k in KERNEL_KEYS}
    for key, data in kernels.items():
        bucket.put(CI + key, data)
    bucket.put(CI + NEWEST_KERNEL + ".config", b"CONFIG_VIRTIO=y\n")
    bucket.put(CI + "ubuntu-22.04.squashfs", b"not the newest")
    bucket.put(CI + "ubuntu-24.04.squashfs", squashfs_image.read_bytes())
    for prefix, release in ((DATED_OLD, "6.1.150"), (DATED_NEW, "6.1.155")):
        kernels[prefix + release] = f"\x7fELF {release}".encode()
        bucket.put(f"{prefix}vmlinux-{release}", kernels[prefix + release])
        bucket.put(prefix + "ubuntu-24.04.squashfs",
                   squashfs_image.read_bytes())
    bucket.put(DATED_ARM_ONLY + "vmlinux-6.1.160", b"arm")
    loopback_server.route("/bucket/", bucket)

    monkeypatch.setenv("FCLAB_RELEASE_URL", f"{url}/releases")
    monkeypatch.setenv("FCLAB_S3_URL", f"{url}/bucket")
    return Site(loopback_server, bucket, tmp_path / "cache", tgz, kernels)


def debugfs(image: Path, request: str) -> str:
    """Run one debugfs request against an ext4 image."""
    return subprocess.run(
        ["debugfs", "-R", request, str(image)],
        capture_output=True, text=True, check=True,
    ).stdout


# -- official ---------------------------------------------------------------


def test_official_fetch_lands_checked_files(site: Site) -> None:
    """The release and the newest CI guest land with right checksums."""
    got = site.fetch()

    members = release_members(VERSION)
    assert got.source == "official" and got.version == VERSION
    assert got.firecracker is not None and got.api_spec is not None
    assert got.checksums["firecracker"] == sha(
        members[f"firecracker-v{VERSION}-{ARCH}"][0]
    )
    assert got.checksums["release"] == sha(site.tarball)
    assert got.api_spec.read_bytes() == (
        members[f"firecracker_spec-v{VERSION}.yaml"][0]
    )
    run = subprocess.run(
        [str(got.firecracker)], capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == f"Firecracker v{VERSION}"
    assert got.kernel.read_bytes() == site.kernels[NEWEST_KERNEL]
    assert got.kernel_release == "6.1.141"
    assert got.extra["rootfs_key"] == CI + "ubuntu-24.04.squashfs"
    for role, path in got.files().items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == (
            got.checksums[role]
        ), role
    # Pages were followed with the server's own (encoded) tokens.
    assert "tok+2/=" in site.bucket.tokens_seen
    json.dumps(got.as_dict())


def test_official_rootfs_is_ext4_with_the_squashfs_files(site: Site) -> None:
    """The Ubuntu squashfs becomes an ext4 image holding its files."""
    got = site.fetch()

    assert "Filesystem magic number:  0xEF53" in subprocess.run(
        ["dumpe2fs", "-h", str(got.rootfs)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert debugfs(got.rootfs, "cat /etc/hostname") == "fclab-ci\n"
    assert "hello" in debugfs(got.rootfs, "ls -l /usr/bin")


@pytest.mark.parametrize("given", ["1.16.1", "v1.16.1"])
def test_version_with_or_without_v(site: Site, given: str) -> None:
    """``v1.16.1`` and ``1.16.1`` name the same release."""
    assert site.fetch(version=given).version == VERSION


@pytest.mark.parametrize("bad", ["1.16", "v1", "1.16.1-rc1", "newest"])
def test_malformed_version_is_refused(bad: str) -> None:
    """A version that is not x.y.z is refused before any request."""
    with pytest.raises(ArtifactError, match="not a Firecracker version"):
        normalize_version(bad)


def test_latest_follows_the_redirect(site: Site) -> None:
    """``latest`` becomes the tag ``releases/latest`` redirects to."""
    got = site.fetch(version="latest")

    assert got.version == VERSION
    assert "/releases/latest" in site.server.paths


def test_latest_offline_uses_the_last_known(site: Site) -> None:
    """Without the network, ``latest`` falls back to the last answer."""
    first = site.fetch(version="latest")
    site.server.stop()

    assert site.fetch(version="latest") == first


def test_dated_layout_when_the_versioned_prefix_is_empty(
    site: Site,
) -> None:
    """With no ``v1.17`` prefix, the newest dated one with a guest wins."""
    got = site.fetch(version="1.17.0")

    assert got.kernel.read_bytes() == site.kernels[DATED_NEW + "6.1.155"]
    assert got.extra["kernel_key"].startswith(DATED_NEW)


def test_second_fetch_needs_no_server(site: Site) -> None:
    """After one complete fetch, the cache answers with the server down."""
    first = site.fetch()
    site.server.stop()

    assert site.fetch() == first


def test_changed_file_is_fetched_again(site: Site) -> None:
    """A cached file that changed is replaced by a checked download."""
    first = site.fetch()
    first.kernel.write_bytes(b"tampered")

    again = site.fetch()
    assert again.kernel.read_bytes() == site.kernels[NEWEST_KERNEL]
    assert again.checksums == first.checksums


def test_checksum_mismatch_keeps_nothing(site: Site) -> None:
    """A tarball that fails its published SHA-256 leaves no file behind."""
    name = f"firecracker-v{VERSION}-{ARCH}.tgz"
    sums = site.server.root / "releases/download" / f"v{VERSION}"
    (sums / f"{name}.sha256.txt").write_text(f"{'0' * 64}  {name}\n")

    with pytest.raises(ChecksumError) as caught:
        site.fetch()
    message = str(caught.value)
    assert caught.value.expected == "0" * 64
    assert caught.value.actual == sha(site.tarball)
    assert "0" * 16 in message and sha(site.tarball)[:16] in message
    assert f"/download/v{VERSION}/{name}" in message
    assert site.files() == []


def test_checksum_error_reads_one_fact_per_line() -> None:
    """File, origin, the two shortened checksums, then the remedy."""
    expected = "1a2b3c4d5e6f7a8b" + "0" * 48
    actual = "9f8e7d6c5b4a3f2e" + "f" * 48
    url = "http://127.0.0.1:8000/guest/vmlinux"
    err = ChecksumError(url, expected, actual)
    lines = str(err).splitlines()
    assert lines[:4] == [
        "SHA-256 mismatch for vmlinux",
        f"from {url}",
        "expected 1a2b3c4d5e6f7a8b…",
        "got      9f8e7d6c5b4a3f2e…",
    ]
    assert lines[4].startswith("The file was not kept. Fetch again")
    assert len(lines) == 5
    assert (err.url, err.name, err.expected, err.actual) == (
        url, "vmlinux", expected, actual)


def test_checksums_alike_when_short_are_shown_whole() -> None:
    """Two digests sharing their first 16 digits are not cut."""
    expected, actual = "ab" * 32, "ab" * 31 + "cd"
    lines = str(ChecksumError("/tmp/x.img", expected, actual)).splitlines()
    assert lines[0] == "SHA-256 mismatch for x.img"
    assert lines[2:4] == [f"expected {expected}", f"got      {actual}"]


def test_inner_checksum_mismatch_keeps_no_release(site: Site) -> None:
    """A member that fails the tarball's SHA256SUMS is not unpacked."""
    members = release_members(VERSION)
    sums = "".join(f"{'1' * 64}  {n}\n" for n in members)
    tgz = make_tarball(members, f"release-v{VERSION}-{ARCH}", sums=sums)
    publish_release(site.server.root, VERSION, tgz)

    with pytest.raises(ChecksumError) as caught:
        site.fetch()
    assert caught.value.expected == "1" * 64
    assert "SHA256SUMS" in str(caught.value)
    folder = site.cache / "artifacts/official" / f"v{VERSION}-{ARCH}"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"firecracker-v{VERSION}-{ARCH}.tgz"
    ]


def test_truncated_body_keeps_nothing(site: Site) -> None:
    """A body cut short of its Content-Length is a DownloadError."""
    name = f"firecracker-v{VERSION}-{ARCH}.tgz"
    path = f"/releases/download/v{VERSION}/{name}"

    def cut(handler: object, query: object) -> None:
        """Promise the whole tarball, send ten bytes, hang up."""
        handler.send_response(200)  # type: ignore[attr-defined]
        handler.send_header(  # type: ignore[attr-defined]
            "Content-Length", str(len(site.tarball))
        )
        handler.end_headers()  # type: ignore[attr-defined]
        handler.wfile.write(site.tarball[:10])  # type: ignore
        handler.close_connection = True  # type: ignore[attr-defined]

    site.server.route(path, cut)
    with pytest.raises(DownloadError, match=name):
        site.fetch()
    assert site.files() == []


def test_server_down_is_a_download_error(site: Site) -> None:
    """No server: DownloadError naming the URL and the other sources."""
    site.server.stop()

    with pytest.raises(DownloadError) as caught:
        site.fetch()
    message = str(caught.value)
    assert site.server.url in message
    assert "source='mirror'" in message and "source='local'" in message


def test_unknown_release_is_a_download_error(site: Site) -> None:
    """A version without a release says so (HTTP 404)."""
    with pytest.raises(DownloadError, match="404.*Is v9.9.9 a Firecracker"):
        site.fetch(version="9.9.9")


def test_path_traversal_in_a_served_tarball_is_refused(site: Site) -> None:
    """A release tarball escaping its folder is refused; nothing lands."""
    evil = tarfile.TarInfo("../../escaped")
    evil.size = 4
    tgz = make_tarball(
        release_members(VERSION), f"release-v{VERSION}-{ARCH}", raw=[evil]
    )
    publish_release(site.server.root, VERSION, tgz)

    with pytest.raises(UnsafeArchiveError, match="escaped"):
        site.fetch()
    assert not list(site.cache.parent.rglob("escaped"))
    assert not list(site.cache.rglob(f"release-v{VERSION}-{ARCH}"))


# -- tarball safety ---------------------------------------------------------


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    """Return a link entry *name* → *target*."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    """Return a character device entry."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize("entry", [
    tarfile.TarInfo("../outside"),
    tarfile.TarInfo("top/../../outside"),
    tarfile.TarInfo("/tmp/absolute"),
    _link("top/link", "/etc/passwd", tarfile.SYMTYPE),
    _link("top/link", "../../outside", tarfile.SYMTYPE),
    _link("top/hard", "/etc/passwd", tarfile.LNKTYPE),
    _device("top/null"),
], ids=["dotdot", "inner-dotdot", "absolute", "symlink-absolute",
        "symlink-dotdot", "hardlink", "device"])
def test_safe_extract_refuses(tmp_path: Path, entry: tarfile.TarInfo) -> None:
    """Entries that could write outside the folder are refused."""
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(make_tarball({}, "top", raw=[entry]))
    dest = tmp_path / "dest"
    dest.mkdir()

    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, dest)
    assert not (tmp_path / "outside").exists()


def test_safe_extract_keeps_inner_links_and_modes(tmp_path: Path) -> None:
    """Files keep their executable bit; links inside the tree are fine."""
    archive = tmp_path / "ok.tgz"
    archive.write_bytes(make_tarball(
        {"run": (b"#!/bin/sh\n", 0o755), "data": (b"x", 0o600)}, "top",
        raw=[_link("top/alias", "run", tarfile.SYMTYPE)],
    ))
    safe_extract(archive, tmp_path)

    assert os.access(tmp_path / "top/run", os.X_OK)
    assert not os.access(tmp_path / "top/data", os.X_OK)
    assert os.readlink(tmp_path / "top/alias") == "run"


# -- squashfs to ext4 -------------------------------------------------------


def test_squashfs_to_ext4_is_real_ext4(
    squashfs_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The repacked image is a 1 GiB ext4 file system with the files."""
    monkeypatch.setattr(artifacts, "MIN_ROOTFS_BYTES", 1 << 30)
    image = squashfs_to_ext4(squashfs_image, tmp_path / "rootfs.ext4")

    header = subprocess.run(
        ["dumpe2fs", "-h", str(image)],
        capture_output=True, text=True, check=True,
    ).stdout
    fields = dict(
        line.split(":", 1) for line in header.splitlines() if ":" in line
    )
    assert fields["Filesystem magic number"].strip() == "0xEF53"
    blocks = int(fields["Block count"])
    assert blocks * int(fields["Block size"]) >= 1 << 30
    assert debugfs(image, "cat /etc/hostname") == "fclab-ci\n"
    assert "hello" in debugfs(image, "ls /usr/bin")
    assert "usr/bin" in debugfs(image, "stat /bin")
    assert [p.name for p in tmp_path.iterdir()] == ["rootfs.ext4"]


def test_feature_names_match_dumpe2fs(
    squashfs_image: Path, tmp_path: Path,
) -> None:
    """Superblock feature bits decode to the names dumpe2fs prints."""
    image = squashfs_to_ext4(squashfs_image, tmp_path / "rootfs.ext4")
    with image.open("rb") as handle:
        handle.seek(1024 + 0x5C)
        flags = struct.unpack("<III", handle.read(12))
    header = subprocess.run(
        ["dumpe2fs", "-h", str(image)],
        capture_output=True, text=True, check=True,
    ).stdout
    [line] = [
        x for x in header.splitlines() if x.startswith("Filesystem features")
    ]

    assert artifacts.ext4_feature_names(*flags) == line.split(":")[1].split()
    assert artifacts.ext4_feature_names(0, 0x80 | 0x40000000, 0) == [
        "64bit", "incompat:0x40000000"
    ]


def test_squashfs_to_ext4_without_root_warns(
    squashfs_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without root, the conversion still works and says what it lost."""
    monkeypatch.setattr(artifacts.os, "geteuid", lambda: 1000)
    image = squashfs_to_ext4(squashfs_image, tmp_path / "rootfs.ext4")

    assert "not root" in caplog.text
    assert debugfs(image, "cat /etc/hostname") == "fclab-ci\n"


def test_broken_squashfs_leaves_nothing(tmp_path: Path) -> None:
    """A file that is no squashfs fails clearly and leaves no image."""
    bogus = tmp_path / "bogus.squashfs"
    bogus.write_bytes(b"not a squashfs at all")

    with pytest.raises(ArtifactError, match="unsquashfs"):
        squashfs_to_ext4(bogus, tmp_path / "out" / "rootfs.ext4")
    assert list((tmp_path / "out").iterdir()) == []


def test_ext4_size_rule() -> None:
    """Content plus a quarter plus slack, never under the minimum."""
    small = artifacts.ext4_size(1 << 20, min_bytes=1 << 30)
    big = artifacts.ext4_size(2 << 30, min_bytes=1 << 30)
    assert small == 1 << 30
    assert big >= (2 << 30) * 1.25
    assert big % artifacts.ROOTFS_ROUND_BYTES == 0


# -- mirror -----------------------------------------------------------------


def serve(folder: Path) -> LoopbackServer:
    """Serve *folder* on a fresh loopback port (stop it when done)."""
    return LoopbackServer(folder).start()


def test_mirror_round_trip(site: Site, tmp_path: Path) -> None:
    """An official fetch, laid out as a mirror, fetches back identical."""
    official = site.fetch()
    folder = tmp_path / "mirror"
    write_mirror(folder, official)

    for rel in (
        "manifest.json", "SHA256SUMS", "guest/vmlinux", "guest/rootfs.ext4",
        f"firecracker/v{VERSION}/firecracker-v{VERSION}-{ARCH}.tgz",
        f"firecracker/v{VERSION}/firecracker-v{VERSION}-{ARCH}.tgz.sha256.txt",
    ):
        assert (folder / rel).is_file(), rel
    subprocess.run(
        ["sha256sum", "--check", "--quiet", "SHA256SUMS"],
        cwd=folder, check=True,
    )
    site.server.stop()
    mirror = serve(folder)
    try:
        got = fetch_artifacts(
            "mirror", base_url=mirror.url, cache=tmp_path / "learner",
            progress=False,
        )
    finally:
        mirror.stop()

    assert got.source == "mirror" and got.version == VERSION
    assert got.checksums == official.checksums
    assert got.kernel_release == official.kernel_release
    assert got.firecracker is not None
    assert subprocess.run(
        [str(got.firecracker)], capture_output=True, text=True, check=True
    ).stdout.strip() == f"Firecracker v{VERSION}"


@pytest.fixture
def guest_only(tmp_path: Path) -> Artifacts:
    """Artifacts like the local source's: a guest and no Firecracker."""
    folder = tmp_path / "built"
    folder.mkdir()
    files = {
        "kernel": folder / "vmlinux",
        "initrd": folder / "initrd.cpio.gz",
        "rootfs": folder / "rootfs.ext4",
    }
    files["kernel"].write_bytes(b"\x7fELF local kernel")
    files["initrd"].write_bytes(b"initrd")
    with files["rootfs"].open("wb") as handle:
        handle.truncate(8 << 20)
        handle.write(b"superblock")
    return Artifacts(
        source="local", version=None, firecracker=None, jailer=None,
        kernel=files["kernel"], rootfs=files["rootfs"],
        initrd=files["initrd"], api_spec=None,
        checksums={r: sha(p.read_bytes()) for r, p in files.items()},
        kernel_release="6.1.0-test",
    )


def test_mirror_of_a_local_guest(
    guest_only: Artifacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A guest-only mirror serves no Firecracker and keeps the checksums."""
    folder = tmp_path / "mirror"
    write_mirror(folder, guest_only)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] is None
    assert set(manifest["files"]) == {"kernel", "initrd", "rootfs"}
    # Zeros stay holes: the copy takes about as much disk as the original.
    copy = folder / "guest/rootfs.ext4"
    assert copy.stat().st_blocks <= guest_only.rootfs.stat().st_blocks

    mirror = serve(folder)
    try:
        got = fetch_artifacts(
            "mirror", base_url=mirror.url + "/", cache=tmp_path / "c",
            progress=False,
        )
    finally:
        mirror.stop()
    assert got.firecracker is None and got.version is None
    assert got.checksums == guest_only.checksums
    assert got.kernel.read_bytes() == guest_only.kernel.read_bytes()

    # The environment variable works as well as the argument, and the
    # record answers without the server.
    monkeypatch.setenv("FCLAB_MIRROR", mirror.url)
    again = fetch_artifacts("mirror", cache=tmp_path / "c", progress=False)
    assert again == got


def test_command_line_mirrors_a_mirror(
    guest_only: Artifacts, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m helpers.artifacts mirror`` re-lays a fetched mirror."""
    write_mirror(tmp_path / "first", guest_only)
    mirror = serve(tmp_path / "first")
    try:
        code = artifacts.main([
            "mirror", str(tmp_path / "second"), "--source", "mirror",
            "--base-url", mirror.url, "--cache", str(tmp_path / "c"),
        ])
    finally:
        mirror.stop()

    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["checksums"] == guest_only.checksums
    first, second = (
        json.loads((tmp_path / name / "manifest.json").read_text())
        for name in ("first", "second")
    )
    assert (first.pop("source"), second.pop("source")) == ("local", "mirror")
    assert first == second


def test_mirror_with_a_changed_file_is_refused(
    guest_only: Artifacts, tmp_path: Path,
) -> None:
    """A mirror file that no longer matches its manifest is not kept."""
    folder = tmp_path / "mirror"
    write_mirror(folder, guest_only)
    (folder / "guest/vmlinux").write_bytes(b"\x7fELF swapped")

    mirror = serve(folder)
    try:
        with pytest.raises(ChecksumError, match="guest/vmlinux"):
            fetch_artifacts(
                "mirror", base_url=mirror.url, cache=tmp_path / "c",
                progress=False,
            )
    finally:
        mirror.stop()
    leftovers = [
        p.name for p in (tmp_path / "c").rglob("*")
        if p.is_file() and p.name != artifacts.CHECKSUMS_NAME
    ]
    assert "vmlinux" not in leftovers
    assert not [n for n in leftovers if n.endswith(".part")]


def test_mirror_of_another_version_is_refused(
    site: Site, tmp_path: Path,
) -> None:
    """Asking a v1.16.1 mirror for v1.17.0 says which version it holds."""
    folder = tmp_path / "mirror"
    write_mirror(folder, site.fetch())
    mirror = serve(folder)
    try:
        with pytest.raises(ArtifactError, match="holds Firecracker v1.16.1"):
            fetch_artifacts(
                "mirror", version="1.17.0", base_url=mirror.url,
                cache=tmp_path / "c", progress=False,
            )
    finally:
        mirror.stop()


GOOD_FILE = {"path": "guest/vmlinux", "sha256": "0" * 64}


@pytest.mark.parametrize(("manifest", "message"), [
    ({"files": {"kernel": {**GOOD_FILE, "path": "../../etc/passwd"},
                "rootfs": GOOD_FILE}}, "leaves the mirror"),
    ({"files": {"kernel": {"path": "guest/vmlinux"}, "rootfs": GOOD_FILE}},
     "no SHA-256 for its kernel"),
    ({"files": {"kernel": GOOD_FILE}}, "lists no rootfs"),
    ({"version": "../../1.16.1", "files": {}}, "not a Firecracker version"),
    ({"arch": "aarch64"}, "aarch64 files, not x86_64"),
    ({"format": 2}, "format 2"),
    ([1, 2], "not a manifest"),
], ids=["path", "no-sha", "no-rootfs", "version", "arch", "format", "list"])
def test_mirror_manifest_is_checked(
    tmp_path: Path, manifest: object, message: str,
) -> None:
    """A bad manifest is refused before any file is downloaded."""
    if isinstance(manifest, dict):
        manifest = {"format": 1, "arch": ARCH, "version": None, **manifest}
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    mirror = serve(folder)
    try:
        with pytest.raises(ArtifactError, match=re.escape(message)):
            fetch_artifacts(
                "mirror", base_url=mirror.url, cache=tmp_path / "c",
                progress=False,
            )
    finally:
        mirror.stop()
    assert mirror.paths == ["/manifest.json"]


def test_mirror_down_is_a_download_error(tmp_path: Path) -> None:
    """No mirror server: DownloadError naming the manifest URL."""
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1:9/manifest"):
        fetch_artifacts("mirror", cache=tmp_path / "c", progress=False)


def test_mirror_needs_an_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without base_url or FCLAB_MIRROR, the error says how to give one."""
    monkeypatch.delenv("FCLAB_MIRROR")
    with pytest.raises(ArtifactError, match="FCLAB_MIRROR"):
        fetch_artifacts("mirror", cache=tmp_path, progress=False)


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    """Only the three sources exist."""
    with pytest.raises(ArtifactError, match="official, mirror, local"):
        fetch_artifacts("s3", cache=tmp_path)
