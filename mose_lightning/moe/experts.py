"""The experts of an MoE layer behind one call: `experts(x, expert_index, weights)`.

Weights are stored like transformers 5.x MoE models: one parameter per projection with the expert as the leading
dimension, `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), gated FFNs `down(act(gate(x)) * up(x))` with the
activation of the dense FFN they replace (SwiGLU: silu; GeGLU: tanh-GELU). Optionally the module also holds the
always-on shared expert (the dense FFN's copy) and computes

    out = shared_weight * shared(x) + routed_weight * sum_k weights[..., k] * expert_{expert_index[..., k]}(x)

`expert_index` (..., k) is broadcast over x's leading dimensions: (B, 1, k) for x of (B, T, H) routes whole
sequences (MoSE), (B, T, k) or (N, k) routes every token. `weights` has the shape of `expert_index`, or is None
for weights of exactly 1 that need no gradient.

How the rows reach their experts is decided inside, per call:
  * slots       inference on few rows (decode steps, short prompts): rows gathered into an (experts, capacity)
                slot layout and two batched matmuls, a fixed handful of ops where per-op overhead, not FLOPs, is
                the cost; the shared expert folds into the last matmul;
  * grouped_mm  `torch.nn.functional.grouped_mm`, one launch for all experts and no host sync (CUDA SM90+, bf16),
                taken by dispatch="auto" for more than GROUPED_MM_MIN_EXPERTS experts;
  * loop        one GEMM chain per non-empty expert on its contiguous rows (rows sorted by expert). With few
                experts each gets thousands of rows, and the GEMMs run at a dense layer's throughput. For silu
                experts one autograd node (`_SiluExpertsLoop`) also folds in the shared expert.
The routing of a call is summarised once in a `DispatchPlan` (rows per expert, sort order, slot layouts); a caller
that runs the same routing again (cached decode steps reuse the prompt's route) passes the plan back in.
Because the whole stack is one parameter, every expert is in the autograd graph every step, so DDP never sees
"unused parameters" when an expert gets no rows on some rank.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

# Public since torch 2.10 (a GPU image may carry an older torch than the pinned one): the private op otherwise.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm

# dispatch="auto" takes grouped_mm above this many experts (measured: the loop is faster at 4 and 8).
GROUPED_MM_MIN_EXPERTS = 8
# Inference on at most this many rows takes the slot path (a decode step has one row per sequence).
SLOT_MAX_ROWS = 64
# Routings of at most this many entries are planned on the host from one copy of the expert indices: for a batch
# of sequences (MoSE) or a decode step a Python pass is cheaper than the sort and scan ops on the device. On a GPU
# only for inference (the slot path's layout is a host plan): training there stays free of host syncs.
HOST_PLAN_MAX_ENTRIES = 64

DISPATCHES = ("auto", "grouped_mm", "loop")


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


def use_grouped_mm(x: torch.Tensor, dispatch: str, num_experts: int) -> bool:
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


def gated_ffn_weights(mlp: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) weights of a bias-free gated FFN with gate_proj / up_proj / down_proj Linears."""
    layers = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(m, nn.Linear) for m in layers):
        raise ValueError(
            f"{type(mlp).__name__}: expected a gated FFN with gate_proj / up_proj / down_proj Linear layers"
        )
    if any(m.bias is not None for m in layers):
        raise ValueError(f"{type(mlp).__name__}: upcycling expects bias-free gate_proj / up_proj / down_proj")
    return layers[0].weight, layers[1].weight, layers[2].weight


def _is_gated_ffn(mlp: Optional[nn.Module]) -> bool:
    try:
        return mlp is not None and gated_ffn_weights(mlp) is not None
    except ValueError:
        return False


