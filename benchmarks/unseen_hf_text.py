"""A spot check on Hugging Face causal language models no test names, in their default configurations but for
their sizes (width 64, 2 layers, 4 heads, vocabulary 256, small experts), asked for their own loss
(``labels=``): how ``unit_scale`` captured the model, ops left unscaled, whether the rewritten model with
every scale erased is the original (outputs and gradients, ``check_equivalence``), the smallest cosine between a
parameter's gradient and the true gradient of the rewritten forward, and the share of weight gradients (2-D or
more, exactly zero ones left out) with RMS in [1/2, 2] on a batch the plan did not see. Batch 2 x 16 tokens.

A model captured through dynamo (``torch.export`` failed) has no single graph to compare: equivalence and
cosines are then "-". ``--kv-heads 2`` also sets ``num_key_value_heads=2``: where a model's attention cannot take
it (multi-head latent attention), ``torch.export`` fails and ``unit_scale`` falls back to dynamo, which is how
these models exercise that path.

    cd benchmarks && PYTHONPATH=../src python unseen_hf_text.py [--models NAME ...] [--kv-heads 2]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import time
import warnings
from typing import Any

import torch

from _common import table, write_result
from unit_scale_fx import unit_scale
from unit_scale_fx.analysis.equivalence import check_equivalence
from unit_scale_fx.analysis.validity import gradient_cosines

#: a sample of architectures across the library's families (dense, mixture of experts, latent attention,
#: hybrid recurrent, encoder-as-decoder, sliding windows); each model type's own config and causal-LM class
MODELS = ["helium", "olmo3", "persimmon", "apertus", "cohere2", "exaone4", "falcon_h1", "falcon_mamba", "glm4_moe",
          "gpt_oss", "granitemoe", "hunyuan_v1_moe", "jetmoe", "llama4_text", "minimax", "nemotron", "phimoe",
          "rwkv", "smollm3", "deepseek_v2", "glm4_moe_lite", "sarvam_mla", "dory", "minicpm3", "roformer", "xglm"]

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
             max_position_embeddings=128, head_dim=16, n_embd=64, n_layer=2, n_head=4, d_model=64, n_positions=128,
             num_layers=2, num_heads=4, ffn_dim=128, n_inner=128, num_experts=4, num_local_experts=4,
             n_routed_experts=4, moe_intermediate_size=32, num_experts_per_tok=2, shared_expert_intermediate_size=64,
             kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
             first_k_dense_replace=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(model_type: str, kv_heads: int | None) -> tuple[torch.nn.Module, Any]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg_cls = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
    sizes = dict(SIZES, **({"num_key_value_heads": kv_heads} if kv_heads else {}))
    accepted = inspect.signature(cfg_cls.__init__).parameters
    cfg = cfg_cls(**{k: v for k, v in sizes.items() if k in accepted})
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) != getattr(cfg, "num_hidden_layers", len(layer_types)):
        cfg.layer_types = layer_types[:cfg.num_hidden_layers]
    torch.manual_seed(0)
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(cfg), cfg


class LM(torch.nn.Module):
    """``forward(input_ids, labels) -> loss``: the model's own loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=labels).loss


def _batch(seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 256), (2, 16), generator=g)
    return ids, ids.clone()


def row(name: str, kv_heads: int | None) -> list[str]:
    model, cfg = build(name, kv_heads)
    model = LM(model)
    vocab = int(getattr(cfg, "vocab_size", 256) or 256)
    t0 = time.perf_counter()
    us = unit_scale(copy.deepcopy(model), _batch(0, vocab))
    plan_s = time.perf_counter() - t0
    capture = getattr(us, "us_capture", "?")
    unscaled = ", ".join(sorted({u.op for u in getattr(us, "us_unsupported", [])})) or "-"
    if capture == "dynamo":
        equivalent, cosine = "-", "-"
    else:
        eq = check_equivalence(model, us, *_batch(0, vocab))
        equivalent = "yes" if eq.ok else f"no: {str(eq).splitlines()[0][:80]}"
        cosine = f"{min(gradient_cosines(us, *_batch(2, vocab)).values()):.5f}"
    us.zero_grad()
    us(*_batch(1, vocab)).backward()
    w = [float(p.grad.pow(2).mean().sqrt()) for p in us.parameters()
         if p.grad is not None and p.dim() >= 2 and p.grad.any()]
    return [name, capture, unscaled, equivalent, cosine, f"{sum(0.5 <= v <= 2.0 for v in w) / len(w):.0%}",
            f"{min(w):.2g} - {max(w):.2g}", f"{plan_s:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--kv-heads", type=int, default=None, help="also set num_key_value_heads")
    ap.add_argument("--name", default="unseen_hf_text", help="results file name")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    head = ["model", "capture", "left unscaled", "scale-erased = original", "min gradient cosine",
            "weight grads in [1/2, 2]", "range", "unit_scale s"]
    rows = []
    for name in args.models:
        try:
            rows.append(row(name, args.kv_heads))
        except Exception as exc:  # noqa: BLE001 - a model that fails is a row of the report
            rows.append([name, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"] + ["-"] * 6)
        print(" | ".join(rows[-1]), flush=True)
    print(write_result(args.name, "Hugging Face causal language models no test names", table(head, rows)))


if __name__ == "__main__":
    main()
