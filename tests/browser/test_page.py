"""The service's web page in a real headless Chromium: upload a photo, see the attention overlay and
the nearest gallery images.

Runs ``benchmarks/screenshot_page.py`` end to end: a real ``dino serve`` process on 127.0.0.1, a
gallery of 20 imagenet-sample photos added through ``POST /index``, the page driven over the Chrome
DevTools Protocol. Skipped (with the reason) where Chromium (``/usr/bin/chromium`` or ``$CHROMIUM``),
the ``websockets`` package, the real photos or a model are missing.

The model is ``$DINO_TEST_MODEL`` if set, else the default model of ``dino serve`` (the first folder
of ``models/``), else a random-init ViT-Tiny/16 at 224 px exported with ``training.export`` (needs
the ``train`` extra). The screenshot goes to a temporary folder, or to
``$DINO_SCREENSHOT_OUT`` (e.g. ``docs/service_page.png``) when set; ``benchmarks/screenshot_page.py``
is what regenerates the documentation's screenshot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
K = 12
GALLERY = 20

#: CI installs Chromium (.ci/run): there, a missing browser is a failure, not a skip
IN_CI = os.environ.get("CI") == "true"

pytestmark = [
    pytest.mark.slow,  # a real server process, a gallery of 20 photos and a browser
    pytest.mark.skipif(
        not IN_CI and not Path(CHROMIUM).is_file(),
        reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM=/path/to/chromium)",
    ),
]


def _load_driver():
    spec = importlib.util.spec_from_file_location("screenshot_page", REPO / "benchmarks" / "screenshot_page.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def driver():
    pytest.importorskip("websockets.sync.client", reason="the websockets package (uvicorn[standard]) drives Chromium")
    pytest.importorskip("httpx")
    return _load_driver()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, driver) -> Path:
    given = os.environ.get("DINO_TEST_MODEL")
    if given:
        if not (Path(given) / "model.json").is_file():
            pytest.fail(f"DINO_TEST_MODEL={given} is not a model folder (no model.json)")
        return Path(given)
    from service.settings import ModelNotFoundError, find_default_model

    try:
        return find_default_model()
    except ModelNotFoundError:
        pass
    pytest.importorskip("torch", reason="exporting the test model needs the train extra (or set DINO_TEST_MODEL)")
    pytest.importorskip("timm")
    pytest.importorskip("onnx")
    return driver.export_random_model(
        tmp_path_factory.mktemp("page-model") / "model", arch="vit_tiny", patch=16, size=224
    )


def test_upload_shows_attention_overlay_and_neighbours(driver, model_dir, sample_photos, tmp_path):
    if len(sample_photos) < GALLERY + 1:
        pytest.skip(f"need {GALLERY + 1} imagenet-sample photos, found {len(sample_photos)}")
    out = Path(os.environ.get("DINO_SCREENSHOT_OUT") or tmp_path / "service_page.png")
    result = driver.screenshot_page(model_dir, out, gallery_size=GALLERY, k=K, log_dir=tmp_path)
    state = result.state
    spec = json.loads((model_dir / "model.json").read_text())

    # the upload went through the page: its own preview, the overlay and the neighbours are shown
    assert not state["resultHidden"]
    assert state["queryLoaded"], state
    assert state["overlayLoaded"] and state["overlaySrc"].startswith("blob:"), state
    assert state["overlaySize"] == [spec["image_size"], spec["image_size"]], state  # overlay of the model's crop
    assert state["neighbours"] == K and state["thumbsLoaded"] == K, state
    assert not state["statusIsError"] and state["status"] == "", state
    assert state["heads"] == spec["num_heads"], state  # the head selector was filled from the model
    assert f"{GALLERY} images" in state["galleryInfo"]

    # neighbours: gallery labels, cosine scores in descending order
    gallery_labels = {driver.label_of(p) for p in sample_photos if p.name != driver.DEFAULT_QUERY}
    assert set(state["labels"]) <= gallery_labels, state["labels"]
    scores = state["scores"]
    assert all(-1.0001 <= s <= 1.0001 for s in scores), scores
    assert scores == sorted(scores, reverse=True), scores
    assert not result.js_errors, result.js_errors

    # the screenshot is a real full-page PNG, not a blank one
    from PIL import Image, ImageStat

    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.width == 1200 and img.height > 900, img.size
        spread = ImageStat.Stat(img.convert("L")).stddev[0]
    assert spread > 20, f"the screenshot looks blank (grey-level stddev {spread:.1f})"
