"""Attention on video: frames in, per-frame [CLS] attention overlays out (``dino attention-video`` and
``POST /attention/video``), like DINO's ``video_generation.py``, with PyAV (FFmpeg's libraries in a wheel).

The pieces, shared by the command and the route:

- a **frame source**: a video file or bytes (:class:`VideoFileSource`) or a folder of images
  (:class:`FrameFolderSource`, decoded by the service's safe decoder), sampled at an output frame rate;
- a **frame preparer** (:class:`FramePreparer`): the model's input (the service's evaluation transform,
  exactly what ``POST /attention`` does to an upload) and the picture the heatmap is drawn over;
- the **overlay** (:func:`attention_overlays`): :func:`service.overlay.render_overlay`, the very PNG that
  ``POST /attention`` answers, drawn at the output size;
- a **clip writer**: an MP4 (H.264 with PyAV's bundled libx264, else MPEG-4 part 2) or a ZIP of the PNG
  frames plus ``attention.json`` (the attention grids).

Frames flow through in chunks (decode a chunk, run it through the model, encode it), so memory does not
grow with the length of the clip. Untrusted videos are opened defensively: only a few container formats
and codecs are allowed (FFmpeg's playlist and concatenation demuxers could otherwise open other files),
and the duration, frame size and frame count are checked against the limits from the header, again from
the packets' timestamps before anything is decoded, and once more while decoding (headers can lie).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import threading
import zipfile
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import av
import av.container
import numpy as np
from PIL import Image

from dino.attention import mass_threshold_mask, select_head
from dino.images import IMAGE_EXTENSIONS, ImageInputError, decode_image
from service.overlay import render_overlay
from service.preprocess import EvalTransform, PreparedImage

#: FFmpeg demuxers allowed to open a video (MP4/MOV, Matroska/WebM, AVI). Not FFmpeg's default "any
#: format": its playlist (hls) and concat demuxers open the files a playlist names, and image2 globs paths
ALLOWED_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi")
#: decoders allowed to run on untrusted bytes: the usual codecs of camera, phone and web video
ALLOWED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4", "mjpeg"})
#: frame rate of a frame folder, which has no timestamps (the reference's default too)
DEFAULT_FOLDER_FPS = Fraction(25)
#: side of the output frames when none is asked for: big enough to see the photo under the heatmap
DEFAULT_OUTPUT_SIZE = 256
#: with a duration limit, the most frames decoded per allowed second (slow motion); bounds the decoding
#: work of a clip whose timestamps do not advance
MAX_SOURCE_FPS = 240
#: a frame reaching its output tick this fraction of a tick early is still on time (timestamps are rounded
#: to the container's time base, e.g. 33 ms for 1/30 s in Matroska)
TICK_TOLERANCE = 0.25
#: H.264 quality (x264's constant rate factor: 0 lossless, 23 default): overlays have fine colour detail
H264_CRF = "20"
#: bits per pixel and frame of the MPEG-4 part 2 fallback, which has no quality-based mode in PyAV
MPEG4_BITS_PER_PIXEL = 0.5
#: members of a ZIP clip
ZIP_FRAME_NAME = "frame_{:06d}.png"
ZIP_ATTENTION_NAME = "attention.json"


class VideoInputError(Exception):
    """An unusable video or frame folder; ``detail`` is the one-line message for the user."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class VideoTooLarge(VideoInputError):
    """Longer, larger or with more frames than the limits allow (HTTP 413)."""


class UnsupportedVideo(VideoInputError):
    """Not a video in an allowed container format and codec (HTTP 415)."""