def mix_weights(combine: str, shared_weight: float, has_shared: bool) -> Tuple[float, float]:
    """(weight of the shared output, weight of the routed output) of a combination rule.

    Why these rules: every expert, and the shared expert, starts as a copy of the dense FFN it replaces (sparse
    upcycling), and at initialisation the layer must compute exactly the dense FFN, so fine-tuning starts from the
    model it was given.
      weighted: w * shared(x) + (1 - w) * routed(x); both terms equal dense(x) at start, so any w works.
      sum:      shared(x) + routed(x) with the routed experts' down projection zeroed at start: each expert is a
                zero delta on top of the dense FFN (a residual-adapter view).
    """
    if combine not in ("weighted", "sum"):
        raise ValueError(f"combine: expected 'weighted' or 'sum', got {combine!r}")
    if not has_shared:
        return 0.0, 1.0
    return (1.0, 1.0) if combine == "sum" else (float(shared_weight), 1.0 - float(shared_weight))


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass
class ExpertSlots:
    """Rows laid out as `capacity` slots per expert for experts first .. end-1 (the slot path)."""

    first: int
    end: int
    capacity: int
    slot_row: torch.Tensor  # (num_slots,) the input row each slot reads; padding slots read row 0
    row_slot: torch.Tensor  # (R,) the slot holding each output row's result

    @property
    def num_slots(self) -> int:
        return self.slot_row.numel()


def _slot_layout(entries: Sequence[int], num_experts: int, group: int, k: int, device) -> ExpertSlots:
    """Slots for output rows r = entry * group + t, where entry j = i * k + slot of input row group i goes to
    expert entries[j] and reads input row i * group + t. Worked out on the host: for the few rows this layout is
    meant for, a Python pass is cheaper than the sort, scan and scatter ops that would do it on the device."""
    sizes = [0] * num_experts
    for e in entries:
        sizes[e] += group
    used = [e for e, n in enumerate(sizes) if n]
    if not used:
        raise ValueError("a slot layout needs at least one row")
    first, end, capacity = used[0], used[-1] + 1, max(sizes)
    fill = [0] * num_experts
    slot_row = [0] * ((end - first) * capacity)
    row_slot = []
    for j, e in enumerate(entries):
        source = (j // k) * group
        for t in range(group):
            slot = (e - first) * capacity + fill[e]
            fill[e] += 1
            slot_row[slot] = source + t
            row_slot.append(slot)
    return ExpertSlots(first, end, capacity, torch.tensor(slot_row, device=device),
                       torch.tensor(row_slot, device=device))


@dataclass
class DispatchPlan:
    """Where the entries of one routing go: entry j = i * k + slot (row group i, one of its k choices) goes to
    expert `index[j]`. Worked out once per routing decision and reused for every call with the same routing."""

    num_experts: int
    k: int
    index: torch.Tensor  # (M * k,) expert of each entry
    host_entries: Optional[List[int]] = None  # the same on the host, for small routings
    _device_sort: Optional[tuple] = field(default=None, repr=False)
    _sizes: Optional[List[int]] = field(default=None, repr=False)
    _slots: Dict[int, ExpertSlots] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, expert_index: torch.Tensor, num_experts: int) -> "DispatchPlan":
        k = expert_index.shape[-1]
        index = expert_index.reshape(-1)
        # One device-to-host copy of a small routing (on a GPU each copy drains the queue): sizes, order check and
        # slot layouts are then worked out on the host.
        small = index.numel() <= HOST_PLAN_MAX_ENTRIES
        host = index.tolist() if small and (index.device.type == "cpu" or not torch.is_grad_enabled()) else None
        return cls(num_experts, k, index, host)

    @property
    def sizes(self) -> List[int]:
        """Entries per expert (a host sync for large routings, the loop kernel's split sizes)."""
        if self._sizes is None:
            if self.host_entries is not None:
                sizes = [0] * self.num_experts
                for e in self.host_entries:
                    sizes[e] += 1
                self._sizes = sizes
            else:
                self._sizes = self.sort()[2].tolist()
        return self._sizes

    def is_sorted(self) -> bool:
        """Whether the entries are in expert order already (then no permutation is needed); only known for small
        routings of one choice per row group (a batch of sequences), else False."""
        entries = self.host_entries
        return self.k == 1 and entries is not None and all(a <= b for a, b in zip(entries, entries[1:]))

    def sort(self) -> tuple:
        """(order, inverse, counts) on the device: a stable order grouping entries by expert, its inverse, and the
        entries per expert."""
        if self._device_sort is None:
            index = self.index
            order = torch.argsort(index, stable=True)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            self._device_sort = (order, inverse, torch.bincount(index, minlength=self.num_experts))
        return self._device_sort

    def counts(self) -> torch.Tensor:
        return self.sort()[2]

    def slots(self, group: int) -> ExpertSlots:
        if group not in self._slots:
            entries = self.host_entries if self.host_entries is not None else self.index.tolist()
            self._slots[group] = _slot_layout(entries, self.num_experts, group, self.k, self.index.device)
        return self._slots[group]


