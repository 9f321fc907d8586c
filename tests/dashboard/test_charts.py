"""dashboard/charts.py: every figure is titled, its axes name their units, and it draws what it claims."""

from __future__ import annotations

import re

import pytest

from dashboard import charts, data
from planner.schedule import simulate
from planner.search import search
from planner.specs import PROFILES_DIR, load_cluster, load_device, load_model
from tests.dashboard.runs import tiny_plan

UNIT = re.compile(r"\((s|GiB|tokens/s|%)[,)]|\(s, |\(GiB, ")


def _axis_titles(fig) -> list[str]:
    layout = fig.layout.to_plotly_json()
    return [v["title"]["text"] for k, v in layout.items() if k.startswith(("xaxis", "yaxis")) and v.get("title", {}).get("text")]


@pytest.fixture(scope="module")
def figures():
    model, cluster, device = load_model("gpt-tiny"), load_cluster("local-cpu", gpus_per_node=2), load_device(str(PROFILES_DIR / "devices" / "cpu.json"))
    result = search(model, cluster, device, 16, {})
    plan = tiny_plan(pp=2, dp=1, micro_batch=1)
    return {
        "scatter": charts.plans_scatter(data.candidates_frame(result.candidates),
                                        data.plans_frame(result.plans), device.memory_gib, "tp"),
        "timeline": charts.timeline_figure(data.predicted_timeline(plan, device), "Pipeline timeline"),
        "breakdown": charts.breakdown_figure(data.breakdown_frame(plan), plan.prediction.iteration_s),
        "memory": charts.memory_figure(data.memory_frame(plan, device), device.memory_gib),
    }


@pytest.mark.parametrize("name", ["scatter", "timeline", "breakdown", "memory"])
def test_every_figure_has_a_title_and_axis_titles_with_units(figures, name):
    fig = figures[name]
    assert fig.layout.title.text
    titles = _axis_titles(fig)
    assert titles and any(UNIT.search(t) for t in titles), titles


def test_validation_figures_have_units_and_the_y_equals_x_line(results_dir):
    df, _, _ = data.load_validation(data.results_files(results_dir))
    fig = charts.validation_figure(df)
    assert all(UNIT.search(t) for t in _axis_titles(fig))
    line = next(t for t in fig.data if t.name.startswith("y = x"))
    assert list(line.x) == list(line.y)
    err = charts.error_figure(df)
    assert list(err.data[0].y) == pytest.approx(list(df["error_pct"]))
    assert "%" in err.layout.yaxis.title.text


def test_scatter_draws_the_memory_limit_at_the_usable_memory(figures):
    limit = next(t for t in figures["scatter"].data if t.name.startswith("usable memory"))
    assert list(limit.x) == [8.0, 8.0]  # the memory the fixture passes
    assert figures["scatter"].layout.xaxis.type == "log"


def test_scatter_draws_every_candidate_once(figures):
    model, cluster, device = load_model("gpt-tiny"), load_cluster("local-cpu", gpus_per_node=2), load_device(str(PROFILES_DIR / "devices" / "cpu.json"))
    n = len(search(model, cluster, device, 16, {}).candidates)
    points = sum(len(t.x) for t in figures["scatter"].data if t.legendgroup and t.name.startswith("tp "))
    assert points == n


def test_timeline_colours_each_op_and_labels_each_device_with_its_idle_share(figures):
    fig = figures["timeline"]
    assert {t.name for t in fig.data} >= {"forward", "backward", "send"}
    assert {t.marker.color for t in fig.data} <= set(charts.OP_COLORS.values())
    assert list(fig.layout.yaxis.ticktext)[0].startswith("stage 0 · idle ")
    assert list(fig.layout.yaxis.ticktext)[1].startswith("stage 1 · idle ")


def test_interleaved_timeline_rows_name_the_device_and_its_stages():
    sim = simulate("interleaved", 2, 4, 3, [1.0] * 6, [2.0] * 6)
    fig = charts.timeline_figure(data.timeline_view(sim.timeline, 2), "interleaved")
    assert list(fig.layout.yaxis.ticktext)[1].startswith("device 1: stages 1, 3, … · idle ")


def test_timeline_with_a_left_out_steady_state_draws_two_windows_and_says_so():
    sim = simulate("1f1b", 32, 256, 1, [1.0] * 32, [2.0] * 32, 0.1)
    view = data.timeline_view(sim.timeline, 32)
    fig = charts.timeline_figure(view, "big")
    assert tuple(fig.layout.xaxis.range) == (0.0, view.gap[0])
    assert tuple(fig.layout.xaxis2.range) == (view.gap[1], view.iteration_s)
    assert "left out" in fig.layout.title.text and "16 of 32 pipeline devices" in fig.layout.title.text


def test_compare_figure_draws_days_and_cost_per_cluster_with_each_plan_in_the_hover():
    from tests.dashboard.runs import compare_rows

    rows = compare_rows()
    df = data.compare_frame(rows)
    fig = charts.compare_figure(df)
    days, cost = (t for t in fig.data if t.type == "bar")
    assert list(days.x) == ["dgx-a100-80gb (1×8)"] and list(days.y) == [rows[0].cost.days]
    assert list(cost.y) == [rows[0].cost.cost_usd] and cost.xaxis == "x2"
    from planner.report import plan_label

    assert days.customdata[0][0] == plan_label(rows[0].plan) == df.at[0, "plan"] and "plan %{customdata[0]}" in days.hovertemplate
    marks = [t for t in fig.data if t.type == "scatter"]
    assert len(marks) == 2 and all(list(t.x) == ["workstation-4x-rtx4090 (1×4)"] and list(t.y) == [0] for t in marks)
    assert marks[0].customdata[0][0] == rows[1].reason  # hover says why nothing fits
    assert fig.layout.title.text and all("(" in t for t in _axis_titles(fig))


def test_compare_figure_without_prices_draws_days_only():
    from tests.dashboard.runs import compare_rows

    fig = charts.compare_figure(data.compare_frame(compare_rows(price=None)))
    assert [t.type for t in fig.data].count("bar") == 1 and "xaxis2" not in fig.layout.to_plotly_json()


def test_the_breakdown_bars_write_every_part_to_the_decimals_of_the_titles_iteration(figures):
    fig = figures["breakdown"]
    said = [t.split(" s (")[0] for t in fig.data[0].text]
    whole = re.search(r"Where the (\S+) s", fig.layout.title.text).group(1)
    assert {len(s.split(".")[-1]) for s in said + [whole]} == {len(whole.split(".")[-1])}, (whole, said)
