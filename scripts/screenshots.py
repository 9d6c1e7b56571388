"""Screenshots of bnlab's TensorBoard dashboard on a sweep, as a researcher first sees it: Time Series,
the HParams table, its parallel coordinates, and the custom-scalars comparisons. It starts `bnlab tb DIR`
(which writes the dashboard first) on a free port and drives Debian's Chromium through the Python
`playwright` package; look at the PNGs it writes. Not a test: it needs a browser.

    apt-get install chromium && pip install playwright
    python scripts/screenshots.py outputs/sweeps/2026-11-22_10-00-00 screenshots/
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from bnlab.results.dashboard import QUERY

CHROMIUM = "/usr/bin/chromium"  # Debian's package (playwright's own browsers are not downloadable offline)
VIEWS = {  # file -> (TensorBoard page, the tab to click there, if any)
    "time_series.png": (QUERY, None),  # where `bnlab tb` says to open it
    "hparams_table.png": ("#hparams", "TABLE VIEW"),
    "hparams_parallel_coordinates.png": ("#hparams", "PARALLEL COORDINATES VIEW"),
    "custom_scalars.png": ("#custom_scalars", None),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/data/runs", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def main(logdir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "bnlab", "tb", str(logdir), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(url)
        time.sleep(5)  # TensorBoard loads the event files after it starts serving
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            for name, (view, tab) in VIEWS.items():
                page.goto(f"{url}/{view}")
                page.wait_for_timeout(8000)  # the charts load their data after the page
                if tab:
                    page.get_by_text(tab, exact=True).click()
                    page.wait_for_timeout(3000)
                page.screenshot(path=str(out / name), full_page=True)
                print(out / name)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
