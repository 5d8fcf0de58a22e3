"""MoE blocks and experts on their own (no backbone): upcycling, routing, the routing record, modality split, aux
losses, and every dispatch path of the experts against independent per-expert references."""

import copy
import math

import pytest
import torch
from torch import nn

from mose_lightning.moe import (
    DispatchPlan,
    ExpertGroupBlock,
    Experts,
    MoSEBlock,
    RoutingContext,
    TokenTopKRouter,
    TopKMoEBlock,
    load_balancing_loss,
    router_z_loss,
)
from mose_lightning.moe.experts import silu_experts_loop, use_grouped_mm

H, I = 16, 24


class GatedFFN(nn.Module):
    def __init__(self, hidden=H, inter=I, act=nn.functional.silu):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def tanh_gelu(x):
    return nn.functional.gelu(x, approximate="tanh")


def expert_fn(experts: Experts, e: int, x: torch.Tensor, act=nn.functional.silu) -> torch.Tensor:
    """Independent per-expert reference written from the stacked weights."""
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (act(gate) * up) @ experts.down_proj[e].T


def randomise(block):
    """Make experts (and the shared expert) differ so routing and mixing mistakes become visible."""
    torch.manual_seed(123)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(std=0.3)
        block.experts.down_proj.normal_(std=0.3)
        if block.experts.shared is not None:
            block.experts.shared.down_proj.weight.normal_(std=0.3)
    return block


def mix(experts: Experts):
    return experts.shared_weight, experts.routed_weight


@pytest.fixture
def dense():
    torch.manual_seed(0)
    return GatedFFN()


# ---- upcycling and the combination rules ---------------------------------------------------------------------
@pytest.mark.parametrize("combine", ["weighted", "sum"])
@pytest.mark.parametrize("shared", [True, False])
def test_upcycled_blocks_compute_the_dense_function(dense, combine, shared):
    x = torch.randn(3, 7, H)
    ctx = RoutingContext(image_mask=torch.rand(3, 7) > 0.5)
    mose = MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0, shared, combine)
    topk = TopKMoEBlock.upcycle(dense, 8, 2, "silu", ctx, 0, shared, combine)
    group = ExpertGroupBlock.from_mose(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0, shared, combine))
    ref = dense(x)
    for block in (mose, topk, group):
        for grad in (True, False):  # the loop kernel and the slot path
            with torch.set_grad_enabled(grad):
                torch.testing.assert_close(block(x[:, :2] if not grad else x), ref[:, :2] if not grad else ref,
                                           rtol=1e-5, atol=1e-6)


def test_upcycled_geglu_experts_compute_the_dense_gemma_ffn():
    """A GeGLU FFN (Gemma's tanh-GELU) upcycles to experts of the same activation, through the plain loop."""
    torch.manual_seed(1)
    geglu = GatedFFN(act=tanh_gelu)
    ctx = RoutingContext()
    block = MoSEBlock.upcycle(geglu, 4, "gelu_pytorch_tanh", ctx, 0, "perception", 0)
    x = torch.randn(3, 5, H)
    torch.testing.assert_close(block(x), geglu(x), rtol=1e-5, atol=1e-6)
    randomise(block)
    route = block.route(x)
    out = block(x)
    for b in range(3):
        e = int(route.expert[b])
        expected = 0.5 * block.experts.shared(x[b]) + 0.5 * expert_fn(block.experts, e, x[b], tanh_gelu)
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)


def test_sum_combination_starts_skill_experts_as_zero_delta(dense):
    block = MoSEBlock.upcycle(dense, 4, "silu", RoutingContext(), 0, "perception", 0, True, "sum")
    assert torch.count_nonzero(block.experts.down_proj) == 0
    torch.testing.assert_close(block.experts.gate_up_proj[2], torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))


# ---- sequence routing ------------------------------------------------------------------------------------
def test_mose_routes_whole_samples_by_router_argmax(dense):
    ctx = RoutingContext()
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0))
    block.routed_by_layer_hook = True  # the test calls `route` as the decoder-layer hook would
    x = torch.randn(5, 6, H)
    ctx.prompt_mask = torch.ones(5, 6, dtype=torch.bool)
    ctx.prompt_mask[:, 4:] = False  # the last two tokens are "answer" tokens
    route = block.route(x)
    pooled = x[:, :4].mean(dim=1)
    pooled = pooled / pooled.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    logits = pooled @ block.router.classifier.weight.T + block.router.classifier.bias
    assert route.expert.tolist() == logits.argmax(-1).tolist()
    out = block(x)
    for b in range(5):
        e = int(route.expert[b])
        expected = 0.5 * block.experts.shared(x[b]) + 0.5 * expert_fn(block.experts, e, x[b])
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)
    assert ctx.record.routes[0] is route and ctx.record.expert_counts(0).tolist() == [
        route.expert.tolist().count(e) for e in range(4)]


