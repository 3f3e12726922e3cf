"""Tiny models of real families, for tests and benchmarks (random init, never downloaded).

Each family is a :class:`Family`: a factory for the model and one for a batch
``(args, kwargs)``, and how to get a scalar loss from the output. Hugging Face
``transformers`` models are built from small configs with their own random init;
``transformers`` is imported only when such a family is built (it is a test-only
dependency). Config knobs set here are ones a user sets: ``use_cache=False`` (a
cache object cannot be captured) and dropout off (measurements are taken without
it). torchvision is not used: PyPI's torchvision does not import beside the CPU
build of torch these tests run on, so :class:`TinyResNet` is a ResNet written with
plain ``torch.nn`` (conv / batch-norm / relu / max-pool / residual / adaptive pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Batch = tuple[tuple, dict]


@dataclass(frozen=True)
class Family:
    """A model family: ``make() -> nn.Module``, ``batch(seed) -> (args, kwargs)``, ``loss(output) -> scalar``."""

    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[int], Batch]
    loss: Callable[[Any], torch.Tensor]
    needs: str = ""  # the optional package it needs


# -- plain torch.nn models ---------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """ResNet-18 in miniature: stem conv/bn/relu/max-pool, two stages of basic blocks, pool, classifier."""

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, width, 1))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return F.cross_entropy(self.fc(torch.flatten(self.pool(h), 1)), y)


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` over embedded tokens, mean-pooled, classified."""

    def __init__(self, vocab: int = 128, d: int = 64, layers: int = 2, heads: int = 4, classes: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.emb(ids))
        return F.cross_entropy(self.head(h.mean(1)), y)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image_batch(seed: int) -> Batch:
    g = _gen(seed)
    return (torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)), {}


def _token_class_batch(seed: int) -> Batch:
    g = _gen(seed)
    return (torch.randint(0, 128, (4, 16), generator=g), torch.randint(0, 8, (4,), generator=g)), {}


# -- Hugging Face transformers ----------------------------------------------------------------------------

VOCAB, D, LAYERS, HEADS, SEQ, BATCH = 128, 64, 2, 4, 16, 4


def _lm_batch(seed: int) -> Batch:
    g = _gen(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return (), {"input_ids": ids, "labels": ids.clone()}


def _hf(cls_name: str, cfg_name: str, **cfg: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        config = getattr(transformers, cfg_name)(**cfg)
        return getattr(transformers, cls_name)(config)

    return make


def _hf_loss(out: Any) -> torch.Tensor:
    return out.loss if hasattr(out, "loss") else out["loss"]


def _itself(out: Any) -> torch.Tensor:
    return out


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_positions=64, n_embd=D,
                           n_layer=LAYERS, n_head=HEADS, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0), _lm_batch, _hf_loss, "transformers"),
        Family("llama", _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=VOCAB, hidden_size=D,
                            intermediate_size=2 * D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            num_key_value_heads=HEADS // 2, max_position_embeddings=64, use_cache=False),
               _lm_batch, _hf_loss, "transformers"),
        Family("bert", _hf("BertForMaskedLM", "BertConfig", vocab_size=VOCAB, hidden_size=D,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * D,
                           max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
               _lm_batch, _hf_loss, "transformers"),
        Family("opt", _hf("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=D, ffn_dim=2 * D,
                          num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=64,
                          word_embed_proj_dim=D, use_cache=False, dropout=0.0, attention_dropout=0.0),
               _lm_batch, _hf_loss, "transformers"),
        Family("gpt_neox", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=D,
                               intermediate_size=2 * D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               max_position_embeddings=64, use_cache=False, hidden_dropout=0.0,
                               attention_dropout=0.0), _lm_batch, _hf_loss, "transformers"),
        Family("resnet", TinyResNet, _image_batch, _itself),
        Family("nn_transformer_encoder", EncoderClassifier, _token_class_batch, _itself),
    ]
}


def _cfg(**extra: Any) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=64, **extra)


#: More architectures, tried by ``benchmarks/model_families.py --extra`` (not part of the test suite).
EXTRA_FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("mistral", _hf("MistralForCausalLM", "MistralConfig", **_cfg(num_key_value_heads=2, use_cache=False)),
               _lm_batch, _hf_loss, "transformers"),
        Family("qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", **_cfg(num_key_value_heads=2, use_cache=False)),
               _lm_batch, _hf_loss, "transformers"),
        Family("phi", _hf("PhiForCausalLM", "PhiConfig", **_cfg(use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0)),
               _lm_batch, _hf_loss, "transformers"),
        Family("gemma", _hf("GemmaForCausalLM", "GemmaConfig", **_cfg(num_key_value_heads=2, head_dim=16,
                                                                        use_cache=False)),
               _lm_batch, _hf_loss, "transformers"),
        Family("roberta", _hf("RobertaForMaskedLM", "RobertaConfig", **_cfg(hidden_dropout_prob=0.0,
                                                                              attention_probs_dropout_prob=0.0)),
               _lm_batch, _hf_loss, "transformers"),
        Family("distilbert", _hf("DistilBertForMaskedLM", "DistilBertConfig", vocab_size=VOCAB, dim=D, hidden_dim=2 * D,
                                 n_layers=LAYERS, n_heads=HEADS, max_position_embeddings=64, dropout=0.0,
                                 attention_dropout=0.0), _lm_batch, _hf_loss, "transformers"),
        Family("gptj", _hf("GPTJForCausalLM", "GPTJConfig", vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                           n_positions=64, rotary_dim=8, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0), _lm_batch, _hf_loss, "transformers"),
        Family("bloom", _hf("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=D, n_layer=LAYERS,
                            n_head=HEADS, use_cache=False), _lm_batch, _hf_loss, "transformers"),
        Family("falcon", _hf("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=D,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS, use_cache=False),
               _lm_batch, _hf_loss, "transformers"),
        Family("t5", _hf("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=D, d_kv=16, d_ff=2 * D,
                         num_layers=LAYERS, num_heads=HEADS, dropout_rate=0.0, use_cache=False,
                         decoder_start_token_id=0, pad_token_id=0), _lm_batch, _hf_loss, "transformers"),
    ]
}
