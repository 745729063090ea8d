"""A corpus of broken sweep files (tests/bad_sweeps/): each is refused by `kdray validate` with one
line naming the file and the field, exit code 2, before anything starts or is written.

Each file's first line says what the error must contain (``# expect: ...``); the folder
``a_folder.yaml/`` stands for a path that is not a file.  Each case runs in a temporary copy
of the corpus, where the files' relative ``storage: results`` points.
"""
import shutil
from pathlib import Path

import pytest

from kdray.cli import main

CORPUS = Path(__file__).parent / "bad_sweeps"
FILES = sorted(p for p in CORPUS.glob("*.yaml") if p.is_file())


def expectation(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: '"
    return first.removeprefix("# expect: ")


def test_the_corpus_is_large_and_distinct():
    assert len(FILES) >= 30
    assert len({expectation(p) for p in FILES}) >= 30


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_validate_refuses_with_one_line_naming_file_and_field(path, capsys, monkeypatch, tmp_path):
    here = tmp_path / "corpus"
    shutil.copytree(CORPUS, here)
    monkeypatch.chdir(here)              # relative storage paths are read from here
    before = sorted(here.rglob("*"))
    assert main(["validate", path.name]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"kdray: error: {path.name}"), err
    assert expectation(path) in err, err
    assert sorted(here.rglob("*")) == before


def test_a_folder_is_not_a_sweep_file(capsys):
    assert main(["validate", str(CORPUS / "a_folder.yaml")]) == 2
    assert "no such sweep file (it is a folder)" in capsys.readouterr().err
