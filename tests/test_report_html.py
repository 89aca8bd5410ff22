"""`spguard report`: the HTML page's content, and its sorting in a real headless Chromium."""

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spguard.cli import main
from spguard.report_html import REPORT_FILE, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1200, "height": 1400}
BROWSER_TIMEOUT_S = 60
HARMFULNESS = [0.12, -0.30, None, 0.45, 0.01]  # None: a failed prompt


def fake_job(out: Path) -> list[dict]:
    """A generate job's folder with known harmfulness scores, without a model."""
    out.mkdir()
    rng = np.random.default_rng(0)
    reports = []
    for k, harmfulness in enumerate(HARMFULNESS):
        stem = f"{k:06d}"
        report = {"index": k, "prompt": f"prompt <{k}> & more", "seed": k, "fields": {"label": "benign"},
                  "method": "spguard", "error": None, "image": f"{stem}.png", "cfg_image": f"{stem}.cfg.png",
                  "mask_image": f"{stem}.mask.png" if harmfulness and harmfulness > 0 else None,
                  "harmfulness": harmfulness, "concept": "violence", "guided": bool(harmfulness and harmfulness > 0)}
        if harmfulness is None:
            report.update(error="TypeError: cannot encode", image=None, cfg_image=None)
        for key in ("image", "cfg_image", "mask_image"):
            if report[key]:
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out / report[key])
        (out / f"{stem}.json").write_text(json.dumps(report))
        reports.append(report)
    return reports


def test_page_lists_every_prompt_escaped_with_its_images(tmp_path, capsys):
    out = tmp_path / "job"
    fake_job(out)
    assert main(["report", str(out)]) == 0
    page = (out / REPORT_FILE).read_text()
    assert "5 prompts, 3 guided, 1 failed." in page
    assert page.count("<tr data-index=") == 5
    assert "prompt &lt;0&gt; &amp; more" in page and "<0>" not in page
    assert 'src="000003.mask.png"' in page and 'src="000001.mask.png"' not in page
    assert "failed: TypeError: cannot encode" in page
    assert "http" not in page.replace('charset="utf-8"', "")  # self-contained: nothing fetched from elsewhere


def test_report_of_a_folder_without_reports_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no reports" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
class Chromium:
    """Headless Chromium driven through the DevTools protocol over a pipe (--remote-debugging-pipe).

    Chromium reads NUL-terminated JSON commands from its fd 3 and writes replies and events to fd 4,
    so no WebDriver or websocket library is needed.
    """

    def __init__(self, profile: Path):
        self.commands_read, self.commands = os.pipe()
        self.replies, self.replies_write = os.pipe()
        # bash moves our pipe ends onto fds 3 and 4 before exec'ing Chromium.
        script = f'exec "$0" "$@" 3<&{self.commands_read} 4>&{self.replies_write}'
        self.process = subprocess.Popen(
            ["bash", "-c", script, CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-pipe"],
            pass_fds=(self.commands_read, self.replies_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(self.commands_read)
        os.close(self.replies_write)
        self.next_id, self.buffer, self.session = 0, b"", None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", **VIEWPORT, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read_message(self) -> dict:
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.replies], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.replies, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str):
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        # Complete: the document and every image it shows (lazy images in view load too).
        while not self.evaluate("document.readyState === 'complete' && "
                                "Array.from(document.images).every(i => i.complete)"):
            assert time.monotonic() < deadline, f"{url} did not load"
            time.sleep(0.05)

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        self.process.kill()
        self.process.wait()
        os.close(self.commands)
        os.close(self.replies)


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (bash .ci/install_browser.sh installs it)")
    chromium = Chromium(tmp_path / "profile")
    yield chromium
    chromium.close()


ROW_SCORES = "Array.from(document.querySelectorAll('#prompts tbody tr')).map(r => r.dataset.harmfulness)"
CLICK_SORT = "document.getElementById('sort-harmfulness').click()"


def test_sorting_by_harmfulness_in_chromium(tmp_path, browser):
    out = tmp_path / "job"
    fake_job(out)
    page = write_report(out)
    browser.open(page.as_uri())
    assert browser.evaluate("document.querySelectorAll('#prompts tbody tr').length") == len(HARMFULNESS)
    assert browser.evaluate("Array.from(document.images).every(i => i.naturalWidth === 32)")

    scored = sorted(h for h in HARMFULNESS if h is not None)
    browser.evaluate(CLICK_SORT)
    assert browser.evaluate(ROW_SCORES) == [repr(h) for h in reversed(scored)] + [""]  # failed prompt last
    browser.evaluate(CLICK_SORT)
    assert browser.evaluate(ROW_SCORES) == [repr(h) for h in scored] + [""]
    assert browser.evaluate("document.getElementById('sort-harmfulness').textContent") == "Harmfulness \u25b2"

    shot = tmp_path / "report.png"
    browser.screenshot(shot)
    screenshot = np.asarray(Image.open(shot).convert("RGB"))
    assert screenshot.shape[:2] == (VIEWPORT["height"], VIEWPORT["width"])
    assert screenshot.std() > 10  # the page rendered content, not a blank window
