"""``dino attention-video``: a video (or a folder of frames) -> a clip of its per-frame DINO [CLS]
attention, like the reference's ``video_generation.py``.

    dino attention-video --model models/NAME --input clip.mp4 --output attention.mp4 [--fps N]
        [--head mean|INDEX] [--threshold F] [--max-frames N] [--size PX]

Each frame goes through the model's evaluation transform (what ``POST /attention`` does to an image),
the model runs on batches of frames, and each frame's heatmap is drawn by the service's overlay (the
PNG ``POST /attention`` answers) at ``--size`` pixels. An output ending in ``.zip`` holds the PNG frames
and the attention grids (``attention.json``) instead of an MP4. Bad input (a corrupt or unsupported
video, an empty folder, a head the model does not have) is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from dino.model_folder import METADATA_FILE
from service.preprocess import Preprocessor
from service.runtime import ModelLoadError, ModelSpec, OnnxModel
from service.settings import ModelNotFoundError, ServiceSettings
from service.video import (
    DEFAULT_OUTPUT_SIZE,
    AttentionClip,
    FrameFolderSource,
    FramePreparer,
    FrameSource,
    VideoFileSource,
    VideoInputError,
    VideoLimits,
    VideoOutputError,
    open_writer,
)

PROG = "dino attention-video"
#: output kinds by file extension
OUTPUT_KINDS = {".mp4": "mp4", ".zip": "zip"}
#: smallest output frame side
MIN_SIZE = 16


class UsageError(Exception):
    """An option out of range (reported as one line, exit code 1)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: DINO_MODEL_DIR, else the first folder of models/)")
    parser.add_argument("--input", required=True, help="a video file (MP4/MOV, MKV/WebM, AVI) or a folder of frames")
    parser.add_argument(
        "--output", required=True, help="the attention clip: OUT.mp4, or OUT.zip for PNG frames + attention.json"
    )
    parser.add_argument(
        "--fps",
        type=float,
        default=None,
        help="output frame rate; a video is sampled at this rate (default: the video's own, at most that; "
        "25 for a frame folder)",
    )
    parser.add_argument("--head", default="mean", help="attention head index, or 'mean' (default) for the average")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="dim the patches outside this fraction of the attention mass (DINO's figures use 0.6)",
    )
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many output frames")
    parser.add_argument(
        "--size",
        type=int,
        default=DEFAULT_OUTPUT_SIZE,
        help=f"side of the output frames in pixels, even (default {DEFAULT_OUTPUT_SIZE}; the model's image size "
        "gives exactly the PNGs of POST /attention)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="frames per inference call (default 16)")
    parser.add_argument(
        "--provider", choices=["auto", "cpu", "cuda"], default=None, help="default: DINO_PROVIDER or auto"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_head(head: str, num_heads: int) -> int | None:
    """'mean' -> None, else a head index of the model."""
    if head == "mean":
        return None
    if not head.isdigit() or not 0 <= int(head) < num_heads:
        raise UsageError(f"--head must be 'mean' or a head index 0..{num_heads - 1} (the model has {num_heads})")
    return int(head)


def check_options(args: argparse.Namespace) -> str:
    """The output kind ("mp4" or "zip"), once every option is in range."""
    kind = OUTPUT_KINDS.get(Path(args.output).suffix.lower())
    if kind is None:
        raise UsageError(f"--output must end in .mp4 or .zip, got {args.output}")
    if args.fps is not None and not 0 < args.fps <= 1000:
        raise UsageError(f"--fps must be above 0 (and at most 1000), got {args.fps:g}")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise UsageError(f"--threshold must be in (0, 1], got {args.threshold:g}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames must be at least 1, got {args.max_frames}")
    if args.size < MIN_SIZE or (kind == "mp4" and args.size % 2):
        raise UsageError(f"--size must be at least {MIN_SIZE} pixels and even for an MP4, got {args.size}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    return kind


def open_source(path: Path, fps: float | None, limits: VideoLimits, settings: ServiceSettings) -> FrameSource:
    """A video file or a folder of frames."""
    if path.is_dir():
        return FrameFolderSource(path, fps, limits, settings.max_image_pixels, settings.max_jpeg_scans)
    if not path.is_file():
        raise UsageError(f"--input {path}: no such file or folder")
    return VideoFileSource(path, fps, limits)


def make_clip(args: argparse.Namespace, progress: bool = True) -> str:
    """Run the command; returns the summary line."""
    started = time.perf_counter()
    kind = check_options(args)
    overrides = {"model_dir": args.model, "provider": args.provider}
    settings = ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
    model_dir = settings.resolved_model_dir()
    spec = ModelSpec.from_json(model_dir / METADATA_FILE)
    head = parse_head(str(args.head), spec.num_heads)  # before the (slow) model load and decoding
    source = open_source(Path(args.input), args.fps, VideoLimits(max_frames=args.max_frames), settings)
    model = OnnxModel.from_settings(settings, model_dir)
    preparer = FramePreparer(Preprocessor.for_model(spec, settings.max_image_pixels).transform, args.size)
    info = {
        "model": spec.name,
        "grid": list(spec.grid),
        "heads": spec.num_heads,
        "head": "mean" if head is None else head,
        "threshold": args.threshold,
    }
    output = Path(args.output)
    clip = AttentionClip(
        source, preparer, open_writer(output, kind, source.fps, args.size, info), spec.grid, head, args.threshold
    )
    try:
        with tqdm(total=source.expected_frames, unit="frame", desc="attention", disable=not progress) as bar:
            while chunk := clip.next_chunk(args.batch_size):
                attentions = model.run(np.stack([frame.prepared.tensor for frame in chunk]), ["attention"])
                clip.write(chunk, list(attentions["attention"]))
                bar.update(len(chunk))
        clip.finish()
    finally:
        clip.close()
    seconds = time.perf_counter() - started
    return (
        f"wrote {clip.frames} frames at {float(clip.fps):g} fps ({args.size}x{args.size}, {clip.writer.codec}) "
        f"to {output} in {seconds:.1f} s"
    )


def main(args: argparse.Namespace) -> int:
    try:
        print(make_clip(args, progress=not args.no_progress))
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"{PROG}: {first['msg']} ({'.'.join(map(str, first['loc'])) or 'settings'})", file=sys.stderr)
        return 1
    except VideoInputError as exc:
        print(f"{PROG}: {args.input}: {exc}", file=sys.stderr)
        return 1
    except (UsageError, VideoOutputError, ModelNotFoundError, ModelLoadError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: {exc.strerror or exc}: {exc.filename or args.input}", file=sys.stderr)
        return 1
    return 0
