"""``dino import``: pretrained ViT weights as an ONNX model folder, fully offline.

Reads official DINO releases, timm state dicts (``.pth``, ``.bin``, ``.safetensors``) and this
project's checkpoints (:mod:`training.weights` says which layouts and how they are checked), then
exports them as ``dino export`` does (:mod:`training.export_cli`). Pickled files are loaded with
``weights_only=True``: no code in a downloaded file is executed, and nothing is written unless the
weights fit the named architecture exactly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.backbone import ARCHS, PATCH_SIZES
from training.export_cli import add_export_options, configure_logging, export_with_options, print_summary
from training.export_graph import ExportError
from training.weights import DEFAULT_IMAGE_SIZE, WeightsError, load_backbone_weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="weights file (.pth, .bin, .safetensors)")
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS), help="architecture the weights belong to")
    parser.add_argument("--patch-size", type=int, required=True, choices=PATCH_SIZES, help="patch size of the weights")
    parser.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help=f"native resolution (default {DEFAULT_IMAGE_SIZE})"
    )
    add_export_options(parser)


def main(args: argparse.Namespace) -> int:
    configure_logging()
    output = Path(args.output)
    try:
        backbone, provenance = load_backbone_weights(args.weights, args.arch, args.patch_size, args.image_size)
        metadata = export_with_options(
            backbone,
            args,
            arch=args.arch,
            patch_size=args.patch_size,
            image_size=args.image_size,
            provenance=provenance,
        )
    except (ExportError, WeightsError) as exc:
        print(f"dino import: {exc}", file=sys.stderr)
        return 1
    print(f"imported {args.weights} ({provenance['source_format']})")
    print_summary(metadata, output)
    return 0
