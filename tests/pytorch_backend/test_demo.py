"""The demo on PyTorch: the three result lines, and the accuracy promised for W4A8 and W2A8."""

from __future__ import annotations

import re

import pytest

from trainable_infra.__main__ import main


def run_demo(capsys, tmp_path, *options: str) -> dict[str, float]:
    status = main(["demo", "--backend", "torch", "--no-progress", "--output", str(tmp_path), *options])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "reloaded (weights_only) predictions identical: True" in out
    assert "converted to mct-quantizers modules; predictions identical: True" in out
    assert (tmp_path / "qat_model.pt").exists()
    assert (tmp_path / "model.onnx").exists()
    return {kind: float(value) for kind, value in re.findall(r"^(float|PTQ|QAT) accuracy: ([\d.]+)%$", out, re.M)}


@pytest.mark.parametrize(
    ("options", "max_drop"),
    [(("--method", "STE"), 1.0), (("--method", "LSQ"), 1.0), (("--method", "LSQ", "--weight-bits", "2"), 3.0)],
    ids=["W4A8-STE", "W4A8-LSQ", "W2A8-LSQ"],
)
def test_qat_accuracy_is_close_to_float(capsys, tmp_path, options, max_drop):
    accuracy = run_demo(capsys, tmp_path, *options)
    assert set(accuracy) == {"float", "PTQ", "QAT"}
    assert accuracy["float"] > 95.0
    assert accuracy["QAT"] >= accuracy["float"] - max_drop, accuracy


def test_bad_bit_width_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "torch", "--weight-bits", "1"])
    assert "--weight-bits must be in 2..16, got 1" in capsys.readouterr().err
