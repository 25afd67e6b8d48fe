"""Method vs baseline: gain, rounds to reach the baseline's final accuracy, the two-curve plot, report section."""
from __future__ import annotations

import pytest

from fedlatent.compare import compare, comparison_markdown, curve, plot_comparison, rounds_to_reach
from fedlatent.fl.run import MetricsWriter, read_metrics

FEDDGM = [{"round": 0, "accuracy": 0.10}, {"round": 1, "accuracy": 0.40}, {"round": 2, "accuracy": None},
          {"round": 3, "accuracy": 0.62}, {"round": 4, "accuracy": 0.70}]
FEDAVG = [{"round": 0, "accuracy": 0.10}, {"round": 1, "accuracy": 0.30}, {"round": 2, "accuracy": 0.55},
          {"round": 3, "accuracy": 0.52}, {"round": 4, "accuracy": 0.60}]


def test_gain_and_rounds_to_reach():
    c = compare(FEDDGM, FEDAVG)
    assert (c.final, c.baseline_final, c.best, c.baseline_best) == (0.70, 0.60, 0.70, 0.60)
    assert c.gain == pytest.approx(0.10)
    # FedDGM first reaches 0.60 in round 3 (round 2 was not evaluated); FedAvg only in its last round
    assert c.rounds_to_baseline_final == {"feddgm": 3, "fedavg": 4}
    assert c.as_dict()["gain"] == pytest.approx(0.10)


def test_a_method_that_never_reaches_the_baseline():
    worse = [{"round": 0, "accuracy": 0.1}, {"round": 4, "accuracy": 0.59}]
    c = compare(worse, FEDAVG, method="fedprox")
    assert c.rounds_to_baseline_final == {"fedprox": None, "fedavg": 4} and c.gain == pytest.approx(-0.01)
    assert "| fedprox | 0.5900 | 0.5900 | never |" in comparison_markdown(c)
    assert rounds_to_reach(FEDAVG, 0.55) == 2 and rounds_to_reach(FEDAVG, 0.0) == 0
    with pytest.raises(ValueError, match="at least one evaluated"):
        compare([{"round": 0, "accuracy": None}], FEDAVG)


def test_works_on_metrics_csv_rows(tmp_path):
    for name, rows in (("a", FEDDGM), ("b", FEDAVG)):
        w = MetricsWriter(tmp_path / f"{name}.csv", ["round", "accuracy"])
        for r in rows:
            w.append(r)
    c = compare(read_metrics(tmp_path / "a.csv"), read_metrics(tmp_path / "b.csv"))
    assert c.rounds_to_baseline_final == {"feddgm": 3, "fedavg": 4} and c.gain == pytest.approx(0.10)


def test_report_section():
    md = comparison_markdown(compare(FEDDGM, FEDAVG))
    assert "| feddgm | 0.7000 | 0.7000 | 3 |" in md and "| fedavg | 0.6000 | 0.6000 | 4 |" in md
    assert "+10.00 accuracy points" in md and "reach fedavg's final (0.6000)" in md


def test_plot_has_both_curves_and_the_target_line(tmp_path):
    fig = plot_comparison({"feddgm": FEDDGM, "fedavg": FEDAVG}, tmp_path / "accuracy.png", baseline="fedavg")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["feddgm", "fedavg", "fedavg final 0.6000"]
    assert list(lines[0].get_xdata()) == [0, 1, 3, 4] and list(lines[1].get_ydata()) == [v for _, v in curve(FEDAVG)]
    assert list(lines[2].get_ydata()) == [0.60, 0.60]
    with pytest.raises(ValueError, match="baseline"):
        plot_comparison({"feddgm": FEDDGM}, tmp_path / "x.png", baseline="fedavg")
