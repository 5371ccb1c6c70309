"""Smoke test of apps/long_context_eval.py, run as a user would run it (loads the embedded SmolLM2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

APPS = Path(__file__).parents[1]


@pytest.mark.slow
def test_long_context_eval_quick_run_writes_the_figure_and_results(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, APPS / "long_context_eval.py", "--quick", "--methods", "base", "yarn",
                          "dynamic", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         cwd=APPS.parent, env=env)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["perplexity"]) == {"base", "yarn", "dynamic"}
    # dynamic NTK changes nothing up to the original length (64 in --quick): same perplexity as the base model
    assert results["perplexity"]["dynamic"]["64"] == results["perplexity"]["base"]["64"]
    assert all(1 < p < 1000 for ppl in results["perplexity"].values() for p in ppl.values())
    assert {"sinks", "window only", "full cache"} <= set(results["streaming"])
    assert (tmp_path / "long_context_eval.png").stat().st_size > 10_000
    assert "base:" in out.stderr and "streaming, sinks" in out.stderr  # progress bars for the long phases


def test_long_context_plot_ticks_at_the_lengths_and_legends_beside_the_curves(tmp_path):
    sys.path.insert(0, str(APPS))
    import long_context_eval as lce

    args = lce.parse_args(["--lengths", "64", "96", "128", "--window", "20", "--n-sink", "4"])
    lengths = {"64": 0, "96": 0, "128": 0}
    methods = ["base", *lce.METHODS]
    results = {"perplexity": {m: {L: 10 + i + j for j, L in enumerate(lengths)} for i, m in enumerate(methods)},
               "passkey": {m: {L: 1.0 for L in lengths} for m in methods},
               "streaming": {k: [2.0 + 0.01 * i for i in range(60)] for k in ("sinks", "window only", "full cache")}}
    fig = lce.plot(results, args, tmp_path / "plot.png")
    ppl_axes = fig.axes[0]
    assert [t.get_text() for t in ppl_axes.get_xticklabels()] == ["64", "96", "128"]  # not 7×10¹
    assert not ppl_axes.xaxis.get_minor_ticks() or all(not t.label1.get_text() for t in
                                                        ppl_axes.xaxis.get_minor_ticks())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:  # no legend covers a plotting area: they sit below the panels
        box = ax.get_legend().get_window_extent(renderer)
        assert all(not box.overlaps(other.get_window_extent(renderer)) for other in fig.axes), ax.get_title()
        assert len(ax.get_legend().get_texts()) >= 3
    lce.plt_close(fig)


def test_long_context_eval_bad_checkpoint_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, APPS / "long_context_eval.py", "--checkpoint", str(tmp_path / "x.gguf"),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=APPS.parent)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: ")
