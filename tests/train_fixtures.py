"""Fixtures of the training tests: a tiny synthetic task in the real layout, a tiny CLIPSeg,
and a helper that runs the top-level scripts as a user would (a subprocess each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def run_script(*args, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """`python <args>` from the repository root, offline; fails the test with its output on error."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, **popen)
    if check and result.returncode != 0:
        pytest.fail(f"{args[0]} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def train_setup(synthetic_root, tmp_path_factory) -> dict:
    """Splits (8 train / 2 val / 2 test of the 12 synthetic images), a text CSV, a tiny CLIPSeg
    folder and a config file for a fast run (input 64, batch 4, 3 epochs)."""
    from model.tiny import save_clipseg_folder

    work = tmp_path_factory.mktemp("train")
    names = sorted(p.name for p in (synthetic_root / "synthetic" / "images").iterdir())
    for split, chunk in (("train", names[:8]), ("val", names[8:10]), ("test", names[10:])):
        pd.DataFrame(dict(dataset="synthetic", img_name=chunk, mask_name=chunk)).to_csv(work / f"{split}_data.csv",
                                                                                      index=False)
    pd.DataFrame(dict(roi_name=names, text="{}", text_prompt="1 round small red polyp area, located in the center "
                                                              "of the image.")).to_csv(work / "text.csv", index=False)
    clipseg = save_clipseg_folder(work / "tiny_clipseg")
    config = dict(
        MODEL=dict(clipseg_hf_api=str(clipseg)),
        DATASET=dict(dataset_name="synthetic", root_dir=str(synthetic_root), split_dir=str(work),
                     text_csv=str(work / "text.csv")),
        TRAIN=dict(input_size=64, batch_size=4, num_workers=0, epochs=3, lr=1e-3, cpu_threads=2, num_overlays=2,
                   run_dir=str(work / "runs")),
    )
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    return dict(work=work, config=work / "config.yaml", runs=work / "runs", root=synthetic_root, names=names)
