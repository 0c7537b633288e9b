"""Schema, shard writer and caption text."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import DR, make_sample

from rgfusion.datasets.schema import Manifest, Sample, SchemaError, SplitInfo, sanitize_key
from rgfusion.datasets.text import HFProcessor, Vocab, VocabProcessor, tokenize
from rgfusion.datasets.writer import (
    ShardWriter, complete_prefix, existing_shards, remove_stale_tmp, write_manifest,
)


def test_sanitize_key_is_injective_and_dot_free():
    ids = ["a.b", "a_b", "a~2eb", "a/b", "COCO_val2014_000000391895.jpg", "é", "e\u0301", "x y", "1"]
    keys = [sanitize_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert sanitize_key("abc_12-3") == "abc_12-3"


@pytest.mark.parametrize("change, match", [
    (dict(region=np.zeros((2, DR), np.float32)), "region must be float16"),
    (dict(boxes=np.zeros((3, 4), np.float32)), r"boxes must have shape \(2, 4\)"),
    (dict(grid=np.zeros((6,), np.float16)), "grid must have shape"),
    (dict(boxes=np.array([[0, 0, 30, 40]] * 2, np.float32)), "normalised"),
    (dict(boxes=np.array([[0.5, 0, 0.2, 0.4]] * 2, np.float32)), "x2>=x1"),
    (dict(region=np.full((2, DR), np.nan, np.float16)), "NaN"),
    (dict(captions=[]), "no captions"),
    (dict(width=0), "width"),
])
def test_sample_validation_names_the_problem(change, match):
    s = make_sample(0, n_regions=2)
    bad = Sample(**{**s.__dict__, **change})
    with pytest.raises(SchemaError, match=match):
        bad.validate()


def test_members_round_trip():
    s = make_sample(3)
    back = Sample.from_members(s.to_members())
    assert back.image_id == s.image_id and back.captions == s.captions
    for name in ("region", "boxes", "grid"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name))


def manifest(**split_kw) -> Manifest:
    info = dict(shards=["train-000000.tar", "train-000001.tar"], samples_per_shard=[3, 2], num_samples=5)
    info.update(split_kw)
    return Manifest("t", 8, 6, (2, 3), 5, 5, {"train": SplitInfo(**info)})


def test_manifest_json_round_trip():
    m = manifest(protocol="coco1k5fold", folds=[[0, 2], [2, 5]])
    back = Manifest.from_json(m.to_json(), root="/x")
    assert back == m and back.root == "/x" and back.grid_size == (2, 3)
    assert back.shard_urls("train") == ["/x/train-000000.tar", "/x/train-000001.tar"]


@pytest.mark.parametrize("kw, match", [
    (dict(num_samples=6), "sums to 5"),
    (dict(samples_per_shard=[5]), "2 shards but 1"),
    (dict(protocol="flickr5k"), "protocol must be one of"),
    (dict(folds=[[0, 9]]), "fold"),
])
def test_manifest_validation(kw, match):
    with pytest.raises(SchemaError, match=match):
        Manifest.from_json(json.dumps({**json.loads(manifest().to_json()),
                                       "splits": {"train": {**json.loads(manifest().to_json())["splits"]["train"],
                                                            **kw}}}))


def test_manifest_rejects_unknown_keys_and_versions():
    d = json.loads(manifest().to_json())
    with pytest.raises(SchemaError, match="unknown key"):
        Manifest.from_json(json.dumps({**d, "extra": 1}))
    with pytest.raises(SchemaError, match="schema_version 2"):
        Manifest.from_json(json.dumps({**d, "schema_version": 2}))


def shard_counts(path: Path) -> dict[str, int]:
    return {p.name: len(tarfile.open(p).getnames()) // 4 for p in sorted(path.glob("*.tar"))}


def test_fixed_shard_boundaries_and_deterministic_bytes(tmp_path):
    for out in ("a", "b"):
        with ShardWriter(str(tmp_path / out), "train", samples_per_shard=4) as w:
            for i in range(10):
                w.write(make_sample(i))
        assert w.close() == [("train-000000.tar", 4), ("train-000001.tar", 4), ("train-000002.tar", 2)]
    assert shard_counts(tmp_path / "a") == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2}
    for name in ("train-000000.tar", "train-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    first = tarfile.open(tmp_path / "a" / "train-000000.tar").getnames()[:4]
    assert first == [f"{make_sample(0).key}.{m}" for m in ("region.npy", "boxes.npy", "grid.npy", "json")]


def test_max_bytes_mode_keeps_shards_under_the_limit(tmp_path):
    with ShardWriter(str(tmp_path), "dev", max_bytes=12_000) as w:
        for i in range(12):
            w.write(make_sample(i, n_regions=4))
    shards = w.close()
    assert sum(c for _, c in shards) == 12 and len(shards) > 1
    assert all((tmp_path / n).stat().st_size <= 12_000 + 1024 for n, _ in shards)  # + tar end blocks


def test_failed_write_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(str(tmp_path), "train", samples_per_shard=3) as w:
            for i in range(4):
                w.write(make_sample(i))
            raise RuntimeError("boom")
    # shard 0 was complete and is published; shard 1 was in progress and left no trace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


def test_writer_rejects_duplicates_and_mixed_dims(tmp_path):
    with ShardWriter(str(tmp_path), "train") as w:
        w.write(make_sample(1))
        with pytest.raises(SchemaError, match="duplicate image_id"):
            w.write(make_sample(1))
        s = make_sample(2)
        with pytest.raises(SchemaError, match="grid must have shape"):
            w.write(Sample(**{**s.__dict__, "grid": np.zeros((7, 6), np.float16)}))


def test_existing_shards_and_resume_point_ignore_temporaries(tmp_path):
    for name in ("train-000000.tar", "train-000001.tar", "train-000003.tar", "train-000002.tar.tmp-1-ab",
                 "dev-000000.tar", "train-12.tar"):
        (tmp_path / name).write_bytes(b"x")
    assert existing_shards(str(tmp_path), "train") == ["train-000000.tar", "train-000001.tar", "train-000003.tar"]
    assert complete_prefix(str(tmp_path), "train") == 2
    assert complete_prefix(str(tmp_path / "missing"), "train") == 0
    assert remove_stale_tmp(str(tmp_path)) == 1


def test_manifest_is_written_atomically(tmp_path):
    write_manifest(str(tmp_path), manifest())
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert Manifest.from_json((tmp_path / "manifest.json").read_text()) == manifest()


def test_vocab_build_encode_and_round_trip():
    v = Vocab.build(["A dog, a DOG!", "a cat"], min_count=2)
    assert list(v.word_to_index)[:4] == ["<pad>", "<unk>", "<start>", "<end>"]
    assert set(v.word_to_index) == {"<pad>", "<unk>", "<start>", "<end>", "a", "dog"}
    assert v.encode("a cat dog") == [2, v.word_to_index["a"], 1, v.word_to_index["dog"], 3]
    assert v.encode("a a a a a", max_words=4) == [2, 4, 4, 3]
    assert Vocab.from_json(v.to_json()) == v
    assert tokenize("It's a Red-car.") == ["it", "s", "a", "red", "car"]


def test_vocab_processor_pads_and_masks():
    v = Vocab.build(["one two three four"])
    tokens, lengths, mask = VocabProcessor(v, max_words=5)(["one", "one two three four"])
    assert tokens.shape == (2, 5) and lengths.tolist() == [3, 5]
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert tokens[0, 3:].tolist() == [0, 0] and tokens.dtype == torch.long


def test_hf_tokenizer_from_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "red", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(tmp_path)
    proc = HFProcessor(tmp_path, max_words=3)
    tokens, lengths, mask = proc(["a red dog", "a cat"])
    assert proc.vocab_size == 5
    assert tokens.tolist() == [[2, 3, 4], [2, 1, 0]] and lengths.tolist() == [3, 2]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFProcessor(tmp_path / "nope", max_words=3)
