"""The ``dino`` command: the one place that names both ``training`` and ``service``.

Each subcommand lives in its own module of one of them and is imported only when used, so that the
serving install (no torch) can run ``dino serve`` while ``dino train`` needs the ``train`` extra.
Several processes or machines train with ``torchrun -m dino.cli train ...``.

A command module exposes ``add_arguments(parser)`` and ``main(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: the project's own packages: a missing module of these is a bug, not a missing extra
PROJECT_PACKAGES = ("dino", "training", "service")
#: name -> (module, one-line help, the extras that provide its dependencies)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "training.train",
        "train DINO on an image folder (resumes if the output folder has a checkpoint)",
        "train",
    ),
    "knn": ("training.knn", "weighted k-NN evaluation of a checkpoint's teacher (DINO protocol)", "train"),
    "linear": ("training.linear_probe", "linear probe on frozen features (the paper's linear evaluation)", "train"),
    "export": ("training.export_cli", "export a checkpoint's teacher backbone to an ONNX model folder", "train"),
    "import": ("training.import_weights", "convert official DINO / timm weights to an ONNX model folder", "train"),
    "serve": ("service.server", "serve a model folder over HTTP", "serve"),
    "index": ("service.index_cli", "build a gallery index offline", "serve"),
    "embed": (
        "service.batch_embedding",
        "embed an image folder into a Parquet dataset (resumable, Ray)",
        "serve,embed",
    ),
    "retrieval": (
        "service.evaluation.retrieval",
        "image retrieval on labelled folders (mAP, recall@k) through the gallery",
        "serve",
    ),
    "copydetect": (
        "service.evaluation.copydetect",
        "copy detection on generated strong copies (µAP, recall@1)",
        "serve",
    ),
    "attention-video": (
        "service.attention_video_cli",
        "per-frame [CLS] attention of a video or frame folder, as an MP4 (like DINO's video_generation.py)",
        "serve,video",
    ),
}


def _usage() -> str:
    lines = ["usage: dino <command> [options]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {help_}" for name, (_, help_, _) in COMMANDS.items()]
    lines += ["", "Run 'dino <command> --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dino: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_, extra = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in PROJECT_PACKAGES:
            raise
        print(
            f"dino {name}: missing dependency {exc.name!r}; install the extras it needs: pip install '.[{extra}]'",
            file=sys.stderr,
        )
        return 1
    parser = argparse.ArgumentParser(prog=f"dino {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print(f"dino {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
