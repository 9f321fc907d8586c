"""Screenshots of the dashboard in a real headless Chromium, one PNG per view.

    .venv/bin/python bench/dashboard_screenshots.py [--out docs/screenshots] [--results-dir DIR]

Starts `streamlit run dashboard/app.py` headless on a free port, drives Chromium over the DevTools
protocol (with the `websockets` package that Streamlit already installs), waits for each view to finish
running and drawing, and saves the whole page. Needs Chromium: on Debian/Ubuntu
`apt-get update && apt-get install -y chromium` (or set CHROMIUM=/path/to/chrome). Not run in CI.
Prints one table: view, seconds until drawn, charts drawn, file."""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--disable-dev-shm-usage"]
# (file name, query string, charts the view draws when it is done)
VIEWS = [
    ("1-plans", "", 1),
    ("2-selected-plan", "view=Selected+plan", 3),
    ("3-predicted-vs-measured", "view=Predicted+vs+measured", 0),
    ("4-gpt3-175b-128-nodes-plans", "model=gpt3-175b&nodes=128&global_batch=1536", 1),
    ("5-gpt3-175b-128-nodes-selected-plan", "model=gpt3-175b&nodes=128&global_batch=1536&view=Selected+plan", 3),
    ("6-does-not-fit", "model=gpt3-175b&nodes=1&view=Selected+plan", 3),
    ("7-bad-pins", "tp=8&pp=8&dp=8", 0),
]
# Evaluated in the page: is Streamlit idle, how many plotly charts are drawn, how tall is the content.
PAGE_STATE_JS = """JSON.stringify({
  app: !!document.querySelector('[data-testid="stApp"]'),
  running: !!document.querySelector('[data-testid="stStatusWidget"]') &&
           /Running|Connecting/i.test(document.querySelector('[data-testid="stStatusWidget"]').innerText),
  skeletons: document.querySelectorAll('[data-testid="stSkeleton"]').length,
  spinners: document.querySelectorAll('[data-testid="stSpinner"]').length,
  charts: document.querySelectorAll('.js-plotly-plot').length,
  exceptions: document.querySelectorAll('[data-testid="stException"]').length,
  height: Math.max(...[...document.querySelectorAll('[data-testid="stMainBlockContainer"], [data-testid="stSidebarContent"]')]
                   .map(e => e.scrollHeight + e.getBoundingClientRect().top), 0),
})"""


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("Chromium not found. Install it with `apt-get update && apt-get install -y chromium` (Debian/Ubuntu; "
             "`brew install --cask chromium` on macOS), or point CHROMIUM at a Chrome/Chromium binary.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
            time.sleep(0.2)


def start_streamlit(port: int, results_dir: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    if results_dir:
        env["MESHPLAN_RESULTS_DIR"] = results_dir
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "dashboard" / "app.py"),
                             "--server.headless", "true", "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/_stcore/health", 60)
    return proc


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, width: int = 1400, height: int = 1000):
        self.width = width
        self.profile = tempfile.mkdtemp(prefix="meshplan-chromium-")
        port = free_port()
        self.proc = subprocess.Popen([find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      f"--remote-debugging-port={port}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        targets = json.loads(wait_http(f"http://127.0.0.1:{port}/json/list", 30))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30).__enter__()
        self.next_id = 0
        self.resize(height)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def resize(self, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1, mobile=False)

    def state(self) -> dict:
        return json.loads(self.call("Runtime.evaluate", expression=PAGE_STATE_JS, returnByValue=True)["result"]["value"])

    def load(self, url: str, min_charts: int, timeout_s: float = 120) -> tuple[float, dict]:
        """Open url and wait until Streamlit is idle and the charts are drawn and stable; seconds taken."""
        t0 = time.perf_counter()
        self.call("Page.navigate", url=url)
        return self.wait_idle(min_charts, t0, timeout_s)

    def wait_idle(self, min_charts: int, t0: float, timeout_s: float = 120) -> tuple[float, dict]:
        last, stable_since = None, None
        while time.perf_counter() - t0 < timeout_s:
            s = self.state()
            idle = s["app"] and not s["running"] and not s["skeletons"] and not s["spinners"] and s["charts"] >= min_charts
            key = (s["charts"], s["exceptions"], s["height"])
            if idle and key == last:
                if time.perf_counter() - stable_since > 0.5:
                    return stable_since - t0, s
            else:
                stable_since = time.perf_counter()
            last = key if idle else None
            time.sleep(0.1)
        raise RuntimeError(f"page not drawn within {timeout_s:.0f} s: {s}")

    def screenshot(self, path: Path, min_charts: int) -> dict:
        """The whole page: grow the viewport to the content's height, let plotly re-lay out, capture."""
        self.resize(max(1000, self.state()["height"] + 40))
        _, s = self.wait_idle(min_charts, time.perf_counter())
        png = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(png))
        self.resize(1000)
        return s

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "screenshots"), help="folder for the PNGs")
    ap.add_argument("--results-dir", help="results/*.jsonl folder for the predicted-vs-measured view (default: results/)")
    ap.add_argument("--width", type=int, default=1400)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    find_chromium()
    port = free_port()
    server = start_streamlit(port, args.results_dir)
    browser = Browser(args.width)
    try:
        browser.load(f"http://127.0.0.1:{port}/", 1)  # warm-up: imports and the default search
        print(f"{'view':40s} {'drawn s':>8s} {'charts':>6s}  file")
        for name, query, charts in VIEWS:
            seconds, _ = browser.load(f"http://127.0.0.1:{port}/?{query}", charts)
            state = browser.screenshot(out / f"{name}.png", charts)
            flag = "  EXCEPTION ON PAGE" if state["exceptions"] else ""
            print(f"{name:40s} {seconds:8.2f} {state['charts']:6d}  {out / (name + '.png')}{flag}")
    finally:
        browser.close()
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
