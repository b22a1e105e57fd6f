"""The HTTP API's contract test: schemathesis against a live ``dino serve``, without and with an API key.

Each run goes through schemathesis' four phases (examples, coverage, fuzzing, stateful) with every
check, configured in ``tests/contract/schemathesis.toml`` (the checks switched off there are listed
with their reasons). The server serves the default model with an in-memory gallery, so the stateful
phase can add images and follow the OpenAPI links from ``POST /index`` to the routes that take an id.

Usage (``make contract``; ``.ci/run`` runs it after the tests)::

    .venv/bin/python tests/contract/run_schemathesis.py [--model models/NAME]

Prints each run's summary and exits 1 if either run has a failure or an error.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from service.settings import find_default_model  # noqa: E402  (after the path set-up)
from tests.helpers import ServerProcess  # noqa: E402

CONFIG = Path(__file__).with_name("schemathesis.toml")
#: bounds one schemathesis run (about 20 s on 2 cores): a hang fails instead of stalling CI
RUN_TIMEOUT_S = 300


def run_schemathesis(server: ServerProcess, api_key: str | None) -> tuple[int, str]:
    """(exit code, output) of one schemathesis run against ``server``."""
    schemathesis = Path(sys.executable).with_name("schemathesis")
    command = [str(schemathesis), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json", "--no-color"]
    if api_key is not None:
        command += ["-H", f"Authorization: Bearer {api_key}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return done.returncode, done.stdout + done.stderr


def summary(output: str) -> str:
    """The part of schemathesis' output from its SUMMARY line on."""
    marker = output.find("SUMMARY")
    start = output.rfind("\n", 0, marker) + 1 if marker >= 0 else 0
    return output[start:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the default model)")
    args = parser.parse_args()
    model_dir = args.model or find_default_model()
    failed = []
    with tempfile.TemporaryDirectory(prefix="dino-contract-") as tmp:
        for mode, api_key in (("without an API key", None), ("with an API key", secrets.token_urlsafe(16))):
            log = Path(tmp) / f"server-{'key' if api_key else 'open'}.log"
            env = {"DINO_API_KEY": api_key, "DINO_LOG_LEVEL": "warning", "DINO_INDEX_DIR": None}
            print(f"==> schemathesis {mode}: dino serve --model {model_dir}", flush=True)
            started = time.perf_counter()
            with ServerProcess(model_dir, log, env=env) as server:
                code, output = run_schemathesis(server, api_key)
            print(output if code else summary(output), flush=True)
            print(f"==> {mode}: exit {code} in {time.perf_counter() - started:.1f} s", flush=True)
            if code:
                failed.append(mode)
                print(f"server log ({log}):\n{log.read_text()[-4000:]}", flush=True)
    if failed:
        print(f"contract test FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("contract test passed: 0 failures without and with an API key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
