"""Data folders are listed as a file browser shows them, by one function (layout.list_files) that
every command uses: links to folders are followed, a folder reached twice is read once (a link
back up cannot loop), a link whose file is gone is listed so that reading it says so.
The commands' behaviour on such folders is in tests/test_bad_inputs.py (folder_* cases)."""

import os

import pytest

from common.errors import CoTexNetError
from data_process import layout
from data_process.decoding import read_image


def _touch(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _link(path, target) -> None:
    """A relative symbolic link at `path` to the folder `target`, as `ln -s` makes one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent), target_is_directory=True)


def test_links_to_folders_are_followed(tmp_path):
    _touch(tmp_path / "images" / "a.jpg")
    _touch(tmp_path / "elsewhere" / "b.jpg")
    _touch(tmp_path / "elsewhere" / "deeper" / "c.png")
    _link(tmp_path / "images" / "linked", tmp_path / "elsewhere")
    assert layout.list_files(tmp_path / "images") == ["a.jpg", "linked/b.jpg", "linked/deeper/c.png"]


def test_a_folder_reached_twice_is_read_once_under_its_real_name(tmp_path, capsys):
    """`alias` sorts before `real`, but the file keeps the name it has without links."""
    _touch(tmp_path / "images" / "real" / "x.jpg")
    _link(tmp_path / "images" / "alias", tmp_path / "images" / "real")
    assert layout.list_files(tmp_path / "images") == ["real/x.jpg"]
    assert f"{tmp_path / 'images' / 'alias'}: a link to a folder already read as {tmp_path / 'images' / 'real'}" \
        in capsys.readouterr().err


def test_links_back_up_do_not_loop(tmp_path, capsys):
    _touch(tmp_path / "images" / "a.jpg")
    _touch(tmp_path / "outside" / "b.jpg")
    _link(tmp_path / "images" / "out", tmp_path / "outside")
    _link(tmp_path / "outside" / "back", tmp_path / "images")      # images/out/back is images/ again
    _link(tmp_path / "outside" / "self", tmp_path / "outside")     # and outside/self is outside/
    assert layout.list_files(tmp_path / "images") == ["a.jpg", "out/b.jpg"]
    err = capsys.readouterr().err
    assert "images/out/back: a link to a folder already read" in err and "images/out/self: a link" in err


def test_a_link_whose_file_is_gone_is_listed_and_reading_it_says_so(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").symlink_to("../moved/a.jpg")
    _link(tmp_path / "images" / ".hidden", tmp_path / "images")  # hidden, as ever: not read
    assert layout.list_files(tmp_path / "images") == ["a.jpg"]
    with pytest.raises(CoTexNetError, match=r"images/a.jpg: a link to \.\./moved/a.jpg, which does not exist"):
        read_image(tmp_path / "images" / "a.jpg")


def test_a_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    """Permissions cannot be denied to root (the test machines): the listing's error is simulated."""
    _touch(tmp_path / "images" / "locked" / "a.jpg")
    scandir = os.scandir

    def denied(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(CoTexNetError, match=r"images/locked: cannot be listed \(Permission denied\)"):
        layout.list_files(tmp_path / "images")