# ---------------------------------------------------------------------------------------------------- experts


class Experts(nn.Module):
    """`num_experts` gated FFNs stacked on dim 0, and optionally the shared expert; see the module docstring."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        dispatch: str = "auto",
        shared: Optional[nn.Module] = None,
        combine: str = "weighted",
        shared_weight: float = 0.5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch: expected one of {DISPATCHES}, got {dispatch!r}")
        if activation not in ACT2FN:
            raise ValueError(f"activation: {activation!r} is not an activation transformers knows")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.dispatch = dispatch
        self.combine = combine
        self.shared = shared
        self.shared_weight, self.routed_weight = mix_weights(combine, shared_weight, shared is not None)
        # The silu loop kernel and the slot path can fold in a shared expert that is a bias-free gated FFN.
        # False computes the shared expert apart and adds it (the reference the fused path is tested against).
        self.fuse_shared = _is_gated_ffn(shared)
        factory = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.act_fn = ACT2FN[activation]
        if self.gate_up_proj.device.type != "meta":
            nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
            nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)

    @classmethod
    def upcycle(cls, dense_mlp: nn.Module, num_experts: int, activation: str, dispatch: str = "auto",
                shared_expert: bool = True, combine: str = "weighted", shared_weight: float = 0.5) -> "Experts":
        """Sparse upcycling: every expert (and the shared expert) starts as an exact copy of the dense gated FFN;
        with combine="sum" the experts' down projections start at zero."""
        gate, up, down = gated_ffn_weights(dense_mlp)
        shared = copy.deepcopy(dense_mlp) if shared_expert else None
        experts = cls(num_experts, gate.shape[1], gate.shape[0], activation, dispatch, shared,
                      combine if shared_expert else "weighted", shared_weight, device=gate.device, dtype=gate.dtype)
        if gate.device.type != "meta":
            with torch.no_grad():
                experts.gate_up_proj.copy_(torch.cat([gate, up], dim=0).unsqueeze(0).expand_as(experts.gate_up_proj))
                experts.down_proj.copy_(down.unsqueeze(0).expand_as(experts.down_proj))
                if experts.combine == "sum":
                    experts.down_proj.zero_()
        return experts

    @classmethod
    def regroup(cls, source: "Experts", index: Sequence[int]) -> "Experts":
        """A new stack whose expert j is a copy of `source`'s expert index[j]; the shared expert moves over as it is
        (expert groups are built this way from a trained MoSE layer)."""
        out = cls(len(index), source.hidden_size, source.intermediate_size, source.activation, source.dispatch,
                  source.shared, source.combine, 0.5, device=source.gate_up_proj.device,
                  dtype=source.gate_up_proj.dtype)
        out.shared_weight, out.routed_weight, out.fuse_shared = source.shared_weight, source.routed_weight, source.fuse_shared
        idx = torch.as_tensor(list(index), device=source.gate_up_proj.device)
        with torch.no_grad():
            out.gate_up_proj.copy_(source.gate_up_proj[idx])
            out.down_proj.copy_(source.down_proj[idx])
        return out

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"act={self.activation}, dispatch={self.dispatch}, shared_weight={self.shared_weight}, "
            f"routed_weight={self.routed_weight}"
        )

    def plan(self, expert_index: torch.Tensor) -> DispatchPlan:
        return DispatchPlan.build(expert_index, self.num_experts)

    # ---- the one call ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, weights: Optional[torch.Tensor] = None,
                plan: Optional[DispatchPlan] = None) -> torch.Tensor:
        """x (..., H); expert_index (..., k) long, broadcast over x's leading dimensions (a size-1 sequence
        dimension routes whole sequences); weights like expert_index, or None (weights 1, no gradient); `plan`: the
        `DispatchPlan` of this routing from an earlier call, or None. Returns x's shape (see the module docstring)."""
        hidden = x.shape[-1]
        k = expert_index.shape[-1]
        # Row groups: whole sequences when the index has one entry per sequence, else single tokens.
        group = x.shape[-2] if x.dim() >= 3 and expert_index.dim() == x.dim() and expert_index.shape[-2] == 1 else 1
        groups = x.numel() // (hidden * group) if x.numel() else 0
        if expert_index.numel() != groups * k:
            raise ValueError(f"expert_index of shape {tuple(expert_index.shape)} does not route x of shape {tuple(x.shape)}")
        if weights is not None and weights.numel() != groups * k:
            raise ValueError(f"weights of shape {tuple(weights.shape)} do not match expert_index {tuple(expert_index.shape)}")
        plan = plan if plan is not None else self.plan(expert_index)
        rows = x.reshape(groups, group * hidden)
        w = None if weights is None else weights.reshape(groups * k)
        if not torch.is_grad_enabled() and groups * k * group <= SLOT_MAX_ROWS:
            out = self._slots(rows, plan, w, group)
        elif use_grouped_mm(x, self.dispatch, self.num_experts):
            out = self._sorted(rows, plan, w, group, self._grouped)
        elif self.activation == "silu":
            out = self._silu_loop(rows, plan, w, group)
        else:
            out = self._sorted(rows, plan, w, group, self._linear_loop)
        return out.view(x.shape)

    # ---- dispatch paths ---------------------------------------------------------------------------------------
    def _add_shared(self, x_rows: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """routed + shared_weight * shared(x) (routed already carries routed_weight)."""
        if self.shared is None:
            return routed
        shared = self.shared(x_rows.view(-1, self.hidden_size)).view(routed.shape)
        return torch.add(routed, shared, alpha=self.shared_weight) if self.shared_weight != 1.0 else routed + shared

    def _sorted(self, rows: torch.Tensor, plan: DispatchPlan, w: Optional[torch.Tensor], group: int, kernel):
        """Rows sorted by expert -> `kernel(rows (R, H), counts, sizes)` -> weights, unsorted, summed over k, plus
        the shared expert. For the grouped_mm and the plain (any-activation) loop kernels."""
        hidden, k = self.hidden_size, plan.k
        order, inverse, counts = plan.sort()
        sorted_rows = rows.index_select(0, order // k if k > 1 else order)
        sizes = None if kernel is self._grouped else [n * group for n in plan.sizes]
        routed = kernel(sorted_rows.reshape(-1, hidden), counts * group, sizes).view(-1, group, hidden)
        scale = self.routed_weight
        if w is not None:
            routed = routed * (w.index_select(0, order).to(routed.dtype).view(-1, 1, 1) * scale)
        elif scale != 1.0:
            routed = routed * scale
        routed = routed.index_select(0, inverse)
        if k > 1:
            routed = routed.view(-1, k, group * hidden).sum(dim=1)
        return self._add_shared(rows, routed.reshape(rows.shape))

    def _silu_loop(self, rows: torch.Tensor, plan: DispatchPlan, w: Optional[torch.Tensor], group: int):
        hidden, k = self.hidden_size, plan.k
        permute = not plan.is_sorted()
        order, inverse = plan.sort()[:2] if permute else (None, None)
        sorted_rows = rows if not permute else rows.index_select(0, order // k if k > 1 else order)
        sorted_w = w if w is None or not permute else w.index_select(0, order)
        fold = self.fuse_shared and k == 1
        out = silu_experts_loop(sorted_rows.reshape(-1, hidden), self, [n * group for n in plan.sizes],
                                self.shared if fold else None, self.shared_weight, self.routed_weight, sorted_w, group)
        out = out.view(-1, group * hidden)
        if permute:
            out = out.index_select(0, inverse)
        if k > 1:
            out = out.view(-1, k, group * hidden).sum(dim=1)
        return out if fold else self._add_shared(rows, out)

    def _slots(self, rows: torch.Tensor, plan: DispatchPlan, w: Optional[torch.Tensor], group: int):
        """Inference on few rows: rows gathered into each expert's (capacity, H) slot block (padded with a repeated
        row whose results are dropped), two batched matmuls over the used experts' weights (a view, no copy)."""
        hidden, k = self.hidden_size, plan.k
        slots = plan.slots(group)
        x = rows.reshape(-1, hidden)
        experts = slice(slots.first, slots.end)
        x_slots = x.index_select(0, slots.slot_row).view(slots.end - slots.first, slots.capacity, hidden)
        # F.silu rather than the activation module: a module call costs as much as the op on rows this few.
        act = F.silu if self.activation == "silu" else self.act_fn
        gate, up = torch.bmm(x_slots, self.gate_up_proj[experts].transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(act(gate) * up, self.down_proj[experts].transpose(1, 2))
        routed = out.view(-1, hidden).index_select(0, slots.row_slot)  # (entries * group, H)
        if w is not None:
            routed = routed.view(-1, group, hidden) * w.to(routed.dtype).view(-1, 1, 1)
        if k > 1:
            routed = routed.reshape(-1, k, group * hidden).sum(dim=1)
        routed = routed.reshape(-1, hidden)
        if self.shared is not None and self.fuse_shared:
            # The shared down projection and the mix in one addmm.
            sg, su, sd = gated_ffn_weights(self.shared)
            h = act(F.linear(x, sg)) * F.linear(x, su)
            return torch.addmm(routed, h, sd.t(), beta=self.routed_weight, alpha=self.shared_weight)
        if self.routed_weight != 1.0:
            routed = routed * self.routed_weight
        return self._add_shared(rows, routed.view(rows.shape))

    def _linear_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """Any activation: plain F.linear per non-empty expert, which autocast handles like any Linear."""
        outputs = []
        for expert, chunk in enumerate(torch.split(x_sorted, sizes)):
            if chunk.shape[0] == 0:
                continue
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(self.act_fn(gate) * up, self.down_proj[expert]))
        if not outputs:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]

    def _grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor, sizes=None) -> torch.Tensor:
        dtype = compute_dtype(x_sorted)
        with autocast_off(x_sorted):
            x_sorted = x_sorted.to(dtype)
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


# ---------------------------------------------------------------------------------------------------- loop kernel


def _mm(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, out: Optional[torch.Tensor] = None,
        accumulate: bool = False) -> torch.Tensor:
    """alpha * a @ b, written to `out` (added to it with `accumulate`): the scale rides on the GEMM for free."""
    if out is None:
        out = a.new_empty(a.shape[0], b.shape[1])
    if alpha == 1.0 and not accumulate:
        return torch.mm(a, b, out=out)
    return torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, alpha=alpha, out=out)


