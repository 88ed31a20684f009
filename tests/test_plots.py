"""The benchmarks' figures (benchmarks/plot.py with matplotlib), drawn from the checked-in
results; the scripts import without matplotlib and say how to get it."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SVG = "{http://www.w3.org/2000/svg}"


def _texts(path) -> set[str]:
    root = ET.parse(path).getroot()
    assert root.tag == SVG + "svg"
    return {t.text for t in root.iter(SVG + "text")}


def test_scripts_import_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None; "   # None: any import of it fails
            "import benchmarks.cost_curve, benchmarks.quality_study, benchmarks.plot")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    from benchmarks.quality_study import main as study
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"pip install 'flashdsa\[plot\]'"):
        study(["--plot-from", str(RESULTS / "quality_study.json"), "--out", str(tmp_path)])


def test_cost_curve_plot_from_results(tmp_path):
    from benchmarks.cost_curve import plot
    result = json.loads((RESULTS / "cost_curve.json").read_text())
    texts = _texts(plot(result, str(tmp_path / "cost_curve.svg")))
    assert {"dense b=1", "DSA b=1", f"DSA b={result['decode_batches'][-1]}", "8K", "128K"} <= texts
    assert any(t.startswith("prefill: time per token") for t in texts)


def test_quality_study_plot_from_results(tmp_path):
    from benchmarks.quality_study import main as study
    res = json.loads((RESULTS / "quality_study.json").read_text())
    assert study(["--plot-from", str(RESULTS / "quality_study.json"), "--out", str(tmp_path)]) == 0
    assert set(res["stages"]) <= _texts(tmp_path / "quality_study_loss.svg")
    assert {r["name"] for r in res["rows"]} <= _texts(tmp_path / "quality_study_loss_by_position.svg")


def test_same_data_same_svg_bytes(tmp_path):
    """The docs' figures change only when their data does."""
    from benchmarks.plot import line_chart
    series = {"a": [(1, 2.0), (2, 1.5)], "b": [(1, 2.5), (2, 1.0)]}
    paths = [line_chart(series, str(tmp_path / f"{i}.svg"), "t", "x", "y") for i in range(2)]
    assert Path(paths[0]).read_bytes() == Path(paths[1]).read_bytes()



def test_cost_curve_toy_profiles_each_decode_step(tmp_path):
    """`cost_curve --profile`: each decode step's ops (kernels on a GPU), slowest first, per
    context and variant, and the eager step's host time by function, in the JSON (here the
    CPU toy run: the logic only); --breakdown-from groups them per layer."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.cost_curve", "--toy", "--contexts", "128", "--profile",
                        "--profile-top", "5", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "cost_curve_toy.json").read_text())
    assert not res["errors"], res["errors"]
    steps = res["profiles"]["128"]
    kernels = {f"decode_{v}_b{b}" for v in ("dsa", "dsa_eager", "dense_bmm") for b in (1, 4)}
    assert set(steps) == kernels | {f"decode_dsa_eager_b{b}_host" for b in (1, 4)}
    for key in kernels:
        rows = steps[key]
        assert 0 < len(rows) <= 5 and all(t > 0 for _, _, t in rows)
        assert [t for _, _, t in rows] == sorted((t for _, _, t in rows), reverse=True)
    for b in (1, 4):   # the eager step's host time by Python function: own time, slowest first
        rows = steps[f"decode_dsa_eager_b{b}_host"]
        assert 0 < len(rows) <= 5 and [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
        assert all(cum >= own >= 0 for _, _, own, cum in rows)
    r = subprocess.run([sys.executable, "-m", "benchmarks.cost_curve", "--breakdown-from",
                        str(tmp_path / "cost_curve_toy.json")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "context 128 decode_dsa_b1:" in r.stdout, r.stdout + r.stderr
