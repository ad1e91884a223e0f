"""The rules under every command that writes shared files (common/shared_files.py, common/output_folders.py), with real processes:
a set of files replaced as one whatever kills the writer, writers that take turns, a folder
swapped in whole, a run folder claimed once, and output paths that never alias an input,
in the path forms a researcher uses (absolute, relative, ./, .., symlinked folders)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from common import atomic, shared_files
from common.errors import CoTexNetError
from common.output_folders import OutputFolder
from common.shared_files import finish_publish, taking_turns
from data_process.splits import within
from train_utils.run_folder import create_run

REPO = Path(__file__).resolve().parents[1]


def child(code: str, **env) -> subprocess.Popen:
    """A Python process running `code` from the repository root, with `env` added."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


PUBLISH = """
from common.shared_files import publish, taking_turns
folder, tag = {folder!r}, {tag!r}
with taking_turns(folder, "set", ["a.csv", "b.csv", "c.csv"]):
    publish(folder, "set", {{name: f"{{name}},{{tag}}\\n".encode() for name in ("a.csv", "b.csv", "c.csv")}})
"""


def read_set(folder: Path) -> set[str]:
    """What a reader gets: under the lock, an interrupted update finished first."""
    with taking_turns(folder, "set", ["a.csv", "b.csv", "c.csv"]):
        return {(folder / name).read_text() for name in ("a.csv", "b.csv", "c.csv")}


@pytest.mark.parametrize("step", ["set:staged", "set:replacing a.csv", "set:replacing b.csv", "set:replacing c.csv"])
def test_a_set_killed_at_any_step_reads_as_the_old_set_or_the_new(tmp_path, step):
    assert child(PUBLISH.format(folder=str(tmp_path), tag="old")).wait(timeout=60) == 0
    run = child(PUBLISH.format(folder=str(tmp_path), tag="new"), COTEXNET_KILL_AT=step)
    assert run.wait(timeout=60) == -signal.SIGKILL
    on_disk = {(tmp_path / name).read_text().split(",")[1] for name in ("a.csv", "b.csv", "c.csv")}
    if step != "set:staged" and step != "set:replacing a.csv":
        assert on_disk == {"old\n", "new\n"}  # the files alone are a mix here ...
    got = read_set(tmp_path)  # ... which no reader ever sees
    old, new = ({f"{n}.csv,{tag}\n" for n in "abc"} for tag in ("old", "new"))
    assert got in (old, new)
    assert got == (old if step == "set:staged" else new)  # after the commit point the update is finished
    assert sorted(p.name for p in tmp_path.iterdir()) == [".set.lock", "a.csv", "b.csv", "c.csv"]


APPEND = """
import io, sys
import pandas as pd
from common.shared_files import publish, taking_turns
folder = {folder!r}
with taking_turns(folder, "set", ["rows.csv"], create=True):
    path = f"{{folder}}/rows.csv"
    try:
        rows = pd.read_csv(path)
    except FileNotFoundError:
        rows = pd.DataFrame(columns=["writer"])
    rows = pd.concat([rows, pd.DataFrame({{"writer": [{writer}]}})])
    publish(folder, "set", {{"rows.csv": rows.to_csv(index=False).encode()}})
"""


def test_writers_started_together_take_turns_and_lose_no_row(tmp_path):
    runs = [child(APPEND.format(folder=str(tmp_path), writer=i)) for i in range(8)]
    errors = [run.communicate(timeout=120)[1] for run in runs]
    assert all(run.returncode == 0 for run in runs), errors
    assert sorted(pd.read_csv(tmp_path / "rows.csv")["writer"]) == list(range(8))
    assert any("waiting for" in err for err in errors)  # they did meet at the lock


FOLDER = """
from pathlib import Path
from common.output_folders import folder_replaced, OutputFolder
with folder_replaced(OutputFolder({target!r}), "done.txt") as out:
    for i in range(20):
        out.path(f"part/{{i}}.txt").parent.mkdir(parents=True, exist_ok=True)
        out.path(f"part/{{i}}.txt").write_text({tag!r})
    out.path("done.txt").write_text({tag!r})
"""


def folder_state(target: Path) -> set[str]:
    return {path.read_text() for path in target.rglob("*.txt")}


@pytest.mark.parametrize("step", ["out:staged", "out:replaced"])
def test_a_folder_killed_before_or_after_its_swap_is_the_old_one_or_the_new(tmp_path, step):
    target = tmp_path / "out"
    assert child(FOLDER.format(target=str(target), tag="old")).wait(timeout=60) == 0
    run = child(FOLDER.format(target=str(target), tag="new"), COTEXNET_KILL_AT=step)
    assert run.wait(timeout=60) == -signal.SIGKILL
    assert folder_state(target) == ({"old"} if step == "out:staged" else {"new"}) and len(list(target.rglob("*.txt"))) == 21
    assert child(FOLDER.format(target=str(target), tag="again")).wait(timeout=60) == 0
    assert folder_state(target) == {"again"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]  # the killed one's leftovers removed


