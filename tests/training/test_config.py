"""Training configuration: a YAML file, then command-line flags over it; unknown keys refused."""

from __future__ import annotations

import argparse

import pytest
import torch

from training import distributed
from training.config import TrainConfig, add_config_arguments, config_from_args


def test_config_yaml_then_flags(tmp_path):
    import argparse

    (tmp_path / "c.yaml").write_text("arch: vit_tiny\nlr: 0.01\nlocal_crops: 4\nhead_bn: true\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.5"]))
    assert (cfg.arch, cfg.lr, cfg.local_crops, cfg.head_bn, cfg.epochs) == ("vit_tiny", 0.5, 4, True, 100)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"not_a_key": 1})


def test_help_shows_every_field_comment(capsys):
    """``dino train --help`` documents each config field with its source comment, not only its default."""
    from dataclasses import fields

    from training.config import field_comments

    comments = field_comments(TrainConfig)
    assert sorted(comments) == sorted(f.name for f in fields(TrainConfig))  # every field has a #: comment
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "K, prototypes of the DINO head (default: 65536)" in text
    assert "area range of the local crops (default: (0.05, 0.4))" in text


@pytest.mark.parametrize(
    ("asked", "device", "native_bf16", "expected"),
    [
        ("auto", "cpu", True, "bf16"),
        ("auto", "cpu", False, "fp32"),
        ("auto", "cuda", False, "bf16"),
        ("fp32", "cpu", True, "fp32"),
        ("bf16", "cpu", False, "bf16"),
    ],
)
def test_auto_precision_is_bf16_where_the_hardware_computes_it(monkeypatch, asked, device, native_bf16, expected):
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: native_bf16)
    assert distributed.resolve_precision(asked, torch.device(device)) == expected
