"""docs/tutorial.md runs as written: every ```bash block, in order, on the shared Sentinel-2
data (one training epoch instead of thirty).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_tutorial_runs_as_written(shared_data, tmp_path):
    text = (REPO / "docs" / "tutorial.md").read_text()
    script = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    assert script.count("specdeepmap ") == 6  # stack-bands, chip, split, train, test, map
    work = tmp_path / "tutorial"
    for old, new in (
        ("DATA=../shared/data/", f"DATA={shared_data}/"),
        ("WORK=runs/tutorial", f"WORK={work}"),
        ("--epochs 30", "--epochs 1 --min-chips-per-epoch 16 --baseline-pixels 5000"),
    ):
        assert old in script, old
        script = script.replace(old, new)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (work / "map.tif").exists() and (work / "test" / "test_iou.csv").exists()
    quality = json.loads((work / "map_quality.json").read_text())
    assert quality["verdict"] in ("ok", "suspect")
    assert (work / "map_iou.csv").read_text().startswith("Class,IoU")
