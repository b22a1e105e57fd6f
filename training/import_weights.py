"""``dino import``: pretrained ViT weights as an ONNX model folder.

The weights come from a local file (``--weights``: official DINO releases, timm state dicts as
``.pth``, ``.bin``, ``.safetensors``, and this project's checkpoints; :mod:`training.weights` says
which layouts and how they are checked), from an official DINO backbone by name (``--name
dino_vits16``: Caron et al. 2021's releases, downloaded once into a cache by
:mod:`training.download`), or from any URL (``--url``). They are exported as ``dino export`` does
(:mod:`training.export_cli`). Pickled files are loaded with ``weights_only=True``: no code in a
downloaded file is executed, and nothing is written unless the weights fit the architecture exactly.
A downloaded file that cannot be read is deleted from the cache, never reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.nn as nn

from training.backbone import ARCHS, PATCH_SIZES
from training.download import (
    CACHE_ENV,
    DEFAULT_CACHE_DIR,
    MIRROR_ENV,
    OFFICIAL_WEIGHTS,
    DownloadError,
    OfficialWeights,
    cache_path,
    cache_root,
    download,
    mirror_url,
    official_for_url,
    official_url,
    offline_hint,
)
from training.export_cli import add_export_options, configure_logging, export_with_options, print_summary
from training.export_graph import ExportError
from training.weights import DEFAULT_IMAGE_SIZE, UnreadableWeightsError, WeightsError, load_backbone_weights

#: exit code of a command line that cannot work (argparse uses the same)
USAGE_ERROR = 2


class UsageError(Exception):
    """Flags that do not go together; reported in one line with exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_export_options(parser, model_name_flag="--model-name")  # here --name picks the official release
    sources = parser.add_argument_group("weights (one of)")
    source = sources.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="local weights file (.pth, .bin, .safetensors)")
    source.add_argument(
        "--name",
        dest="release",
        choices=sorted(OFFICIAL_WEIGHTS),
        help=f"official DINO backbone, downloaded into the cache (${MIRROR_ENV}=BASE: a mirror of the official host)",
    )
    source.add_argument("--url", help="download the weights file from this URL (into the cache)")
    parser.add_argument(
        "--arch", choices=sorted(ARCHS), help="architecture of the weights (known for --name and official files)"
    )
    parser.add_argument("--patch-size", type=int, choices=PATCH_SIZES, help="patch size of the weights (likewise)")
    parser.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help=f"native resolution (default {DEFAULT_IMAGE_SIZE})"
    )
    parser.add_argument(
        "--cache-dir", default=None, help=f"download cache (default: ${CACHE_ENV}, else {DEFAULT_CACHE_DIR})"
    )
    parser.add_argument("--quiet", action="store_true", help="no download progress bar")


def resolve_architecture(args: argparse.Namespace, official: OfficialWeights | None) -> tuple[str, int]:
    """(arch, patch size) from the flags, or from the official release; they must agree when both given."""
    if official is not None:
        for flag, given, known in (
            ("--arch", args.arch, official.arch),
            ("--patch-size", args.patch_size, official.patch_size),
        ):
            if given is not None and given != known:
                raise UsageError(f"{official.name} is {official.arch}/{official.patch_size}, not {flag} {given}")
        return official.arch, official.patch_size
    if args.arch is None or args.patch_size is None:
        source = f"--url {args.url}" if args.url else f"--weights {args.weights}"
        raise UsageError(f"{source} needs --arch and --patch-size (they are known only for the official files)")
    return args.arch, int(args.patch_size)


def load_downloaded_weights(
    url: str,
    arch: str,
    patch_size: int,
    image_size: int,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """The backbone of the weights at ``url``, downloaded into the cache unless already there.

    ``url`` is the official URL for an official release (the cache key); ``$DINO_IMPORT_MIRROR``
    replaces its host for the download. A cached file that cannot be read (a disk error, an older
    tool's partial file) is deleted and downloaded again; a freshly downloaded one that cannot be read
    is deleted and reported. Weights that do not fit ``arch``/``patch_size`` are reported as such and
    the file is kept (it is not the file that is wrong).
    """
    path = cache_path(url, cache_root(cache_dir))
    source_url = mirror_url(url)
    for cached in (path.is_file(), False):
        if cached:
            print(f"using the cached {path}", file=sys.stderr)
        else:
            print(f"downloading {source_url}", file=sys.stderr)
            download(source_url, path, progress=progress)
        try:
            backbone, provenance = load_backbone_weights(path, arch, patch_size, image_size)
        except UnreadableWeightsError as exc:
            path.unlink(missing_ok=True)
            if cached:
                print(f"the cached file is unreadable ({exc}); deleted it, downloading again", file=sys.stderr)
                continue
            raise WeightsError(f"the file downloaded from {source_url} is unreadable and was deleted: {exc}") from exc
        return backbone, {**provenance, "source_url": source_url}
    raise AssertionError("unreachable: the second pass downloads or raises")


def main(args: argparse.Namespace) -> int:
    configure_logging()
    output = Path(args.output)
    # a release by name, or an official file named by its URL or by a local file's name
    given = args.url or args.weights
    official = OFFICIAL_WEIGHTS[args.release] if args.release else official_for_url(given) if given else None
    try:
        arch, patch_size = resolve_architecture(args, official)
    except UsageError as exc:
        print(f"dino import: {exc}", file=sys.stderr)
        return USAGE_ERROR
    url = official_url(OFFICIAL_WEIGHTS[args.release]) if args.release else args.url
    try:
        if args.weights:
            backbone, provenance = load_backbone_weights(args.weights, arch, patch_size, args.image_size)
        else:
            backbone, provenance = load_downloaded_weights(
                url, arch, patch_size, args.image_size, cache_dir=args.cache_dir, progress=not args.quiet
            )
            if args.release:
                provenance["release"] = args.release
        metadata = export_with_options(
            backbone, args, arch=arch, patch_size=patch_size, image_size=args.image_size, provenance=provenance
        )
    except DownloadError as exc:
        print(f"dino import: {exc}. Offline? {offline_hint(url, arch, patch_size)}", file=sys.stderr)
        return 1
    except (ExportError, WeightsError) as exc:
        print(f"dino import: {exc}", file=sys.stderr)
        return 1
    source = args.weights or provenance["source_url"]  # the URL fetched (a mirror's, when set)
    print(f"imported {source} ({provenance['source_format']}, {arch}/{patch_size})")
    print_summary(metadata, output)
    return 0