def test_router_standardisation_is_applied_to_the_normalised_input():
    from mose_lightning.moe import SequenceSkillRouter

    torch.manual_seed(2)
    router = SequenceSkillRouter(H, 3)
    pooled = torch.randn(40, H) * 3 + 5
    normalised = router.normalise(pooled)
    router.set_standardisation(normalised)
    z = (normalised - normalised.mean(0)) / normalised.std(0, unbiased=False)
    torch.testing.assert_close(router.features(pooled), z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(router(pooled), z @ router.classifier.weight.T + router.classifier.bias,
                               rtol=1e-4, atol=1e-4)


def test_router_reads_prompt_tokens_only_and_reuses_routes_while_decoding(dense):
    ctx = RoutingContext()
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0))
    x = torch.randn(2, 6, H)
    ctx.prompt_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    first = block.route(x).logits.clone()
    y = x.clone()
    y[0, 3:] = 100.0  # answer / padding tokens change: the router input must not
    y[1, 5] = -50.0
    torch.testing.assert_close(block.route(y).logits, first)
    z = x.clone()
    z[0, 0] += 3.0
    assert not torch.allclose(block.route(z).logits, first)
    decided = block.route(x)
    ctx.decoding = True
    assert block.route(torch.randn(2, 1, H)) is decided


def test_block_without_its_layer_hook_routes_each_call_on_its_own_input(dense):
    """A block called on its own routes every call anew on its input (never a stale decision of an earlier
    input); one routed by its layer's hook runs the decision the hook recorded, and refuses to run without one."""
    ctx = RoutingContext()
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0))
    with torch.no_grad():
        block.router.classifier.weight.normal_(std=3.0)
    torch.manual_seed(3)
    a, b = torch.randn(4, 5, H) + 2 * torch.randn(4, 1, H), torch.randn(4, 5, H) + 2 * torch.randn(4, 1, H)
    fresh = copy.deepcopy(block)
    fresh.context = RoutingContext()
    out_a, out_b = block(a), block(b)
    torch.testing.assert_close(out_b, fresh(b))
    assert not torch.equal(block.decide(a).expert, block.decide(b).expert)
    torch.testing.assert_close(out_a, fresh(a))
    block.routed_by_layer_hook = True
    block.context.begin()
    with pytest.raises(RuntimeError, match="no routing decision"):
        block(a)
    route = block.route(a)
    out = block(b)  # a's decision, b's rows: what the hooked FFN of a layer whose input was `a` computes
    for i, e in enumerate(route.expert.tolist()):
        expected = 0.5 * block.experts.shared(b[i]) + 0.5 * expert_fn(block.experts, e, b[i])
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["labels", "shuffled"])
def test_route_source_labels_and_shuffled(dense, source):
    ctx = RoutingContext()
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 1, "prediction", 2))
    x = torch.randn(3, 4, H)
    free = block.route(x).expert.clone()
    ctx.skill_labels = torch.tensor([[0, 3, 1], [2, -1, 0], [1, 2, 2]])
    ctx.shuffle = torch.tensor([2, 0, 1])
    ctx.route_source = source
    routed = block.route(x)
    if source == "labels":
        assert routed.expert.tolist() == [3, int(free[1]), 2]  # the router decides where there is no label
    else:
        assert routed.expert.tolist() == free[[2, 0, 1]].tolist()
    assert routed.source == source
    ctx.route_source = "router"
    assert torch.equal(block.route(x).expert, free)


def test_routers_can_read_the_first_moe_layers_input(dense):
    ctx = RoutingContext(router_input_layer=0)
    first = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0))
    later = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 1, "prediction", 2))
    x0, x2 = torch.randn(3, 4, H), torch.randn(3, 4, H)
    with pytest.raises(RuntimeError, match="has not been routed"):
        later.route(x2)
    first.route(x0)
    assert torch.equal(later.route(x2).pooled, ctx.record.routes[0].pooled)