def _used(sizes: Sequence[int]) -> List[int]:
    return [e for e, n in enumerate(sizes) if n > 0]


def _per_expert(stacked: torch.Tensor, inter: int, dim: int = 2):
    """The gate and up halves of a stacked gate_up weight split along `dim` (1 for the stored (E, 2I, H) layout, 2
    for its (E, H, 2I) transposed view), each as a tuple of per-expert views: a few dispatcher calls for all
    experts instead of indexing inside the loop."""
    return tuple(half.unbind(0) for half in stacked.split(inter, dim=dim))


def _stacked_grad(weight: torch.Tensor, used: Sequence[int]) -> torch.Tensor:
    """An uninitialised gradient for a stacked weight whose `used` experts' slices the caller overwrites: only the
    other experts' slices are zeroed."""
    grad = torch.empty_like(weight)
    used = set(used)
    for e in range(weight.shape[0]):
        if e not in used:
            grad[e].zero_()  # a slice each: an index tensor would be a host-to-device copy on a GPU
    return grad


class _SiluExpertsLoop(torch.autograd.Function):
    """SwiGLU experts on rows grouped by expert, optionally with a shared SwiGLU, in one node:

        out = shared_weight * shared(x) + routed_weight * w * expert_e(x)     (rows of expert e)

    `w` (one weight per `rows_per_weight` consecutive rows, or None for 1) is the routing weight of the entry each
    row belongs to (a MoSE sequence's straight-through gate, a top-k token's combine weight).

    Why one node: the weights are folded into the GEMMs (addmm's alpha/beta), the shared down projection
    accumulates onto the routed output and both input-gradient halves into one buffer, so the combination and its
    backward cost no passes over (rows, hidden) of their own; each expert's weight gradient is written into its
    slice of one stacked gradient, instead of autograd's per-expert full-size zero tensors that `gate_up_proj[e]`
    indexing would create and then sum. The intermediate activations of the shared expert (rows 0..N-1) and the
    routed experts (the next N rows, expert by expert) share one buffer per quantity, so every elementwise pass
    (silu, the gating product and their backward) is one op over all rows: on small layers per-op overhead, not
    FLOPs, is the cost, and on a GPU each op is a kernel launch. The gate and up halves of `gate_up_proj` get
    separate GEMMs into separate buffers, as a dense SwiGLU's gate_proj and up_proj do, so the passes run on
    contiguous memory. The gradient of `w` is the row dot product of the unweighted routed output with the
    output gradient: no division by a probability, so a gate whose probability underflows stays finite.
    """

    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, sizes, shared_gate, shared_up, shared_down, shared_weight,
                routed_weight, w, rows_per_weight):
        x = x.contiguous()
        num_rows, hidden = x.shape
        inter = down_proj.shape[-1]
        if sum(sizes) != num_rows:
            raise ValueError(f"expert row counts sum to {sum(sizes)}, but {num_rows} rows were given")
        has_shared = shared_gate is not None
        first = num_rows if has_shared else 0  # first row of the routed experts in the intermediate buffers
        gate = x.new_empty(first + num_rows, inter)  # pre-activations, saved for the backward
        up = x.new_empty(first + num_rows, inter)
        routed = x.new_empty(num_rows, hidden)  # routed_weight * expert(x)
        experts = _used(sizes)
        x_rows = x.split(sizes)
        gate_rows, up_rows = gate[first:].split(sizes), up[first:].split(sizes)
        gate_wt, up_wt = _per_expert(gate_up_proj.transpose(1, 2), inter)  # (H, I) views, no copy
        for e in experts:
            torch.mm(x_rows[e], gate_wt[e], out=gate_rows[e])
            torch.mm(x_rows[e], up_wt[e], out=up_rows[e])
        if has_shared:
            torch.mm(x, shared_gate.t(), out=gate[:first])
            torch.mm(x, shared_up.t(), out=up[:first])
        act = F.silu(gate)  # saved for the backward
        h = act * up  # the down projections' input
        h_rows, routed_rows, down_wt = h[first:].split(sizes), routed.split(sizes), down_proj.transpose(1, 2).unbind(0)
        for e in experts:
            _mm(h_rows[e], down_wt[e], routed_weight, out=routed_rows[e])
        keep_routed = w is not None and ctx.needs_input_grad[9]
        if w is not None:
            weighted = routed.view(-1, rows_per_weight, hidden) * w.view(-1, 1, 1)
            out = weighted.view(num_rows, hidden)
        else:
            out = routed
        if has_shared:
            out = torch.addmm(out, h[:first], shared_down.t(), alpha=shared_weight, out=out)
        ctx.sizes, ctx.weights, ctx.rows_per_weight = sizes, (shared_weight, routed_weight), rows_per_weight
        ctx.save_for_backward(x, gate_up_proj, down_proj, gate, up, act, h, shared_gate, shared_up, shared_down,
                              w, routed if keep_routed else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_up_proj, down_proj, gate, up, act, h, shared_gate, shared_up, shared_down, w, routed = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_gu, need_down, need_w = need[0], need[1], need[2], need[9]
        shared_weight, routed_weight = ctx.weights
        sizes = ctx.sizes
        grad_out = grad_out.contiguous()
        num_rows, hidden = x.shape
        inter = down_proj.shape[-1]
        has_shared = shared_gate is not None
        first = num_rows if has_shared else 0
        experts = _used(sizes)
        # The gradient reaching the routed term: scaled by each row's weight.
        grad_routed = grad_out if w is None else (grad_out.view(-1, ctx.rows_per_weight, hidden)
                                                  * w.view(-1, 1, 1)).view(num_rows, hidden)
        grad_rows, x_rows = grad_routed.split(sizes), x.split(sizes)
        down_w = down_proj.unbind(0)
        grads_shared = [None, None, None]
        grad_gu_w = _stacked_grad(gate_up_proj, experts) if need_gu else None
        grad_down_w = _stacked_grad(down_proj, experts) if need_down else None
        if grad_down_w is not None:
            h_rows, grad_down_rows = h[first:].split(sizes), grad_down_w.unbind(0)
            grad_rows_t = grad_routed.t().split(sizes, dim=1)
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
        grad_w = None
        if need_w:
            row_dot = torch.sum(routed * grad_out, dim=-1, dtype=torch.float32)
            grad_w = row_dot.view(-1, ctx.rows_per_weight).sum(dim=1).to(w.dtype)
        return (grad_x, grad_gu_w, grad_down_w, None, *grads_shared, None, None, grad_w, None)


def silu_experts_loop(x_sorted: torch.Tensor, experts: Experts, sizes: List[int], shared: Optional[nn.Module] = None,
                      shared_weight: float = 1.0, routed_weight: float = 1.0, w: Optional[torch.Tensor] = None,
                      rows_per_weight: int = 1) -> torch.Tensor:
    """`_SiluExpertsLoop` on rows grouped by expert (`sizes` rows each): the experts alone, or `shared_weight *
    shared(x) + routed_weight * w * expert(x)` with a bias-free gated `shared` FFN."""
    weights = [experts.gate_up_proj, experts.down_proj, None, None, None]
    if shared is not None:
        weights[2:] = gated_ffn_weights(shared)
    # Under autocast the node computes in autocast's dtype on explicitly cast inputs (its out= matmuls would
    # otherwise silently stay in float32); the casts' backward returns float32 gradients to float32 weights.
    dtype = compute_dtype(x_sorted)
    gu, down, sg, su, sd = (None if t is None else t.to(dtype) for t in weights)
    with autocast_off(x_sorted):
        return _SiluExpertsLoop.apply(x_sorted.to(dtype), gu, down, sizes, sg, su, sd, float(shared_weight),
                                      float(routed_weight), None if w is None else w.to(dtype), rows_per_weight)
