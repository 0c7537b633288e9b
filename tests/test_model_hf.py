"""The Hugging Face text path on a tiny randomly initialised BERT saved to (and read from) a
local directory; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

from rgfusion.trainer.model import ModelConfig, TextConfig, build_model, flops_per_pair  # noqa: E402
from rgfusion.trainer.model.flops import image_flops  # noqa: E402

WORDS = ["a", "dog", "runs", "on", "the", "grass", "cat", "sits", "mat", "two", "men", "play", "##s"]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    tokenizer.save_pretrained(path)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    return path


def hf_model(path, pooling="map", attention="sdpa", fused=True):
    cfg = ModelConfig(width=16, heads=2, map_heads=2, pooling=pooling, attention=attention,
                      text=TextConfig(encoder="hf", hf_path=str(path), fused_bert=fused))
    torch.manual_seed(0)
    return cfg, build_model(cfg, region_dim=8, grid_dim=8, grid_size=(2, 2), vocab_size=0)


def tokenize(path, captions, pad_to=None):
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(captions, padding="max_length" if pad_to else True, max_length=pad_to, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    return enc["input_ids"], mask.sum(1), mask


CAPTIONS = ["a dog runs on the grass", "a cat sits", "two men plays"]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pooling", ["map", "gpo", "mean", "max"])
def test_hf_text_path_embeds_and_trains(bert_dir, pooling, fused):
    _, model = hf_model(bert_dir, pooling, fused=fused)
    model.train()
    tokens, lengths, mask = tokenize(bert_dir, CAPTIONS)
    cap = model.embed_captions(tokens, lengths, mask)
    assert cap.shape == (3, 16)
    torch.testing.assert_close(cap.norm(dim=-1), torch.ones(3))
    (cap * torch.randn_like(cap)).sum().backward()
    for name, p in model.text.named_parameters():
        assert p.grad is not None, f"no gradient reaches text.{name}"


@pytest.mark.parametrize("fused", [True, False])
def test_hf_lr_multiplier_hint_names_the_transformer(bert_dir, fused):
    _, model = hf_model(bert_dir, fused=fused)
    hint = model.param_groups_hint()
    assert hint == {"text.hf": 0.1}
    names = [n for n, _ in model.named_parameters()]
    inside = [n for n in names if n.startswith("text.hf.")]
    assert any(("layers.1.qkv" if fused else "encoder.layer.1") in n for n in inside)
    assert not any(n.startswith("text.hf.") for n in names if n.startswith(("text.proj", "text.pool", "image.")))


@pytest.mark.parametrize("fused", [True, False])
def test_hf_padding_changes_nothing(bert_dir, fused):
    _, model = hf_model(bert_dir, fused=fused)
    model.eval()
    ref = model.embed_captions(*tokenize(bert_dir, CAPTIONS))
    torch.testing.assert_close(model.embed_captions(*tokenize(bert_dir, CAPTIONS, pad_to=16)), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_hf_math_attention_gives_the_sdpa_embedding(bert_dir, fused):
    caps = {}
    for attention in ("sdpa", "math"):
        _, model = hf_model(bert_dir, attention=attention, fused=fused)
        if not fused:
            assert model.text.hf.model.config._attn_implementation == ("eager" if attention == "math" else "sdpa")
        caps[attention] = model.eval().embed_captions(*tokenize(bert_dir, CAPTIONS, pad_to=12))
    torch.testing.assert_close(caps["math"], caps["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_hf_flops_match_flop_counter(bert_dir, fused):
    cfg, model = hf_model(bert_dir, "mean", fused=fused)
    model.eval()
    tokens, lengths, mask = tokenize(bert_dir, CAPTIONS[:1])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.embed_captions(tokens, lengths, mask)
    t = tokens.shape[1]
    text = flops_per_pair(cfg, 8, 8, (2, 2), 3, t) - image_flops(cfg, 8, 8, (2, 2), 3)
    assert text == counter.get_total_flops()


def test_bigru_has_no_lr_hint():
    model = build_model(ModelConfig(width=16, heads=2), region_dim=8, grid_dim=8, grid_size=(2, 2), vocab_size=20)
    assert model.param_groups_hint() == {}


def test_hf_encoder_needs_a_path():
    with pytest.raises(ValueError, match="hf_path"):
        TextConfig(encoder="hf")
