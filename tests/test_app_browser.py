"""The Gradio app end to end in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Starts `openbagel app` in a subprocess on a free localhost port, types a prompt, clicks Generate and
waits for the image; then runs an example through Edit, Understand and Chat, and saves a screenshot of
each tab (to a temporary folder; `OPENBAGEL_SCREENSHOTS=docs make test` refreshes the ones in docs/).
Install the browser with `.ci/install-browser.sh`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_server import stop

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="no browser: /usr/bin/chromium is missing (run .ci/install-browser.sh)")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go: $OPENBAGEL_SCREENSHOTS when set, else a temporary folder (a test run
    leaves the tracked docs/ images alone)."""
    target = os.environ.get("OPENBAGEL_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def app_model(tiny_checkpoint, tmp_path_factory) -> Path:
    """The embedded model when installed, else the tiny random one with 3 denoising steps by default."""
    from openbagel.inference.pipeline import EMBEDDED_MODEL

    if EMBEDDED_MODEL.is_dir():
        return EMBEDDED_MODEL
    path = tmp_path_factory.mktemp("app") / "tiny-app"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "bagel_config.json").read_text())
    config["task_defaults"] = {task: {"num_inference_steps": 3, "max_think_token_n": 16}
                               for task in ("generate", "edit")} | {"understand": {"max_think_token_n": 16}}
    (path / "bagel_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def app_url(app_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "openbagel", "app", "--model", str(app_model), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the app did not answer in 180 s")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(90_000)
        page.goto(app_url)
        yield page
        browser.close()


def test_generate_in_the_browser(page, shots):
    page.get_by_role("tab", name="Generate").click()
    page.locator("#generate-prompt textarea").fill("a red circle left of a blue square")
    page.locator("#generate-button").click()
    image = page.locator("#generate-image img")
    image.wait_for(state="visible")
    assert "gradio_api/file=" in image.get_attribute("src")
    page.screenshot(path=str(shots / "app-generate.png"), full_page=True)
    assert (shots / "app-generate.png").stat().st_size > 0


@pytest.mark.parametrize("tab, button, output", [("Edit", "Edit", "#edit-image img"),
                                                 ("Understand", "Ask", "#understand-answer textarea"),
                                                 ("Chat", "Send", "#chat-image img")])
def test_examples_run_in_each_tab(page, shots, tab, button, output):
    page.get_by_role("tab", name=tab).click()
    panel = page.get_by_role("tabpanel")
    panel.locator("[data-testid='dataset-cell-0-0']").click()  # the first example fills the inputs
    # Gradio loads the example's image asynchronously: a click before it arrives sends no image.
    page.locator(f"#{tab.lower()}-source img").wait_for(state="visible")
    panel.get_by_role("button", name=button, exact=True).click()
    result = page.locator(output)
    if tab == "Understand":
        page.wait_for_function("el => el.value.length > 0", arg=result.element_handle())
    else:
        result.wait_for(state="visible")
    # The answer streams in: the docs screenshot waits for the whole of it (Gradio marks a streaming output
    # block `.generating` until the event ends).
    page.wait_for_function("() => document.querySelector('.generating') === null")
    page.screenshot(path=str(shots / f"app-{tab.lower()}.png"), full_page=True)
