"""experiments.scaling: the report it makes of pipeline runs at several sizes
(the runs themselves are the pipeline's, tested in test_pipeline)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import scaling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _results(finetuned, supervised):
    spread = {}
    for method, draws in (("simclr_finetune", finetuned), ("supervised_baseline", supervised)):
        spread[method] = {fraction: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                     "values": list(v)} for fraction, v in draws.items()}
    return {"spread": spread, "wall_s": 100.0, "timings": {"pretrain_s": 10.0}}


def test_the_gain_is_paired_by_label_draw():
    # Draw-by-draw differences, not the difference of the means' spreads.
    gain = scaling.paired_gain([0.70, 0.60, 0.65], [0.60, 0.55, 0.50])
    differences = 100 * (np.array([0.70, 0.60, 0.65]) - np.array([0.60, 0.55, 0.50]))
    assert gain["mean"] == pytest.approx(differences.mean())
    assert gain["std"] == pytest.approx(np.std(differences))
    assert gain["values"] == pytest.approx(list(differences))
    with pytest.raises(ValueError, match="one baseline per fine-tuning draw"):
        scaling.paired_gain([0.7, 0.6], [0.6])


def test_the_sweep_reads_finished_sizes_and_reports_them(tmp_path):
    draws = {"8": ({"0.01": [0.60, 0.62, 0.58], "0.1": [0.75, 0.76, 0.74]},
                   {"0.01": [0.55, 0.56, 0.57], "0.1": [0.73, 0.72, 0.74]}),
             "16": ({"0.01": [0.68, 0.70, 0.66], "0.1": [0.80, 0.81, 0.79]},
                    {"0.01": [0.60, 0.62, 0.61], "0.1": [0.77, 0.76, 0.78]})}
    for width, (tuned, sup) in draws.items():
        folder = tmp_path / f"width_{width}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(_results(tuned, sup)))
    result = subprocess.run(
        [sys.executable, "-m", "experiments.scaling", f"--output_dir={tmp_path}",
         "--base_widths=8,16"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reading" in result.stdout and "experiments.pipeline" not in result.stdout
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert set(report) == {"8", "16"}
    for width, (tuned, sup) in draws.items():
        for fraction in ("0.01", "0.1"):
            expected = 100 * (np.array(tuned[fraction]) - np.array(sup[fraction]))
            got = report[width]["fractions"][fraction]["gain"]
            assert got["mean"] == pytest.approx(expected.mean())
    # ResNet-18 at base width 16 has about four times the parameters of width 8.
    ratio = report["16"]["parameters"] / report["8"]["parameters"]
    assert 3.5 < ratio < 4.1
    table = (tmp_path / "scaling.md").read_text()
    assert "| ResNet-18, base width 16 |" in table and "+7.00 ± 1.41" in table
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
