"""Stacked SwiGLU experts and their dispatch.

Experts are stored like transformers 5.x MoE models: one parameter per projection with the expert as the leading
dimension, `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I). A caller sorts its rows (tokens, or the tokens of
whole sequences) by expert and passes how many rows each expert gets; the experts then run one matmul chain per
expert. There is no per-expert `nonzero`/`where` scan and no tokens x experts x capacity tensor.

Two interchangeable kernels:
  * loop: one GEMM chain per non-empty expert on its contiguous rows (`silu_moe` for silu experts, which can also
    fold in a shared expert). With few experts each gets thousands of rows, and cuBLAS / oneDNN GEMMs on them
    match a dense layer's: on an H100 in bf16 (2B size, 8 x 2048 tokens) it beat grouped_mm by 5-7% for 4 and 8
    experts, and on CPU it is as good as it gets. It costs one host sync per layer for the row counts.
  * grouped_mm: `torch.nn.functional.grouped_mm`, one launch for all experts, no host sync (CUDA SM90+, bf16).
    `dispatch="auto"` takes it there for fine-grained MoEs (more than GROUPED_MM_MIN_EXPERTS experts), where
    per-expert launches on a few rows each would dominate.
And for inference on few rows per expert (decode steps), `forward_slots`: rows gathered into a (experts, capacity)
slot layout and two batched matmuls, a fixed handful of ops where per-op overhead, not FLOPs, is the cost.
Because the whole stack is one parameter, every expert is part of the autograd graph every step, so DDP never
sees "unused parameters" when an expert gets no rows on some rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

# Public since torch 2.10 (a GPU image may carry an older torch than the pinned one): the private op otherwise.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's where it is on for x's device (what nn.Linear would do under
    bf16-mixed), else x's own."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def autocast_off(x: torch.Tensor):
    """Autocast disabled for x's device, where it was on: the experts cast explicitly instead. Autocast skips ops
    with `out=` (the loop kernel's) and may not know grouped_mm, so it must not decide dtypes inside them."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


# dispatch="auto" takes grouped_mm above this many experts (measured: the loop is faster at 4 and 8).
GROUPED_MM_MIN_EXPERTS = 8


def _use_grouped_mm(x: torch.Tensor, dispatch: str, num_experts: int) -> bool:
    if dispatch == "loop":
        return False
    if dispatch == "grouped_mm":
        return True
    # auto: the CUTLASS kernel exists only for bf16 on Hopper and newer; elsewhere grouped_mm is a loop in disguise.
    return (
        num_experts > GROUPED_MM_MIN_EXPERTS
        and x.is_cuda
        and compute_dtype(x) == torch.bfloat16
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

    def runs_silu_loop(self, x: torch.Tensor) -> bool:
        """Whether rows like `x` take the hand-written silu loop (`silu_moe`), which can also fold in a shared expert."""
        return self.activation == "silu" and not _use_grouped_mm(x, self.dispatch, self.num_experts)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
        """Rows of `x_sorted` (N, H) are grouped by expert: the first counts[0] go to expert 0, and so on.

        `counts` is an (E,) integer tensor summing to N; `sizes`, the same as a Python list when the caller already
        has it (it saves the loop kernel a device-to-host copy). Returns (N, H) in the same row order.
        """
        if _use_grouped_mm(x_sorted, self.dispatch, self.num_experts):
            dtype = compute_dtype(x_sorted)
            with autocast_off(x_sorted):
                return self._forward_grouped(x_sorted.to(dtype), counts, dtype)
        return self._forward_loop(x_sorted, counts, sizes)

    def _forward_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor, sizes: Optional[List[int]] = None) -> torch.Tensor:
        # One host sync for the split sizes (unless given), then plain matmuls; empty experts are skipped.
        sizes = counts.tolist() if sizes is None else sizes
        if self.activation == "silu":
            # Fused loop with a hand-written backward: outputs and gradients are written straight into their rows
            # of preallocated buffers (no torch.cat, no chunk-backward cat) and each expert's weight gradient into
            # its slice of one stacked gradient, instead of autograd's per-expert full-size zero tensors that
            # `gate_up_proj[e]` indexing would create and then sum.
            return silu_moe(x_sorted, self, sizes)
        outputs = []
        # Other activations: plain F.linear per expert, which autocast handles like any Linear.
        for expert, chunk in enumerate(torch.split(x_sorted, sizes)):
            if chunk.shape[0] == 0:
                continue
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(self.act_fn(gate) * up, self.down_proj[expert]))
        if not outputs:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]

    def forward_slots(self, x: torch.Tensor, slots: "ExpertSlots", shared: Optional[nn.Module] = None,
                      shared_weight: float = 1.0, routed_weight: float = 1.0) -> torch.Tensor:
        """Rows of `x` (N, H), in any order, through their experts as two batched matmuls over the experts
        `slots.first` .. `slots.end - 1` (a view of the stacked weights, no copy): the rows are gathered into each
        expert's (capacity, H) slot block, padded with a repeated row whose results are dropped. Returns (N, H) in
        x's row order; with a bias-free gate/up/down SwiGLU `shared`, `shared_weight * shared(x) + routed_weight *
        experts(x)`, the shared down projection and the mix in one addmm.

        A fixed handful of ops whatever the number of experts, for inference on few rows per expert (decode
        steps), where the loop's per-expert op overhead, not the FLOPs, is the cost. Plain differentiable ops, but
        meant for inference: its weight gradients would be written through slices of zero-filled stacks."""
        hidden = x.shape[-1]
        experts = slice(slots.first, slots.end)
        x_slots = x.index_select(0, slots.slot_row).view(slots.end - slots.first, slots.capacity, hidden)
        # F.silu rather than the activation module: a module call costs as much as the op on rows this few.
        act = F.silu if self.activation == "silu" else self.act_fn
        gate, up = torch.bmm(x_slots, self.gate_up_proj[experts].transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(act(gate) * up, self.down_proj[experts].transpose(1, 2))
        routed = out.view(-1, hidden).index_select(0, slots.row_slot)
        if shared is None:
            return routed if routed_weight == 1.0 else routed * routed_weight
        # The shared FFN is the dense FFN's copy: its activation is the experts' (as in `silu_moe`).
        h = act(F.linear(x, shared.gate_proj.weight)) * F.linear(x, shared.up_proj.weight)
        return torch.addmm(routed, h, shared.down_proj.weight.t(), beta=routed_weight, alpha=shared_weight)

    def _forward_grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        # grouped_mm wants (E, K, N) right operands; a transposed view of the stored (E, N, K) is accepted as is.
        # `.to(dtype)`: float32 master weights under bf16-mixed are cast per call, as autocast casts a Linear's.
        gate_up = _grouped_mm(x_sorted, self.gate_up_proj.to(dtype).transpose(1, 2), offs=offs)
        gate, up = gate_up.chunk(2, dim=-1)
        out = _grouped_mm(self.act_fn(gate) * up, self.down_proj.to(dtype).transpose(1, 2), offs=offs)
        if out.requires_grad:
            # grouped_mm's backward rejects broadcast (stride-0) gradients such as those of `.sum()`.
            out.register_hook(lambda grad: grad.contiguous())
        return out


def _mm(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, out: Optional[torch.Tensor] = None,
        accumulate: bool = False) -> torch.Tensor:
    """alpha * a @ b, written to `out` (added to it with `accumulate`): the scale rides on the GEMM for free."""
    if out is None:
        out = a.new_empty(a.shape[0], b.shape[1])
    if alpha == 1.0 and not accumulate:
        return torch.mm(a, b, out=out)
    return torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, alpha=alpha, out=out)


