"""A page of pictures (``Report.to_html``) opened in a real headless browser
(scripts/screenshot_page.py): the screenshot shows the images, and every image the page names
exists. Skipped where no Chromium is installed (Debian: ``apt-get install chromium``)."""
import importlib.util
import os
import sys

import pytest
import torch

import planner
from planner.models import GPTConfig, TinyGPT

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "screenshot_page", os.path.join(ROOT, "scripts", "screenshot_page.py"))
shot = importlib.util.module_from_spec(_spec)
sys.modules["screenshot_page"] = shot
_spec.loader.exec_module(shot)

needs_chromium = pytest.mark.skipif(shot.find_chromium() is None,
                                    reason="no Chromium installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    torch.manual_seed(0)
    m = TinyGPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=512)).eval()
    cm = planner.compile(m, policy=planner.policy("sink_window", sink=4, window=32),
                         cost_model="off", record="recall")
    with torch.no_grad():
        cm(torch.randint(0, 256, (1, 300)))
    folder = tmp_path_factory.mktemp("page")
    return planner.inspect(cm).to_html(str(folder / "tiny.html"), spans=[(100, 110)])


def test_page_names_only_images_that_exist(page):
    assert shot.missing_images(page) == []
    with open(page) as f:
        text = f.read()
    broken = os.path.join(os.path.dirname(page), "broken.html")
    with open(broken, "w") as f:
        f.write(text.replace("</body>", "<img src='nowhere.png' alt='x'></body>"))
    assert shot.missing_images(broken) == ["nowhere.png"]


@needs_chromium
def test_headless_browser_renders_the_page(page, tmp_path):
    png = str(tmp_path / "shot.png")
    assert shot.main([page, png, "--width", "900", "--height", "1200"]) == 0
    assert os.path.getsize(png) > 10_000
    assert shot.rendered(png)


@needs_chromium
def test_a_blank_page_does_not_pass(tmp_path):
    page = tmp_path / "blank.html"
    page.write_text("<!doctype html><html><body><p>nothing here</p></body></html>")
    png = str(tmp_path / "shot.png")
    assert shot.main([str(page), png, "--width", "600", "--height", "400"]) == 1
