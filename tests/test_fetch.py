"""``kdray data fetch`` end to end against local ``file://`` copies: the real pins, archives
unpacked into each loader's layout, and failures that leave nothing behind."""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from kdray.cli import main
from kdray.data import load_dataset
from kdray.data.fetch import SOURCES, Download, Progress, Source, tree_digest

REPO_DATA = Path(__file__).resolve().parents[1] / "data"


def fetch(*args: str) -> int:
    return main(["data", "fetch", *args])


def only_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kdray: error: fetch ")
    return err


def test_list_shows_every_source_and_its_pin(capsys):
    assert fetch("--list") == 0
    out = capsys.readouterr().out
    blocks = {b.split(":", 1)[0]: b for b in out.replace("\n ", "\t").splitlines()}   # one line per source
    assert set(blocks) == {"tinyshakespeare", "fsdd", "svhn", "tinyimagenet", "speechcommands", "urbansound8k"}
    for name, block in blocks.items():
        assert "NOT PINNED" not in block and "pin: " in block and "://" in block and "-> <root>/" in block
    assert "pin: sha256 of the unpacked files" in blocks["fsdd"] and "pin: md5 of the download" in blocks["svhn"]


def test_pins_are_the_ones_torchvision_and_torchaudio_publish():
    """Checked against the libraries' own download tables, not copied from ours."""
    from torchaudio.datasets import speechcommands
    from torchvision.datasets import SVHN

    svhn = {d.filename: d for d in SOURCES.get("svhn").downloads}
    for split in ("train", "test"):
        url, fname, md5 = SVHN.split_list[split]
        assert svhn[fname].url == url and svhn[fname].checksum == f"md5:{md5}"
    sc = SOURCES.get("speechcommands").downloads[0]
    assert sc.checksum == f"sha256:{speechcommands._CHECKSUMS[sc.url]}"


