"""SIGINT and SIGTERM midway: exit 130 / 143 with one line, every image on disk is in the manifest and in the
offline W&B run (which reads back), and no traceback."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.test_app import read_wandb

SEEDS = "[" + ",".join(str(i) for i in range(40)) + "]"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_keeps_everything(tmp_path, sig, code):
    args = [sys.executable, "-m", "stablefused", "model=tiny_random", "prompts=[a red circle]", f"seeds={SEEDS}",
            "guidance_scales=[3]", "steps=10", "batch_size=1", "progress=false", "logger=wandb",
            f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = tmp_path / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few batches are written
        if manifest.is_file() and manifest.read_text().count('"type": "image"') >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err + out
    lines = [x for x in (out + err).splitlines() if "interrupted" in x]
    assert len(lines) == 1 and f"of 40 images; outputs in {tmp_path}" in lines[0], lines
    images = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert 3 <= len(images) < 40
    assert all((tmp_path / r["path"]).is_file() for r in images)
    assert len(list((tmp_path / "images").glob("*.png"))) == len(images)  # no file outside the manifest
    (records,) = read_wandb(tmp_path)
    files = [f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]]
    assert sum("media/images/images_" in f for f in files) == len(images)
    exit_rec = [r for r in records if r["type"] == "exit"]
    assert exit_rec and json.dumps(exit_rec[0]).count(str(code)) >= 1
