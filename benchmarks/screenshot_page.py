"""Drive the service's web page in headless Chromium and save a screenshot (docs/service_page.png).

Steps: start ``dino serve`` on 127.0.0.1 (free port, in-memory gallery), index ``--gallery`` photos of
``$DINO_DATA_DIR/imagenet-sample`` through ``POST /index`` with their names as labels, open ``GET /``
in headless Chromium, upload a photo that is not in the gallery through the page's file input, wait
until the [CLS] attention overlay and the neighbour thumbnails have loaded, check them, and save a
full-page PNG.

The browser is driven over the Chrome DevTools Protocol with the ``websockets`` package (a
dependency of ``uvicorn[standard]``): no chromedriver, Selenium or Playwright download. Chromium is
the system one (``/usr/bin/chromium``, Debian's ``chromium`` package; ``--chromium`` or
``$CHROMIUM`` to change), started with a new empty profile and no network besides 127.0.0.1.

Usage::

    .venv/bin/python benchmarks/screenshot_page.py                          # the default model of dino serve
    .venv/bin/python benchmarks/screenshot_page.py --model models/NAME --out docs/service_page.png

Without ``--model`` the model is the one ``dino serve`` serves by default (the first folder of
``models/``), or, when there is none, a random-init ViT-S/16 at 224 px exported into a temp folder.

``tests/browser/test_page.py`` runs the same code (into a temporary folder) as a pytest test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dino.data_dir import data_dir  # noqa: E402
from tests.helpers import ServerProcess  # noqa: E402

DATA_DIR = data_dir()
DEFAULT_CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
DEFAULT_OUT = REPO / "docs" / "service_page.png"
#: the query photo (not among the first 20, the gallery): a dog; the gallery holds five other dog breeds
DEFAULT_QUERY = "n02110185_Siberian_husky.JPEG"
#: seconds ``dino serve`` may take to answer /readyz
SERVER_READY_TIMEOUT = 300.0
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class PageError(AssertionError):
    """The page did not reach the expected state (message says what was seen)."""


# ------------------------------------------------------------------------------------------ server
def page_server(model_dir: Path, log_path: Path) -> ServerProcess:
    """``dino serve`` on 127.0.0.1 (CPU unless ``$DINO_PROVIDER`` says otherwise, in-memory gallery, no API
    key), not started yet: ``with page_server(...).start(timeout) as server``."""
    env: dict[str, str | None] = {
        "DINO_PROVIDER": os.environ.get("DINO_PROVIDER", "cpu"),
        "DINO_LOG_LEVEL": "warning",
        "DINO_INDEX_DIR": None,
        "DINO_API_KEY": None,
    }
    return ServerProcess(model_dir, log_path, env=env)


def label_of(path: Path) -> str:
    """``n02099601_golden_retriever.JPEG`` -> ``golden retriever``."""
    stem = path.stem
    return stem.split("_", 1)[1].replace("_", " ") if "_" in stem else stem


def index_gallery(base: str, photos: list[Path]) -> list[str]:
    """POST /index the photos (one request, labels from the file names); returns the ids."""
    import httpx

    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    data = {"labels": json.dumps([label_of(p) for p in photos])}
    r = httpx.post(f"{base}/index", files=files, data=data, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"POST /index failed: {r.status_code} {r.text[:500]}")
    ids = r.json()["ids"]
    if len(ids) != len(photos):
        raise RuntimeError(f"POST /index returned {len(ids)} ids for {len(photos)} photos")
    return ids


# ----------------------------------------------------------------------------------------- browser
class CDP:
    """A minimal Chrome DevTools Protocol client over one page's websocket (synchronous)."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(ws_url, max_size=64 * 2**20, open_timeout=30))
        self._ids = itertools.count(1)
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 60.0, **params):
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"CDP {method}: no answer in {timeout:.0f}s")
            message = json.loads(self.ws.recv(timeout=remaining))
            if message.get("id") == msg_id:
                if "error" in message:
                    raise RuntimeError(f"CDP {method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression[:80]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        with contextlib.suppress(Exception):
            self._stack.close()

    def js_errors(self, ignore: tuple[str, ...] = ("/favicon.ico",)) -> list[str]:
        """Uncaught exceptions, console.error messages and failed loads seen so far (``ignore``: URL
        endings of failed loads to leave out; the page has no favicon, and browsers ask for one)."""
        out = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                details = event["params"]["exceptionDetails"]
                out.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif event["method"] == "Runtime.consoleAPICalled" and event["params"].get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in event["params"]["args"]))
            elif event["method"] == "Log.entryAdded" and event["params"]["entry"].get("level") == "error":
                entry = event["params"]["entry"]
                if entry.get("url", "").endswith(ignore):
                    continue
                out.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        return out


