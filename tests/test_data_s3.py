"""Writer and reader against a real S3-protocol server (moto) through s3fs."""

from __future__ import annotations

import boto3
import numpy as np
import pytest
from data_helpers import write_dataset

from rgfusion.datasets import DataConfig, build_text_processor, eval_loader, load_manifest, train_loader
from rgfusion.datasets.storage import DatasetNotFound, publish_bytes, read_bytes
from rgfusion.datasets.writer import complete_prefix, existing_shards


def keys(endpoint: str, bucket: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_write_and_read_through_s3(s3_endpoint, s3_bucket, storage_options):
    root = f"s3://{s3_bucket}/ds"
    samples = write_dataset(root, {"train": [3, 2], "dev": [4, 1]}, storage_options)
    assert keys(s3_endpoint, s3_bucket) == [
        "ds/dev-000000.tar", "ds/dev-000001.tar", "ds/manifest.json",
        "ds/train-000000.tar", "ds/train-000001.tar", "ds/vocab.json"]  # no temporary keys left behind
    assert existing_shards(root, "train", storage_options) == ["train-000000.tar", "train-000001.tar"]
    assert complete_prefix(root, "dev", storage_options) == 2

    m = load_manifest(root, storage_options)
    cfg = DataConfig(url=root, storage_options=storage_options, num_workers=2, shuffle_buffer=4,
                     dtype="float16", block_size=1 << 20)
    text = build_text_processor(cfg, m)
    by_id = {s.image_id: s for s in samples["dev"]}
    got = {}
    for rank in range(2):
        for b in eval_loader(cfg, m, text, split="dev", batch_size=2, rank=rank, world_size=2):
            for i, image_id in enumerate(b.image_ids):
                got[image_id] = b.grids[i].numpy()
    assert sorted(got) == sorted(by_id)
    for image_id, grid in got.items():
        np.testing.assert_array_equal(grid, by_id[image_id].grid)
    assert sum(1 for _ in train_loader(cfg, m, text, batch_size=2, steps=3, rank=0, world_size=1,
                                       seed=0, epoch=0)) == 3


def test_missing_bucket_is_one_clear_error(s3_endpoint, storage_options):
    with pytest.raises(DatasetNotFound, match=rf"bucket 'no-such-bucket' does not exist at {s3_endpoint}"):
        load_manifest("s3://no-such-bucket/ds", storage_options)


def test_missing_manifest_is_one_clear_error(s3_bucket, storage_options):
    with pytest.raises(DatasetNotFound, match=rf"no dataset manifest: s3://{s3_bucket}/ds/manifest.json: "
                                              "object not found"):
        load_manifest(f"s3://{s3_bucket}/ds", storage_options)


def test_publish_is_atomic_and_overwrites(s3_endpoint, s3_bucket, storage_options):
    url = f"s3://{s3_bucket}/x/file.bin"
    publish_bytes(url, b"one", storage_options)
    publish_bytes(url, b"two", storage_options)
    assert read_bytes(url, storage_options) == b"two"
    assert keys(s3_endpoint, s3_bucket) == ["x/file.bin"]
