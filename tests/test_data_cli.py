"""``rgfusion data synth|inspect|bench`` through the argparse tree the datasets module registers."""

from __future__ import annotations

import argparse
import json

import pytest

from rgfusion.datasets import cli


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rgfusion")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


SMALL = ["--set", "train_images=40", "--set", "dev_images=10", "--set", "test_images=10",
         "--set", "samples_per_shard=16", "--quiet"]


def test_synth_inspect_bench(tmp_path, capsys):
    root = str(tmp_path / "ds")
    assert run(["data", "synth", "--out", root, *SMALL, "--set", "grid_size=[3,5]"]) == 0
    out = capsys.readouterr().out
    assert "40 images in    3 shards" in out and "grid: 3x5 x 64" in out
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["grid_size"] == [3, 5] and manifest["meta"]["config"]["train_images"] == 40

    assert run(["data", "inspect", root, "--shards", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == 5 and "BAD" not in out

    assert run(["data", "bench", root, "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "read 40 images" in out and "images/s" in out and "MB/s" in out
    assert run(["data", "bench", root, "--mode", "train", "--steps", "3", "--batch-size", "4",
                "--workers", "2"]) == 0
    assert "read 12 images" in capsys.readouterr().out
    assert run(["data", "bench", root, "--mode", "train", "--steps", "9", "--batch-size", "4",
                "--workers", "2", "--reuse-memory"]) == 0
    assert "read 36 images" in capsys.readouterr().out


def test_inspect_reports_a_bad_shard(tmp_path, capsys):
    root = tmp_path / "ds"
    assert run(["data", "synth", "--out", str(root), *SMALL]) == 0
    shard = root / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    assert run(["data", "inspect", str(root), "--shards", "0"]) == 1
    captured = capsys.readouterr()
    assert "BAD train/train-000001.tar" in captured.out and "bad_tar" in captured.err


def test_missing_dataset_is_one_line(tmp_path, capsys):
    assert run(["data", "inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rgfusion: error: no dataset manifest:") and "\n" not in err


def test_bad_synth_option_names_the_key(tmp_path):
    from rgfusion.configs import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'regions'"):
        run(["data", "synth", "--out", str(tmp_path), "--set", "regions=3"])
    assert run(["data", "synth", "--out", str(tmp_path), "--set", "max_regions=2"]) == 2