@contextlib.contextmanager
def headless_chromium(chromium: str, width: int, height: int, startup_timeout: float = 60.0):
    """Start headless Chromium with an empty profile; yields a :class:`CDP` client on its page."""
    import httpx

    profile = Path(tempfile.mkdtemp(prefix="dino-chromium-"))
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + startup_timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"chromium exited ({proc.returncode}): {proc.stderr.read().decode(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port in {startup_timeout:.0f}s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = []
        while not targets:
            targets = [
                t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t.get("type") == "page"
            ]
            if not targets:
                if time.monotonic() > deadline:
                    raise RuntimeError("chromium has no page target")
                time.sleep(0.1)
        cdp = CDP(targets[0]["webSocketDebuggerUrl"])
        cdp.send("Runtime.enable")
        cdp.send("Log.enable")
        cdp.send("Page.enable")
        cdp.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        yield cdp
    finally:
        if cdp is not None:
            with contextlib.suppress(Exception):
                cdp.send("Browser.close", timeout=5)
            cdp.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(cdp: CDP, expression: str, timeout: float, what: str, describe: str | None = None):
    """Poll a JS expression until it is truthy; on timeout raise PageError with ``describe``'s value."""
    deadline = time.monotonic() + timeout
    while True:
        value = cdp.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            seen = cdp.evaluate(describe) if describe else None
            raise PageError(
                f"timed out after {timeout:.0f}s waiting for {what}; page state: {seen}; JS errors: {cdp.js_errors()}"
            )
        time.sleep(0.25)


PAGE_STATE_JS = """(() => {
  const overlay = document.getElementById('overlay');
  const thumbs = [...document.querySelectorAll('#neighbors li img')];
  return {
    galleryInfo: document.getElementById('gallery-info').textContent,
    status: document.getElementById('status').textContent,
    statusIsError: document.getElementById('status').classList.contains('error'),
    resultHidden: document.getElementById('result').hidden,
    queryLoaded: document.getElementById('query').complete && document.getElementById('query').naturalWidth > 0,
    overlaySrc: overlay.getAttribute('src') || '',
    overlayLoaded: overlay.complete && overlay.naturalWidth > 0,
    overlaySize: [overlay.naturalWidth, overlay.naturalHeight],
    neighbours: thumbs.length,
    thumbsLoaded: thumbs.filter(
      (i) => i.complete && i.naturalWidth > 0 && (i.getAttribute('src') || '').startsWith('blob:')
    ).length,
    labels: [...document.querySelectorAll('#neighbors .label')].map((e) => e.textContent),
    scores: [...document.querySelectorAll('#neighbors .score')].map((e) => parseFloat(e.textContent)),
    heads: document.getElementById('head').options.length - 1,
  };
})()"""


@dataclass
class PageResult:
    png: Path
    state: dict
    js_errors: list[str] = field(default_factory=list)
    gallery_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0


