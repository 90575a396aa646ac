"""Each benchmark script runs end to end at tiny sizes, so none of them can rot."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_smoke(capsys):
    results = load("throughput").main(["--smoke", "--threads", "1"])
    assert results["sampling"][0]["ours_images_per_s"] > 0
    assert results["sefa_dormancy"]["dormancy_curve_s"] >= 0
    assert "speedup" in capsys.readouterr().out