class _SiluMoELoop(torch.autograd.Function):
    """SwiGLU experts (silu) on rows grouped by expert, optionally combined with a shared SwiGLU, in one pass:

        out = shared_weight * shared(x) + routed_weight * gate * expert_e(x)     (rows of expert e)

    `shared` has separate gate/up/down weights (the dense FFN's copy); `gate` is the straight-through router gate
    p / p.detach() of the routing decision each row follows (a MoSE sequence, an expert-group token's sample, a
    top-1 token) when `prob` (one chosen probability per `rows_per_prob` rows) is given: value 1, gradient to p.
    Without a shared expert and prob, it is just the experts.

    Why one Function: the weights are folded into the GEMMs (addmm's alpha/beta), the shared down projection
    accumulates onto the routed output and both input-gradient halves into one buffer, so the combination, its
    backward and the input-gradient sum cost no passes over (rows, hidden) of their own; each expert's weight
    gradient is written into its slice of one stacked gradient (no per-expert full-size zero tensors).

    Layout: the intermediate activations of the shared expert (rows 0..N-1, when there is one) and of the routed
    experts (the next N rows, expert by expert) live in one (N_shared + N, I) buffer per quantity, each GEMM
    writing its own contiguous row block. Every elementwise pass (silu, the gating product and their backward) is
    then one op over the whole buffer instead of one per expert plus one for the shared expert: on small layers
    per-op overhead, not FLOPs, is the cost, and on a GPU each op is a kernel launch. The gate and up halves of
    `gate_up_proj` get separate GEMMs into separate buffers, as a dense SwiGLU's gate_proj and up_proj do, so the
    passes run on contiguous memory (on a GPU the strided halves of one (rows, 2I) buffer took twice as long).
    The router's gradient is one row dot product over the hidden size with the routed output, which is kept only
    when the router trains.
    """

    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, sizes, shared_gate, shared_up, shared_down, shared_weight,
                routed_weight, prob, rows_per_prob):
        x = x.contiguous()
        num_rows, hidden = x.shape
        inter = down_proj.shape[-1]
        if sum(sizes) != num_rows:
            raise ValueError(f"expert row counts sum to {sum(sizes)}, but {num_rows} rows were given")
        has_shared = shared_gate is not None
        keep_routed = prob is not None and ctx.needs_input_grad[9]
        first = num_rows if has_shared else 0  # first row of the routed experts in the intermediate buffers
        gate = x.new_empty(first + num_rows, inter)  # pre-activations, saved for the backward
        up = x.new_empty(first + num_rows, inter)
        routed = x.new_empty(num_rows, hidden)  # routed_weight * expert(x)
        experts = _used_experts(sizes)
        x_rows = x.split(sizes)
        gate_rows, up_rows = gate[first:].split(sizes), up[first:].split(sizes)
        gate_wt, up_wt = _per_expert(gate_up_proj.transpose(1, 2), inter)  # (H, I) views, no copy
        for e in experts:
            torch.mm(x_rows[e], gate_wt[e], out=gate_rows[e])
            torch.mm(x_rows[e], up_wt[e], out=up_rows[e])
        if has_shared:
            torch.mm(x, shared_gate.t(), out=gate[:first])
            torch.mm(x, shared_up.t(), out=up[:first])
        act = torch.nn.functional.silu(gate)  # saved for the backward
        h = act * up  # the down projections' input
        h_rows, routed_rows, down_wt = h[first:].split(sizes), routed.split(sizes), down_proj.transpose(1, 2).unbind(0)
        for e in experts:
            _mm(h_rows[e], down_wt[e], routed_weight, out=routed_rows[e])
        out = routed
        if has_shared:
            # In place unless the routed term must survive for the router's gradient.
            out = torch.addmm(routed, h[:first], shared_down.t(), alpha=shared_weight,
                              out=None if keep_routed else routed)
        ctx.sizes, ctx.weights, ctx.rows_per_prob = sizes, (shared_weight, routed_weight), rows_per_prob
        ctx.save_for_backward(x, gate_up_proj, down_proj, gate, up, act, h, shared_gate, shared_up, shared_down,
                              prob, routed if keep_routed else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_up_proj, down_proj, gate, up, act, h, shared_gate, shared_up, shared_down, prob, routed = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_gu, need_down, need_prob = need[0], need[1], need[2], need[9]
        shared_weight, routed_weight = ctx.weights
        sizes = ctx.sizes
        grad_out = grad_out.contiguous()
        num_rows = x.shape[0]
        inter = down_proj.shape[-1]
        has_shared = shared_gate is not None
        first = num_rows if has_shared else 0
        experts = _used_experts(sizes)
        grad_rows, x_rows = grad_out.split(sizes), x.split(sizes)
        down_w = down_proj.unbind(0)
        grads_shared = [None, None, None]
        # Stacked weight gradients: used experts' slices are overwritten below, only unused ones need zeros.
        grad_gu_w = _stacked_grad(gate_up_proj, experts) if need_gu else None
        grad_down_w = _stacked_grad(down_proj, experts) if need_down else None
        if grad_down_w is not None:
            h_rows, grad_down_rows = h[first:].split(sizes), grad_down_w.unbind(0)
            grad_rows_t = grad_out.t().split(sizes, dim=1)
            for e in experts:
                _mm(grad_rows_t[e], h_rows[e], routed_weight, out=grad_down_rows[e])
        if has_shared and need[6]:
            grads_shared[2] = _mm(grad_out.t(), h[:first], shared_weight)
        grad_x = None
        if need_x or need_gu or need[4] or need[5]:
            d_h = torch.empty_like(h)  # gradient of the down projections' input, then of the gate pre-activation
            d_h_rows = d_h[first:].split(sizes)
            for e in experts:
                _mm(grad_rows[e], down_w[e], routed_weight, out=d_h_rows[e])
            if has_shared:
                _mm(grad_out, shared_down, shared_weight, out=d_h[:first])
            d_up = d_h * act
            # d gate = silu'(gate) * (d_h * up), with the fused kernel autograd's SiluBackward uses, into d_h
            d_gate = torch.ops.aten.silu_backward.grad_input(d_h.mul_(up), gate, grad_input=d_h)
            if has_shared:
                if need[4]:
                    grads_shared[0] = torch.mm(d_gate[:first].t(), x)
                if need[5]:
                    grads_shared[1] = torch.mm(d_up[:first].t(), x)
            d_gate_rows, d_up_rows = d_gate[first:].split(sizes), d_up[first:].split(sizes)
            gate_w, up_w = _per_expert(gate_up_proj, inter, dim=1)
            if grad_gu_w is not None:
                grad_gate_w, grad_up_w = _per_expert(grad_gu_w, inter, dim=1)
                d_gate_rows_t, d_up_rows_t = d_gate[first:].t().split(sizes, dim=1), d_up[first:].t().split(sizes, dim=1)
                for e in experts:
                    torch.mm(d_gate_rows_t[e], x_rows[e], out=grad_gate_w[e])
                    torch.mm(d_up_rows_t[e], x_rows[e], out=grad_up_w[e])
            if need_x:
                grad_x = torch.empty_like(x)
                if has_shared:
                    torch.mm(d_gate[:first], shared_gate, out=grad_x)
                    _mm(d_up[:first], shared_up, out=grad_x, accumulate=True)
                grad_x_rows = grad_x.split(sizes)
                for e in experts:
                    _mm(d_gate_rows[e], gate_w[e], out=grad_x_rows[e], accumulate=has_shared)
                    _mm(d_up_rows[e], up_w[e], out=grad_x_rows[e], accumulate=True)
        grad_prob = None
        if need_prob:
            # <d out / d gate, grad> per row is <routed term, grad> (over the hidden size); d gate / d p = 1 / p.
            row_dot = torch.sum(routed * grad_out, dim=-1, dtype=torch.float32)
            grad_prob = (row_dot.view(-1, ctx.rows_per_prob).sum(dim=1) / prob.detach()).to(prob.dtype)
        return (grad_x, grad_gu_w, grad_down_w, None, *grads_shared, None, None, grad_prob, None)


def _per_expert(stacked: torch.Tensor, inter: int, dim: int = 2):
    """The gate and up halves of a stacked gate_up weight split along `dim` (1 for the stored (E, 2I, H) layout, 2
    for its (E, H, 2I) transposed view), each as a tuple of per-expert views: a few dispatcher calls for all
    experts instead of indexing inside the loop."""
    return tuple(half.unbind(0) for half in stacked.split(inter, dim=dim))


def _used_experts(sizes: Sequence[int]) -> List[int]:
    return [e for e, n in enumerate(sizes) if n > 0]


def _stacked_grad(weight: torch.Tensor, used: Sequence[int]) -> torch.Tensor:
    """An uninitialised gradient for a stacked weight whose `used` experts' slices the caller overwrites: only the
    other experts' slices are zeroed."""
    grad = torch.empty_like(weight)
    used = set(used)
    for e in range(weight.shape[0]):
        if e not in used:
            grad[e].zero_()  # a slice each: an index tensor would be a host-to-device copy on a GPU
    return grad


def silu_moe(x_sorted: torch.Tensor, experts: "StackedSwiGLUExperts", sizes: List[int], shared: Optional[nn.Module] = None,
             shared_weight: float = 1.0, routed_weight: float = 1.0, prob: Optional[torch.Tensor] = None,
             rows_per_prob: int = 1) -> torch.Tensor:
    """`_SiluMoELoop` on rows grouped by expert: experts alone, or `shared_weight * shared(x) + routed_weight *
    p/p.detach() * expert(x)` with a bias-free gate/up/down SwiGLU `shared` (see the Function's doc)."""
    weights = [experts.gate_up_proj, experts.down_proj, None, None, None]
    if shared is not None:
        weights[2:] = shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight
    # Under autocast the Function computes in autocast's dtype on explicitly cast inputs (its out= matmuls would
    # otherwise silently stay in float32); the casts' backward returns float32 gradients to float32 weights.
    dtype = compute_dtype(x_sorted)
    gu, down, sg, su, sd = (None if w is None else w.to(dtype) for w in weights)
    with autocast_off(x_sorted):
        return _SiluMoELoop.apply(x_sorted.to(dtype), gu, down, sizes, sg, su, sd,
                                  float(shared_weight), float(routed_weight), prob, rows_per_prob)


def fusable_shared(shared: Optional[nn.Module]) -> bool:
    """A shared expert `silu_moe` can fold in: bias-free gate_proj / up_proj / down_proj Linears."""
    if shared is None:
        return False
    layers = [getattr(shared, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(m, nn.Linear) and m.bias is None for m in layers)


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


@dataclass
class ExpertSlots:
    """Rows laid out as `capacity` slots per expert for experts first .. end-1 (see `forward_slots`)."""

    first: int
    end: int
    capacity: int
    slot_row: torch.Tensor  # (num_slots,) the row each slot reads; padding slots read the first row
    row_slot: torch.Tensor  # (N,) the slot holding each row's result

    sizes: List[int]  # rows per expert, all experts

    @classmethod
    def plan(cls, expert_of_row: torch.Tensor, num_experts: int) -> "ExpertSlots":
        """Slots for rows whose experts are `expert_of_row` (N,), rows of an expert in row order. Worked out on the
        host from one copy of the N expert indices: for the few rows this layout is meant for, a Python pass is
        cheaper than the sort, scan and scatter ops that would do it on the device (a dozen ops of fixed cost each,
        kernel launches on a GPU), and the row counts it needs are host values anyway."""
        experts = expert_of_row.tolist()
        sizes = [0] * num_experts
        for e in experts:
            sizes[e] += 1
        used = _used_experts(sizes)
        if not used:
            raise ValueError("ExpertSlots.plan needs at least one row")
        first, end, capacity = used[0], used[-1] + 1, max(sizes)
        fill = [0] * num_experts
        slot_row = [0] * ((end - first) * capacity)  # padding slots read row 0
        row_slot = []
        for row, e in enumerate(experts):
            slot = (e - first) * capacity + fill[e]
            fill[e] += 1
            slot_row[slot] = row
            row_slot.append(slot)
        device = expert_of_row.device
        return cls(first, end, capacity, torch.tensor(slot_row, device=device), torch.tensor(row_slot, device=device),
                   sizes)

    @property
    def num_slots(self) -> int:
        return self.slot_row.numel()


def sort_rows_by_expert(expert_of_row: torch.Tensor, num_experts: int):
    """Stable order that groups rows by expert, its inverse, and the rows per expert."""
    order = torch.argsort(expert_of_row, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(expert_of_row, minlength=num_experts)
    return order, inverse, counts
