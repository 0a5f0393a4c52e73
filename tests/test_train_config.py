"""Training configs: defaults load, overrides apply, bad keys and values are named with the fix."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from codec.config import load_config
from core.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_loads_and_overrides_apply():
    cfg = load_config(ROOT / "configs/train/default.yaml", {"stage1.epochs": 1, "out": "/tmp/x"})
    assert cfg.stage1.epochs == 1 and cfg.out == "/tmp/x"
    assert cfg.default_beta in cfg.betas and cfg.input_size % 32 == 0


@pytest.mark.parametrize("text, needle", [
    ("stage1: {epochz: 3}\n", "stage1.epochz"),
    ("bogus: 1\n", "'bogus'"),
    ("input_size: 250\n", "250"),
    ("betas: [0.1, -1]\n", "betas"),
    ("betas: [0.1]\ndefault_beta: 0.2\n", "default_beta 0.2"),
    ("stage1: {epochs: 2, beta_warmup_epochs: 3}\n", "beta_warmup_epochs 3"),
    ("stage2: {det_anchor_weight: focal}\n", "det_anchor_weight 'focal'"),
    ("stage2: {det_class_kl: -1}\n", "det_class_kl -1"),
    ("stage1: {foreground_weight: -2}\n", "foreground_weight -2"),
    ("student: {encoder_kernels: [5, 4]}\n", "encoder_kernels [5, 4]"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        load_config(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_train_cli_reports_bad_config_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage1: {epochz: 3}\n")
    proc = subprocess.run([sys.executable, "run_pipeline.py", "train", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "stage1.epochz" in last and "allowed" in last


def test_a_collapsed_stage1_stops_with_the_fix_and_a_learning_one_goes_on():
    """Stage 1 whose latent went to almost no bits while the feature error did not fall is stopped after 3 epochs
    with the fix named (the 2026-12-07 run on the continued detector: 0.004 bits per pixel, error 4.7-5.1)."""
    from codec.train import check_stage1_collapse

    with pytest.raises(RuntimeError, match="beta_warmup_epochs"):
        check_stage1_collapse(2, mse=4.9, first_mse=4.7, bpp=0.004, beta=3.2)
    check_stage1_collapse(1, mse=4.9, first_mse=4.7, bpp=0.004, beta=3.2)  # too early to tell
    check_stage1_collapse(2, mse=2.0, first_mse=4.7, bpp=0.004, beta=3.2)  # few bits, but it learns
    check_stage1_collapse(5, mse=4.9, first_mse=4.7, bpp=0.12, beta=3.2)  # bits flow
