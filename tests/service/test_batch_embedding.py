"""``dino embed`` (service.batch_embedding): the Parquet layout, ids and labels, equality with
POST /embed, unreadable files, resume after a limit, a crash or a kill, clear errors, and the Ray
Data pipeline (``--ray local``, slow) against the single-process run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from dino.cli import main as dino
from service.app import create_app
from service.batch_embedding import (
    MANIFEST_FILE,
    SCHEMA,
    SKIPPED_FILE,
    TMP_PREFIX,
    EmbedError,
    RayOptions,
    check_workers_fit,
    default_workers,
    image_id,
    root_cause,
    rows_table,
)
from service.settings import ServiceSettings
from tests.service.images import multipart, photo_paths

REPO = Path(__file__).resolve().parents[2]
#: POST /embed and dino embed must agree to this (the brief's bound; in practice they are identical)
MAX_ABS_DIFF = 1e-4
#: how the photo folder is laid out: label -> number of real photos (None: the top level)
LAYOUT = {"cat": 3, "dog": 3, None: 1}
#: files in the folder that are not images; they must be skipped and listed
UNREADABLE = {"dog/not_an_image.jpg": b"this is text, not a JPEG", "cat/empty.png": b""}
#: a run of the real command in a subprocess (Ray starts in a few seconds; this bounds a hang)
SUBPROCESS_TIMEOUT = 300


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of real photos in two labelled subfolders and the top level, plus unreadable files."""
    sources = iter(photo_paths())
    root = tmp_path_factory.mktemp("photos")
    for label, count in LAYOUT.items():
        folder = root / label if label else root
        folder.mkdir(exist_ok=True)
        for _ in range(count):
            source = next(sources)
            shutil.copyfile(source, folder / source.name)
    for relative, data in UNREADABLE.items():
        (root / relative).write_bytes(data)
    return root


def readable(photos: Path) -> set[str]:
    """Relative paths of the real photos of the folder."""
    return {p.relative_to(photos).as_posix() for p in photos.rglob("*.JPEG")}