def test_tinyshakespeare_from_a_file_mirror_with_the_real_pin(tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv("KDRAY_FETCH_MIRROR", (REPO_DATA / "tinyshakespeare").as_uri())   # as --mirror
    assert fetch("tinyshakespeare", "--root", str(root)) == 0
    got = root / "tinyshakespeare" / "input.txt"
    assert got.read_bytes() == (REPO_DATA / "tinyshakespeare" / "input.txt").read_bytes()
    assert sorted(p.name for p in root.iterdir()) == ["tinyshakespeare"]      # no staging folder left
    assert load_dataset("tinyshakespeare", root).extras["test_text"][:5] == got.read_text()[-111540:][:5]
    capsys.readouterr()
    assert fetch("tinyshakespeare", "--root", str(root), "--mirror", "file:///nowhere") == 0   # already there
    assert "already there" in capsys.readouterr().out


def fsdd_archive(folder: Path, recordings: list[Path]) -> Path:
    """An archive laid out like the FSDD release tarball, holding the given recordings."""
    folder.mkdir()
    path = folder / SOURCES.get("fsdd").downloads[0].filename
    with tarfile.open(path, "w:gz") as t:
        for r in recordings:
            t.add(r, arcname=f"free-spoken-digit-dataset-1.0.10/recordings/{r.name}")
        info = tarfile.TarInfo("free-spoken-digit-dataset-1.0.10/README.md")
        info.size = 5
        t.addfile(info, io.BytesIO(b"fsdd\n"))
    return path


def test_fsdd_archive_whose_files_differ_from_the_pin_is_refused(tmp_path, capsys):
    """The shipped subset is not the pinned 3,000 recordings: refused, nothing left; --no-verify takes it."""
    recs = sorted((REPO_DATA / "fsdd" / "recordings").glob("*.wav"))
    mirror = fsdd_archive(tmp_path / "mirror", recs).parent.as_uri()
    root = tmp_path / "root"
    assert fetch("fsdd", "--root", str(root), "--mirror", mirror) == 2
    err = only_error_line(capsys)
    assert "tree sha256" in err and "not the pinned" in err and "nothing was written" in err
    assert list(root.iterdir()) == []
    assert fetch("fsdd", "--root", str(root), "--mirror", mirror, "--no-verify") == 0
    rec = root / "fsdd" / "recordings"
    assert sorted(p.name for p in rec.iterdir()) == [p.name for p in recs]
    assert tree_digest(rec) == tree_digest(REPO_DATA / "fsdd" / "recordings")
    assert sorted(p.name for p in root.iterdir()) == ["fsdd"]
    b = load_dataset("fsdd", root, cache_dir=str(tmp_path / "cache"))
    assert (len(b.train_x), len(b.test_x)) == (240, 120)


def test_tree_digest_is_the_documented_formula(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_bytes(b"bee")
    (tmp_path / "d" / "sub" / "a.txt").write_bytes(b"ay")
    h = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    assert tree_digest(tmp_path / "d") == h(f"b.txt\t{h(b'bee')}\nsub/a.txt\t{h(b'ay')}\n".encode())


@pytest.fixture()
def zip_source(tmp_path, monkeypatch):
    """A one-zip source planted in the table, pinned to the zip's real sha256."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "thing.zip", "w") as z:
        z.writestr("thing-1.0/data/x.txt", "x")
        z.writestr("thing-1.0/junk.txt", "junk")
    sha = hashlib.sha256((mirror / "thing.zip").read_bytes()).hexdigest()

    def plant(checksum="real"):
        checksum = f"sha256:{sha}" if checksum == "real" else checksum
        src = Source("thing", "a test archive", "1 kB", "none",
                     (Download("https://example.invalid/thing.zip", "thing", checksum, "zip", "thing-1.0/data"),))
        monkeypatch.setitem(SOURCES._items, "thing", src)

    plant()
    return mirror.as_uri(), plant


def test_zip_source_unpacks_its_member_into_place(tmp_path, zip_source):
    mirror, _ = zip_source
    assert fetch("thing", "--root", str(tmp_path / "r"), "--mirror", mirror) == 0
    assert (tmp_path / "r" / "thing" / "x.txt").read_text() == "x"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["thing"]


def test_checksum_mismatch_unpinned_and_unreachable_leave_nothing(tmp_path, zip_source, capsys):
    mirror, plant = zip_source
    root = tmp_path / "r"
    plant("sha256:" + "0" * 64)
    assert fetch("thing", "--root", str(root), "--mirror", mirror) == 2
    assert "is not the pinned 000" in only_error_line(capsys) and list(root.iterdir()) == []
    plant(None)
    assert fetch("thing", "--root", str(root), "--mirror", mirror) == 2
    assert "no pinned checksum" in only_error_line(capsys) and list(root.iterdir()) == []
    plant()
    assert fetch("thing", "--root", str(root), "--mirror", (tmp_path / "absent").as_uri()) == 2
    assert "cannot download" in only_error_line(capsys) and list(root.iterdir()) == []
    assert fetch("thing", "--root", str(root), "--mirror", "http://127.0.0.1:9") == 2   # nothing listens
    assert "cannot download http://127.0.0.1:9/thing.zip" in only_error_line(capsys)
    assert list(root.iterdir()) == []
    plant(None)
    assert fetch("thing", "--root", str(root), "--mirror", mirror, "--no-verify") == 0
    assert (root / "thing" / "x.txt").is_file()


def test_cli_errors_are_one_line_exit_2_no_traceback(tmp_path):
    env_run = lambda *a: subprocess.run([sys.executable, "-m", "kdray.cli", "data", "fetch", *a],  # noqa: E731
                                        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                                             "PYTHONPATH": str(REPO_DATA.parent)})
    p = env_run("tinyshakespeare")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "kdray: error: fetch tinyshakespeare: no data root: give --root DIR or set $KDRAY_DATA"]
    (tmp_path / "a-file").write_text("")
    p = env_run("tinyshakespeare", "--root", str(tmp_path / "a-file" / "sub"))        # not a folder
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"kdray: error: fetch tinyshakespeare: cannot write in the data root {tmp_path / 'a-file' / 'sub'}: "
        "Not a directory; nothing was written"]
    (tmp_path / "a-file").unlink()
    p = env_run("nosuch", "--root", str(tmp_path))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "valid: fsdd" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_draws_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress("x", 2_000_000, stream)
        bar.update(1_000_000)
        bar.update(1_000_000, final=True)
    assert pipe.getvalue() == ""
    assert tty.getvalue().endswith("\n") and "100% [" + "#" * 30 + "] 2.0/2.0 MB" in tty.getvalue()
