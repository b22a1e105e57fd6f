"""Attention on video: ``dino attention-video`` (service.attention_video_cli) and ``POST /attention/video``.

The clip is a slow pan and zoom over one real photo, encoded here with PyAV. Each output frame must be
the overlay that ``POST /attention`` draws for that frame (the same transform, model, head selection
and rendering), within what the H.264 round trip changes; the ZIP format's ``attention.json`` must hold
the same grids as ``POST /attention?format=json``.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

av = pytest.importorskip("av", reason="PyAV is the 'video' extra")

from service import attention_video_cli  # noqa: E402  (after the skip: both need PyAV)
from service.app import create_app  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from service.video import FrameSampler, VideoFileSource, VideoLimits, h264_available  # noqa: E402
from tests.service.images import encode, multipart, photo  # noqa: E402

FRAMES = 12
FPS = 10
WIDTH, HEIGHT = 128, 96  # not square: the model's centre crop matters
MODEL_SIZE = 64  # the test model's image size: output frames at this size are POST /attention's PNGs
NUM_HEADS = 3
#: mean absolute difference (grey levels) that the 4:2:0 H.264 round trip of a 64 px overlay stays within
CODEC_TOLERANCE = 6.0


def pan_frames(count: int = FRAMES) -> list[Image.Image]:
    """A slow pan (left to right) and zoom (in by a quarter) over one photo."""
    image = photo(3)
    width, height = image.size
    frames = []
    for i in range(count):
        t = i / (count - 1)
        crop_w = width * (0.8 - 0.2 * t)
        crop_h = crop_w * HEIGHT / WIDTH
        left, top = (width - crop_w) * (0.2 + 0.6 * t), (height - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
        frames.append(image.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC, box=box))
    return frames


def encode_clip(frames: list[Image.Image], path: Path, fps: int = FPS, options: dict | None = None) -> bytes:
    """An MP4 of the frames (H.264 when PyAV has it)."""
    with av.open(str(path), mode="w", format="mp4", options=options or {}) as container:
        stream = container.add_stream("libx264" if h264_available() else "mpeg4", rate=Fraction(fps))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_image(image)
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def decode_clip(data: bytes | Path) -> tuple[list[np.ndarray], Fraction]:
    """The RGB frames of a clip and its frame rate."""
    with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, Fraction(stream.average_rate)


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    attention_video_cli.add_arguments(parser)
    return attention_video_cli.main(parser.parse_args([*argv, "--no-progress"]))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("clip") / "pan.mp4"
    return path, encode_clip(pan_frames(), path, options={"movflags": "+faststart"})


@pytest.fixture(scope="module")
def first_frame_png(clip) -> bytes:
    """The clip's first frame as decoded (what the command and the route see), as a PNG."""
    frames, _ = decode_clip(clip[1])
    return encode(Image.fromarray(frames[0]), "PNG")


