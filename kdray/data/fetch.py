"""``kdray data fetch NAME``: a full data set from its public source, checked, in the loader's layout.

Each source is a row of ``SOURCES``: the files to download, the checksum each must have,
how to unpack it and where the result goes under the data root (the layout the data set's
loader in ``kdray/data/<name>.py`` reads).  A download is written to a staging folder
inside the data root, verified, unpacked there and only then renamed into place, so a
failure (offline, wrong checksum, interrupted) leaves nothing half-written behind.

Checksums are the published ones (SHA-256, or MD5 where that is all the established
downloaders, torchvision and soundata, pin) or, where no archive checksum is published,
a SHA-256 over the unpacked files (``tree_digest``), computed from a known-good copy.  A source without any
pin is refused unless ``--no-verify`` is given; the SHA-256 printed for every download is
the value to pin.  ``--mirror URL`` (or ``$KDRAY_FETCH_MIRROR``) fetches each file from
``URL/<file name>`` instead of its public address: a local copy, a mirror, or a test's
``file://`` folder; the checksums still apply.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

from kdray.data import tinyimagenet, tinyshakespeare
from kdray.errors import FetchError
from kdray.registry import Registry

MIRROR_ENV = "KDRAY_FETCH_MIRROR"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Download:
    url: str
    dest: str                       # relative to the data root
    checksum: Optional[str] = None  # "sha256:<hex>" or "md5:<hex>" of the downloaded file
    unpack: Optional[str] = None    # None (a plain file), "tar" or "zip"
    member: str = ""                # the folder inside the archive that becomes ``dest`` ("" = all of it)

    @property
    def filename(self) -> str:
        return self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Source:
    name: str
    what: str
    size: str
    licence: str
    downloads: tuple[Download, ...]
    tree: Optional[str] = None      # "sha256:<hex>": tree_digest of the first download's dest

    def pin(self) -> str:
        if self.tree:
            return f"{self.tree.split(':')[0]} of the unpacked files"
        if self.pinned:
            return "/".join(sorted({d.checksum.split(":")[0] for d in self.downloads})) + " of the download"
        return "NOT PINNED (to be filled on the first verified download; --no-verify until then)"

    @property
    def pinned(self) -> bool:
        return bool(self.tree) or all(d.checksum for d in self.downloads)


SOURCES: Registry = Registry("data source")


def add_source(src: Source) -> Source:
    SOURCES.register(src.name)(src)
    return src


# The table.  Provenance of each pin is in the comment above it.
# sha256 of karpathy/char-rnn's input.txt, the file shipped in the repository's data/.
add_source(Source("tinyshakespeare", "TinyShakespeare, char-level corpus (1,115,394 characters)", "1.1 MB",
                  "public domain", (Download(tinyshakespeare.URL, "tinyshakespeare/input.txt",
                                             f"sha256:{tinyshakespeare.SHA256}"),)))
# No archive checksum is published.  The tree digest was computed from a copy of the
# repository's recordings/ folder (3,000 files, 6 speakers); if the tagged release holds
# other files, fetch refuses it and prints the digest it found.
add_source(Source("fsdd", "Free Spoken Digit Dataset v1.0.10, 3,000 recordings", "21 MB unpacked",
                  "CC BY-SA 4.0", (Download(
                      "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz",
                      "fsdd/recordings", None, "tar", "free-spoken-digit-dataset-1.0.10/recordings"),),
                  tree="sha256:8dac6ce326e419e9fcfadedf2e4a67d6c08a40968c34bb8fa2b4e27d74753d5a"))
# md5 as torchvision's datasets.SVHN pins them (the loader reads the same files).
add_source(Source("svhn", "SVHN cropped digits, train and test .mat (73,257 / 26,032)", "182 + 64 MB",
                  "non-commercial use (Stanford)", (
                      Download("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "svhn/train_32x32.mat",
                               "md5:e26dedcc434d2e4c54c9b2d4a06d8373"),
                      Download("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "svhn/test_32x32.mat",
                               "md5:eb5a983be6a315427106f1b164d9cef3"))))
# md5 as kdray.data.tinyimagenet (and the common TinyImageNet loaders) pin it.
add_source(Source("tinyimagenet", "TinyImageNet-200 (100,000 train / 10,000 val)", "248 MB",
                  "ImageNet terms (non-commercial research)", (Download(
                      tinyimagenet.URL, tinyimagenet.FOLDER, f"md5:{tinyimagenet.MD5}", "zip", tinyimagenet.FOLDER),)))
# sha256 as torchaudio's datasets.SPEECHCOMMANDS pins it; the archive has no top folder.
add_source(Source("speechcommands", "Speech Commands v0.02 (105,829 clips, 35 words)", "2.3 GB",
                  "CC BY 4.0", (Download(
                      "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
                      "SpeechCommands/speech_commands_v0.02",
                      "sha256:af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58", "tar", ""),)))
# md5 as soundata's UrbanSound8K loader pins it (the file of Zenodo record 1203745).
add_source(Source("urbansound8k", "UrbanSound8K (8,732 clips, 10 classes)", "about 6 GB",
                  "CC BY-NC (non-commercial)", (Download(
                      "https://zenodo.org/record/1203745/files/UrbanSound8K.tar.gz", "UrbanSound8K",
                      "md5:9aa69802bbf37fb986f71ec1483a196e", "tar", "UrbanSound8K"),)))


def tree_digest(path: Path) -> str:
    """SHA-256 over ``<relative path>\\t<sha256 of file>\\n`` of every file under ``path``, sorted."""
    path = Path(path)
    lines = []
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
        lines.append(f"{p.relative_to(path).as_posix()}\t{h.hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


class Progress:
    """A one-line progress bar on a terminal (nothing on a pipe or in a log)."""

    def __init__(self, label: str, total: Optional[int], stream: IO = sys.stderr):
        self.label, self.total, self.stream = label, total, stream
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int, final: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not self.live or (now - self.last < 0.2 and not final):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-6) / 1e6
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            text = f"{frac:4.0%} [{bar:<30}] {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
        else:
            text = f"{self.done / 1e6:.1f} MB"
        self.stream.write(f"\r{self.label} {text} {rate:.1f} MB/s" + ("\n" if final else ""))
        self.stream.flush()


def download(url: str, dest: Path, label: str, stream: IO = sys.stderr) -> dict[str, str]:
    """``url`` -> ``dest`` in chunks; returns its sha256 and md5.  Any transfer error is a FetchError."""
    hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    try:
        with urllib.request.urlopen(url, timeout=60) as r, dest.open("wb") as f:
            size = r.headers.get("Content-Length")
            bar = Progress(label, int(size) if size and size.isdigit() else None, stream)
            for block in iter(lambda: r.read(CHUNK), b""):
                f.write(block)
                for h in hashes.values():
                    h.update(block)
                bar.update(len(block))
            bar.update(0, final=True)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise FetchError(f"cannot download {url}: {reason} (offline, or the address moved? "
                         f"--mirror URL fetches from a copy)") from None
    return {k: h.hexdigest() for k, h in hashes.items()}


def _unpack(archive: Path, kind: str, out: Path) -> None:
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(out)
        else:
            with tarfile.open(archive) as t:
                t.extractall(out, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"cannot unpack {archive.name}: {e}") from None


def fetch(name: str, root: Path, mirror: Optional[str] = None, verify: bool = True,
          stream: IO = sys.stderr) -> list[Path]:
    """Fetch source ``name`` under ``root``; returns the paths put in place (none if all were there)."""
    src = SOURCES.get(name)
    if verify and not src.pinned:
        raise FetchError(f"no pinned checksum for {', '.join(d.url for d in src.downloads)}; "
                         f"rerun with --no-verify to fetch it unchecked")
    todo = [d for d in src.downloads if not (root / d.dest).exists()]
    for d in src.downloads:
        if d not in todo:
            print(f"{name}: {root / d.dest} is already there (delete it to fetch again)")
    if not todo:
        return []
    try:
        root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".kdray-fetch-{name}-", dir=root))
    except OSError as e:
        raise FetchError(f"cannot write in the data root {root}: {e.strerror or e}") from None
    try:
        staged = []
        for i, d in enumerate(todo):
            url = f"{mirror.rstrip('/')}/{d.filename}" if mirror else d.url
            file = stage / d.filename
            got = download(url, file, f"{name} {d.filename}", stream)
            print(f"{name}: {url}: sha256 {got['sha256']}")
            if verify and d.checksum:
                algo, want = d.checksum.split(":", 1)
                if got[algo] != want:
                    raise FetchError(f"{url}: {algo} {got[algo]} is not the pinned {want}")
            item = file
            if d.unpack:
                _unpack(file, d.unpack, stage / f"unpacked{i}")
                file.unlink()
                item = stage / f"unpacked{i}" / d.member
                if not item.exists():
                    raise FetchError(f"{url} has no {d.member!r} inside")
            if verify and src.tree and d is src.downloads[0]:
                want, got_tree = src.tree.split(":", 1)[1], tree_digest(item)
                if got_tree != want:
                    raise FetchError(f"the files of {url} have tree sha256 {got_tree}, "
                                     f"not the pinned {want}")
            staged.append((item, root / d.dest))
        for item, target in staged:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, target)
            except OSError as e:
                raise FetchError(f"cannot move the download into {target}: {e.strerror or e}") from None
        return [t for _, t in staged]
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def format_sources() -> str:
    """``--list``: one block per source."""
    blocks = []
    for n in SOURCES.names():
        s = SOURCES.get(n)
        lines = [f"{n}: {s.what}", f"    size {s.size}; licence {s.licence}; pin: {s.pin()}"]
        lines += [f"    {d.url}" + (f"  ({d.checksum.replace(':', ' ')})" if d.checksum else "")
                  + f"\n      -> <root>/{d.dest}" for d in s.downloads]
        if s.tree:
            lines.append(f"    files under <root>/{s.downloads[0].dest}: {s.tree.replace(':', ' ')}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def fetch_main(argv: list[str]) -> int:
    from kdray.data import DATA_ROOT_ENV

    p = argparse.ArgumentParser(prog="kdray data fetch",
                                description="download a full data set from its public source into the data root")
    p.add_argument("name", nargs="?", help="the data set (--list shows them)")
    p.add_argument("--list", action="store_true", help="show the sources, their sizes, licences and pins")
    p.add_argument("--root", help=f"data root (default ${DATA_ROOT_ENV})")
    p.add_argument("--mirror", default=os.environ.get(MIRROR_ENV),
                   help=f"fetch each file from MIRROR/<file name> instead (default ${MIRROR_ENV})")
    p.add_argument("--no-verify", action="store_true", help="accept files whose checksum differs or is not pinned")
    args = p.parse_args(argv)
    if args.list:
        print(format_sources())
        return 0
    if not args.name:
        print(f"kdray: error: fetch: name a data set: {', '.join(SOURCES.names())} (or --list)", file=sys.stderr)
        return 2
    root = args.root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        print(f"kdray: error: fetch {args.name}: no data root: give --root DIR or set ${DATA_ROOT_ENV}", file=sys.stderr)
        return 2
    try:
        placed = fetch(args.name, Path(root).expanduser(), args.mirror, not args.no_verify)
    except FetchError as e:
        print(f"kdray: error: fetch {args.name}: {e}; nothing was written", file=sys.stderr)
        return 2
    for path in placed:
        print(f"{args.name}: {path}")
    return 0
