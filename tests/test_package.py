"""meshplan as a real package: the wheel (not an editable install) carries the presets and datasheets, plans
from any directory, and keeps measured profiles out of its own files. Builds the wheel from a copy of the
source (an in-tree build/ can carry stale modules into a wheel) and installs it with --no-deps into a fresh
venv that borrows the test venv's dependencies through a .pth line (pip cannot reach the network in CI)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

import planner

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "results", "tmp", "tests",
                              "docs", "*.measured.json")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the meshplan wheel installed; returns its bin/ folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    (src / "profiles" / "devices" / "cpu.measured.json").write_text("{}")  # must not ship
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src))
    (wheel,) = (tmp / "dist").glob("meshplan-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    _pip("--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel))
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The test venv's site-packages as a plain path: its .pth files (our editable install) are not run from there.
    Path(purelib, "deps-from-test-venv.pth").write_text(site.getsitepackages()[0] + "\n")
    return venv / "bin"


def _run(bin_dir: Path, *argv: str, cwd: Path, input: str | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=cwd, env=environ,
                          input=input, timeout=120)


def test_the_wheel_plans_every_preset_from_another_directory(installed, tmp_path):
    r = _run(installed, "python", "-c", "import planner, planner.specs as s; print(planner.__file__); "
             "print(*s._presets('models')); print(*s._presets('clusters')); print(*s._presets('devices'))", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    where, models, clusters, devices = r.stdout.splitlines()
    assert str(installed.parent) in where and str(ROOT) not in where  # the wheel's planner, not the checkout's
    assert set(models.split()) == {p.stem for p in (ROOT / "profiles" / "models").glob("*.yaml")}
    assert set(clusters.split()) == {p.stem for p in (ROOT / "profiles" / "clusters").glob("*.yaml")}
    # every datasheet, and no measured profile (the checkout may hold one: make run caches it there)
    assert set(devices.split()) == {p.stem for p in (ROOT / "profiles" / "devices").glob("*.json") if not p.name.endswith(".measured.json")}
    # Each preset priced by the wheel's CLI (planner.cli.main, the `planner` script's function), all in one process:
    # a process per preset spent 24 s starting Python; the script itself is run by the next test.
    script = ("import contextlib, io, json, sys\n"
              "from planner.cli import main\n"
              "for line in sys.stdin:\n"
              "    out = io.StringIO()\n"
              "    with contextlib.redirect_stdout(out):\n"
              "        code = main(json.loads(line))\n"
              "    print(json.dumps([code, out.getvalue()]))\n")
    argvs = []
    for model in models.split():
        cluster = ("--cluster", "local-cpu", "--gpus-per-node", "2") if model == "gpt-tiny" else ("--cluster", "dgx-a100-80gb", "--nodes", "1")
        argvs.append(["predict", "--model", model, *cluster, "--global-batch", "8", "--tp", "1", "--pp", "1",
                      "--dp", "2" if model == "gpt-tiny" else "8", "--micro-batch", "1" if model != "gpt-tiny" else "4", "--json"])
    r = _run(installed, "python", "-c", script, cwd=tmp_path, input="".join(json.dumps(a) + "\n" for a in argvs))
    assert r.returncode == 0, r.stderr
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(answers) == len(argvs) == len(models.split()), r.stdout[-2000:]
    for argv, (code, out) in zip(argvs, answers):
        assert code == 0, (argv, out, r.stderr)
        assert json.loads(out)["iteration_s"] > 0, argv


def test_the_wheel_runs_planner_plan_for_gpt3_175b_and_says_its_version(installed, tmp_path):
    r = _run(installed, "planner", "plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--nodes", "16",
             "--global-batch", "512", "--top", "1", "--out", "plan.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "plan.json").read_text())["created_by"] == f"meshplan {planner.__version__}"
    r = _run(installed, "planner", "--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"meshplan {planner.__version__}"


def test_an_installed_planner_keeps_measured_profiles_in_the_user_data_dir(installed, tmp_path):
    data = tmp_path / "data"
    measured = json.loads((ROOT / "profiles" / "devices" / "cpu.json").read_text()) | {"notes": "placed by the test"}
    (data / "meshplan" / "devices").mkdir(parents=True)
    (data / "meshplan" / "devices" / "cpu.measured.json").write_text(json.dumps(measured))
    r = _run(installed, "python", "-c", "from planner.specs import load_device, measured_profile_path as m; "
             "print(m('cpu')); print(load_device('cpu').notes)", cwd=tmp_path, XDG_DATA_HOME=str(data))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(data / "meshplan" / "devices" / "cpu.measured.json"), "placed by the test"]
