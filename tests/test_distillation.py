"""Progressive distillation, checked where the answer is known exactly: Gaussian data, whose
exact denoiser is affine in z, so every DDIM step, the teacher's two steps and hence the student's
target are affine in z too. A student that is one affine map per grid level can then fit its
targets exactly, and its N/2-step samples must equal the N-step teacher's from the same noise.

The students are fitted by minimizing `distillation_loss` itself. With a v-prediction read off an
affine x_hat the loss is quadratic in the student's parameters, so one Newton step from zero
(computed with autograd's Hessian) lands on its minimizer: what training converges to, without the
tolerance of a gradient descent. Also here: the guidance input of the backbones.
"""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian

from dit_video.diffusion import (CosineSchedule, GaussianMixture, classifier_free_guidance, convert, ddim_step,
                                 diffuse, distillation_levels, distillation_loss, distillation_target, sample,
                                 teacher_steps)
from dit_video.models import build_backbone

SCHEDULE = CosineSchedule()
D = 3


def gaussian(seed: int, shift: float = 0.0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(D, D, dtype=torch.float64, generator=g)
    return GaussianMixture.gaussian(torch.randn(D, dtype=torch.float64, generator=g) + shift,
                                    m @ m.T / D + 0.05 * torch.eye(D, dtype=torch.float64))


DATA = gaussian(0)


class LinearStudent(nn.Module):
    """x_hat = sum_k w^k (A[i, k] z + b[i, k]) at the i-th level of an N-step grid (the level
    looked up from the log-SNR): coefficients polynomial of `degree` in the guidance weight w."""

    def __init__(self, steps: int, degree: int = 0):
        super().__init__()
        self.register_buffer("levels", SCHEDULE.grid(steps, dtype=torch.float64)[:-1])
        self.degree = degree
        self.A = nn.Parameter(torch.zeros(steps, degree + 1, D, D, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(steps, degree + 1, D, dtype=torch.float64))

    def forward(self, z, logsnr, guidance=None):
        i = (logsnr.reshape(-1, 1) - self.levels).abs().argmin(dim=1).expand(len(z))
        w = torch.zeros(len(z), dtype=torch.float64) if guidance is None else guidance.double()
        powers = w[:, None] ** torch.arange(self.degree + 1)  # [B, K+1]
        per_power = torch.einsum("bkij,bj->bki", self.A[i], z) + self.b[i]
        return torch.einsum("bk,bki->bi", powers, per_power)


def fit(student: LinearStudent, teacher, x, generator, weights=None) -> float:
    """Minimize the distillation loss of `student` (v-prediction) on data x and the teacher's
    targets, exactly (one Newton step of a quadratic); returns the loss at the minimum.
    `weights` (a list) makes it a guided fit: w per sample drawn from it, passed to both."""
    steps = len(student.levels)
    levels = distillation_levels(steps, len(x), SCHEDULE, generator, dtype=torch.float64)
    assert set(levels.t.tolist()) == set(student.levels.tolist())  # every level is trained
    z = diffuse(x, levels.t, torch.randn(x.shape, generator=generator, dtype=torch.float64))
    w = None
    if weights is not None:
        w = torch.tensor(weights, dtype=torch.float64)[torch.randint(len(weights), (len(x),), generator=generator)]
    target = distillation_target(lambda z_, l_: teacher(z_, l_, w), z, levels)
    names = [n for n, _ in student.named_parameters()]
    shapes = [p.shape for _, p in student.named_parameters()]
    sizes = [p.numel() for _, p in student.named_parameters()]

    def loss(theta):
        params = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        x_hat = functional_call(student, params, (z, levels.t), {"guidance": w})
        return distillation_loss(convert(x_hat, z, levels.t, "x", "v"), z, target, levels.t, "v").mean()

    theta = torch.zeros(sum(sizes), dtype=torch.float64)
    theta = theta - torch.linalg.solve(hessian(loss)(theta), grad(loss)(theta))
    assert grad(loss)(theta).abs().max() < 1e-10  # the minimizer
    with torch.no_grad():
        for (_, p), t in zip(student.named_parameters(), theta.split(sizes)):
            p.copy_(t.reshape(p.shape))
    return loss(theta).item()


def exact(data: GaussianMixture):
    return lambda z, logsnr, w=None: data.denoiser(z, logsnr)


def test_levels_are_the_samplers_grid_levels_drawn_uniformly():
    levels = distillation_levels(4, 40_000, SCHEDULE, torch.Generator().manual_seed(0), dtype=torch.float64)
    student, teacher = SCHEDULE.grid(4, dtype=torch.float64), SCHEDULE.grid(8, dtype=torch.float64)
    for i in range(4):  # student level i (t = 1 - i/4): the teacher steps through its levels 2i+1 and 2i+2
        rows = levels.t == student[i]
        assert abs(rows.float().mean().item() - 0.25) < 0.01
        assert torch.equal(levels.mid[rows], teacher[2 * i + 1].expand(int(rows.sum())))
        assert torch.equal(levels.next[rows], student[i + 1].expand(int(rows.sum())))
        assert bool((levels.last[rows] == (i == 3)).all())
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        distillation_levels(0, 4)


def test_one_student_step_with_the_target_lands_on_the_teachers_two_step_result():
    """The identity behind the target: a DDIM step from z_t with x_tilde gives exactly the
    teacher's z_t''; at the last level, where the sampler returns x_hat, the target is the
    teacher's final x_hat."""
    g = torch.Generator().manual_seed(1)
    levels = distillation_levels(4, 512, SCHEDULE, g, dtype=torch.float64)
    x = DATA.sample(512, g)[0]
    z = diffuse(x, levels.t, torch.randn(x.shape, generator=g, dtype=torch.float64))
    target = distillation_target(DATA.denoiser, z, levels)
    z_next, x_mid = teacher_steps(DATA.denoiser, z, levels)
    step = ddim_step(z, target, levels.t, levels.next)
    inner = ~levels.last
    assert inner.sum() > 300 and levels.last.sum() > 80
    torch.testing.assert_close(step[inner], z_next[inner], rtol=0, atol=1e-12)
    assert torch.equal(target[levels.last], x_mid[levels.last])
    # the target is not what one teacher step would predict: distilling changes something
    assert (target[inner] - DATA.denoiser(z, levels.t)[inner]).abs().max() > 0.05


@pytest.mark.parametrize("prediction", ["v", "eps", "x"])
def test_the_loss_is_truncated_snr_weighted_x_mse_in_any_target_space(prediction):
    g = torch.Generator().manual_seed(2)
    z, x_hat, target = (torch.randn(6, 2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    logsnr = torch.tensor([-8.0, -1.0, -0.2, 0.3, 2.0, 7.0], dtype=torch.float64)
    loss = distillation_loss(convert(x_hat, z, logsnr, "x", prediction), z, target, logsnr, prediction)
    expected = logsnr.exp().clamp(min=1) * (x_hat - target).square().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)  # the weight is a float32 factor


def test_two_rounds_of_distillation_reproduce_the_teachers_samples():
    """8-step DDIM on the exact denoiser -> a 4-step student -> a 2-step student of that one."""
    g = torch.Generator().manual_seed(3)
    x = DATA.sample(1000, g)[0]
    four, two = LinearStudent(4), LinearStudent(2)
    assert fit(four, exact(DATA), x, g) < 1e-20  # the targets are affine in z: fitted exactly
    assert fit(two, lambda z, logsnr, w: four(z, logsnr), x, g) < 1e-20
    noise = torch.randn(500, D, generator=g, dtype=torch.float64)
    teacher = sample(DATA.denoiser, noise, steps=8)
    for student, steps in ((four, 4), (two, 2)):
        with torch.no_grad():
            mine = sample(student, noise, steps=steps)
        torch.testing.assert_close(mine, teacher, rtol=0, atol=1e-11)  # measured: 4e-15 and 1e-14
        # ... which plain DDIM with that few steps does not do (measured: 0.74 and 2.0 off)
        assert (sample(DATA.denoiser, noise, steps=steps) - teacher).abs().max() > 0.5


def test_guidance_distilled_in_reproduces_the_guided_teacher_between_the_training_weights():
    """Teacher: classifier-free guidance between a conditional and an unconditional Gaussian,
    x = (1 + w) x_c - w x_u, 8 steps. Each guided x_hat is affine in z with coefficients linear in
    w, so the two composed steps give a target quadratic in w: a student of degree 2 trained on
    three weights reproduces the teacher at every w, a degree-1 one cannot fit its targets."""
    conditional, unconditional = gaussian(4, shift=1.5), gaussian(5)

    def labelled(z, logsnr, label):
        c = label.bool()[:, None]
        return torch.where(c, conditional.denoiser(z, logsnr), unconditional.denoiser(z, logsnr))

    def guided(w):
        ones = torch.ones(len(w), dtype=torch.float64)
        return classifier_free_guidance(labelled, w, {"label": ones}, {"label": torch.zeros_like(ones)})

    g = torch.Generator().manual_seed(6)
    x = conditional.sample(1500, g)[0]
    teacher = lambda z, logsnr, w: guided(w)(z, logsnr)  # noqa: E731
    linear_in_w = LinearStudent(4, degree=1)
    assert fit(linear_in_w, teacher, x, torch.Generator().manual_seed(7), weights=[0.0, 1.5, 4.0]) > 1e-2  # 0.09
    student = LinearStudent(4, degree=2)
    assert fit(student, teacher, x, torch.Generator().manual_seed(7), weights=[0.0, 1.5, 4.0]) < 1e-20
    noise = torch.randn(300, D, generator=g, dtype=torch.float64)
    for weight in (0.625, 1.5, 2.5, 3.375):  # exact in float32, the dtype the guidance wrapper reads w in
        w = torch.full((len(noise),), weight, dtype=torch.float64)
        reference = sample(guided(w), noise, steps=8)
        with torch.no_grad():
            mine = sample(lambda z, logsnr, w=w: student(z, logsnr, guidance=w), noise, steps=4)
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-10)  # measured: at most 3e-12
    assert (sample(guided(w), noise, steps=4) - reference).abs().max() > 10  # plain 4-step CFG: 124 off


# ---------------------------------------------------------------------------------------------
# The guidance input of the backbones

BACKBONES = {
    "dit": dict(name="dit", size="tiny", in_channels=4, text_dim=8, attention_backend="math"),
    "dit3d": dict(name="dit3d", size="tiny", in_channels=4, text_dim=8, attention_backend="math"),
    "unet3d": dict(name="unet3d", in_channels=4, text_dim=8, channels=16, channel_mult=[1, 2], blocks_per_level=1,
                   attention_levels=[1], head_dim=16, norm_groups=8, attention_backend="math"),
}


def teacher_and_student(name: str):
    """A teacher with randomized weights (off the zero init) and a student with the guidance
    input, loaded with the teacher's weights."""
    torch.manual_seed(0)
    teacher = build_backbone(BACKBONES[name]).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = build_backbone({**BACKBONES[name], "guidance_input": True}).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("conditioning.guidance.") for k in missing)
    return teacher, student


@pytest.mark.parametrize("name", list(BACKBONES))
def test_a_student_with_the_guidance_input_starts_as_its_teacher_and_learns_to_use_it(name):
    """Zero-initialized, the input changes nothing until a gradient step, then the output depends on w."""
    teacher, student = teacher_and_student(name)
    z, logsnr, text = torch.randn(2, 4, 3, 8, 8), torch.tensor([-1.0, 2.0]), torch.randn(2, 3, 8)
    with torch.no_grad():
        reference = teacher(z, logsnr, text=text)
        for w in (0.0, 1.0, 7.5):
            assert torch.equal(student(z, logsnr, text=text, guidance=torch.full((2,), w)), reference)
    student.train()
    out = student(z, logsnr, text=text, guidance=torch.tensor([0.0, 3.0]))
    out.square().mean().backward()
    assert student.conditioning.guidance.fc2.weight.grad.abs().max() > 0  # zero-init, yet it learns
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p.sub_(p.grad)
    student.eval()
    with torch.no_grad():
        low, high = (student(z, logsnr, text=text, guidance=torch.full((2,), w)) for w in (0.0, 3.0))
    assert (low - high).abs().max() > 1e-4
    # and a clear error for a missing or unexpected weight
    z = z[:, :, :1]
    with pytest.raises(ValueError, match="takes the guidance weight as an input"):
        student(z, logsnr)
    with pytest.raises(ValueError, match="no guidance input"):
        teacher(z, logsnr, guidance=torch.ones(2))
    with pytest.raises(ValueError, match=r"guidance must be a \[B\] tensor with B = 2"):
        student(z, logsnr, guidance=torch.ones(3))
    assert student(z, logsnr, guidance=torch.tensor(2.0)).shape == z.shape  # one w for the batch
    assert math.isfinite(student(z, logsnr, guidance=torch.ones(2)).sum().item())