def test_teacher_forced_route_with_vanishing_probability_trains_finitely(dense):
    """The straight-through gate exp(log p - log p.detach()) of a teacher-forced expert whose probability
    underflows to 0 is still 1, and its gradient stays finite (p / p.detach() would be 0 / 0)."""
    ctx = RoutingContext(route_source="labels")
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0))
    with torch.no_grad():
        block.router.classifier.bias.copy_(torch.tensor([200.0, 0.0, 0.0, 0.0]))  # p(expert 3) = exp(-200) = 0
    ctx.skill_labels = torch.tensor([[3], [3]])
    x = torch.randn(2, 5, H, requires_grad=True)
    route = block.route(x)
    assert route.prob.tolist() == [0.0, 0.0] and route.expert.tolist() == [3, 3]
    out = block(x)
    expected = 0.5 * block.experts.shared(x) + 0.5 * expert_fn(block.experts, 3, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    grads = [x.grad, block.router.classifier.weight.grad, block.experts.down_proj.grad]
    assert all(torch.isfinite(g).all() for g in grads)
    assert block.router.classifier.weight.grad.abs().sum() > 0


def test_expert_group_splits_tokens_by_modality(dense):
    ctx = RoutingContext()
    mose = randomise(MoSEBlock.upcycle(dense, 3, "silu", ctx, 0, "perception", 0))
    group = ExpertGroupBlock.from_mose(mose)
    assert group.experts.num_experts == 6 and group.router is mose.router
    assert group.experts.shared is mose.experts.shared
    # Both members of a group start as the skill expert they were copied from.
    torch.testing.assert_close(group.experts.down_proj[4], mose.experts.down_proj[2])
    torch.testing.assert_close(group.experts.down_proj[5], mose.experts.down_proj[2])
    with torch.no_grad():
        group.experts.gate_up_proj.normal_(std=0.3)  # now image and text members differ
    x = torch.randn(2, 5, H)
    ctx.image_mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    skill = group.route(x).expert
    out = group(x)
    for b in range(2):
        for t in range(5):
            member = 2 * int(skill[b]) + (0 if ctx.image_mask[b, t] else 1)
            expected = 0.5 * group.experts.shared(x[b, t]) + 0.5 * expert_fn(group.experts, member, x[b, t])
            torch.testing.assert_close(out[b, t], expected, rtol=1e-5, atol=1e-5)
    assert ctx.record.expert_counts(0).sum() == 10


# ---- top-k ---------------------------------------------------------------------------------------------------
def test_topk_aux_losses_match_hand_computed_values():
    # Two experts, tokens x1 = e1 (logits ln3, 0 -> p = 3/4, 1/4) and x2 = e2 (p = 1/4, 3/4); the 4th is padding.
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.1, 0.9]])
    top_i = torch.tensor([[0], [0], [1], [1]])
    valid = torch.tensor([True, True, True, False])
    # f = (2/3, 1/3), P = (1.75/3, 1.25/3), aux = 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 9.5 / 9
    assert load_balancing_loss(probs, top_i, 2, valid).item() == pytest.approx(9.5 / 9)
    logits = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0], [0.0, math.log(3)], [5.0, 5.0]])
    assert router_z_loss(logits, valid).item() == pytest.approx(math.log(4) ** 2)

    block = TopKMoEBlock.upcycle(GatedFFN(2, 4), 2, 1, "silu", RoutingContext(), 3)
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]]))
    block.context.attention_mask = valid.view(1, 4)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    block(x)
    # The padding token (logits 0, 0) is excluded, so the losses are exactly the hand-computed ones.
    aux = block.context.record.aux[3]
    assert aux["load_balancing"].item() == pytest.approx(9.5 / 9, rel=1e-5)
    assert aux["z_loss"].item() == pytest.approx(math.log(4) ** 2, rel=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mask", ["none", "some", "all_padding"])
def test_topk_routing_node_matches_autograd_through_the_plain_formulas(top_k, mask):
    """`route_with_aux` (one node, hand-written backward) against autograd through `forward`, `load_balancing_loss`
    and `router_z_loss`: same choices, weights and losses, same gradients for the tokens and the gate."""
    torch.manual_seed(4)
    router = TokenTopKRouter(H, 4, top_k)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.5)
    x = torch.randn(12, H)
    valid = {"none": None, "some": torch.arange(12) % 3 != 0, "all_padding": torch.zeros(12, dtype=torch.bool)}[mask]
    g_w, g_b, g_z = torch.randn(12, top_k), 0.7, -0.3

    results = []
    for node in (True, False):
        xin = x.clone().requires_grad_()
        router.gate.weight.grad = None
        if node:
            top_i, weights, balance, z = router.route_with_aux(xin, valid)
        else:
            logits, probs, top_i, weights = router(xin)
            balance = load_balancing_loss(probs, top_i, 4, valid)
            z = router_z_loss(logits, valid)
        losses = [weights, balance, z]
        torch.autograd.backward([t for t in losses if t.requires_grad],
                                [g for t, g in zip(losses, [g_w, torch.tensor(g_b), torch.tensor(g_z)]) if t.requires_grad])
        results.append((top_i, weights.detach(), balance.detach(), z.detach(), xin.grad, router.gate.weight.grad.clone()))
    (a_i, *a), (b_i, *b) = results
    assert torch.equal(a_i, b_i)
    for name, u, v in zip(["weights", "balance", "z", "grad x", "grad gate"], a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=name)
    if mask == "all_padding":
        assert a[1].item() == 0.0 and a[2].item() == 0.0


