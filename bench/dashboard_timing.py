"""First-render time of the dashboard, cold (fresh process, empty cache) and warm (a new session once the
search is cached), for the default inputs and for gpt3-175b on 128 DGX A100 nodes, global batch 1536.

    .venv/bin/python bench/dashboard_timing.py [--repeats 3] [--no-browser]

Two ways, each printed as one table row per case:
- apptest: the script run alone (streamlit's AppTest), each cold run in a fresh Python process;
- browser: `streamlit run` headless and a real headless Chromium (bench/dashboard_screenshots.py's driver),
  from navigation until the charts are drawn and Streamlit is idle. The cold load is the first one after
  the server starts; warm loads open the same URL again (a new session). Skipped without Chromium.
Budget: warm under 3 s, cold under 15 s."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl

REPO = Path(__file__).resolve().parent.parent
CASES = [  # (name, query string, charts on the page when drawn)
    ("gpt-tiny, 126 configs, Plans tab", "model=gpt-tiny&cluster=local-cpu&nodes=1&gpus_per_node=2&device=cpu&global_batch=16", 1),
    ("default, Plans tab", "", 1),
    ("gpt3-175b x 1024 GPUs, Plans tab", "model=gpt3-175b&nodes=128&global_batch=1536", 1),
    ("gpt3-175b x 1024 GPUs, Selected plan", "model=gpt3-175b&nodes=128&global_batch=1536&view=Selected+plan", 3),
]
WARM_RUNS = 5
BUDGET_S = {"cold": 15.0, "warm": 3.0}


def child(query: str) -> None:
    """In a fresh process: one cold AppTest run, then warm runs in new sessions; prints JSON."""
    sys.path.insert(0, str(REPO))
    from streamlit.testing.v1 import AppTest

    def run() -> tuple[float, object]:
        at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=120)
        for key, value in parse_qsl(query):
            at.query_params[key] = value
        t0 = time.perf_counter()
        at.run()
        seconds = time.perf_counter() - t0
        if at.exception or at.error:
            raise SystemExit(f"the app failed for ?{query}: {[e.value for e in at.exception] or [e.value for e in at.error]}")
        return seconds, at

    cold, at = run()
    search_s = float(re.search(r"in ([\d.]+) s", at.caption[0].value).group(1))
    warm = [run()[0] for _ in range(WARM_RUNS)]
    print(json.dumps({"cold": cold, "warm": warm, "search_s": search_s}))


def apptest_row(query: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", query], capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            raise SystemExit(out.stderr.strip().splitlines()[-1])
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"cold": statistics.median(r["cold"] for r in runs),
            "warm": statistics.median(w for r in runs for w in r["warm"]),
            "search_s": statistics.median(r["search_s"] for r in runs)}


def browser_rows(repeats: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dashboard_screenshots import Browser, free_port, start_streamlit

    rows = {}
    for name, query, charts in CASES:
        colds, warms = [], []
        for _ in range(repeats):
            port = free_port()
            server = start_streamlit(port, None)  # a fresh server: empty cache
            browser = Browser()
            try:
                url = f"http://127.0.0.1:{port}/?{query}"
                colds.append(browser.load(url, charts)[0])
                warms += [browser.load(url, charts)[0] for _ in range(WARM_RUNS)]
            finally:
                browser.close()
                server.terminate()
                server.wait(10)
        rows[name] = {"cold": statistics.median(colds), "warm": statistics.median(warms)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="cold runs per case (each in a fresh process or server)")
    ap.add_argument("--no-browser", action="store_true", help="only the AppTest timings")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)

    rows = [("apptest", name, apptest_row(query, args.repeats)) for name, query, _ in CASES]
    if not args.no_browser:
        import shutil
        if any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
            rows += [("browser", name, r) for name, r in browser_rows(args.repeats).items()]
        else:
            print("(no Chromium: browser timings skipped; `apt-get install -y chromium` to add them)")
    print(f"{'how':8s} {'case':40s} {'cold s':>7s} {'warm s':>7s} {'search s':>8s}  budget (cold < {BUDGET_S['cold']:g} s, warm < {BUDGET_S['warm']:g} s)")
    for how, name, r in rows:
        ok = r["cold"] < BUDGET_S["cold"] and r["warm"] < BUDGET_S["warm"]
        search = f"{r['search_s']:8.2f}" if "search_s" in r else f"{'':8s}"
        print(f"{how:8s} {name:40s} {r['cold']:7.2f} {r['warm']:7.2f} {search}  {'ok' if ok else 'OVER'}")


if __name__ == "__main__":
    main()
