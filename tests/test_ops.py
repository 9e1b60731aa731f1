"""The attention custom ops: schema, fake implementation and autograd pass ``opcheck``, and
``torch.compile(fullgraph=True)`` keeps the op in its graph and gives eager's results."""

from __future__ import annotations

import pytest
import torch

from fa3dist import fa3_attention, ring_fa3_attention
from fa3dist.ops import LOCAL, attention_backward_op, attention_op, group_name


def qkv(seq_q: int = 12, seq_k: int = 12, heads: int = 4, kv_heads: int = 2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seq_q * 100 + seq_k)
    shapes = ((2, seq_q, heads, 8), (2, seq_k, kv_heads, 8), (2, seq_k, kv_heads, 8))
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("causal, seq_k, dtype", [(True, 12, torch.float64), (False, 12, torch.float32),
                                                  (False, 20, torch.float64)])
def test_attention_op_passes_opcheck(causal, seq_k, dtype):
    q, k, v = qkv(seq_k=seq_k, dtype=dtype)
    options = (causal, 0.3, "zigzag", "reference", LOCAL)
    torch.library.opcheck(attention_op, (q, k, v, *options))
    q, k, v = (t.detach() for t in (q, k, v))  # the backward has no backward of its own
    out, lse = attention_op(q, k, v, *options)
    torch.library.opcheck(attention_backward_op, (torch.randn_like(out), q, k, v, out, lse, *options))


def test_without_a_process_group_the_ops_run_locally():
    assert group_name(None) == LOCAL


@pytest.mark.parametrize("attention", [fa3_attention, ring_fa3_attention])
def test_compiled_attention_is_one_graph_and_matches_eager(attention):
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm

    def loss(q, k, v):
        return (attention(q, k, v, causal=True) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend=record)
    q, k, v = qkv()
    expected = loss(q, k, v)
    expected_grads = torch.autograd.grad(expected, (q, k, v))
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v))
    (graph,) = graphs
    assert torch.ops.fa3dist.attention.default in [node.target for node in graph.graph.nodes]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=0)
