"""Every program starts as the README writes it, from the repository root, through the installed
project (pyproject.toml; requirement.txt ends with `-e .`): no file edits sys.path."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.train_fixtures import REPO

GUARD_DIR = REPO / "tests" / "netguard"
TRACKED = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
PROJECT_FILES = [REPO / name for name in TRACKED if not name.startswith("tests/")]
PROGRAMS = [path for path in PROJECT_FILES if 'if __name__ == "__main__":' in path.read_text()]
README_MODULES = sorted(set(re.findall(r"python -m ((?:model|data_process|llava_inference|train_utils)\.\w+)",
                                       (REPO / "README.md").read_text())))


def test_no_program_edits_sys_path():
    assert PROGRAMS and [str(p.relative_to(REPO)) for p in PROJECT_FILES if "sys.path" in p.read_text()] == []


def installed_from_this_checkout() -> bool:
    # Every record of the name: the checkout's own cotexnet.egg-info (on sys.path through ".") has
    # no direct_url.json; the venv's dist-info of the editable install has.
    records = (d.read_text("direct_url.json") for d in importlib.metadata.distributions(name="cotexnet"))
    return REPO.as_uri() in {json.loads(record or "{}").get("url") for record in records}


@pytest.mark.slow
@pytest.mark.skipif(not installed_from_this_checkout(),
                    reason="this venv has no editable install of this checkout (pip install -r requirement.txt)")
def test_every_program_starts_from_the_root_as_the_readme_writes_it():
    # The network guard only on PYTHONPATH: the packages must come from the install, not from the
    # checkout that the suite's other child processes are given.
    env = dict(os.environ, PYTHONPATH=str(GUARD_DIR))
    commands = [[str(p.relative_to(REPO))] for p in PROGRAMS] + [["-m", module] for module in README_MODULES]
    assert ["data_process/make_ROI_img.py"] in commands and ["get_text.py"] in commands
    assert ["-m", "model.tiny"] in commands

    def start(command):
        done = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        return " ".join(command), done.returncode, "usage:" in done.stdout, done.stderr.strip().splitlines()[-1:]

    with ThreadPoolExecutor(3) as pool:  # each child imports torch: a few at a time
        results = list(pool.map(start, commands))
    assert [r for r in results if r[1:3] != (0, True)] == []