@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_inference_selection_matches_the_router_forward(top_k):
    """`select` (inference) chooses the experts and combine weights that the full router forward gives."""
    torch.manual_seed(3)
    router = TokenTopKRouter(H, 4, top_k)
    with torch.no_grad():
        router.gate.weight.normal_(std=1.0)
        x = torch.randn(50, H)
        _, _, top_i, weights = router(x)
        chosen, chosen_weights = router.select(x)
    assert torch.equal(chosen, top_i)
    if top_k == 1:
        assert chosen_weights is None and torch.equal(weights, torch.ones_like(weights))
    else:
        torch.testing.assert_close(chosen_weights, weights)


def test_topk_without_token_dropping_sends_every_token_to_k_experts(dense):
    ctx = RoutingContext()
    block = randomise(TopKMoEBlock.upcycle(dense, 4, 2, "silu", ctx, 0))
    block(torch.randn(2, 9, H))
    assert int(ctx.record.expert_counts(0).sum()) == 2 * 9 * 2


# ---- the experts' dispatch paths against the per-expert reference ---------------------------------------------
def _reference(experts: Experts, x: torch.Tensor, index: torch.Tensor, weights, act=nn.functional.silu):
    """sum_k w_k expert_{index_k}(x) mixed with the shared expert, token by token (rows of x (N, H), index (N, k))."""
    rows = []
    for t in range(x.shape[0]):
        routed = sum((1.0 if weights is None else weights[t, j]) * expert_fn(experts, int(index[t, j]), x[t], act)
                     for j in range(index.shape[1]))
        shared = experts.shared(x[t]) if experts.shared is not None else 0.0
        rows.append(experts.shared_weight * shared + experts.routed_weight * routed)
    return torch.stack(rows)


