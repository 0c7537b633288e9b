"""trainer/graphs.py on a CPU: padded caption slots change no embedding, and graphs are keyed by
shape. Capture and replay themselves need CUDA: tests/test_gpu.py compares captured trainer
steps with eager ones."""

from __future__ import annotations

import pytest
import torch

from rgfusion.datasets import Batch
from rgfusion.trainer.graphs import count_bad, pad_words, shape_key, take_bad
from rgfusion.trainer.model import ModelConfig, TextConfig, build_model

torch.set_num_threads(1)


def caption_batch(words: int, vocab: int = 50) -> Batch:
    g = torch.Generator().manual_seed(words)
    lengths = torch.tensor([words, max(words - 3, 1), 2])
    mask = torch.arange(words)[None] < lengths[:, None]
    tokens = torch.randint(4, vocab, (3, words), generator=g).masked_fill(~mask, 0)
    return Batch(regions=torch.zeros(3, 2, 4), boxes=torch.zeros(3, 2, 4), region_mask=torch.ones(3, 2, dtype=torch.bool),
                 grids=torch.zeros(3, 4, 4), grid_size=(2, 2), tokens=tokens, lengths=lengths,
                 attention_mask=mask, caption_image=torch.arange(3), image_ids=["a", "b", "c"])


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32, vocab_size=50)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("encoder", ["bigru", "bert"])
def test_padded_word_slots_change_no_caption_embedding(encoder, request):
    text = TextConfig(encoder="hf", hf_path=request.getfixturevalue("bert_path")) if encoder == "bert" \
        else TextConfig(word_dim=8)
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=16, heads=2, map_heads=2, text=text), region_dim=4, grid_dim=4,
                        grid_size=(2, 2), vocab_size=50).eval()
    batch = caption_batch(11)
    padded = pad_words(batch, 8)
    assert padded.tokens.shape == (3, 16) and padded.attention_mask.shape == (3, 16)
    assert not padded.attention_mask[:, 11:].any() and torch.equal(padded.lengths, batch.lengths)
    embed = lambda b: model.embed_captions(b.tokens, b.lengths, b.attention_mask)  # noqa: E731
    torch.testing.assert_close(embed(padded), embed(batch), atol=1e-5, rtol=1e-5)


def test_lengths_on_a_multiple_are_left_alone_and_keys_follow_shapes():
    batch = caption_batch(8)
    assert pad_words(batch, 8) is batch
    assert shape_key(pad_words(caption_batch(11), 8)) == shape_key(pad_words(caption_batch(13), 8))
    assert shape_key(pad_words(caption_batch(11), 8)) != shape_key(batch)


def test_bad_step_counters_match_a_brute_force_count():
    # Random non-finite steps, read back at random points: each read gives the steps since the
    # last read and the longest run in a row that ended or is going on in that stretch.
    rng = torch.Generator().manual_seed(0)
    bad = (torch.rand(300, generator=rng) < 0.3).tolist()
    reads = sorted(set(torch.randint(1, 300, (25,), generator=rng).tolist())) + [300]
    counters = torch.zeros(3, dtype=torch.int64)
    start = 0
    for stop in reads:
        for flag in bad[start:stop]:
            count_bad(counters, torch.tensor(flag))
        run_start = start
        while run_start > 0 and bad[run_start - 1]:  # a run carried over from the last stretch
            run_start -= 1
        runs, n = [], 0
        for flag in bad[run_start:stop]:
            n = n + 1 if flag else 0
            runs.append(n)
        assert take_bad(counters) == (sum(bad[start:stop]), max(runs, default=0))
        start = stop