def embed(capsys, *args) -> tuple[int, str, str]:
    """``dino embed ARGS`` in this process; (exit code, stdout, stderr)."""
    code = dino(["embed", "--no-progress", "--provider", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def embed_subprocess(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dino.cli", "embed", "--no-progress", "--provider", "cpu", *map(str, args)]
    return subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


def rows(output: Path) -> dict[str, dict]:
    """The dataset as id -> row; fails on duplicate ids."""
    table = pq.read_table(output)
    assert table.schema.equals(SCHEMA), table.schema
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate ids in the dataset"
    return {row["id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def post_embed(model_dir):
    """path -> the embedding POST /embed answers for that file (the real app, default normalisation)."""
    with TestClient(create_app(ServiceSettings(model_dir=model_dir, provider="cpu", warmup_batches=0))) as client:

        def run(path: Path) -> np.ndarray:
            response = client.post("/embed", files=multipart(path.read_bytes()))
            assert response.status_code == 200, response.text
            return np.asarray(response.json()["embeddings"][0], dtype=np.float32)

        yield run


@pytest.fixture(scope="module")
def single_run(model_dir, photos, tmp_path_factory) -> tuple[Path, str]:
    """One complete single-process run over the photo folder: (output folder, stdout)."""
    output = tmp_path_factory.mktemp("single") / "embeddings.parquet"
    command = ["embed", "--no-progress", "--provider", "cpu", "--model", str(model_dir)]
    command += ["--images", str(photos), "--output", str(output), "--batch-size", "2", "--rows-per-part", "3"]
    # capsys is function-scoped: this module-scoped run captures its own stdout
    stdout = tmp_path_factory.mktemp("single-log") / "stdout.txt"
    with open(stdout, "w") as fh:
        saved, sys.stdout = sys.stdout, fh
        try:
            assert dino(command) == 0
        finally:
            sys.stdout = saved
    return output, stdout.read_text()


def test_rows_have_ids_paths_labels_and_the_embeddings_of_post_embed(single_run, photos, post_embed):
    output, _ = single_run
    dataset = rows(output)
    assert {row["path"] for row in dataset.values()} == readable(photos)
    for row_id, row in dataset.items():
        # the id is computable from the path alone, and has the form of the gallery's ids
        assert row_id == image_id(row["path"]) == hashlib.sha256(row["path"].encode()).hexdigest()[:32]
        assert row["label"] == (row["path"].split("/")[0] if "/" in row["path"] else None)
        vector = np.asarray(row["embedding"], dtype=np.float32)
        assert abs(np.linalg.norm(vector) - 1) < 1e-5
        assert np.abs(vector - post_embed(photos / row["path"])).max() <= MAX_ABS_DIFF, row["path"]
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    assert manifest["model"]["dim"] == len(next(iter(dataset.values()))["embedding"])
    # the folder reads as one dataset with pandas too (the sidecars are ignored by readers)
    pd = pytest.importorskip("pandas")
    assert len(pd.read_parquet(output)) == len(dataset)


def test_unreadable_files_are_skipped_and_listed(single_run):
    output, stdout = single_run
    paths = {row["path"] for row in rows(output).values()}
    listed = [json.loads(line) for line in (output / SKIPPED_FILE).read_text().splitlines()]
    assert {entry["path"] for entry in listed} == set(UNREADABLE)
    assert all(entry["reason"] for entry in listed)
    assert not paths & set(UNREADABLE)
    assert f"{len(UNREADABLE)} skipped as unreadable" in stdout
    for relative in UNREADABLE:
        assert relative in stdout


def test_a_limited_run_resumes_without_duplicates(model_dir, photos, tmp_path, capsys):
    output = tmp_path / "out.parquet"
    args = ["--model", model_dir, "--images", photos, "--output", output, "--batch-size", "1", "--rows-per-part", "2"]
    code, out, _ = embed(capsys, *args, "--limit", 4)
    assert code == 0 and "left for a later run" in out
    first = rows(output)
    first_files = sorted(output.glob("part-*.parquet"))
    assert 0 < len(first) <= 4

    code, out, _ = embed(capsys, *args)
    assert code == 0 and f"{len(first)} were already in" in out
    second = rows(output)
    assert {row["path"] for row in second.values()} == readable(photos)
    assert set(first) <= set(second) and all(f.exists() for f in first_files), "finished parts were redone"

    code, out, _ = embed(capsys, *args)  # nothing left: only the unreadable files are tried again
    assert code == 0 and out.startswith("embedded 0 images") and rows(output) == second


def test_leftovers_of_a_crash_are_cleaned_up_and_whole_ray_files_kept(model_dir, photos, tmp_path, capsys):
    output = tmp_path / "out.parquet"
    args = ["--model", model_dir, "--images", photos, "--output", output]
    assert embed(capsys, *args, "--limit", 2)[0] == 0
    done = rows(output)
    # what a kill leaves: a temporary file, and the staging folder of a Ray job with one whole
    # file (rows of two images not embedded yet) and one torn file
    (output / f"{TMP_PREFIX}part-x.parquet").write_bytes(b"PAR1 half a file")
    staging = output / ".ray-interrupted"
    staging.mkdir()
    todo = sorted(readable(photos) - {row["path"] for row in done.values()})[:2]
    whole = rows_table([image_id(p) for p in todo], todo, [None, None], np.eye(2, 192, dtype=np.float32))
    pq.write_table(whole, staging / "job_000000-0.parquet")
    (staging / "job_000001-0.parquet").write_bytes(pq_bytes(whole)[:-100])

    code, out, _ = embed(capsys, *args)
    assert code == 0 and f"{len(done) + 2} were already in" in out
    after = rows(output)
    assert {row["path"] for row in after.values()} == readable(photos)
    # the adopted rows are the staging file's, not embedded again
    assert np.asarray(after[image_id(todo[0])]["embedding"])[0] == 1.0
    assert not list(output.glob(f"{TMP_PREFIX}*")) and not staging.exists()


def pq_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.slow  # a real kill -9 of a running command, ~5 s
def test_a_killed_run_keeps_its_finished_parts(model_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for source in photo_paths()[:60]:
        os.symlink(source, images / source.name)
    output = tmp_path / "out.parquet"
    args = ["--model", model_dir, "--images", images, "--output", output, "--batch-size", "1", "--rows-per-part", "2"]
    command = [sys.executable, "-m", "dino.cli", "embed", "--no-progress", "--provider", "cpu", "--threads", "1"]
    process = subprocess.Popen(
        [*command, *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not list(output.glob("part-*.parquet")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    kept = rows(output)
    assert 0 < len(kept) < 60

    result = embed_subprocess(*args)
    assert result.returncode == 0, result.stderr
    assert f"{len(kept)} were already in" in result.stdout
    assert len(rows(output)) == 60


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no images folder", "does not exist"),
        ("no model folder", "is not a model folder"),
        ("empty images folder", "no images in"),
        ("output is a file", "is not a folder"),
        ("output of something else", "was not made by dino embed"),
        ("output of another model", "holds embeddings of model"),
        ("bad --ray", "--ray must be"),
        ("bad --limit", "--limit must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(case, expected, model_dir, photos, tmp_path, capsys):
    images, output, model, extra = photos, tmp_path / "out.parquet", model_dir, []
    if case == "no images folder":
        images = tmp_path / "missing"
    elif case == "no model folder":
        model = tmp_path / "no-model"
        model.mkdir()
    elif case == "empty images folder":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "output is a file":
        output.write_text("x")
    elif case == "output of something else":
        output.mkdir()
        (output / "data.csv").write_text("a,b\n")
    elif case == "output of another model":
        assert embed(capsys, "--model", model, "--images", images, "--output", output, "--limit", 1)[0] == 0
        manifest = json.loads((output / MANIFEST_FILE).read_text())
        manifest["model"].update(sha256="0" * 64, name="another")
        (output / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif case == "bad --ray":
        extra = ["--ray", "localhost:6379"]
    elif case == "bad --limit":
        extra = ["--limit", "0"]
    code, out, err = embed(capsys, "--model", model, "--images", images, "--output", output, *extra)
    assert code == 1 and out == ""
    assert err.startswith("dino embed: ") and expected in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_inference_actors_leave_cpus_for_decoding():
    cpu_only = RayOptions("local")
    # the measured share of inference decides, with at least one CPU left to decode and write
    assert default_workers(cpu_only, {"CPU": 16.0}, share=0.85) == 14
    assert default_workers(cpu_only, {"CPU": 2.0}, share=0.85) == 1
    assert default_workers(cpu_only, {"CPU": 64.0}, share=0.2) == 13
    assert default_workers(RayOptions("auto", gpus_per_worker=0.5), {"CPU": 8.0, "GPU": 2.0}, share=0.9) == 4
    check_workers_fit(cpu_only, 1, {"CPU": 2.0})
    with pytest.raises(EmbedError, match="leave no CPU for decoding"):
        check_workers_fit(cpu_only, 2, {"CPU": 2.0})
    with pytest.raises(EmbedError, match="GPUs"):
        check_workers_fit(RayOptions("auto", gpus_per_worker=1.0), 3, {"CPU": 8.0, "GPU": 2.0})


def test_a_failed_ray_job_is_one_line_naming_the_workers_error():
    # an actor that dies in its constructor reaches the driver as Ray's exception, with the worker's
    # traceback as text, chained to an empty Ray Data exception
    actor_died = type("ActorDiedError", (Exception,), {"__module__": "ray.exceptions"})
    system = type("SystemException", (Exception,), {"__module__": "ray.data.exceptions"})
    died = actor_died(
        "The actor died because of an error raised in its creation task\nTraceback (most recent call last):\n"
        '  File "service/runtime.py", line 190, in __init__\n'
        "service.runtime.ModelLoadError: provider 'cuda' asked for, but onnxruntime could not start it"
    )
    died.__cause__ = system()
    assert root_cause(died) == "ModelLoadError: provider 'cuda' asked for, but onnxruntime could not start it"
    # a task's exception kept as ``cause``
    task_error = type("RayTaskError", (Exception,), {"__module__": "ray.exceptions"})("wrapped")
    task_error.cause = ValueError("bad batch")
    assert root_cause(task_error) == "ValueError: bad batch"


@pytest.mark.slow  # starts Ray twice (a few seconds each)
def test_ray_local_equals_single_process_and_post_embed_and_resumes(
    model_dir, photos, single_run, post_embed, tmp_path
):
    reference = rows(single_run[0])
    output = tmp_path / "ray.parquet"
    # a temporary folder of its own (short: Ray's socket paths must fit 107 characters) shows that
    # every Ray process is gone when the command ends
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        args = ["--model", model_dir, "--images", photos, "--output", output, "--ray", "local", "--ray-cpus", 2]
        args += ["--batch-size", 2, "--rows-per-part", 3]
        first = embed_subprocess(*args, "--limit", 3, env={"RAY_TMPDIR": ray_tmp})
        assert first.returncode == 0, first.stderr[-3000:]
        assert 0 < len(rows(output)) <= 3

        second = embed_subprocess(*args, env={"RAY_TMPDIR": ray_tmp})
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"{len(UNREADABLE)} skipped as unreadable" in second.stdout
        listed = {json.loads(line)["path"] for line in (output / SKIPPED_FILE).read_text().splitlines()}
        assert listed == set(UNREADABLE)
        leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or [])]
        assert not leftovers, f"Ray processes still running: {leftovers}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    result = rows(output)
    assert set(result) == set(reference)
    for row_id, row in result.items():
        assert (row["path"], row["label"]) == (reference[row_id]["path"], reference[row_id]["label"])
        vector = np.asarray(row["embedding"], dtype=np.float32)
        assert np.abs(vector - np.asarray(reference[row_id]["embedding"])).max() <= MAX_ABS_DIFF, row["path"]
        assert np.abs(vector - post_embed(photos / row["path"])).max() <= MAX_ABS_DIFF, row["path"]
    assert not [p for p in output.iterdir() if p.name.startswith(".ray-")]