@pytest.mark.parametrize("path", ["loop", "slots", "geglu_loop", "unfused"])
@pytest.mark.parametrize("layout", ["sequences", "tokens", "top2"])
@pytest.mark.parametrize("shared_expert", [True, False])
def test_every_dispatch_path_matches_the_per_token_reference(path, layout, shared_expert):
    """One call, `experts(x, expert_index, weights)`, on every path (the silu loop kernel with the shared expert
    folded in or apart, the slot path, the plain loop of other activations: GeGLU here) for whole-sequence
    routing, token routing and top-2 with weights: output, and gradients of x, the weights and every parameter."""
    torch.manual_seed(9)
    act, act_name = (tanh_gelu, "gelu_pytorch_tanh") if path == "geglu_loop" else (nn.functional.silu, "silu")
    experts = Experts.upcycle(GatedFFN(act=act), 5, act_name, "loop", shared_expert)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.3)
        experts.down_proj.normal_(std=0.3)
        if shared_expert:
            experts.shared.down_proj.weight.normal_(std=0.3)
    if path == "unfused":
        experts.fuse_shared = False
    batch, seq = (3, 4) if path == "slots" else (4, 6)
    x = torch.randn(batch, seq, H)
    if layout == "sequences":
        index = torch.tensor([3, 1, 3, 0][:batch]).view(-1, 1, 1)  # experts 2 and 4 empty, samples out of order
        weights = torch.rand(batch, 1, 1) + 0.5
    else:
        k = 2 if layout == "top2" else 1
        index = torch.randint(0, 4, (batch, seq, k))  # expert 4 empty
        if k == 2:
            index[..., 1] = (index[..., 0] + 1 + torch.randint(0, 3, (batch, seq))) % 4
        weights = torch.rand(batch, seq, k) + 0.5
    k = index.shape[-1]

    def per_token(t: torch.Tensor) -> torch.Tensor:
        return t.expand(batch, seq, k).reshape(-1, k)

    grad = torch.randn(batch, seq, H)
    train = path != "slots"

    def run(fn):
        xin = x.clone().requires_grad_(train)
        w = weights.clone().requires_grad_(train)
        for p in experts.parameters():
            p.grad = None
        with torch.set_grad_enabled(train):
            out = fn(xin, w)
        if train:
            out.backward(grad)
        return out.detach(), xin.grad, w.grad, {n: None if p.grad is None else p.grad.clone()
                                               for n, p in experts.named_parameters()}

    got = run(lambda xin, w: experts(xin, index, w))
    want = run(lambda xin, w: _reference(experts, xin.reshape(-1, H), per_token(index), per_token(w), act).view(
        batch, seq, H))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    if not train:
        return
    for name, a, b in zip(["x", "weights"], got[1:3], want[1:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-4, atol=1e-5, msg=name)
    if layout == "sequences":  # unused experts' gradient slices are exactly zero, not stale memory
        assert not got[3]["down_proj"][2].any() and not got[3]["gate_up_proj"][4].any()


def test_loop_kernel_matches_autograd_per_expert_reference_with_empty_experts(dense):
    """The silu loop kernel on pre-sorted rows: empty experts first, between and last, one weight per 2 rows."""
    torch.manual_seed(11)
    experts = Experts.upcycle(dense, 5, "silu", "loop", True, "weighted", 0.3)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.3)
        experts.down_proj.normal_(std=0.3)
    sizes = [0, 4, 0, 6, 0]  # rows 0-3 to expert 1, rows 4-9 to expert 3
    x = torch.randn(10, H, requires_grad=True)
    w = torch.tensor([0.9, 0.4, 0.6, 0.7, 0.3], requires_grad=True)
    grad = torch.randn(10, H)
    out = silu_experts_loop(x, experts, sizes, experts.shared, 0.3, 0.7, w, 2)
    out.backward(grad)
    got = [t.grad.clone() for t in (x, w, experts.gate_up_proj, experts.down_proj)]
    for t in (x, w, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    expert_of_row = [1] * 4 + [3] * 6
    routed = torch.stack([expert_fn(experts, e, x[i]) for i, e in enumerate(expert_of_row)]) * w.repeat_interleave(2)[:, None]
    reference = 0.7 * routed + 0.3 * experts.shared(x)
    reference.backward(grad)
    torch.testing.assert_close(out.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["x", "w", "gate_up_proj", "down_proj"], got, [x.grad, w.grad, experts.gate_up_proj.grad,
                                                                       experts.down_proj.grad]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for e in (0, 2, 4):
        assert not got[2][e].any() and not got[3][e].any()


def test_slot_layout_lays_rows_out_per_expert_with_padding():
    # Rows 0, 2, 3 go to expert 2 and row 1 to expert 1; experts 0 and 3 get nothing, so the slots span experts 1-2
    # with capacity 3: expert 1 holds row 1 then two padding slots (reading row 0), expert 2 rows 0, 2, 3.
    slots = DispatchPlan.build(torch.tensor([[2], [1], [2], [2]]), 4).slots(1)
    assert (slots.first, slots.end, slots.capacity, slots.num_slots) == (1, 3, 3, 6)
    assert slots.slot_row.tolist() == [1, 0, 0, 0, 2, 3]
    assert slots.row_slot.tolist() == [3, 0, 4, 5]
    # Whole sequences of 2 rows (entries 0, 1 -> experts 1, 0) and top-2 of 2 tokens (entries read rows j // 2).
    seq = DispatchPlan.build(torch.tensor([[1], [0]]), 2).slots(2)
    assert seq.slot_row.tolist() == [2, 3, 0, 1] and seq.row_slot.tolist() == [2, 3, 0, 1]
    top2 = DispatchPlan.build(torch.tensor([[0, 1], [1, 0]]), 2).slots(1)
    assert top2.slot_row.tolist() == [0, 1, 0, 1] and top2.row_slot.tolist() == [0, 2, 3, 1]


def test_dispatch_plan_sizes_and_order_on_host_and_device():
    small = DispatchPlan.build(torch.tensor([[2], [0], [2]]), 3)
    assert small.host_entries == [2, 0, 2] and small.sizes == [1, 0, 2] and not small.is_sorted()
    assert DispatchPlan.build(torch.tensor([[0], [1], [1]]), 2).is_sorted()
    big = DispatchPlan.build(torch.randint(0, 4, (300, 2)), 4)
    order, inverse, counts = big.sort()
    assert big.host_entries is None and big.sizes == counts.tolist()
    assert torch.equal(big.index[order], big.index[order].sort().values)
    assert torch.equal(order[inverse], torch.arange(600))


@pytest.mark.parametrize("kind", ["mose", "group", "topk"])
def test_grouped_mm_and_loop_dispatch_agree_forward_and_backward(dense, kind):
    def make(dispatch):
        torch.manual_seed(7)
        ctx = RoutingContext(image_mask=torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) > 0.5)
        if kind == "topk":
            block = TopKMoEBlock.upcycle(dense, 4, 2, "silu", ctx, 0, dispatch=dispatch)
        else:
            block = MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0, dispatch=dispatch)
            if kind == "group":
                block = ExpertGroupBlock.from_mose(block)
        return randomise(block)

    x = torch.randn(4, 8, H)
    outs, grads = [], []
    for dispatch in ("loop", "grouped_mm"):
        block = make(dispatch)
        xin = x.clone().requires_grad_()
        out = block(xin)
        out.sum().backward()  # a broadcast gradient, the case grouped_mm's backward needs made contiguous
        outs.append(out.detach())
        grads.append((xin.grad, block.experts.gate_up_proj.grad, block.experts.down_proj.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_trainable_router_gets_gradient_through_hard_choice_without_changing_output(dense):
    ctx = RoutingContext()
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0))
    x = torch.randn(3, 5, H)
    with torch.no_grad():
        reference = block(x)
    out = block(x)
    torch.testing.assert_close(out, reference)
    out.pow(2).sum().backward()
    assert block.router.classifier.weight.grad is not None
    assert block.router.classifier.weight.grad.abs().sum() > 0
    # Unchosen experts receive exactly zero gradient, chosen ones a nonzero one, all from one stacked parameter.
    chosen = set(block.decide(x).expert.tolist())
    for e in range(4):
        g = block.experts.down_proj.grad[e].abs().sum()
        assert (g > 0) == (e in chosen)