def screenshot_page(
    model_dir: Path,
    out: Path,
    *,
    chromium: str = DEFAULT_CHROMIUM,
    gallery_size: int = 20,
    query: str = DEFAULT_QUERY,
    k: int = 12,
    width: int = 1200,
    timeout: float = 180.0,
    log_dir: Path | None = None,
) -> PageResult:
    """Start the server, fill the gallery, drive the page, check it and save ``out`` (PNG)."""
    started = time.perf_counter()
    folder = DATA_DIR / "imagenet-sample"
    photos = sorted(folder.glob("*.JPEG"))
    if not photos:
        raise FileNotFoundError(f"no photos in {folder} (set DINO_DATA_DIR)")
    query_path = folder / query
    if not query_path.is_file():
        raise FileNotFoundError(query_path)
    gallery = [p for p in photos if p != query_path][:gallery_size]
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="dino-page-"))
    with page_server(model_dir, log_dir / "server.log").start(SERVER_READY_TIMEOUT) as server:
        base = server.url
        ids = index_gallery(base, gallery)
        with headless_chromium(chromium, width, 900) as cdp:
            cdp.send("Page.navigate", url=f"{base}/")
            wait_for(
                cdp, "document.readyState === 'complete' && !!document.getElementById('file')", 60, "the page to load"
            )
            wait_for(
                cdp,
                f"document.getElementById('gallery-info').textContent.includes('{len(ids)} images')",
                60,
                "the gallery info line",
                "document.getElementById('gallery-info').textContent",
            )
            cdp.evaluate(f"document.getElementById('k').value = '{k}'")
            # choose the file in the page's <input type=file> (what a user's file dialog does)
            root = cdp.send("DOM.getDocument", depth=0)["root"]["nodeId"]
            node = cdp.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            cdp.send("DOM.setFileInputFiles", nodeId=node, files=[str(query_path)])
            cdp.evaluate(
                "(() => { const f = document.getElementById('file');"
                " if (document.getElementById('result').hidden && f.files.length)"
                " f.dispatchEvent(new Event('change', {bubbles: true})); return true; })()"
            )  # Chromium fires 'change' itself; this only covers a build that does not
            expected = min(k, len(ids))
            wait_for(
                cdp,
                f"(() => {{ const s = {PAGE_STATE_JS}; return s.overlayLoaded && s.queryLoaded"
                " && s.overlaySrc.startsWith('blob:')"
                f" && s.neighbours === {expected} && s.thumbsLoaded === {expected} && !s.statusIsError; }})()",
                timeout,
                "the attention overlay and the neighbour thumbnails",
                PAGE_STATE_JS,
            )
            state = cdp.evaluate(PAGE_STATE_JS)
            # full-page screenshot: grow the viewport to the document's height
            height = int(cdp.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
            cdp.send(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
            time.sleep(0.3)  # one layout/paint after the resize
            shot = cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=False, fromSurface=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            errors = cdp.js_errors()
    return PageResult(png=out, state=state, js_errors=errors, gallery_ids=ids, seconds=time.perf_counter() - started)


def export_random_model(out_dir: Path, arch: str = "vit_small", patch: int = 16, size: int = 224) -> Path:
    """A random-init backbone exported with the project's exporter (needs the train extra)."""
    from training.backbone import build_backbone
    from training.export import export_backbone

    export_backbone(
        build_backbone(arch, patch, size),
        out_dir,
        name=f"{arch}{patch}-random",
        arch=arch,
        patch_size=patch,
        image_size=size,
        provenance={"source": "random init (benchmarks/screenshot_page.py)"},
    )
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        help="model folder; default: dino serve's default model (first of models/), else a random-init ViT-S/16",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--chromium", default=DEFAULT_CHROMIUM)
    p.add_argument("--gallery", type=int, default=20, help="imagenet-sample photos put in the gallery")
    p.add_argument("--query", default=DEFAULT_QUERY, help="imagenet-sample file uploaded through the page")
    p.add_argument("--k", type=int, default=12)
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    if not Path(args.chromium).is_file():
        sys.exit(f"no Chromium at {args.chromium}: apt-get install chromium (or --chromium PATH)")
    tmp = Path(tempfile.mkdtemp(prefix="dino-page-"))
    try:
        model = args.model
        if model is None:
            from service.settings import ModelNotFoundError, find_default_model

            try:
                model = find_default_model()
            except ModelNotFoundError:
                print("no model in models/: exporting a random-init vit_small/16 @224 ...", flush=True)
                model = export_random_model(tmp / "model")
        print(f"model: {model}", flush=True)
        result = screenshot_page(
            model,
            args.out,
            chromium=args.chromium,
            gallery_size=args.gallery,
            query=args.query,
            k=args.k,
            width=args.width,
            timeout=args.timeout,
            log_dir=tmp,
        )
        print(json.dumps(result.state, indent=1))
        if result.js_errors:
            print("JS errors:", *result.js_errors, sep="\n  ")
        print(f"saved {result.png} in {result.seconds:.0f}s")
        return 1 if result.js_errors else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
