"""Stacked SwiGLU experts and their dispatch.

Experts are stored like transformers 5.x MoE models: one parameter per projection with the expert as the leading
dimension, `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I). A caller sorts its rows (tokens, or the tokens of
whole sequences) by expert and passes how many rows each expert gets; the experts then run one matmul chain per
expert. There is no per-expert `nonzero`/`where` scan and no tokens x experts x capacity tensor.

Two interchangeable kernels:
  * grouped_mm: `torch.nn.functional.grouped_mm`, one launch for all experts. Fast on CUDA SM90+ in bf16, which
    is where `dispatch="auto"` takes it.
  * loop: `torch.split` of the sorted rows, one `F.linear` pair per non-empty expert. On CPU this is as good as
    it gets, and it is the reference the grouped path is tested against.
Because the whole stack is one parameter, every expert is part of the autograd graph every step, so DDP never
sees "unused parameters" when an expert gets no rows on some rank.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def _use_grouped_mm(x: torch.Tensor, dispatch: str) -> bool:
    if dispatch == "loop":
        return False
    if dispatch == "grouped_mm":
        return True
    # auto: the CUTLASS kernel exists only for bf16 on Hopper and newer; elsewhere grouped_mm is a loop in disguise.
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class StackedSwiGLUExperts(nn.Module):
    """`num_experts` SwiGLU FFNs: down(act(gate(x)) * up(x)) per expert, weights stacked on dim 0."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        dispatch: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.dispatch = dispatch
        factory = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.act_fn = ACT2FN[activation]
        if self.gate_up_proj.device.type != "meta":
            nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
            nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, activation: str, dispatch: str = "auto") -> "StackedSwiGLUExperts":
        """Sparse upcycling: every expert starts as an exact copy of a dense SwiGLU MLP (gate/up/down_proj)."""
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        if any(getattr(m, "bias", None) is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise ValueError("upcycling expects a bias-free SwiGLU MLP (gate_proj/up_proj/down_proj without bias)")
        experts = cls(
            num_experts, gate.shape[1], gate.shape[0], activation, dispatch, device=gate.device, dtype=gate.dtype
        )
        if gate.device.type != "meta":
            with torch.no_grad():
                experts.gate_up_proj.copy_(torch.cat([gate, up], dim=0).unsqueeze(0).expand_as(experts.gate_up_proj))
                experts.down_proj.copy_(down.unsqueeze(0).expand_as(experts.down_proj))
        return experts

    @classmethod
    def from_experts(cls, source: "StackedSwiGLUExperts", index: Sequence[int]) -> "StackedSwiGLUExperts":
        """New stack whose expert j is a copy of `source`'s expert index[j] (used to build expert groups)."""
        out = cls(
            len(index), source.hidden_size, source.intermediate_size, source.activation, source.dispatch,
            device=source.gate_up_proj.device, dtype=source.gate_up_proj.dtype,
        )
        idx = torch.as_tensor(list(index), device=source.gate_up_proj.device)
        with torch.no_grad():
            out.gate_up_proj.copy_(source.gate_up_proj[idx])
            out.down_proj.copy_(source.down_proj[idx])
        return out

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"act={self.activation}, dispatch={self.dispatch}"
        )

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
        """Rows of `x_sorted` (N, H) are grouped by expert: the first counts[0] go to expert 0, and so on.

        `counts` is an (E,) integer tensor summing to N; `sizes`, the same as a Python list when the caller already
        has it (it saves the loop kernel a device-to-host copy). Returns (N, H) in the same row order.
        """
        if _use_grouped_mm(x_sorted, self.dispatch):
            return self._forward_grouped(x_sorted, counts)
        return self._forward_loop(x_sorted, counts, sizes)

    def _forward_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
        # One host sync for the split sizes (unless given), then plain matmuls; empty experts are skipped.
        sizes = counts.tolist() if sizes is None else sizes
        if self.activation == "silu":
            # Fused loop with a hand-written backward: outputs and gradients are written straight into their rows
            # of preallocated buffers (no torch.cat, no chunk-backward cat) and each expert's weight gradient into
            # its slice of one stacked gradient, instead of autograd's per-expert full-size zero tensors that
            # `gate_up_proj[e]` indexing would create and then sum.
            return _SiluExpertLoop.apply(x_sorted, self.gate_up_proj, self.down_proj, sizes)
        outputs = []
        for expert, chunk in enumerate(torch.split(x_sorted, sizes)):
            if chunk.shape[0] == 0:
                continue
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(self.act_fn(gate) * up, self.down_proj[expert]))
        if not outputs:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]

    def _forward_grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        # grouped_mm wants (E, K, N) right operands; a transposed view of the stored (E, N, K) is accepted as is.
        gate_up = F.grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offs=offs)
        gate, up = gate_up.chunk(2, dim=-1)
        out = F.grouped_mm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
        if out.requires_grad:
            # grouped_mm's backward rejects broadcast (stride-0) gradients such as those of `.sum()`.
            out.register_hook(lambda grad: grad.contiguous())
        return out


