"""Small builders shared by the data tests (not a test module itself)."""

from __future__ import annotations

import io
import tarfile

import numpy as np

from rgfusion.datasets.schema import Manifest, Sample, SplitInfo
from rgfusion.datasets.text import Vocab
from rgfusion.datasets.writer import ShardWriter, shard_name, write_manifest, write_vocab

DR, DG, GRID, MAXR = 8, 6, (2, 3), 5


def make_sample(i: int, split: str = "train", n_regions: int | None = None) -> Sample:
    rng = np.random.default_rng(i)
    n = int(rng.integers(0, MAXR + 1)) if n_regions is None else n_regions
    xy = rng.uniform(0, 0.5, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 0.5, (n, 2))], 1).astype(np.float32)
    return Sample(
        image_id=f"{split}/img.{i}",
        region=rng.random((n, DR)).astype(np.float16),
        boxes=boxes,
        grid=rng.random((GRID[0] * GRID[1], DG)).astype(np.float16),
        captions=[f"a photo number {i} variant {k}" for k in range(5)],
        width=640, height=480,
    )


def write_dataset(root: str, shard_sizes: dict[str, list[int]], storage_options: dict | None = None
                  ) -> dict[str, list[Sample]]:
    """Dataset with exactly the given samples per shard (uneven on purpose); returns the samples."""
    out, splits, offset = {}, {}, 0
    for split, sizes in shard_sizes.items():
        samples = []
        for index, size in enumerate(sizes):
            with ShardWriter(root, split, storage_options=storage_options, samples_per_shard=max(size, 1),
                             start_index=index) as w:
                for j in range(size):
                    s = make_sample(offset, split)
                    offset += 1
                    w.write(s)
                    samples.append(s)
            if size == 0:  # an empty shard: the writer never opens one, so write an empty tar
                write_raw_shard(root, split, index, [], storage_options)
        out[split] = samples
        splits[split] = SplitInfo([shard_name(split, i) for i in range(len(sizes))], list(sizes), sum(sizes))
    write_vocab(root, Vocab.build(c for s in out.get("train", []) for c in s.captions), storage_options)
    write_manifest(root, Manifest("test", DR, DG, GRID, MAXR, 5, splits), storage_options)
    return out


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_raw_shard(root: str, split: str, index: int, members: list[tuple[str, bytes]],
                    storage_options: dict | None = None) -> None:
    from rgfusion.datasets.storage import join_url, publish_bytes

    publish_bytes(join_url(root, shard_name(split, index)), tar_bytes(members), storage_options)


def sample_members(s: Sample) -> list[tuple[str, bytes]]:
    return [(f"{s.key}.{k}", v) for k, v in s.to_members().items()]
