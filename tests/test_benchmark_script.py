"""The benchmark script runs end to end on a small constructed MNIST file (slow: builds VGG16 several times)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import make_digits


@pytest.mark.slow
def test_benchmark_script_quick_run(tmp_path: Path) -> None:
    x, y = make_digits(700, seed=5)
    src = tmp_path / "m.npz"
    np.savez(src, x_train=x, y_train=y, x_test=x[:100], y_test=y[:100])
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    r = subprocess.run(
        [sys.executable, str(script), "--source", str(src), "--limit", "700", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    emb = data["embedding"]
    if emb["precision"] == "float32":
        assert emb["max_abs_vector_difference"] < 1e-4
    else:  # bfloat16 where the CPU has it: the documented tolerance
        assert emb["min_cosine_to_notebook"] > 0.9999 and emb["max_abs_vector_difference"] < 0.01
    assert 0.9 <= data["search"]["filtered_recall_at_5"] <= 1.0
    assert data["evaluation"]["queries"] == 100 and data["evaluation"]["indexed"] == 600
    assert data["evaluation"]["store_accuracy"] == data["evaluation"]["numpy_exact_accuracy"]
    assert data["writes"]["vectors"] == 700 and data["search"]["filtered_queries"] > 0
    assert "ratio" in r.stdout and data["machine"]["cores"] >= 1