@pytest.mark.parametrize("kind", ["mose", "group", "topk"])
@pytest.mark.parametrize("combine", ["weighted", "sum"])
@pytest.mark.parametrize("router_trainable", [True, False])
def test_fused_shared_and_routed_experts_match_the_separate_computation(dense, kind, combine, router_trainable):
    """The one-pass shared + routed kernel against the shared expert, the experts and the combination computed
    apart (`fuse_shared=False`): same output, same gradients for the input, the shared expert, the stacked
    experts and the router."""
    torch.manual_seed(3)
    ctx = RoutingContext(image_mask=torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) > 0.5)
    if kind == "topk":
        fused = randomise(TopKMoEBlock.upcycle(dense, 4, 1, "silu", ctx, 0, combine=combine, dispatch="loop"))
        router = fused.router.gate
    else:
        fused = MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0, combine=combine, dispatch="loop")
        fused = randomise(ExpertGroupBlock.from_mose(fused) if kind == "group" else fused)
        router = fused.router.classifier
    with torch.no_grad():
        router.weight.normal_(std=3.0)
    fused.router.requires_grad_(router_trainable)
    separate = copy.deepcopy(fused)
    separate.experts.fuse_shared = False
    x = torch.randn(6, 5, H)
    grad = torch.randn(6, 5, H)
    results = []
    for block in (fused, separate):
        xin = x.clone().requires_grad_()
        out = block(xin)
        out.backward(grad)
        results.append((out.detach(), xin.grad, {n: p.grad for n, p in block.named_parameters()}))
    if kind != "topk":  # the batch is not in expert order, so both row permutations (and backward) are exercised
        expert = fused.decide(x).expert
        assert not torch.equal(expert, expert.sort().values)
    assert len(ctx.record.expert_counts(0).nonzero()) > 1
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    assert results[0][2].keys() == results[1][2].keys()
    for name in results[0][2]:
        a, b = results[0][2][name], results[1][2][name]
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert (router.weight.grad is not None) == router_trainable