class _SiluExpertLoop(torch.autograd.Function):
    """SwiGLU experts on rows grouped by expert (silu activation), one matmul chain per non-empty expert.

    Computes what the autograd loop computes, with the same kernels (matmuls, silu, silu_backward) and the same
    saved activations, in the same row order.
    """

    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, sizes):
        x = x.contiguous()
        num_rows, hidden = x.shape
        inter = down_proj.shape[-1]
        gate_up = x.new_empty(num_rows, 2 * inter)  # pre-activations, saved for the backward
        act = x.new_empty(num_rows, inter)  # silu(gate), saved for the backward
        h = x.new_empty(num_rows, inter)  # silu(gate) * up, the down projection's input
        out = x.new_empty(num_rows, hidden)
        start = 0
        for expert, n in enumerate(sizes):
            if n == 0:
                continue
            rows = slice(start, start + n)
            gu = gate_up[rows]
            torch.mm(x[rows], gate_up_proj[expert].t(), out=gu)
            torch.mul(torch.ops.aten.silu.out(gu[:, :inter], out=act[rows]), gu[:, inter:], out=h[rows])
            torch.mm(h[rows], down_proj[expert].t(), out=out[rows])
            start += n
        if start != num_rows:
            raise ValueError(f"expert row counts sum to {start}, but {num_rows} rows were given")
        ctx.sizes = sizes
        ctx.save_for_backward(x, gate_up_proj, down_proj, gate_up, act, h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_up_proj, down_proj, gate_up, act, h = ctx.saved_tensors
        need_x, need_gu, need_down = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        inter = down_proj.shape[-1]
        grad_x = torch.empty_like(x) if need_x else None
        # Stacked weight gradients: used experts' slices are overwritten below, only unused ones need zeros.
        grad_gu_w = torch.empty_like(gate_up_proj) if need_gu else None
        grad_down_w = torch.empty_like(down_proj) if need_down else None
        d_gate_up = torch.empty_like(gate_up)
        start = 0
        for expert, n in enumerate(ctx.sizes):
            if n == 0:
                if grad_gu_w is not None:
                    grad_gu_w[expert].zero_()
                if grad_down_w is not None:
                    grad_down_w[expert].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            g_out = grad_out[rows]
            if grad_down_w is not None:
                torch.mm(g_out.t(), h[rows], out=grad_down_w[expert])
            if not (need_x or need_gu):
                continue
            d_h = torch.mm(g_out, down_proj[expert])  # (n, I)
            gate, up = gate_up[rows, :inter], gate_up[rows, inter:]
            d_gu = d_gate_up[rows]
            torch.mul(d_h, act[rows], out=d_gu[:, inter:])  # d up = d_h * silu(gate)
            # d gate = silu'(gate) * (d_h * up), with the fused kernel autograd's SiluBackward uses
            torch.ops.aten.silu_backward.grad_input(d_h.mul_(up), gate, grad_input=d_gu[:, :inter])
            if grad_gu_w is not None:
                torch.mm(d_gu.t(), x[rows], out=grad_gu_w[expert])
            if grad_x is not None:
                torch.mm(d_gu, gate_up_proj[expert], out=grad_x[rows])
        return grad_x, grad_gu_w, grad_down_w, None


class _PermuteRows(torch.autograd.Function):
    """x[order] along dim 0 for a permutation `order`: the backward is the gather by the inverse permutation,
    not the zero-filled index_put with accumulation that advanced indexing's backward runs."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[order] where `order` is a permutation of x's rows and `inverse` its inverse (as `sort_rows_by_expert`
    returns them)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.index_select(0, order)
    return _PermuteRows.apply(x, order, inverse)


def sort_rows_by_expert(expert_of_row: torch.Tensor, num_experts: int):
    """Stable order that groups rows by expert, its inverse, and the rows per expert."""
    order = torch.argsort(expert_of_row, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(expert_of_row, minlength=num_experts)
    return order, inverse, counts
