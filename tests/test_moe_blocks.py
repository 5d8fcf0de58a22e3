"""MoE blocks on their own (no backbone): upcycling, routing, modality split, aux losses, both dispatch kernels."""

import copy
import math

import pytest
import torch
from torch import nn

from mose_lightning.moe import (
    ExpertGroupBlock,
    ExpertSlots,
    MoSEBlock,
    RoutingContext,
    StackedSwiGLUExperts,
    TopKMoEBlock,
    load_balancing_loss,
    router_z_loss,
)
from mose_lightning.moe.experts import silu_moe

H, I = 16, 24


class SwiGLU(nn.Module):
    def __init__(self, hidden=H, inter=I):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def expert_fn(experts: StackedSwiGLUExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Independent per-expert reference written from the stacked weights."""
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (nn.functional.silu(gate) * up) @ experts.down_proj[e].T


def randomise(block):
    """Make experts differ so routing mistakes become visible."""
    torch.manual_seed(123)
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(std=0.3)
        block.experts.down_proj.normal_(std=0.3)
    return block


def with_loop_twin(block, router_weight: torch.Tensor, router_std: float):
    """`block` with a decisive router (`router_weight` redrawn) and a shared expert unlike the routed ones, and a
    copy of it that never takes the slot path (the loop kernel's reference)."""
    with torch.no_grad():
        router_weight.normal_(std=router_std)
        if block.shared is not None:
            block.shared.down_proj.weight.normal_(std=0.3)
    loop = copy.deepcopy(block)
    loop.SLOT_MAX_ROWS = 0
    return block, loop


@pytest.fixture
def dense():
    torch.manual_seed(0)
    return SwiGLU()


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
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-6)


def test_sum_combination_starts_skill_experts_as_zero_delta(dense):
    block = MoSEBlock.upcycle(dense, 4, "silu", RoutingContext(), 0, "perception", 0, True, "sum")
    assert torch.count_nonzero(block.experts.down_proj) == 0
    torch.testing.assert_close(block.experts.gate_up_proj[2], torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))


def test_mose_routes_whole_samples_by_router_argmax(dense):
    ctx = RoutingContext()
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0))
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
        expected = 0.5 * dense(x[b]) + 0.5 * expert_fn(block.experts, e, x[b])
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)


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
    decided = block.route(x).expert.clone()
    ctx.decoding = True
    reused = block.route(torch.randn(2, 1, H))
    assert torch.equal(reused.expert, decided)


def test_teacher_forcing_uses_labels_and_falls_back_to_router_where_unlabelled(dense):
    ctx = RoutingContext(teacher_forcing=True)
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 1, "prediction", 2))
    x = torch.randn(3, 4, H)
    free = block.route(x).expert.clone()
    ctx.skill_labels = torch.tensor([[0, 3, 1], [2, -1, 0], [1, 2, 2]])
    forced = block.route(x)
    assert forced.expert.tolist() == [3, int(free[1]), 2]
    ctx.teacher_forcing = False
    assert torch.equal(block.route(x).expert, free)


def test_expert_group_splits_tokens_by_modality(dense):
    ctx = RoutingContext()
    mose = randomise(MoSEBlock.upcycle(dense, 3, "silu", ctx, 0, "perception", 0))
    group = ExpertGroupBlock.from_mose(mose)
    assert group.experts.num_experts == 6 and group.router is mose.router
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
            expected = 0.5 * dense(x[b, t]) + 0.5 * expert_fn(group.experts, member, x[b, t])
            torch.testing.assert_close(out[b, t], expected, rtol=1e-5, atol=1e-5)
    assert group.last_expert_counts.sum() == 10


def test_topk_aux_losses_match_hand_computed_values():
    # Two experts, tokens x1 = e1 (logits ln3, 0 -> p = 3/4, 1/4) and x2 = e2 (p = 1/4, 3/4); the 4th is padding.
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.1, 0.9]])
    top_i = torch.tensor([[0], [0], [1], [1]])
    valid = torch.tensor([True, True, True, False])
    # f = (2/3, 1/3), P = (1.75/3, 1.25/3), aux = 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 9.5 / 9
    assert load_balancing_loss(probs, top_i, 2, valid).item() == pytest.approx(9.5 / 9)
    logits = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0], [0.0, math.log(3)], [5.0, 5.0]])
    assert router_z_loss(logits, valid).item() == pytest.approx(math.log(4) ** 2)

    block = TopKMoEBlock.upcycle(SwiGLU(2, 4), 2, 1, "silu", RoutingContext(), 0, aux_loss_coef=0.01, z_loss_coef=0.001)
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]]))
    block.context.attention_mask = valid.view(1, 4)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    block(x)
    # Padding token (logits 0, 0) is excluded, so the losses are exactly the hand-computed ones.
    expected = 0.01 * 9.5 / 9 + 0.001 * math.log(4) ** 2
    assert block.context.aux_losses[0].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mask", ["none", "some", "all_padding"])
def test_topk_routing_node_matches_autograd_through_the_plain_formulas(top_k, mask):
    """`route_with_aux` (one node, hand-written backward) against autograd through `forward`, `load_balancing_loss`
    and `router_z_loss`: same choices, weights and losses, same gradients for the tokens and the gate."""
    from mose_lightning.moe import TokenTopKRouter

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
    from mose_lightning.moe import TokenTopKRouter

    torch.manual_seed(3)
    router = TokenTopKRouter(H, 4, top_k)
    with torch.no_grad():
        router.gate.weight.normal_(std=1.0)
        x = torch.randn(50, H)
        _, _, top_i, weights = router(x)
        chosen, chosen_weights = router.select(x)
    assert torch.equal(chosen, top_i) and chosen_weights.dtype == torch.float32
    torch.testing.assert_close(chosen_weights, weights)


def test_topk_without_token_dropping_sends_every_token_to_k_experts(dense):
    ctx = RoutingContext()
    block = randomise(TopKMoEBlock.upcycle(dense, 4, 2, "silu", ctx, 0))
    x = torch.randn(2, 9, H)
    block(x)
    assert int(block.last_expert_counts.sum()) == 2 * 9 * 2


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
    block.last_route = None
    out = block(x)
    torch.testing.assert_close(out, reference)
    out.pow(2).sum().backward()
    assert block.router.classifier.weight.grad is not None
    assert block.router.classifier.weight.grad.abs().sum() > 0
    # Unchosen experts receive exactly zero gradient, chosen ones a nonzero one, all from one stacked parameter.
    chosen = set(block.last_route.expert.tolist())
    for e in range(4):
        g = block.experts.down_proj.grad[e].abs().sum()
        assert (g > 0) == (e in chosen)


@pytest.mark.parametrize("kind", ["mose", "group", "topk"])
@pytest.mark.parametrize("combine", ["weighted", "sum"])
@pytest.mark.parametrize("router_trainable", [True, False])
def test_fused_shared_and_routed_experts_match_the_separate_computation(dense, kind, combine, router_trainable):
    """The one-pass shared + routed kernel (silu_moe) against shared(x), experts and the combination computed
    apart: same output, same gradients for the input, the shared expert, the stacked experts and the router (for
    top-k with one expert per token, whose combine weight is the same straight-through gate)."""
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
        fused.shared.down_proj.weight.normal_(std=0.3)
    fused.router.requires_grad_(router_trainable)
    separate = copy.deepcopy(fused)
    separate.fuse_shared = False
    x = torch.randn(6, 5, H)
    grad = torch.randn(6, 5, H)
    results = []
    for block in (fused, separate):
        xin = x.clone().requires_grad_()
        out = block(xin)
        out.backward(grad)
        results.append((out.detach(), xin.grad, {n: p.grad for n, p in block.named_parameters()}))
    if kind != "topk":  # the batch is not in expert order, so both row permutations (and backward) are exercised
        assert not torch.equal(fused.last_route.expert, fused.last_route.expert.sort().values)
    assert len(fused.last_expert_counts.nonzero()) > 1
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    assert results[0][2].keys() == results[1][2].keys()
    for name in results[0][2]:
        a, b = results[0][2][name], results[1][2][name]
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert (router.weight.grad is not None) == router_trainable