CLAIM = """
from common.output_folders import claim_folder
print(claim_folder({run!r}, "config.yaml", b"x: 1\\n" * 1000, next_free=True))
"""


def test_runs_started_together_with_one_default_name_get_a_folder_each(tmp_path):
    runs = [child(CLAIM.format(run=str(tmp_path / "kvasir_20260101-120000"))) for _ in range(6)]
    claimed = [run.communicate(timeout=120)[0].strip() for run in runs]
    assert all(run.returncode == 0 for run in runs) and len(set(claimed)) == 6
    assert sorted(Path(path).name for path in claimed) == ["kvasir_20260101-120000"] + [
        f"kvasir_20260101-120000-{n}" for n in range(2, 7)]
    for path in claimed:
        assert (Path(path) / "config.yaml").read_text() == "x: 1\n" * 1000  # whole, and its own


def test_a_given_run_name_taken_meanwhile_stops_the_second(tmp_path):
    one = SimpleNamespace(is_main_process=True, num_processes=1)
    assert create_run(tmp_path / "mine", "a: 1\n", one, default_name=False) == tmp_path / "mine"
    with pytest.raises(CoTexNetError, match="mine: taken by another run started at the same time"):
        create_run(tmp_path / "mine", "b: 2\n", one, default_name=False)
    assert (tmp_path / "mine" / "config.yaml").read_text() == "a: 1\n"


def test_output_paths_never_alias_an_input_in_any_path_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(b"image")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link_to_images").symlink_to(images, target_is_directory=True)
    for given in (images, "data/images", "./data/images", "data/../data/images", "link_to_images",
                  "data/images/sub", "link_to_images/sub"):
        with pytest.raises(CoTexNetError, match="inside the input folder"):
            OutputFolder(given, "--out", input_folders=["data/images"])
    out = OutputFolder("out", "--out", input_folders=["./data/images"], input_files=["data/images/a.png"])
    for name in ("/etc/passwd", str(images / "a.png"), "../data/images/a.png", "x/../../a.png", ""):
        with pytest.raises(CoTexNetError, match="an output name must stay inside"):
            out.path(name)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "masks").symlink_to(images, target_is_directory=True)
    (tmp_path / "out" / "away").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(CoTexNetError, match="leads out of out through a symlink"):
        out.path("masks/a.png")
    with pytest.raises(CoTexNetError, match="leads out of out through a symlink"):
        out.path("away/a.png")
    (tmp_path / "out" / "a.png").symlink_to(images / "a.png")  # a file link is replaced by the rename, not followed
    assert out.path("sub/a.png") == Path("out/sub/a.png")
    with pytest.raises(CoTexNetError, match="holds the input"):
        OutputFolder("data", "--out", input_folders=["data/images"]).check_holds_no_input()
    assert (images / "a.png").read_bytes() == b"image"


def test_split_rows_read_as_paths_under_the_dataset_in_any_form(tmp_path):
    images = tmp_path / "kvasir" / "images"
    images.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "kvasir", target_is_directory=True)
    for name in ("a.jpg", "./a.jpg", "sub/../a.jpg", str(images / "a.jpg"), str(images.resolve() / "a.jpg")):
        assert within(name, images, "row") == "a.jpg", name
    assert within(str(tmp_path / "link" / "images" / "a.jpg"), tmp_path / "link" / "images", "row") == "a.jpg"
    for name in ("../masks/a.jpg", "..", ".", "/etc/passwd", str(tmp_path / "a.jpg")):
        with pytest.raises(CoTexNetError, match="row: "):
            within(name, images, "row")


def test_a_journal_nobody_can_finish_is_said(tmp_path):
    (tmp_path / ".set.publish.json").write_text('{"files": {"a.csv": ".a.csv.k3j4h5g6.tmp.csv"}}')
    (tmp_path / ".a.csv.k3j4h5g6.tmp.csv").write_text("new")
    (tmp_path / "a.csv").write_text("old")
    finish_publish(tmp_path, "set", ["a.csv"])
    assert (tmp_path / "a.csv").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["a.csv"]


class Stopped(Exception):
    pass


@pytest.mark.parametrize("write", [
    lambda folder: atomic.write_text(folder / "a.txt", "new"),
    lambda folder: atomic.create_exclusive(folder / "a.txt", b"new"),
    lambda folder: shared_files.publish(folder, "set", {"a.txt": b"new"}),
], ids=["atomic_path", "create_exclusive", "publish"])
def test_a_stop_that_arrives_while_a_temporary_is_made_leaves_none(tmp_path, monkeypatch, write):
    """SIGTERM held while the temporary is created is raised the moment it is let go: the writer
    must already know its temporary then, and remove it (a SIGTERM to augment_data.py left one)."""
    made = atomic.temporary_beside

    def made_then_stopped(path):
        tmp = made(path)
        os.kill(os.getpid(), signal.SIGTERM)  # pending until the writer lets signals through
        return tmp

    def stop(signum, frame):
        raise Stopped

    for module in (atomic, shared_files):
        monkeypatch.setattr(module, "temporary_beside", made_then_stopped)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped):
            write(tmp_path)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
