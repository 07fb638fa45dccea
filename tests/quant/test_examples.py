"""The image example scripts run end to end (tiny settings)."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(monkeypatch, script, *args):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def test_custom_conv(monkeypatch, capsys):
    run_example(monkeypatch, "custom_conv.py", "--train", "--epochs", "1", "--limit", "200")
    out = capsys.readouterr().out
    assert "test accuracy" in out and "conv2: -1/0/+1" in out


def test_attention_with_heatmap(monkeypatch, capsys, tmp_path):
    png = tmp_path / "attn.png"
    run_example(
        monkeypatch,
        "attention.py",
        "--train",
        "--epochs",
        "1",
        "--limit",
        "200",
        "--visualize-attention",
        "--out",
        str(png),
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "patch grid saved" in capsys.readouterr().out


def test_custom_quant_through_the_backend(monkeypatch, capsys):
    run_example(
        monkeypatch,
        "custom_quant.py",
        "--train",
        "--quantization-scheme",
        "lsq",
        "--bits",
        "4",
        "--epochs",
        "1",
        "--limit",
        "128",
    )
    out = capsys.readouterr().out
    assert "lsq: test accuracy" in out and "quantizer parameter 0" in out


def test_cifar10_directory_format(tmp_path, monkeypatch):
    """--data-dir reads CIFAR-10's python batches (written here with random pixels)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from image_data import load_images

    xtr, xte, ytr, yte = load_images("cifar10", str(tmp_path))
    assert xtr.shape == (20, 3, 32, 32) and xte.shape == (4, 3, 32, 32)
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0 and ytr.shape == (20,)
    with pytest.raises(SystemExit, match="--data-dir"):
        load_images("cifar10", None)
