"""Hugging Face transformers: ring attention as an attention implementation.

``register()`` adds "fa3dist_ring" to transformers' ``AttentionInterface``. A model loaded with
``attn_implementation="fa3dist_ring"`` then runs every attention layer over the sequence-parallel
ring. Each rank passes its shard of the tokens and their global positions::

    from fa3dist import shard_positions, shard_sequence
    from fa3dist.integrations import hf

    hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fa3dist_ring")
    ids = shard_sequence(input_ids, world_size=W, rank=r)                  # (B, S/W)
    pos = shard_positions(S, world_size=W, rank=r).unsqueeze(0)            # (1, S/W)
    logits = model(input_ids=ids, position_ids=pos).logits                 # this rank's shard

Attention is causal (or not, as the layer says) over the whole sharded sequence. Padding masks,
dropout, sliding windows and logit soft-capping are not supported and raise an error.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from fa3dist.api import ring_fa3_attention

NAME = "fa3dist_ring"


def ring_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, *, group: dist.ProcessGroup | None = None,
                           layout: str = "zigzag", backend: str = "auto", **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, H, S, D), key and value (B, H_kv, S, D) of this
    rank's shard; returns the attention output (B, S, H, D) and no weights."""
    if attention_mask is not None:
        raise ValueError(f"{NAME} takes no attention mask: it attends over the whole sharded sequence")
    if dropout:
        raise ValueError(f"{NAME} does not support attention dropout (got {dropout}); set attention_dropout=0")
    for option in ("sliding_window", "softcap"):
        if kwargs.get(option) is not None:
            raise ValueError(f"{NAME} does not support {option} (got {kwargs[option]!r})")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    out = ring_fa3_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=bool(causal),
                             softmax_scale=scaling, group=group, layout=layout, backend=backend)
    return out, None


def _no_mask(*, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """The mask builder for ``NAME``: no mask, and an error for a padding mask that would be dropped."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{NAME} does not support padding masks: pass sequences without padding")
    return None


def register(*, group: dist.ProcessGroup | None = None, layout: str = "zigzag", backend: str = "auto") -> str:
    """Register ``NAME`` with transformers' attention and mask interfaces; returns the name.

    ``group`` is the sequence-parallel process group (None: the default group), ``layout`` how the
    sequence is sharded over it, ``backend`` the kernels.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        raise ImportError("fa3dist.integrations.hf needs transformers: pip install transformers") from None
    AttentionInterface.register(NAME, functools.partial(ring_attention_forward, group=group, layout=layout,
                                                        backend=backend))
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME
