"""Checks that every backbone must pass, shared by their test files."""

import torch

from dit_video.models.dit import DiT, DiTConfig


def assert_checkpointing_is_exact(make) -> None:
    """`make(gradient_checkpointing=...)` builds a model; with checkpointing its outputs and
    gradients must be those without."""
    results = []
    for checkpointing in (False, True):
        model = make(gradient_checkpointing=checkpointing).train()
        z = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        out = model(z, torch.tensor([0.1, -2.0]), text=torch.ones(2, 2, 8))
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1])
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1)


def assert_compiled_blocks_are_exact(make, blocks: int, shapes=((2, 4, 3, 8, 8),)) -> None:
    """`compile_blocks` on a model from `make()` compiles `blocks` blocks, keeps the parameter
    names, and gives its outputs and gradients to float rounding: on a batch of a video and an
    image (masks in the temporal attention) with padded text, at each of `shapes` in turn (each
    new shape compiles anew: seconds to a minute on CPU). No block breaks its graph: a break
    splits the fused work and costs a trip through Python on every call."""
    from torch._dynamo.utils import counters

    from dit_video.models import compile_blocks

    counters.clear()
    eager, compiled = make().train(), make().train()
    names = [name for name, _ in compiled.named_parameters()]
    assert compile_blocks(compiled) == blocks
    assert [name for name, _ in compiled.named_parameters()] == names
    g = torch.Generator().manual_seed(2)
    text, text_mask = torch.randn(2, 3, 8, generator=g), torch.tensor([[True, True, False], [True, False, False]])
    for shape in shapes:
        z = torch.randn(shape, generator=g)
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(z, torch.tensor([0.1, -2.0]), text=text, text_mask=text_mask, is_image=torch.tensor([False, True]))
            out.square().mean().backward()
            results.append((out.detach(), [p.grad for p in model.parameters()]))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
        for g0, g1 in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not counters["graph_break"], dict(counters["graph_break"])


def assert_trains_from_its_initialization(model: torch.nn.Module, **inputs) -> None:
    """From the real initialization (adaLN-Zero, zero-initialized projections; no randomized
    weights): after two optimizer steps every parameter gets a gradient, and the first frame's
    output depends on the last frame's input. A layer whose output and gate both start at zero
    has zero gradient forever, and these checks catch it."""
    torch.manual_seed(0)
    model.train()
    z, logsnr = torch.randn(2, 4, 5, 8, 8), torch.tensor([0.5, -1.0])
    target = z.flip(2)  # the frames in reverse order: only learnable by mixing frames
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        (model(z, logsnr, **inputs) - target).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad()
    (model(z, logsnr, **inputs) - target).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, f"parameters without gradient: {dead}"
    z = z.clone().requires_grad_(True)
    model(z, logsnr, **inputs)[:, :, 0].square().sum().backward()
    assert z.grad[:, :, -1].abs().max() > 0, "the first frame's output ignores the last frame's input"


def make_dit(name="dit", spatial="sincos", temporal="rope", randomize=True, **kwargs) -> DiT:
    """A tiny DiT with seeded weights; `randomize` moves them off adaLN-Zero's zeros, so that
    every path shows in the output."""
    torch.manual_seed(0)
    cfg = dict(name=name, size="tiny", in_channels=4, text_dim=8, cond_channels=0, attention_backend="math",
               spatial_positions=spatial, temporal_positions=temporal)
    model = DiT(DiTConfig(**{**cfg, **kwargs})).eval()
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model