# ---- inference on few rows: the slot path ------------------------------------------------------------------
@pytest.mark.parametrize("combine", ["weighted", "sum"])
@pytest.mark.parametrize("shared_expert", [True, False])
def test_mose_decode_steps_reuse_the_prompts_route_and_plan(dense, combine, shared_expert):
    """Decode steps (one row per sample) reuse the prompt's decision and its dispatch plan, and compute what the
    per-sample reference (and the loop kernel, with gradients on) computes."""
    ctx = RoutingContext()
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0, shared_expert, combine))
    block.routed_by_layer_hook = True  # the test calls `route` as the decoder-layer hook would
    with torch.no_grad():
        block.router.classifier.weight.normal_(std=3.0)
    torch.manual_seed(7)
    prompt = torch.randn(6, 5, H) + 3 * torch.randn(6, 1, H)
    step = torch.randn(6, 1, H)
    with torch.no_grad():
        route = block.route(prompt)
        block(prompt)
        assert len(set(route.expert.tolist())) > 1
        ctx.decoding = True
        assert block.route(step) is route
        out = block(step)
        plan = route.cache["mose"]
        block.route(step)
        again = block(step)
        assert route.cache["mose"] is plan and plan.host_entries == route.expert.tolist()
    block.route(step)
    loop = block(step)  # gradients on: the loop kernel
    torch.testing.assert_close(out, again)
    torch.testing.assert_close(out, loop.detach(), rtol=1e-5, atol=1e-6)
    w_shared, w_routed = mix(block.experts)
    for b, e in enumerate(route.expert.tolist()):
        expected = w_routed * expert_fn(block.experts, e, step[b, 0])
        if shared_expert:
            expected = expected + w_shared * block.experts.shared(step[b, 0])
        torch.testing.assert_close(out[b, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared_expert", [True, False])
def test_expert_group_decode_steps_use_each_samples_text_expert(dense, shared_expert):
    image = torch.zeros(6, 5, dtype=torch.bool)
    image[:, :3] = True
    ctx = RoutingContext(image_mask=image)
    block = randomise(ExpertGroupBlock.from_mose(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0,
                                                                   shared_expert)))
    block.routed_by_layer_hook = True  # the test calls `route` as the decoder-layer hook would
    with torch.no_grad():
        block.router.classifier.weight.normal_(std=3.0)
    torch.manual_seed(7)
    prompt = torch.randn(6, 5, H) + 3 * torch.randn(6, 1, H)
    step = torch.randn(6, 1, H)
    with torch.no_grad():
        route = block.route(prompt)
        block(prompt)
        skills = route.expert.tolist()
        assert len(set(skills)) > 1
        ctx.decoding = True
        block.route(step)
        out = block(step)
        plan = route.cache["group_text"]
        block.route(step)
        again = block(step)
        assert route.cache["group_text"] is plan
    for b, skill in enumerate(skills):
        expected = expert_fn(block.experts, 2 * skill + ExpertGroupBlock.TEXT, step[b, 0])
        if shared_expert:
            expected = 0.5 * block.experts.shared(step[b, 0]) + 0.5 * expected
        torch.testing.assert_close(out[b, 0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, out)


@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_inference_counts_the_prompts_usage_not_decode_steps(dense, top_k):
    ctx = RoutingContext()
    block = randomise(TopKMoEBlock.upcycle(dense, 4, top_k, "silu", ctx, 0))
    with torch.no_grad():
        block(torch.randn(3, 4, H))
        prompt = ctx.record.expert_counts(0).clone()
        ctx.decoding = True
        block(torch.randn(3, 1, H))
    assert torch.equal(ctx.record.expert_counts(0), prompt) and int(prompt.sum()) == 12 * top_k


# ---- precision ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fuse", [True, False])
def test_skill_router_stays_float32_in_a_bf16_block(dense, fuse):
    """bf16 would wreck a router whose large weights and bias cancel; the block still runs and trains in bf16."""
    block = MoSEBlock.upcycle(dense.to(torch.bfloat16), 4, "silu", RoutingContext(), 0, "perception", 0,
                              dispatch="loop")
    block.experts.fuse_shared = fuse
    assert block.router.classifier.weight.dtype == torch.float32
    assert block.experts.gate_up_proj.dtype == torch.bfloat16
    x = torch.randn(3, 5, H, dtype=torch.bfloat16, requires_grad=True)
    out = block(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    assert block.router.classifier.weight.grad.dtype == torch.float32
    assert block.router.classifier.weight.grad.abs().sum() > 0
    assert x.grad is not None and block.experts.gate_up_proj.grad is not None


def _bf16_copy(block):
    """The block with bf16 weights (routers kept float32, as a bf16 model keeps them)."""
    copy_ = copy.deepcopy(block).to(torch.bfloat16)
    for name, module in block.named_modules():
        if name.endswith("router") and hasattr(module, "classifier"):
            copy_.get_submodule(name).to(torch.float32)
    return copy_


@pytest.mark.parametrize("kind", ["mose", "mose_unfused", "group", "topk"])
def test_blocks_under_bf16_autocast_compute_in_bf16_like_a_bf16_block(dense, kind):
    """bf16-mixed: float32 weights, autocast on. The experts must run their matmuls in bf16 (as nn.Linear does
    under autocast; the loop kernel's out= matmuls and grouped_mm are not autocast ops) while the skill router
    stays float32. Reference: the same block with bf16 weights on a bf16 input, no autocast."""
    ctx = RoutingContext(image_mask=torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.5)
    if kind == "topk":
        block = TopKMoEBlock.upcycle(dense, 4, 1, "silu", ctx, 0, dispatch="loop")
    else:
        block = MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0, dispatch="loop")
        block.experts.fuse_shared = kind != "mose_unfused"
        if kind == "group":
            block = ExpertGroupBlock.from_mose(block)
    block = randomise(block)
    reference = _bf16_copy(block)
    x = torch.randn(4, 6, H)
    grad = torch.randn(4, 6, H)

    xin = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(xin)
        if kind != "topk":
            logits = block.router(torch.randn(4, H))
            assert logits.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    out.float().backward(grad)

    x_ref = x.to(torch.bfloat16).requires_grad_()
    out_ref = reference(x_ref)
    out_ref.float().backward(grad)
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=2e-2)
    # Against the float32 computation the difference is of bf16 rounding size, not zero: the matmuls really ran in bf16.
    with torch.no_grad():
        fp32 = block(x)
    assert (out.float() - fp32).abs().max() > 1e-4
    torch.testing.assert_close(xin.grad.float(), x_ref.grad.float(), rtol=5e-2, atol=5e-2)
    for (name, p), p_ref in zip(block.named_parameters(), reference.parameters()):
        assert p.dtype == torch.float32, name
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, p_ref.grad.float(), rtol=5e-2, atol=5e-2, msg=name)


