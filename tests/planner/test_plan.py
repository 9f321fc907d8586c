"""plan.json is read exactly or refused: bad stage fields name the stage, and the id is the contents' hash."""

from __future__ import annotations

import json

import pytest

from planner.errors import SpecError
from planner.plan import Knobs, load_plan, plan_to_dict, write_plan


@pytest.fixture
def plan_file(tmp_path):
    """A real pp2 plan of gpt-tiny (8 layers, uneven 3 + 5) written as planner plan --out writes it."""
    import dataclasses

    from planner.cost import predict
    from planner.plan import with_id
    from planner.specs import load_cluster, load_device, load_model

    plan, _ = predict(load_model("gpt-tiny"), load_cluster("local-cpu", gpus_per_node=2), load_device("cpu"),
                      Knobs(1, 2, 1, 2, recompute="full"), 16)
    stages = (dataclasses.replace(plan.stages[0], layers=(0, 3)), dataclasses.replace(plan.stages[1], layers=(3, 8)))
    path = tmp_path / "plan.json"
    write_plan(path, with_id(dataclasses.replace(plan, stages=stages)))
    return path


def edit(path, change) -> dict:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    return d


def test_a_plan_written_by_the_planner_loads_without_a_warning(plan_file):
    warnings = []
    plan = load_plan(plan_file, warn=warnings.append)
    assert warnings == [] and plan.id == json.loads(plan_file.read_text())["id"]


def test_a_stage_with_three_layer_bounds_is_refused_naming_the_stage(plan_file):
    edit(plan_file, lambda d: d["stages"][1].update(layers=[3, 5, 8]))
    with pytest.raises(SpecError, match=r"stages\[1\]\.layers: expected a list of 2 values, got \[3, 5, 8\]"):
        load_plan(plan_file)


@pytest.mark.parametrize("n, recompute", [(4, "full"), (-1, "full"), (2, "none")])
def test_recompute_layers_outside_the_stage_or_without_full_recompute_is_refused(plan_file, n, recompute):
    edit(plan_file, lambda d: d["stages"][0].update(recompute_layers=n, recompute=recompute))
    with pytest.raises(SpecError, match=r"stages\[0\]\.recompute_layers: expected 0 to 3 \(the stage's blocks\)"):
        load_plan(plan_file)


def test_a_hand_edited_plan_gets_its_contents_id_and_a_warning_naming_both(plan_file):
    old = json.loads(plan_file.read_text())["id"]
    edit(plan_file, lambda d: (d["stages"][0].update(layers=[0, 4]), d["stages"][1].update(layers=[4, 8])))
    warnings = []
    plan = load_plan(plan_file, warn=warnings.append)
    assert plan.stages[0].layers == (0, 4) and plan.id != old
    (message,) = warnings
    assert f"id: the file says {old!r} but its contents hash to {plan.id!r}" in message
    edit(plan_file, lambda d: d.update(id=plan.id))  # the id of the edited contents: no warning, same id
    assert load_plan(plan_file, warn=warnings.append).id == plan.id and len(warnings) == 1


def test_the_recomputed_id_is_the_one_the_planner_would_write(plan_file):
    plan = load_plan(plan_file)
    assert plan_to_dict(plan)["id"] == json.loads(plan_file.read_text())["id"]


def test_a_plan_file_that_is_not_utf8_or_repeats_a_key_is_refused(plan_file):
    text = plan_file.read_text()
    plan_file.write_text(text.replace('"tp": 1,', '"tp": 1, "tp": 2,', 1))
    with pytest.raises(SpecError, match="tp: given twice"):
        load_plan(plan_file)
    plan_file.write_bytes(text.encode().replace(b'"gpt-tiny"', b'"gpt-\xfftiny"', 1))
    with pytest.raises(SpecError, match=r"plan.json: not UTF-8 text \(byte 0xff"):
        load_plan(plan_file)


def test_a_plan_priced_for_another_framework_says_so_and_its_memory_parts_are_that_frameworks(tmp_path):
    # `planner search --framework megatron-core` writes a plan whose prediction and stage memory are Megatron-Core's;
    # the dashboard's memory parts must add up to those, and the id (what runs) stays the meshplan plan's.
    from planner.cost import FRAMEWORKS, MESHPLAN, memory_by_device, predict
    from planner.specs import load_cluster, load_device, load_model

    model, cluster, device = load_model("llama3-8b"), load_cluster("dgx-h100-80gb", nodes=1), load_device("h100-sxm5-80gb")
    knobs = Knobs(2, 2, 2, 1, zero=1)
    ours, _ = predict(model, cluster, device, knobs, 16)
    theirs, _ = predict(model, cluster, device, knobs, 16, framework=FRAMEWORKS["megatron-core"])
    write_plan(tmp_path / "plan.json", theirs)
    loaded = load_plan(tmp_path / "plan.json")
    assert (loaded.framework, ours.framework) == ("megatron-core", "meshplan")
    assert loaded.id == ours.id
    parts = [m.total_gib for m in memory_by_device(loaded, device)]
    assert parts == pytest.approx([s.memory_gib for s in loaded.stages], abs=1e-3)
    ours_parts = [m.total_gib for m in memory_by_device(loaded, device, framework=MESHPLAN)]
    assert ours_parts == pytest.approx([s.memory_gib for s in ours.stages], abs=1e-3)
    assert all(abs(a - b) > 1 for a, b in zip(parts, ours_parts))  # the frameworks hold different state


def test_a_plan_naming_an_unknown_framework_is_refused_naming_the_field(plan_file):
    edit(plan_file, lambda d: d.update(framework="megatron-lm"))
    with pytest.raises(SpecError, match=r"framework.*meshplan, megatron, deepspeed, megatron-core.*'megatron-lm'"):
        load_plan(plan_file)
