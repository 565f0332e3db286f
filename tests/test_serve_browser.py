"""The `fastsam3d serve` page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, via selenium).

Open a volume from the --root list, click on the axial view (include), shift-click and right-click (exclude), check that
the overlay appears on screen, save the labelmap and the click file with the page's own buttons, and check
that `fastsam3d infer` on the saved click file writes the same labelmap. The server has a token, which the
page takes from its address (`/#token=...`). Skips locally when Chromium or
selenium is absent; under CI=true it must run. FASTSAM3D_SCREENSHOT=path.png keeps a screenshot (docs).
"""
from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fastsam3d_cli.cli import app as cli_app
from fastsam3d_cli.serve.app import ServeConfig
from fastsam3d_cli.serve.server import BackgroundServer
from fastsam3d_cli.weights.loading import load_inference_model
from infer_phantoms import CLI_ENV, make_tiny_checkpoint, phantom, write

pytestmark = pytest.mark.usefixtures("one_thread")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _browser_or_skip(download_dir: Path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        chromium = None
    if not (chromium and driver):
        message = "headless Chromium, chromedriver or selenium is missing (apt-get install chromium chromium-driver)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                     "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


def _wait(driver, script: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    status = driver.execute_script("return document.getElementById('status').textContent")
    raise AssertionError(f"timed out waiting for: {script}; page status: {status}")


def _reddish_pixels(driver) -> int:
    from PIL import Image

    canvas = driver.find_element("id", "gl")
    image = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")).astype(int)
    return int(((image[..., 0] - image[..., 1] > 60) & (image[..., 0] - image[..., 2] > 40)).sum())


def _download(folder: Path, name: str, timeout: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout
    path = folder / name
    while time.monotonic() < deadline:
        if path.is_file() and not any(p.suffix == ".crdownload" for p in folder.iterdir()):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded; folder has {[p.name for p in folder.iterdir()]}")


def test_click_in_the_browser_shows_the_overlay_and_saves_what_infer_writes(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser_or_skip(downloads)
    try:
        checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pth")
        image, _ = phantom(shape=(48, 40, 32), spacing=(2.0, 2.0, 3.0))
        volume = write(image, tmp_path / "root" / "ct.nii.gz")
        loaded = load_inference_model(checkpoint=checkpoint, device="cpu")
        token = "browser-test-token"  # the page reads it from its address and sends it on every request
        with BackgroundServer(ServeConfig(loaded, root=tmp_path / "root", max_crops=1, token=token)) as url:
            driver.get(f"{url}/#token={token}")
            _wait(driver, "return window.fastsam3d && window.fastsam3d.ready")
            driver.find_element("id", "open").click()  # ct.nii.gz is the only file under --root
            _wait(driver, "return window.fastsam3d.sid && window.fastsam3d.overlay && !window.fastsam3d.busy")
            driver.find_element("css selector", "[data-view=axial]").click()
            time.sleep(0.5)
            if os.environ.get("FASTSAM3D_SCREENSHOT"):
                driver.save_screenshot(os.environ["FASTSAM3D_SCREENSHOT"] + ".before.png")
            assert _reddish_pixels(driver) == 0  # a grey volume, no overlay yet

            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.keys import Keys

            canvas = driver.find_element("id", "gl")
            ActionChains(driver).move_to_element(canvas).click().perform()  # include at the centre
            _wait(driver, "return window.fastsam3d.clicks === 1 && !window.fastsam3d.busy")
            state = driver.execute_script("return window.fastsam3d")
            assert state["error"] is None and state["last"]["voxels"] > 0
            assert state["overlayVoxels"] == state["last"]["voxels"]  # the overlay is the server's labelmap
            time.sleep(0.5)
            assert _reddish_pixels(driver) > 100  # and it is drawn

            ActionChains(driver).move_to_element_with_offset(canvas, 60, 40).key_down(Keys.SHIFT).click() \
                .key_up(Keys.SHIFT).perform()  # exclude
            _wait(driver, "return window.fastsam3d.clicks === 2 && !window.fastsam3d.busy")
            ActionChains(driver).move_to_element_with_offset(canvas, -50, 30).context_click().perform()  # exclude
            _wait(driver, "return window.fastsam3d.clicks === 3 && !window.fastsam3d.busy")
            assert driver.execute_script("return window.fastsam3d.error") is None
            # the overlay, patched box by box after each click, as the page holds it (NIfTI voxel order)
            overlay = driver.execute_script("return Array.from(window.fastsam3d.overlay.img)")
            if os.environ.get("FASTSAM3D_SCREENSHOT"):
                driver.find_element("css selector", "[data-view=multi]").click()  # the views + the 3D render
                time.sleep(1.0)
                driver.save_screenshot(os.environ["FASTSAM3D_SCREENSHOT"])

            driver.find_element("id", "save-clicks").click()
            clicks = _download(downloads, "ct_clicks.json")
            driver.find_element("id", "save-labelmap").click()
            saved = _download(downloads, "ct_mask.nii.gz")
    finally:
        driver.quit()

    import json

    click_file = json.loads(clicks.read_text())
    assert click_file["objects"][0]["point_labels"] == [1, 0, 0]  # left click, shift-click, right click
    result = CliRunner().invoke(cli_app, ["infer", str(volume), "-c", str(clicks), "-o", str(tmp_path / "infer.nii.gz"),
                                          "--checkpoint", str(checkpoint), "--device", "cpu", "--max-crops", "1"],
                                env=CLI_ENV)
    assert result.exit_code == 0, result.stderr
    page_labels = np.asarray(nib.load(str(saved)).dataobj)
    assert page_labels.any()
    assert np.array_equal(np.asarray(overlay).reshape(page_labels.shape, order="F"), page_labels)
    assert np.array_equal(page_labels, np.asarray(nib.load(str(tmp_path / "infer.nii.gz")).dataobj))
