"""The sync-free BiGRU equals a packed bidirectional GRU (the VSE∞ reference) on valid words."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rgfusion.trainer.model.config import TextConfig
from rgfusion.trainer.model.text import BiGRUWords, reverse_within_length

WORD, HIDDEN, VOCAB = 6, 5, 30


def packed_reference(words: BiGRUWords, layers: int, tokens, lengths):
    ref = torch.nn.GRU(WORD, HIDDEN, layers, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for layer, (f, b) in enumerate(zip(words.forward_gru, words.backward_gru)):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{name}_l{layer}").copy_(getattr(f, f"{name}_l0"))
                getattr(ref, f"{name}_l{layer}_reverse").copy_(getattr(b, f"{name}_l0"))
    packed = pack_padded_sequence(words.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
    out, _ = pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=tokens.shape[1])
    return (out[..., :HIDDEN] + out[..., HIDDEN:]) / 2


@pytest.mark.parametrize("layers", [1, 2])
def test_matches_packed_bidirectional_gru(layers):
    torch.manual_seed(layers)
    words = BiGRUWords(TextConfig(word_dim=WORD, layers=layers), VOCAB, HIDDEN)
    lengths = torch.tensor([7, 3, 1, 5])
    tokens = torch.randint(4, VOCAB, (4, 7)) * (torch.arange(7)[None] < lengths[:, None])
    mask = torch.arange(7)[None] < lengths[:, None]
    got = words(tokens, lengths, mask)
    ref = packed_reference(words, layers, tokens, lengths)
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-6)


def test_padding_length_changes_nothing():
    torch.manual_seed(0)
    words = BiGRUWords(TextConfig(word_dim=WORD), VOCAB, HIDDEN)
    tokens = torch.randint(4, VOCAB, (2, 4))
    lengths = torch.tensor([4, 2])
    tokens[1, 2:] = 0
    short = words(tokens, lengths, None)
    long = words(torch.cat([tokens, torch.zeros(2, 6, dtype=torch.long)], 1), lengths, None)
    torch.testing.assert_close(short[0], long[0, :4])
    torch.testing.assert_close(short[1, :2], long[1, :2])


def test_reverse_index_is_its_own_inverse():
    idx = reverse_within_length(torch.tensor([3, 1, 4]), 4)
    assert idx.tolist() == [[2, 1, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]]
    assert torch.equal(idx.gather(1, idx), torch.arange(4).expand(3, 4))


def test_caption_path_never_reads_data_on_the_host():
    """On the meta device a host sync raises: the BiGRU needs no lengths on the host."""
    with torch.device("meta"):
        words = BiGRUWords(TextConfig(word_dim=WORD), VOCAB, HIDDEN)
        tokens, lengths = torch.randint(4, VOCAB, (3, 5)), torch.tensor([5, 2, 3])
    out = words(tokens, lengths, None)
    out.sum().backward()
    assert out.shape == (3, 5, HIDDEN)