@pytest.fixture(scope="module")
def client(model_dir):
    settings = ServiceSettings(
        model_dir=model_dir,
        warmup_batches=0,
        preprocess_threads=2,
        max_batch_wait_ms=2,
        max_batch_size=8,  # several chunks per clip
        max_video_frames=FRAMES,
        max_video_seconds=5,
        max_video_bytes=200_000,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_frame_sampler_keeps_the_clip_duration():
    def kept(source_fps: float, fps: int, count: int, time_base: float | None = None) -> list[int]:
        sampler = FrameSampler(Fraction(fps))
        times = [i / source_fps for i in range(count)]
        if time_base:  # timestamps rounded to the container's time base (Matroska: 1 ms)
            times = [round(t / time_base) * time_base for t in times]
        return [i for i, t in enumerate(times) if sampler.keep(t)]

    assert kept(30, 30, 9) == list(range(9))
    assert kept(30, 30, 9, time_base=0.001) == list(range(9))
    assert kept(30, 10, 10) == [0, 3, 6, 9]
    sampled = kept(60, 25, 13, time_base=0.001)  # 0.2 s: the ticks at 0, 40, ..., 200 ms
    assert len(sampled) == 6 and sampled[0] == 0 and sampled[-1] == 12


def with_rotation_matrix(mp4: bytes) -> bytes:
    """A copy of an MP4 whose track header (tkhd, version 0) says "rotate by 90 degrees clockwise to
    show": the matrix of a clip filmed on a phone held upright."""
    data = bytearray(mp4)
    box = data.find(b"tkhd")
    assert box > 0 and data[box + 4] == 0, "a version 0 tkhd box"
    # type, version+flags, creation, modification, track id, reserved, duration, reserved[2], layer,
    # alternate group, volume, reserved: then the 3x3 matrix (16.16 and 2.30 fixed point)
    matrix = box + 4 + 4 + 5 * 4 + 8 + 4 * 2
    struct.pack_into(">9i", data, matrix, 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)
    return bytes(data)


def test_rotated_clips_are_shown_upright(tmp_path):
    landscape = np.zeros((32, 64, 3), dtype=np.uint8)
    landscape[:, :8] = 255  # a white bar on the left edge: on the top edge once turned clockwise
    data = with_rotation_matrix(encode_clip([Image.fromarray(landscape)] * 2, tmp_path / "phone.mp4"))
    first = next(VideoFileSource(data, None, VideoLimits()).frames())
    grey = np.asarray(first.convert("L"), dtype=np.float32)
    assert first.size == (32, 64) and grey[:8].mean() > 200 and grey[8:].mean() < 50


def test_cli_on_a_video(model_dir, clip, first_frame_png, client, tmp_path):
    output = tmp_path / "attention.mp4"
    assert run_cli("--model", str(model_dir), "--input", str(clip[0]), "--output", str(output), "--size", "64") == 0
    frames, fps = decode_clip(output)
    assert len(frames) == FRAMES and fps == FPS and frames[0].shape == (MODEL_SIZE, MODEL_SIZE, 3)
    assert not list(tmp_path.glob(".*partial"))  # written aside, then moved in place
    # the first frame is POST /attention's overlay of that frame, up to the H.264 round trip
    expected = png_pixels(client.post("/attention", files=multipart(first_frame_png)).content)
    assert np.abs(frames[0].astype(np.float32) - expected).mean() < CODEC_TOLERANCE
    # a lower rate samples the clip (same duration, fewer frames); --max-frames stops early; a head, a threshold
    output = tmp_path / "sampled.mp4"
    argv = ["--model", str(model_dir), "--input", str(clip[0]), "--output", str(output), "--fps", "5"]
    assert run_cli(*argv, "--head", "1", "--threshold", "0.6", "--size", "96") == 0
    frames, fps = decode_clip(output)
    assert (len(frames), fps, frames[0].shape) == (FRAMES // 2, 5, (96, 96, 3))
    assert run_cli(*argv, "--max-frames", "2") == 0
    assert len(decode_clip(output)[0]) == 2


def test_cli_on_a_frame_folder(model_dir, client, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = pan_frames()
    for i, image in enumerate(frames):  # frame2 before frame10: natural order, not the names' order
        (folder / f"frame{i}.png").write_bytes(encode(image, "PNG"))
    (folder / "notes.txt").write_text("not a frame")
    output = tmp_path / "attention.zip"
    argv = ["--model", str(model_dir), "--input", str(folder), "--output", str(output), "--size", "64"]
    assert run_cli(*argv, "--fps", "8", "--head", "2") == 0
    with zipfile.ZipFile(output) as archive:
        names = sorted(name for name in archive.namelist() if name.endswith(".png"))
        info = json.loads(archive.read("attention.json"))
        pngs = [archive.read(names[0]), archive.read(names[10])]
    assert len(names) == FRAMES and info["frames"] == FRAMES and info["fps"] == 8 and info["head"] == 2
    for png, image in zip(pngs, (frames[0], frames[10]), strict=True):
        answer = client.post("/attention", params={"head": 2}, files=multipart(encode(image, "PNG")))
        assert np.abs(png_pixels(png) - png_pixels(answer.content)).max() <= 2  # batched vs single inference


def test_cli_bad_inputs_are_one_line_errors(model_dir, clip, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_frames = tmp_path / "bad_frames"
    bad_frames.mkdir()
    (bad_frames / "0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    out = str(tmp_path / "out.mp4")
    cases = [
        (["--input", str(corrupt), "--output", out], "not a video in a supported format"),
        (["--input", str(empty), "--output", out], "no frames in"),
        (["--input", str(bad_frames), "--output", out], "frame 0001.jpg"),
        (["--input", str(tmp_path / "missing.mp4"), "--output", out], "no such file or folder"),
        (["--input", str(clip[0]), "--output", out, "--head", str(NUM_HEADS)], "--head must be 'mean' or"),
        (["--input", str(clip[0]), "--output", out, "--head", "first"], "--head must be 'mean' or"),
        (["--input", str(clip[0]), "--output", out, "--threshold", "0"], "--threshold must be in (0, 1]"),
        (["--input", str(clip[0]), "--output", out, "--size", "65"], "--size must be"),
        (["--input", str(clip[0]), "--output", str(tmp_path / "out.gif")], "--output must end in .mp4 or .zip"),
        (["--input", str(clip[0]), "--output", str(tmp_path / "no" / "dir" / "out.mp4")], "cannot write"),
    ]
    for argv, message in cases:
        assert run_cli("--model", str(model_dir), *argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (argv, err)
    assert not Path(out).exists()


def test_route_mp4_and_zip(client, clip, first_frame_png):
    data = clip[1]
    answer = client.post("/attention/video", files=multipart(data, field="video"))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "video/mp4"
    assert (answer.headers["x-frame-count"], answer.headers["x-frame-rate"]) == (str(FRAMES), str(FPS))
    frames, fps = decode_clip(answer.content)
    assert len(frames) == FRAMES and fps == FPS and frames[0].shape == (256, 256, 3)  # the default size

    answer = client.post(
        "/attention/video",
        params={"format": "zip", "size": MODEL_SIZE, "fps": 5, "head": 1, "threshold": 0.5},
        files=multipart(data, field="video"),
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip", answer.text
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        info = json.loads(archive.read("attention.json"))
        first = archive.read("frame_000000.png")
        assert len([n for n in archive.namelist() if n.endswith(".png")]) == FRAMES // 2
    assert (info["frames"], info["fps"], info["head"], info["threshold"]) == (FRAMES // 2, 5, 1, 0.5)
    params = {"head": 1, "threshold": 0.5}
    expected = client.post("/attention", params={**params, "format": "json"}, files=multipart(first_frame_png)).json()
    np.testing.assert_allclose(info["attention"][0], expected["attention"], rtol=1e-4, atol=1e-6)
    overlay = client.post("/attention", params=params, files=multipart(first_frame_png)).content
    assert np.abs(png_pixels(first) - png_pixels(overlay)).max() <= 2


def test_route_refuses_what_it_cannot_serve(client, clip, tmp_path):
    data = clip[1]

    def post(body: bytes, **params):
        return client.post("/attention/video", params=params, files=multipart(body, field="video"))

    def refused(answer, status: int, words: str) -> None:
        assert answer.status_code == status, answer.text
        assert isinstance(answer.json()["detail"], str) and words in answer.json()["detail"], answer.text

    longer = encode_clip(pan_frames(FRAMES + 4), tmp_path / "longer.mp4")
    refused(post(longer), 413, "too many frames")
    assert post(longer, fps=5).status_code == 200  # the same clip, sampled at a lower rate, fits
    slow = encode_clip(pan_frames(FRAMES), tmp_path / "slow.mp4", fps=2)  # 6 s, over max_video_seconds
    refused(post(slow), 413, "the limit is 5 s")
    refused(post(data + bytes(200_000)), 413, "DINO_MAX_VIDEO_BYTES")
    huge = encode_clip([Image.new("RGB", (1952, 1088), "grey")] * 2, tmp_path / "huge.mp4")  # over full HD
    refused(post(huge), 413, "1952x1088 pixels are over the limit")
    refused(post(b"GIF89a" + bytes(range(256)) * 8), 415, "not a video in a supported format")
    refused(post(encode(photo(0), "JPEG")), 415, "not a video")
    refused(post(data[: len(data) * 2 // 3]), 422, "corrupt video")  # cut inside the frames (index first)
    refused(post(b""), 422, "empty")
    refused(post(data, head=NUM_HEADS), 422, "head must be")
    refused(post(data, size=1024), 422, "size must be at most")
    refused(client.post("/attention/video", files=multipart(data)), 422, "unknown field 'images'")
    refused(client.post("/attention/video", files=multipart(data, data, field="video")), 422, "one video per request")
    refused(client.post("/attention/video", content=data, headers={"Content-Type": "video/mp4"}), 415, "multipart")


def test_route_without_pyav_is_a_501(client, clip, monkeypatch):
    import service

    monkeypatch.delattr(service, "video")
    monkeypatch.delitem(sys.modules, "service.video")
    monkeypatch.setitem(sys.modules, "av", None)  # "import av" fails as if PyAV were not installed
    answer = client.post("/attention/video", files=multipart(clip[1], field="video"))
    assert answer.status_code == 501 and "pip install 'dino-platform[serve,video]'" in answer.json()["detail"]