class InvalidVideo(VideoInputError):
    """A corrupt or truncated video, an empty or unreadable frame folder (HTTP 422)."""


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on a clip. ``None``: no bound (the command line on one's own files)."""

    #: most output frames (after sampling at the output rate)
    max_frames: int | None = None
    #: past ``max_frames``: stop there (the command's ``--max-frames``) or refuse the clip (the service)
    truncate: bool = True
    #: longest clip, in seconds
    max_seconds: float | None = None
    #: largest frame (width x height), read from the stream before a frame is decoded
    max_frame_pixels: int | None = None
    #: highest output frame rate (the default rate is the clip's own, capped at this)
    max_fps: float | None = None

    @property
    def max_decoded_frames(self) -> int | None:
        """Most frames decoded (sampled or not): ``max_seconds`` at :data:`MAX_SOURCE_FPS`."""
        return None if self.max_seconds is None else math.ceil(self.max_seconds * MAX_SOURCE_FPS)


def to_fraction(fps: float | Fraction) -> Fraction:
    """A frame rate as a fraction (what the encoder's time base needs): 29.97 -> 2997/100."""
    return fps if isinstance(fps, Fraction) else Fraction(str(fps)).limit_denominator(1001)


class FrameSampler:
    """Keeps the frames that reach the next tick of an output clock at ``fps``, so that a 60 fps clip
    sampled at 10 fps keeps every sixth frame and the clip keeps its duration. Frames are never
    repeated: the output rate is at most the source's (see :func:`output_rate`)."""

    def __init__(self, fps: Fraction):
        self.fps = float(fps)
        self.start: float | None = None
        self.last_tick = -1

    def keep(self, seconds: float) -> bool:
        if self.start is None:
            self.start = seconds
        tick = math.floor((seconds - self.start) * self.fps + TICK_TOLERANCE)
        if tick <= self.last_tick:
            return False
        self.last_tick = tick
        return True


def output_rate(requested: float | Fraction | None, source: Fraction | None, limit: float | None) -> Fraction:
    """The output frame rate: the requested one (default: the source's, else 25), never above the
    source's rate (frames would have to be repeated) nor ``limit``."""
    fps = to_fraction(requested) if requested is not None else (source or DEFAULT_FOLDER_FPS)
    if source is not None and fps > source:
        fps = source
    if limit is not None and fps > limit:
        fps = to_fraction(limit)
    return fps


#: how to show a frame whose display matrix rotates it (``av.VideoFrame.rotation``: degrees
#: counterclockwise, -90 for a phone held upright), as FFmpeg's players do
ROTATIONS = {
    90: Image.Transpose.ROTATE_90,
    -90: Image.Transpose.ROTATE_270,
    180: Image.Transpose.ROTATE_180,
    -180: Image.Transpose.ROTATE_180,
}


def upright(image: Image.Image, rotation: int) -> Image.Image:
    """A decoded frame as it is meant to be seen: phones record portrait clips as landscape frames plus a
    rotation, and the model should see the scene upright, as in a photo (EXIF orientation)."""
    transpose = ROTATIONS.get(rotation)
    return image.transpose(transpose) if transpose is not None else image


def _too_many_frames(count: int | str, fps: Fraction, limit: int) -> VideoTooLarge:
    return VideoTooLarge(
        f"too many frames: the clip gives {count} frames at {float(fps):g} fps, the limit is {limit}; "
        "send a shorter clip or ask for a lower fps"
    )


class FrameSource(Protocol):
    """Frames of a clip, sampled at ``fps``; ``expected_frames`` sizes a progress bar (None: unknown)."""

    fps: Fraction
    expected_frames: int | None

    def frames(self) -> Generator[Image.Image]: ...

    def close(self) -> None: ...


class VideoFileSource:
    """A video file (a path) or an uploaded clip (bytes), decoded with PyAV.

    Opening checks the container format, the codec, the frame size and the duration in the header,
    then reads the packets once (no decoding: cheap) to count the frames the output rate keeps and to
    check the real duration, before :meth:`frames` decodes anything.
    """

    def __init__(self, video: str | os.PathLike | bytes, fps: float | Fraction | None, limits: VideoLimits):
        self.video = video
        self.limits = limits
        container = self._open()
        try:
            stream = container.streams.video[0]
            source_rate = stream.average_rate or stream.guessed_rate
            self.source_fps: Fraction | None = Fraction(source_rate) if source_rate else None
            self.fps = output_rate(fps, self.source_fps, limits.max_fps)
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            self._check_frame_size(self.width, self.height)
            header_seconds = self._header_seconds(container, stream)
            if limits.max_seconds is not None and header_seconds is not None and header_seconds > limits.max_seconds:
                raise self._too_long(header_seconds)
            self.expected_frames: int | None = self._count_frames(container, stream)
        finally:
            container.close()

    def _open(self) -> av.container.InputContainer:
        """The container, opened with only the allowed demuxers; its first video stream checked."""
        source = io.BytesIO(self.video) if isinstance(self.video, bytes) else os.fspath(self.video)
        try:
            container = av.open(source, mode="r", options={"format_whitelist": ",".join(ALLOWED_FORMATS)})
        except av.FFmpegError as exc:
            if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
                raise
            raise UnsupportedVideo(
                "not a video in a supported format (MP4/MOV, Matroska/WebM or AVI with H.264, HEVC, VP8, VP9, "
                "AV1, MPEG-4 or MJPEG)"
            ) from exc
        try:
            if not container.streams.video:
                raise UnsupportedVideo(f"no video stream in this {container.format.name.split(',')[0]} file")
            codec = container.streams.video[0].codec_context.name
            if codec not in ALLOWED_CODECS:
                raise UnsupportedVideo(
                    f"unsupported video codec {codec!r}: use H.264, HEVC, VP8, VP9, AV1, MPEG-4 or MJPEG"
                )
        except BaseException:
            container.close()
            raise
        return container

    def _check_frame_size(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise InvalidVideo(f"the video's frames have no size ({width}x{height})")
        limit = self.limits.max_frame_pixels
        if limit is not None and width * height > limit:
            raise VideoTooLarge(f"video frames of {width}x{height} pixels are over the limit of {limit} pixels")

    def _too_long(self, seconds: float) -> VideoTooLarge:
        return VideoTooLarge(f"the clip lasts {seconds:.1f} s, the limit is {self.limits.max_seconds:g} s")

    @staticmethod
    def _header_seconds(container: av.container.InputContainer, stream: Any) -> float | None:
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / av.time_base
        return None

    def _times(self, index: int, time: float | None) -> float:
        """A frame's or packet's time in seconds (from its index when it has no timestamp)."""
        if time is not None:
            return time
        return index / float(self.source_fps or self.fps)

    def _count_frames(self, container: av.container.InputContainer, stream: Any) -> int:
        """Frames the output rate keeps, from the packets' timestamps (demuxing only, no decoding);
        the real duration and the number of frames are checked here, before any decoding."""
        limits = self.limits
        times: list[float] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker, not a frame
                    continue
                if limits.max_decoded_frames is not None and len(times) >= limits.max_decoded_frames:
                    raise VideoTooLarge(
                        f"too many frames: more than {limits.max_decoded_frames} in a clip of at most "
                        f"{limits.max_seconds:g} s"
                    )
                pts = packet.pts
                seconds = float(pts * stream.time_base) if pts is not None and stream.time_base else None
                times.append(self._times(len(times), seconds))
        except av.FFmpegError as exc:
            raise InvalidVideo(f"corrupt video: {exc.strerror or exc}") from exc
        if not times:
            raise InvalidVideo("the video has no frames")
        times.sort()  # packets come in decoding order; B-frames are shown in another
        if limits.max_seconds is not None and times[-1] - times[0] > limits.max_seconds:
            raise self._too_long(times[-1] - times[0])
        sampler = FrameSampler(self.fps)
        kept = sum(sampler.keep(t) for t in times)
        if limits.max_frames is not None and kept > limits.max_frames:
            if not limits.truncate:
                raise _too_many_frames(kept, self.fps, limits.max_frames)
            kept = limits.max_frames
        return kept

    def frames(self) -> Generator[Image.Image]:
        """The sampled frames as RGB images, decoded one at a time; the limits are enforced again on
        what is decoded (a stream can change size, and timestamps need not match the packets')."""
        limits = self.limits
        container = self._open()
        sampler = FrameSampler(self.fps)
        decoded = kept = 0
        first: float | None = None
        stream = container.streams.video[0]
        if limits.max_frame_pixels is not None:
            # FFmpeg's own bound, checked before a frame is allocated: the header's size was checked at
            # opening, but a stream can switch to larger frames midway
            stream.codec_context.options = {"max_pixels": str(limits.max_frame_pixels)}
        try:
            for frame in container.decode(stream):
                decoded += 1
                if limits.max_decoded_frames is not None and decoded > limits.max_decoded_frames:
                    raise VideoTooLarge(f"too many frames: more than {limits.max_decoded_frames} decoded")
                self._check_frame_size(frame.width, frame.height)
                seconds = self._times(decoded - 1, frame.time)
                first = seconds if first is None else first
                if limits.max_seconds is not None and seconds - first > limits.max_seconds:
                    raise self._too_long(seconds - first)
                if not sampler.keep(seconds):
                    continue
                if limits.max_frames is not None and kept >= limits.max_frames:
                    if limits.truncate:
                        return
                    raise _too_many_frames(f"more than {kept}", self.fps, limits.max_frames)
                kept += 1
                yield upright(frame.to_image(), frame.rotation)
        except av.FFmpegError as exc:
            raise InvalidVideo(f"corrupt video after {decoded} frames: {exc.strerror or exc}") from exc
        finally:
            container.close()
        if not kept:
            raise InvalidVideo("no frame of the video could be decoded")

    def close(self) -> None:
        """Nothing stays open between calls (each pass opens the container)."""


def _natural_key(path: Path) -> list[Any]:
    """Sort key that puts frame2.png before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class FrameFolderSource:
    """A folder of frames: its image files (not recursive), in natural name order, each decoded by
    :func:`dino.images.decode_image` (the service's checks on untrusted images) and shown for one
    frame at ``fps`` (default 25)."""

    def __init__(
        self,
        folder: Path,
        fps: float | Fraction | None,
        limits: VideoLimits,
        max_pixels: int,
        max_jpeg_scans: int,
    ):
        self.files = sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()), key=_natural_key
        )
        if not self.files:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise InvalidVideo(f"no frames in {folder}: the folder holds no image files ({extensions})")
        self.fps = output_rate(fps, None, limits.max_fps)
        self.limits = limits
        self.max_pixels = max_pixels
        self.max_jpeg_scans = max_jpeg_scans
        count = len(self.files)
        if limits.max_frames is not None and count > limits.max_frames:
            if not limits.truncate:
                raise _too_many_frames(count, self.fps, limits.max_frames)
            count = limits.max_frames
        self.expected_frames: int | None = count

    def frames(self) -> Generator[Image.Image]:
        for path in self.files[: self.expected_frames]:
            try:
                yield decode_image(path.read_bytes(), self.max_pixels, self.max_jpeg_scans)
            except ImageInputError as exc:
                raise InvalidVideo(f"frame {path.name}: {exc.detail}") from exc
            except OSError as exc:
                raise InvalidVideo(f"frame {path.name}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Nothing to close."""


@dataclass
class FrameInput:
    """One frame made ready: the model's input (and crop) and the picture the heatmap is drawn over."""

    prepared: PreparedImage
    display: Image.Image


class FramePreparer:
    """RGB frame -> :class:`FrameInput`, with the model's evaluation transform (as ``POST /attention``).

    The heatmap is drawn over the same square the model saw, at ``size`` pixels: at the model's own
    size it is the model's crop itself (so a frame's overlay is exactly ``POST /attention``'s PNG of
    that frame); at another size the square is resampled from the full-resolution frame, which is
    sharper than enlarging the model's small crop.
    """

    def __init__(self, transform: EvalTransform, size: int):
        self.transform = transform
        self.size = size

    def __call__(self, frame: Image.Image) -> FrameInput:
        crop = self.transform.crop(frame)
        prepared = PreparedImage(crop=crop, tensor=self.transform.normalize(crop))
        side, size = self.transform.image_size, self.size
        if size == side:
            return FrameInput(prepared, crop)
        width, height = frame.size
        new_w, new_h = self.transform.resized_size(width, height)
        if new_w < side or new_h < side:  # the crop is padded with black: draw over the model's crop
            return FrameInput(prepared, crop.resize((size, size), Image.Resampling.BICUBIC))
        # the crop window in the resized frame (torchvision's centre crop), mapped back to the frame
        left, top = int(round((new_w - side) / 2.0)), int(round((new_h - side) / 2.0))
        scale_x, scale_y = width / new_w, height / new_h
        box = (left * scale_x, top * scale_y, (left + side) * scale_x, (top + side) * scale_y)
        return FrameInput(prepared, frame.resize((size, size), Image.Resampling.BICUBIC, box=box))


def prepare_chunk(frames: Iterator[Image.Image], preparer: FramePreparer, count: int) -> list[FrameInput]:
    """The next ``count`` frames (fewer at the end of the clip), prepared for the model."""
    chunk = []
    for frame in frames:
        chunk.append(preparer(frame))
        if len(chunk) == count:
            break
    return chunk


def attention_overlays(
    chunk: Sequence[FrameInput],
    attentions: Sequence[np.ndarray],
    grid: tuple[int, int],
    head: int | None,
    threshold: float | None,
) -> list[tuple[bytes, np.ndarray]]:
    """(overlay PNG, attention grid) of each frame, from the model's ``attention`` output [heads, N]:
    the same selection, threshold and rendering as ``POST /attention``."""
    overlays = []
    for frame, attention in zip(chunk, attentions, strict=True):
        attention_map = select_head(attention, grid, head)
        mask = mass_threshold_mask(attention_map, threshold) if threshold is not None else None
        overlays.append((render_overlay(frame.display, attention_map, mask), attention_map))
    return overlays


class VideoOutputError(Exception):
    """The clip could not be written (a full disk, an encoder that refuses the frame size)."""


class ClipWriter(Protocol):
    """Where the overlays go, one frame at a time; ``finish`` returns the clip's bytes when it is
    written in memory (the service), else None (written to its file)."""

    frames: int
    codec: str

    def add(self, png: bytes, attention_map: np.ndarray) -> None: ...

    def finish(self) -> bytes | None: ...

    def abort(self) -> None: ...


def h264_available() -> bool:
    """Whether PyAV's FFmpeg has an H.264 encoder (the manylinux wheels bundle libx264)."""
    return "libx264" in av.codecs_available


class Mp4Writer:
    """An MP4 clip: H.264 (libx264) when PyAV has it, else MPEG-4 part 2; 4:2:0, which every player
    reads. Written to a temporary file beside the target (or in a temporary folder, for bytes) and moved
    in place at the end, so that a failed run leaves no half-written clip; the index is moved to the
    front of the file (faststart), so that a browser starts playing before the whole clip has arrived,
    which FFmpeg can only do with a file it can read back."""

    def __init__(self, target: Path | None, fps: Fraction, size: int):
        if size % 2:
            raise VideoOutputError(f"the frame size must be even for an MP4 (4:2:0 chroma), got {size}")
        self.target = target
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if target is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="dino-video-")
            self.path = Path(self._tmpdir.name) / "attention.mp4"
        else:
            self.path = target.with_name(f".{target.name}.partial")
        self.codec = "libx264" if h264_available() else "mpeg4"
        self.frames = 0
        self._closed = False
        try:
            self.container = av.open(str(self.path), mode="w", format="mp4", options={"movflags": "+faststart"})
        except (av.FFmpegError, OSError) as exc:
            self._closed = True
            self.abort()
            raise VideoOutputError(f"cannot write {target or 'the clip'}: {exc}") from exc
        try:
            stream = self.container.add_stream(self.codec, rate=fps)
            assert isinstance(stream, av.VideoStream)  # for mypy: a video codec gives a video stream
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            if self.codec == "libx264":
                stream.options = {"crf": H264_CRF, "preset": "medium"}
            else:
                stream.bit_rate = max(200_000, int(size * size * float(fps) * MPEG4_BITS_PER_PIXEL))
            self.stream = stream
        except av.FFmpegError as exc:
            self.abort()
            raise VideoOutputError(f"cannot encode {self.codec} at {size}x{size} pixels: {exc}") from exc

    def add(self, png: bytes, attention_map: np.ndarray) -> None:
        with Image.open(io.BytesIO(png)) as img:
            pixels = np.asarray(img.convert("RGB"))
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = self.frames
        try:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        except av.FFmpegError as exc:
            raise VideoOutputError(f"encoding frame {self.frames} failed: {exc}") from exc
        self.frames += 1

    def finish(self) -> bytes | None:
        try:
            for packet in self.stream.encode():  # flush the encoder's delayed frames
                self.container.mux(packet)
            self._closed = True
            self.container.close()  # writes the index (and moves it to the front)
            if self.target is None:
                return self.path.read_bytes()
            os.replace(self.path, self.target)
            return None
        except (av.FFmpegError, OSError) as exc:
            raise VideoOutputError(f"cannot write {self.target or 'the clip'}: {exc}") from exc
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the container and remove what is left of the temporary file (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self.container.close()
            except av.FFmpegError:
                pass  # a clip that failed to encode: only its file is left to remove
        if self.target is not None:
            self.path.unlink(missing_ok=True)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()


class ZipWriter:
    """A ZIP of the overlay PNGs (``frame_000000.png``, ... : exactly ``POST /attention``'s PNGs, at the
    output size) and ``attention.json``: ``info`` (model, grid, head, fps, ...) plus ``attention``, the
    grid of weights of every frame, as ``POST /attention?format=json`` gives them."""

    codec = "png"

    def __init__(self, target: Path | None, info: dict[str, Any]):
        self.target = target
        self.info = info
        self.frames = 0
        self.maps: list[list[list[float]]] = []
        self.path = target.with_name(f".{target.name}.partial") if target is not None else None
        try:
            self.buffer: io.BytesIO | Path = self.path if self.path is not None else io.BytesIO()
            # PNGs are compressed already: stored, not deflated again
            self.zip = zipfile.ZipFile(self.buffer, mode="w", compression=zipfile.ZIP_STORED)
        except OSError as exc:
            raise VideoOutputError(f"cannot write {target}: {exc.strerror or exc}") from exc

    def add(self, png: bytes, attention_map: np.ndarray) -> None:
        self.zip.writestr(ZIP_FRAME_NAME.format(self.frames), png)
        self.maps.append(attention_map.tolist())
        self.frames += 1

    def finish(self) -> bytes | None:
        body = {**self.info, "frames": self.frames, "attention": self.maps}
        try:
            self.zip.writestr(ZIP_ATTENTION_NAME, json.dumps(body), compress_type=zipfile.ZIP_DEFLATED)
            self.zip.close()
            if isinstance(self.buffer, io.BytesIO):
                return self.buffer.getvalue()
            os.replace(self.buffer, self.target)  # type: ignore[arg-type]
            return None
        except OSError as exc:
            self.abort()
            raise VideoOutputError(f"cannot write {self.target}: {exc.strerror or exc}") from exc

    def abort(self) -> None:
        self.zip.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class AttentionClip:
    """One attention clip in the making: frames come out of ``source`` in chunks, the caller runs the
    model on them, and :meth:`write` draws and encodes the overlays.

    Every step holds a lock. The service runs the steps in its worker threads, and when a request is
    cancelled in the middle of one, its :meth:`close` (from another thread) must wait for that step to
    end: FFmpeg's decoders and encoders must never be used by two threads at once.
    """

    def __init__(
        self,
        source: FrameSource,
        preparer: FramePreparer,
        writer: Mp4Writer | ZipWriter,
        grid: tuple[int, int],
        head: int | None,
        threshold: float | None,
    ):
        self.source = source
        self.preparer = preparer
        self.writer = writer
        self.grid = grid
        self.head = head
        self.threshold = threshold
        self._frames = source.frames()
        self._lock = threading.Lock()

    @property
    def fps(self) -> Fraction:
        return self.source.fps

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return self.writer.frames

    def next_chunk(self, count: int) -> list[FrameInput]:
        """The next ``count`` frames (fewer at the end, none after it), decoded and prepared."""
        with self._lock:
            return prepare_chunk(self._frames, self.preparer, count)

    def write(self, chunk: Sequence[FrameInput], attentions: Sequence[np.ndarray]) -> None:
        """Draw and encode the overlays of a chunk from the model's ``attention`` outputs."""
        with self._lock:
            for png, attention_map in attention_overlays(chunk, attentions, self.grid, self.head, self.threshold):
                self.writer.add(png, attention_map)

    def finish(self) -> bytes | None:
        """Complete the clip: its bytes when written in memory, else None (moved to its file)."""
        with self._lock:
            return self.writer.finish()

    def close(self) -> None:
        """Release the decoder and anything half written (idempotent; after :meth:`finish` too)."""
        with self._lock:
            self._frames.close()
            self.source.close()
            self.writer.abort()


def open_writer(
    target: Path | None, kind: str, fps: Fraction, size: int, info: dict[str, Any]
) -> Mp4Writer | ZipWriter:
    """A writer of ``kind`` ("mp4" or "zip") to the file ``target``, or to memory when it is None."""
    if kind == "zip":
        return ZipWriter(target, {**info, "fps": float(fps), "size": size})
    return Mp4Writer(target, fps, size)
