"""Time and cost to train: days, GPU-hours and cost follow from tokens/s exactly, in every output that shows them;
without --tokens nothing changes; planner compare plans the same job on each cluster, and a cluster on which
nothing fits is a row that says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from planner.cli import main
from planner.compare import SECONDS_PER_DAY, parse_tokens, training_cost
from planner.errors import SpecError
from tests.planner.refusals import refused

SMALL = ("--model", "gpt3-1.3b", "--cluster", "dgx-a100-80gb", "--nodes", "1", "--global-batch", "64")
PREDICT = ("predict", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--global-batch", "1536", "--tp", "8", "--pp", "8",
           "--dp", "8", "--micro-batch", "1", "--recompute", "full")
# gpt3-13b fits on one DGX A100 node; on four 24 GB cards it needs more than any split of them holds.
COMPARE = ("compare", "--model", "gpt3-13b", "--global-batch", "64", "--tokens", "1T")
FITS, DOES_NOT_FIT = ("--cluster", "dgx-a100-80gb", "--nodes", "1"), ("--cluster", "workstation-4x-rtx4090")


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def assert_follows(t: dict, tokens: int, tokens_per_s: float, gpus: int, price: float | None) -> None:
    """The training object says exactly what the arithmetic says (==, not approx: one function computes both)."""
    days = tokens / tokens_per_s / SECONDS_PER_DAY
    assert (t["tokens"], t["tokens_per_s"], t["gpus"]) == (tokens, tokens_per_s, gpus)
    assert t["days"] == days and t["gpu_hours"] == days * 24 * gpus
    assert t["cost_usd"] == (None if price is None else days * 24 * gpus * price) and t["gpu_hour_price_usd"] == price


def test_days_gpu_hours_and_cost_follow_from_tokens_per_s_exactly():
    c = training_cost(1_083_878.0, 1024, 15 * 10**12, 3.0)
    assert c.days == 15e12 / 1_083_878.0 / 86_400 == pytest.approx(160.17, abs=0.01)
    assert c.gpu_hours == c.days * 24 * 1024 and c.cost_usd == c.gpu_hours * 3.0
    assert training_cost(2e6, 8, 10**12).cost_usd is None  # no price, no cost
    assert training_cost(2e6, 16, 10**12).days == training_cost(1e6, 16, 10**12).days / 2


def test_plan_json_gives_each_fitting_plan_its_days_gpu_hours_and_cost(capsys):
    code, out = run(capsys, "plan", *SMALL, "--json", "--top", "3", "--tokens", "300B", "--gpu-hour-price", "1.3")
    d = json.loads(out)
    assert code == 0 and [t["id"] for t in d["training"]] == [p["id"] for p in d["plans"] if p["prediction"]["fits"]]
    for t, p in zip(d["training"], d["plans"]):
        assert_follows(t, 300 * 10**9, p["prediction"]["tokens_per_s"], 8, 1.3)
    assert all("training" not in p for p in d["plans"])  # the plan objects stay plan.json's


def test_predict_json_gives_the_days_gpu_hours_and_cost_of_its_prediction(capsys):
    code, out = run(capsys, *PREDICT, "--json", "--tokens", "15e12")
    d = json.loads(out)
    assert code == 0
    assert_follows(d["training"], 15 * 10**12, d["tokens_per_s"], 512, None)


def test_without_tokens_plan_and_predict_print_what_they_printed_before(capsys):
    def plan_json(*extra):
        d = json.loads(run(capsys, "plan", *SMALL, "--json", *extra)[1])
        return {k: v for k, v in d.items() if k != "search_s"}

    plain, costed = plan_json(), plan_json("--tokens", "1T")
    assert "training" not in plain and plain == {k: v for k, v in costed.items() if k != "training"}
    predicted = json.loads(run(capsys, *PREDICT, "--json")[1])
    assert "training" not in predicted
    assert predicted == {k: v for k, v in json.loads(run(capsys, *PREDICT, "--json", "--tokens", "1T")[1]).items() if k != "training"}
    assert "Time and cost" not in run(capsys, *PREDICT)[1] and "Time and cost" not in run(capsys, "plan", *SMALL)[1]


def test_the_tables_show_days_gpu_hours_and_cost_beside_tokens_per_s(capsys):
    out = run(capsys, *PREDICT, "--tokens", "300B", "--gpu-hour-price", "1.40")[1]
    d = json.loads(run(capsys, *PREDICT, "--json", "--tokens", "300B", "--gpu-hour-price", "1.40")[1])["training"]
    assert "Time and cost to train 300B tokens at $1.4 per GPU-hour" in out
    row = next(line for line in out.splitlines() if "8×8×8" in line and "$" in line)
    assert 1e6 < d["cost_usd"] < 1.1e6  # shown in millions
    assert f"{d['tokens_per_s']:,.0f}" in row and f"{d['days']:.1f}" in row and f"${d['cost_usd'] / 1e6:.2f}M" in row


@pytest.mark.parametrize("text, tokens", [("15e12", 15 * 10**12), ("15T", 15 * 10**12), ("1.5e13", 15 * 10**12),
                                          ("15_000_000_000_000", 15 * 10**12), ("300B", 3 * 10**11), ("2.5M", 2_500_000),
                                          (" 7k ", 7000)])
def test_tokens_take_the_usual_notations(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text, message", [("lots", "expected a number of tokens such as 15e12"), ("15TT", "expected a number"),
                                           ("", "expected a number"), ("nan", "expected a number"), ("-5", "expected a number"),
                                           ("0", "whole number of tokens, at least 1"), ("1.5", "whole number"),
                                           ("1e400", "beyond any training run")])
def test_nonsense_tokens_are_refused_naming_the_flag(capsys, text, message):
    err = refused(capsys, "plan", *SMALL, "--tokens", text)
    assert err.startswith("error: --tokens: ") and message in err
    with pytest.raises(SpecError, match=message):
        parse_tokens(text)


def test_fewer_tokens_than_one_iteration_is_refused_as_the_typo_it_is(capsys):
    err = refused(capsys, *PREDICT, "--tokens", "1M")
    assert "--tokens: 1,000,000 tokens are fewer than one iteration's 3,145,728" in err


@pytest.mark.parametrize("argv, message", [
    (("--gpu-hour-price", "2"), "--gpu-hour-price: prices GPU-hours, which need --tokens"),
    (("--tokens", "1T", "--gpu-hour-price", "-1"), "--gpu-hour-price: expected a price above 0"),
    (("--tokens", "1T", "--gpu-hour-price", "$2"), "--gpu-hour-price: expected US dollars per GPU-hour"),
    (("--tokens", "1T", "--gpu-hour-price", "inf"), "expected a price above 0"),
])
def test_a_bad_price_is_refused_naming_the_flag(capsys, argv, message):
    assert message in refused(capsys, "plan", *SMALL, *argv)


# ---------------------------------------------------------------- planner compare

def test_a_cluster_on_which_nothing_fits_is_a_row_that_says_why(capsys):
    code, out = run(capsys, *COMPARE, *FITS, *DOES_NOT_FIT, "--json")
    fits, nothing = json.loads(out)["rows"]
    assert code == 0  # one cluster has a plan
    assert fits["fits"] and fits["plan"]["prediction"]["fits"] and fits["reason"] == ""
    assert not nothing["fits"] and nothing["plan"] is None and nothing["training"] is None and nothing["tokens_per_s"] is None
    assert nothing["reason"].startswith("nothing fits: ") and "GiB over the 21.99 GiB usable on one rtx4090-pcie-24gb" in nothing["reason"]
    table = run(capsys, *COMPARE, *FITS, *DOES_NOT_FIT)[1]
    row = next(line for line in table.splitlines() if line.startswith("workstation"))
    assert "nothing fits" in row
    assert f"workstation-4x-rtx4090 (1×4): {nothing['reason']}" in " ".join(table.split())


def test_compare_exits_1_when_nothing_fits_anywhere_and_still_prints_every_row(capsys):
    code, out = run(capsys, *COMPARE, *DOES_NOT_FIT, *DOES_NOT_FIT, "--json")
    assert code == 1 and [r["fits"] for r in json.loads(out)["rows"]] == [False, False]


def test_pins_no_configuration_of_a_cluster_satisfies_make_its_row_say_so(capsys):
    d = json.loads(run(capsys, *COMPARE, *FITS, *DOES_NOT_FIT, "--tp", "8", "--json")[1])
    assert d["rows"][0]["fits"] and d["rows"][0]["plan"]["tp"] == 8
    assert "tp 8" in d["rows"][1]["reason"] and "4 devices" in d["rows"][1]["reason"]


def test_each_row_is_the_plan_planner_plan_picks_on_that_cluster_and_its_cost_follows_from_it(capsys):
    d = json.loads(run(capsys, *COMPARE, "--gpu-hour-price", "2.5", *FITS, "--cluster", "dgx-h100-80gb", "--nodes", "1",
                       "--device", "h200-sxm-141gb", "--gpu-hour-price", "4", "--json")[1])
    for row, pins, price in zip(d["rows"], (FITS, ("--cluster", "dgx-h100-80gb", "--nodes", "1", "--device", "h200-sxm-141gb")), (2.5, 4.0)):
        best = json.loads(run(capsys, "plan", "--model", "gpt3-13b", *pins, "--global-batch", "64", "--json", "--top", "1")[1])["plans"][0]
        assert row["plan"]["id"] == best["id"] and row["tokens_per_s"] == best["prediction"]["tokens_per_s"]
        assert row["mfu"] == best["prediction"]["mfu"] and row["peak_memory_gib"] == best["prediction"]["peak_memory_gib"]
        assert_follows(row["training"], 10**12, row["tokens_per_s"], 8, price)
    assert d["rows"][1]["device"] == "h200-sxm-141gb" and d["rows"][1]["profile"] == "h200-sxm-141gb (datasheet)"


def test_one_price_before_the_first_cluster_prices_every_cluster(capsys):
    d = json.loads(run(capsys, *COMPARE, "--gpu-hour-price", "2", *FITS, "--cluster", "dgx-h100-80gb", "--nodes", "1", "--json")[1])
    assert [r["gpu_hour_price_usd"] for r in d["rows"]] == [2.0, 2.0]
    assert all(r["training"]["cost_usd"] == r["training"]["gpu_hours"] * 2 for r in d["rows"])


@pytest.mark.parametrize("argv, message", [
    (("--nodes", "2", *FITS), "--nodes: comes before any --cluster; give it after the --cluster it belongs to"),
    ((*FITS, "--nodes", "2"), "--nodes: given twice for --cluster dgx-a100-80gb"),
    ((*FITS, "--gpu-hour-price", "2", *DOES_NOT_FIT), "--gpu-hour-price: given for some clusters but not for "
                                                      "--cluster workstation-4x-rtx4090"),
    (("--gpu-hour-price", "1", "--gpu-hour-price", "2", *FITS), "given twice before the first --cluster"),
    ((*FITS, "--gpu-hour-price", "free"), "--gpu-hour-price: expected US dollars"),
    (("--cluster", "no-such-cluster"), "--cluster: unknown preset 'no-such-cluster'"),
])
def test_compare_refuses_flags_it_cannot_pair_with_a_cluster_in_one_line(capsys, argv, message):
    assert message in refused(capsys, *COMPARE, *argv)


def test_compare_markdown_is_one_row_per_cluster_with_whole_numbers(capsys):
    code, out = run(capsys, *COMPARE, "--gpu-hour-price", "2", *FITS, *DOES_NOT_FIT, "--markdown")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and lines[0].startswith("| cluster | GPUs | profile | best plan")
    assert lines[2].startswith("| dgx-a100-80gb | 8 | a100-sxm4-80gb (datasheet) | ") and "k |" not in lines[2]
    assert lines[3].startswith("| workstation-4x-rtx4090 | 4 | rtx4090-pcie-24gb (datasheet) | nothing fits: ")


def test_the_compare_table_fits_80_columns_with_no_value_cut():
    argv = [*COMPARE, "--gpu-hour-price", "2.5", *FITS, "--cluster", "dgx-h200-141gb", "--nodes", "2", *DOES_NOT_FIT]
    r = subprocess.run([sys.executable, "-m", "planner.cli", *argv], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    table = r.stdout[r.stdout.index("cluster"):r.stdout.index("days = tokens")]
    assert "…" not in table and "$" in table and "nothing fits" in table
