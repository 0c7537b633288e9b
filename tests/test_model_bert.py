"""FusedBert against Hugging Face's BertModel holding the same weights: the same features and
the same gradients (query/key/value gradients concatenated), and the architectures it refuses."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rgfusion.trainer.model.bert import FusedBert, fused_state  # noqa: E402
from rgfusion.trainer.model.text import transformer_words  # noqa: E402

torch.set_num_threads(1)


def tiny_config(**kw):
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, vocab_size=60, max_position_embeddings=24, **kw)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 60, (5, 9), generator=g)
    lengths = torch.tensor([9, 4, 7, 1, 6])
    mask = torch.arange(9)[None] < lengths[:, None]
    return tokens.masked_fill(~mask, 0), lengths, mask


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_features_and_gradients_equal_bert_model(attention):
    torch.manual_seed(0)
    impl = "eager" if attention == "math" else "sdpa"
    hf = transformers.BertModel(tiny_config(attn_implementation=impl), add_pooling_layer=False).eval()
    fused = FusedBert.from_hf(hf, attention).eval()
    tokens, lengths, mask = inputs()
    ref = hf(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    out = fused(tokens, lengths, mask)
    torch.testing.assert_close(out[mask], ref[mask], atol=2e-5, rtol=2e-5)

    weight = torch.randn_like(ref)
    (ref[mask] * weight[mask]).sum().backward()
    (out[mask] * weight[mask]).sum().backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    expected = fused_state(hf_grads, hf.config.num_hidden_layers)
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=2e-5, rtol=2e-5, msg=name)


def test_fused_state_covers_every_parameter_and_concatenates_qkv():
    hf = transformers.BertModel(tiny_config(), add_pooling_layer=False)
    state = fused_state(hf.state_dict(), 2)
    fused = FusedBert(hf.config, "sdpa")
    assert set(state) == set(dict(fused.named_parameters()))
    q, k, v = (hf.state_dict()[f"encoder.layer.1.attention.self.{p}.weight"] for p in ("query", "key", "value"))
    assert torch.equal(state["layers.1.qkv.weight"], torch.cat([q, k, v]))


@pytest.mark.parametrize("change", [{"hidden_act": "relu"}, {"position_embedding_type": "relative_key"}])
def test_other_architectures_keep_hugging_faces_module(change):
    assert FusedBert.supports(tiny_config())
    assert not FusedBert.supports(tiny_config(**change))
    assert not FusedBert.supports(transformers.RobertaConfig())


def test_transformer_words_picks_the_module(tmp_path):
    transformers.BertModel(tiny_config(hidden_act="relu")).save_pretrained(tmp_path / "relu")
    transformers.BertModel(tiny_config()).save_pretrained(tmp_path / "gelu")
    assert isinstance(transformer_words(str(tmp_path / "gelu"), "sdpa", fused=True), FusedBert)
    assert not isinstance(transformer_words(str(tmp_path / "gelu"), "sdpa", fused=False), FusedBert)
    assert not isinstance(transformer_words(str(tmp_path / "relu"), "sdpa", fused=True), FusedBert)
