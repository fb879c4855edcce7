from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from lookalike.frontends.cli import app
from lookalike.frontends.quickstart import quickstart

from .conftest import offline_env, run_cli


def test_quickstart_offline_library(tmp_path: Path) -> None:
    r = quickstart(db=str(tmp_path / "db"), out=str(tmp_path / "q.png"), offline=True, limit=200, test_size=50)
    assert (r.dataset, r.weights) == ("mnist-sample", "random")
    assert any("offline" in n for n in r.notes)
    assert r.evaluation.n_queries == 50 and r.evaluation.n_indexed == 150
    assert r.evaluation.recall_at_1 >= 0.999
    assert len(r.hits) == 5 and all(h.id != r.query_id for h in r.hits)
    with Image.open(r.picture) as im:
        assert im.format == "PNG"
    again = CliRunner().invoke(
        app,
        ["quickstart", "--offline", "--limit", "200", "--test-size", "50", "--db", str(tmp_path / "db"), "--out", str(tmp_path / "q2.png")],
    )
    assert again.exit_code == 0, again.output
    assert "data:     mnist-sample" in again.stdout and "0 embedded" in again.stdout  # resumed: nothing redone
    assert (tmp_path / "q2.png").is_file()


@pytest.mark.slow
def test_quickstart_falls_back_when_downloads_fail(tmp_path: Path) -> None:
    """The README's main job on a machine without internet: no flag needed."""
    r = run_cli(
        "quickstart",
        "--limit",
        "150",
        "--test-size",
        "30",
        "--db",
        str(tmp_path / "db"),
        "--out",
        str(tmp_path / "q.png"),
        env=offline_env(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert "data:     mnist-sample" in r.stdout and "weights:  random" in r.stdout
    assert "MNIST unavailable" in r.stdout and "ImageNet weights unavailable" in r.stdout
    assert (tmp_path / "q.png").is_file()


@pytest.mark.slow
def test_quickstart_default_sizes_offline(tmp_path: Path) -> None:
    """The README's main job at full size (5,000 digits, 1,000 held out), as a new user runs it offline."""
    r = run_cli("quickstart", "--db", str(tmp_path / "db"), "--out", str(tmp_path / "q.png"), env=offline_env(tmp_path), timeout=900)
    assert r.returncode == 0, r.stderr
    assert "(4000 indexed, 1000 held out)" in r.stdout and "recall@1 1.0000" in r.stdout
