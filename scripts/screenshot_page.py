"""Open an HTML page in headless Chromium and save a screenshot, to know the page renders.

    python scripts/screenshot_page.py benchmarks/results/explain/explain_smollm2_135m_4096.html \\
        benchmarks/results/explain/explain_page.png --width 1100 --height 1900

Chromium is found as ``$CHROMIUM``, ``chromium``, ``chromium-browser`` or ``google-chrome``
(Debian: ``apt-get install chromium``). It runs with a throw-away profile, no network
services, no GPU. Exit code 0 when the screenshot was written and shows the page's images
(``rendered``: enough of the picture is neither white nor one flat colour) and every image
the page names exists, 2 when no Chromium is installed, 1 when the page did not render.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> Optional[str]:
    env = os.environ.get("CHROMIUM")
    if env:
        return env if os.path.exists(env) or shutil.which(env) else None
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: str, out: str, width: int = 1200, height: int = 1600,
               chromium: Optional[str] = None, timeout: float = 120.0) -> str:
    """Render ``page`` (a file path) into the PNG ``out``; returns ``out``. Raises
    FileNotFoundError without Chromium, RuntimeError when Chromium wrote no screenshot."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (set $CHROMIUM or install chromium)")
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        os.remove(out)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={out}", f"--window-size={width},{height}",
               "file://" + os.path.abspath(page)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not os.path.exists(out):
        raise RuntimeError(f"{exe} wrote no screenshot (exit {res.returncode}): "
                           f"{res.stderr.strip()[-2000:]}")
    return out


def missing_images(page: str) -> list:
    """The ``<img src>`` files of ``page`` that do not exist beside it (Chromium draws a
    broken-image box for them, which a screenshot alone does not tell apart)."""
    with open(page) as f:
        srcs = re.findall(r"<img[^>]*\ssrc=['\"]([^'\"]+)['\"]", f.read())
    folder = os.path.dirname(os.path.abspath(page))
    return [s for s in srcs if not os.path.exists(os.path.join(folder, s))]


def rendered(png: str, min_ink: float = 0.05) -> bool:
    """Whether at least ``min_ink`` of the screenshot's pixels are not white and the picture is
    not one flat colour (a page whose images failed to load is text on white)."""
    import matplotlib.image as mpimg
    img = mpimg.imread(png)[..., :3]
    ink = float((img.min(axis=-1) < 0.9).mean())
    return ink >= min_ink and float(img.std()) > 0.02


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("page")
    ap.add_argument("out")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=1600)
    args = ap.parse_args(argv)
    try:
        png = screenshot(args.page, args.out, args.width, args.height)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = missing_images(args.page)
    ok = rendered(png) and not missing
    why = f"missing images: {missing}" if missing else ("rendered" if ok else "looks blank")
    print(f"{png}: {why}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