@pytest.mark.parametrize("shared_expert", [True, False])
def test_loop_kernel_matches_autograd_per_expert_reference_with_empty_experts(dense, shared_expert):
    """The loop kernel (`silu_moe`) against autograd through per-expert formulas written from the stacked weights:
    empty experts first, between and last, two rows per router probability, every gradient compared."""
    torch.manual_seed(11)
    experts = randomise(MoSEBlock.upcycle(dense, 5, "silu", RoutingContext(), 0, "perception", 0)).experts
    shared = copy.deepcopy(dense) if shared_expert else None
    sizes = [0, 4, 0, 6, 0]  # rows 0-3 to expert 1, rows 4-9 to expert 3
    x = torch.randn(10, H, requires_grad=True)
    prob = torch.tensor([0.9, 0.4, 0.6, 0.7, 0.3], requires_grad=True)  # one per 2 rows
    grad = torch.randn(10, H)
    out = silu_moe(x, experts, sizes, shared, 0.3, 0.7, prob, 2)
    out.backward(grad)
    got = [t.grad.clone() for t in (x, prob, experts.gate_up_proj, experts.down_proj)]
    got_shared = [p.grad.clone() for p in shared.parameters()] if shared_expert else []

    for t in (x, prob, experts.gate_up_proj, experts.down_proj, *(shared.parameters() if shared_expert else ())):
        t.grad = None
    expert_of_row = [1] * 4 + [3] * 6
    gate = (prob / prob.detach()).repeat_interleave(2)
    routed = torch.stack([expert_fn(experts, e, x[i]) for i, e in enumerate(expert_of_row)]) * gate[:, None]
    reference = 0.7 * routed + (0.3 * shared(x) if shared_expert else 0.0)
    reference.backward(grad)
    torch.testing.assert_close(out.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    expected = [t.grad for t in (x, prob, experts.gate_up_proj, experts.down_proj)]
    for name, a, b in zip(["x", "prob", "gate_up_proj", "down_proj"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for e in (0, 2, 4):  # unused experts: exactly zero, not stale memory
        assert not got[2][e].any() and not got[3][e].any()
    for a, b in zip(got_shared, [p.grad for p in shared.parameters()] if shared_expert else []):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_expert_slots_lay_rows_out_per_expert_with_padding():
    # Rows 0, 2, 3 go to expert 2 and row 1 to expert 1; experts 0 and 3 get nothing, so the slots span experts 1-2
    # with capacity 3: expert 1 holds row 1 then two padding slots (reading row 0), expert 2 rows 0, 2, 3.
    slots = ExpertSlots.plan(torch.tensor([2, 1, 2, 2]), 4)
    assert (slots.first, slots.end, slots.capacity, slots.num_slots) == (1, 3, 3, 6)
    assert slots.sizes == [0, 1, 3, 0]
    assert slots.slot_row.tolist() == [1, 0, 0, 0, 2, 3]
    assert slots.row_slot.tolist() == [3, 0, 4, 5]
    with pytest.raises(ValueError, match="at least one row"):
        ExpertSlots.plan(torch.tensor([], dtype=torch.long), 2)


@pytest.mark.parametrize("shared_expert", [True, False])
def test_slot_path_matches_the_per_expert_reference(dense, shared_expert):
    torch.manual_seed(5)
    block = randomise(MoSEBlock.upcycle(dense, 5, "silu", RoutingContext(), 0, "perception", 0, shared_expert))
    experts = block.experts
    expert_of_row = torch.tensor([3, 1, 3, 2, 1, 3, 3])  # experts 0 and 4 empty, expert 3 pads the others
    x = torch.randn(7, H)
    slots = ExpertSlots.plan(expert_of_row, 5)
    reference = torch.stack([expert_fn(experts, int(e), x[i]) for i, e in enumerate(expert_of_row)])
    with torch.no_grad():
        torch.testing.assert_close(experts.forward_slots(x, slots), reference, rtol=1e-5, atol=1e-6)
        if shared_expert:
            torch.testing.assert_close(experts.forward_slots(x, slots, block.shared, 0.3, 0.7),
                                       0.3 * block.shared(x) + 0.7 * reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["weighted", "sum"])
@pytest.mark.parametrize("shared_expert", [True, False])
def test_mose_inference_on_few_rows_takes_the_slot_path_with_the_same_result(dense, combine, shared_expert):
    """Decode steps (one row per sample, the prompt's route reused) and short inference batches run the slot path;
    it computes what the loop kernel computes, and its layout is prepared once per routing decision."""
    ctx = RoutingContext()
    block = randomise(MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0, shared_expert, combine))
    block, loop = with_loop_twin(block, block.router.classifier.weight, 3.0)
    torch.manual_seed(7)
    prompt = torch.randn(6, 5, H) + 3 * torch.randn(6, 1, H)
    step = torch.randn(6, 1, H)
    with torch.no_grad():
        for b in (block, loop):
            b.route(prompt)
        assert len(set(block.last_route.expert.tolist())) > 1
        torch.testing.assert_close(block(prompt), loop(prompt), rtol=1e-5, atol=1e-6)  # 5 rows per sample
        ctx.decoding = True
        outputs = [block(step), loop(step)]
        plan = block._slot_plan
        block(step)
        assert block._slot_plan is plan  # reused on the next step
    assert not hasattr(loop, "_slot_plan")
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    # Training never takes it: with gradients on, the loop kernel runs (and the router gets its gradient).
    trained = copy.deepcopy(block)
    del trained._slot_plan
    ctx.decoding = False
    trained.route(prompt)
    trained(step.requires_grad_()).sum().backward()
    assert not hasattr(trained, "_slot_plan") and step.grad is not None


@pytest.mark.parametrize("shared_expert", [True, False])
def test_expert_group_decode_steps_take_the_slot_path_with_the_same_result(dense, shared_expert):
    """Cached decode steps of an expert-group block (one text token per sample) run the slot path on each sample's
    text expert, planned once per routing decision, and compute what the loop kernel computes: the per-token
    reference, 0.5 * shared + 0.5 * text expert of the sample's skill."""
    image = torch.zeros(6, 5, dtype=torch.bool)
    image[:, :3] = True
    ctx = RoutingContext(image_mask=image)
    mose = MoSEBlock.upcycle(dense, 4, "silu", ctx, 0, "perception", 0, shared_expert)
    block = randomise(ExpertGroupBlock.from_mose(mose))
    with torch.no_grad():
        block.router.classifier.weight.normal_(std=3.0)
    torch.manual_seed(7)
    prompt = torch.randn(6, 5, H) + 3 * torch.randn(6, 1, H)
    step = torch.randn(6, 1, H)
    with torch.no_grad():
        block.route(prompt)
        block(prompt)  # prefill: image and text tokens, the loop kernel
        assert not hasattr(block, "_slot_plan")
        skills = block.last_route.expert.tolist()
        assert len(set(skills)) > 1
        ctx.decoding = True
        out = block(step)
        plan = block._slot_plan
        again = block(step)
        assert block._slot_plan is plan
    assert plan[2].first >= 1  # slots span text experts only (odd indices) from the first skill used
    for b, skill in enumerate(skills):
        expected = expert_fn(block.experts, 2 * skill + ExpertGroupBlock.TEXT, step[b, 0])
        if shared_expert:
            expected = 0.5 * block.shared(step[b, 0]) + 0.5 * expected
        torch.testing.assert_close(out[b, 0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, out)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("combine", ["weighted", "sum"])
@pytest.mark.parametrize("shared_expert", [True, False])
def test_topk_inference_on_few_tokens_takes_the_slot_path_with_the_same_result(dense, top_k, combine, shared_expert):
    """Top-k inference on few tokens (decode steps, short prompts) runs the slot path, laid out per call since
    every token routes itself; it computes the per-token reference from the router's own choice and weights
    (shared and routed terms mixed by the combination rule) and what the loop kernel computes. Above
    SLOT_MAX_ROWS rows, and whenever gradients are on, the loop kernel runs."""
    ctx = RoutingContext()
    block = randomise(TopKMoEBlock.upcycle(dense, 4, top_k, "silu", ctx, 0, shared_expert, combine))
    block, loop = with_loop_twin(block, block.router.gate.weight, 1.0)
    calls = []
    slot_path = block.experts.forward_slots
    block.experts.forward_slots = lambda *a, **kw: calls.append(1) or slot_path(*a, **kw)
    torch.manual_seed(5)
    x = torch.randn(3, 4, H)  # 12 tokens, x top_k rows: under SLOT_MAX_ROWS
    with torch.no_grad():
        out = block(x)
        from_loop = loop(x)
        _, _, top_i, weights = block.router(x.reshape(-1, H))  # the full forward: an independent choice
    assert calls and len(set(top_i.flatten().tolist())) > 1
    shared_w, routed_w = (1.0, 1.0) if combine == "sum" or not shared_expert else (0.5, 0.5)
    for t, token in enumerate(x.reshape(-1, H)):
        with torch.no_grad():
            expected = sum(weights[t, j] * expert_fn(block.experts, int(top_i[t, j]), token) for j in range(top_k))
            if shared_expert:
                expected = shared_w * block.shared(token) + routed_w * expected
        torch.testing.assert_close(out.reshape(-1, H)[t], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, from_loop, rtol=1e-5, atol=1e-6)
    assert torch.equal(block.last_expert_counts, loop.last_expert_counts)
    assert int(block.last_expert_counts.sum()) == 12 * top_k

    calls.clear()
    with torch.no_grad():
        block(torch.randn(4, 20, H))  # 80 x top_k rows: the loop kernel
    block(x.clone().requires_grad_()).sum().backward()  # training
    assert not calls


@pytest.mark.parametrize("fuse", [True, False])
def test_skill_router_stays_float32_in_a_bf16_block(dense, fuse):
    """bf16 would wreck a router whose large weights and bias cancel; the block still runs and trains in bf16."""
    block = MoSEBlock.upcycle(dense.to(torch.bfloat16), 4, "silu", RoutingContext(), 0, "perception", 0,
                              dispatch="loop")
    block.fuse_shared = fuse
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
        block.fuse_shared = kind != "mose_unfused"
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
    from mose_lightning.moe.experts import _use_grouped_mm

    torch.manual_seed(0)
    hidden, inter, batch, seq = 256, 512, 8, 64
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dense_ffn = SwiGLU(hidden, inter).cuda().to(dtype)
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
        assert _use_grouped_mm(x, "auto", 16) and not _use_grouped_mm(x, "auto", 8)
        with torch.no_grad():
            at_init = block(x)
            reference = dense_ffn(x)
    assert _rel_err(at_init, reference) < 1e-2

    block = randomise(block)
    loop = copy.deepcopy(block)
    loop.experts.dispatch = "loop"
    grad = torch.randn(batch, seq, hidden, device="cuda")
    results = []
    for b in (block, loop):
        if hasattr(b, "last_route"):
            b.last_route = None
        xin = x.clone().requires_grad_()
        with autocast:
            out = b(xin)
        out.float().backward(grad)
        results.append((out, xin.grad, b.experts.gate_up_proj.grad, b.experts.down_proj.grad))
    assert torch.equal(block.last_expert_counts, loop.last_expert_counts)  # the same routing
    for got, want in zip(results[0], results[1]):
        assert got.dtype == want.dtype
        assert torch.isfinite(got).all()
        assert _rel_err(got, want) < 1e-2