# ---- CUDA (skipped without a GPU; `make test-gpu` runs only these) ----------------------------------------
needs_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="grouped_mm dispatch needs a CUDA GPU of compute capability 9.0 or newer",
)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.cuda
@needs_sm90
@pytest.mark.parametrize("kind", ["mose", "group", "topk"])
@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_cuda_grouped_mm_dispatch_matches_the_loop_kernel(kind, precision):
    """On a Hopper GPU, grouped_mm runs on bf16 weights and on float32 weights under bf16 autocast (which
    dispatch="auto" also takes there for more than 8 experts); it computes what the loop kernel computes (same
    routing, bf16 rounding apart), forward and backward, and at initialisation the upcycled dense FFN's function."""
    torch.manual_seed(0)
    hidden, inter, batch, seq = 256, 512, 8, 64
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dense_ffn = GatedFFN(hidden, inter).cuda().to(dtype)
    image = torch.rand(batch, seq, device="cuda") > 0.5
    ctx = RoutingContext(image_mask=image)
    if kind == "topk":
        block = TopKMoEBlock.upcycle(dense_ffn, 4, 1, "silu", ctx, 0, dispatch="grouped_mm")
    else:
        block = MoSEBlock.upcycle(dense_ffn, 4, "silu", ctx, 0, "perception", 0, dispatch="grouped_mm")
        if kind == "group":
            block = ExpertGroupBlock.from_mose(block)
    x = torch.randn(batch, seq, hidden, device="cuda", dtype=dtype) + torch.randn(batch, 1, hidden, device="cuda",
                                                                                   dtype=dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast:
        assert use_grouped_mm(x, "auto", 16) and not use_grouped_mm(x, "auto", 8)
        with torch.no_grad():
            at_init = block(x)
            reference = dense_ffn(x)
    assert _rel_err(at_init, reference) < 1e-2

    block = randomise(block)
    loop = copy.deepcopy(block)
    loop.experts.dispatch = "loop"
    grad = torch.randn(batch, seq, hidden, device="cuda")
    results, counts = [], []
    for b in (block, loop):
        xin = x.clone().requires_grad_()
        with autocast:
            out = b(xin)
        out.float().backward(grad)
        results.append((out, xin.grad, b.experts.gate_up_proj.grad, b.experts.down_proj.grad))
        counts.append(b.context.record.expert_counts(0))
    assert torch.equal(counts[0], counts[1])  # the same routing
    for got, want in zip(results[0], results[1]):
        assert got.dtype == want.dtype
        assert torch.isfinite(got).all()
        assert _rel_err(got, want) < 1e-2


@pytest.mark.cuda
@needs_sm90
@pytest.mark.parametrize("kind", ["mose", "group", "topk"])
def test_cuda_training_step_through_grouped_mm_makes_no_host_sync(kind):
    """Routing, dispatch plan, grouped_mm experts and the backward stay on the device: CUDA's sync debug mode turns
    any device-to-host synchronisation in a training step into an error."""
    torch.manual_seed(0)
    hidden, inter, batch, seq = 256, 512, 8, 64
    dense_ffn = GatedFFN(hidden, inter).cuda().to(torch.bfloat16)
    ctx = RoutingContext(image_mask=torch.rand(batch, seq, device="cuda") > 0.5)
    if kind == "topk":
        block = TopKMoEBlock.upcycle(dense_ffn, 4, 1, "silu", ctx, 0, dispatch="grouped_mm")
    else:
        block = MoSEBlock.upcycle(dense_ffn, 4, "silu", ctx, 0, "perception", 0, dispatch="grouped_mm")
        if kind == "group":
            block = ExpertGroupBlock.from_mose(block)
    x = torch.randn(batch, seq, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    block(x).float().sum().backward()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = block(x)
        loss = out.float().sum()
        if kind == "topk":
            aux = ctx.record.aux[0]
            loss = loss + 0.01 * aux["load_balancing"] + 0.001 * aux["z_loss"]
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()
