"""Diffusion task: DDPM schedule, training step, resume, DDIM sampling, EMA, objectives, quality metrics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.diffusion import EMA, DiffusionObjective, NoiseSchedule, pad_to_unit_range, train_denoiser
from distill.quality import class_histogram, frechet_distance, histogram_entropy, precision_recall
from memplan.zoo.ddpm import DDPMUNet


def tiny_unet(**kw) -> DDPMUNet:
    torch.manual_seed(0)
    return DDPMUNet(in_chans=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,),
                    dropout=0.0, norm_groups=4, **kw)


def fixture_images(n: int = 16) -> torch.Tensor:
    """Tiny 8×8 'images' in [-1, 1]: bright squares at varying places."""
    x = -torch.ones(n, 1, 8, 8)
    for i in range(n):
        r, c = i % 5, (i * 3) % 5
        x[i, 0, r:r + 3, c:c + 3] = 1.0
    return x


def test_linear_schedule_matches_hand_product():
    s = NoiseSchedule()
    betas = np.linspace(1e-4, 0.02, 1000)
    a = s.alphas_cumprod
    assert a.shape == (1000,)
    assert float(a[0]) == pytest.approx(1 - 1e-4)
    assert float(a[-1]) == pytest.approx(float(np.prod(1 - betas)), rel=1e-5)  # ~4.04e-5
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    xt = s.q_sample(x0, torch.tensor([0, 999]), noise)
    assert float(xt[0, 0, 0, 0]) == pytest.approx(math.sqrt(a[0]) + 2 * math.sqrt(1 - a[0]), rel=1e-6)
    assert float(xt[1, 0, 0, 0]) == pytest.approx(math.sqrt(a[-1]) + 2 * math.sqrt(1 - a[-1]), rel=1e-6)


def test_one_training_step_lowers_the_loss_on_its_batch(single_thread):
    images = fixture_images()
    model = tiny_unet()
    before = copy.deepcopy(model)
    train_denoiser(model, images, steps=1, batch_size=8, lr=1e-3, warmup=1, seed=3)
    # the batch train_denoiser drew (same generator, same order of draws)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(images), (8,), generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    noise = torch.randn((8, 1, 8, 8), generator=gen)
    xt = NoiseSchedule().q_sample(images[idx], t, noise)
    with torch.no_grad():
        loss_before = F.mse_loss(before.eval()(xt, t), noise)
        loss_after = F.mse_loss(model.eval()(xt, t), noise)
    assert float(loss_after) < float(loss_before)


def test_resume_continues_bit_for_bit(tmp_path, single_thread):
    images = fixture_images()
    straight = train_denoiser(tiny_unet(), images, steps=4, batch_size=4, seed=1)
    run = tmp_path / "run"
    train_denoiser(tiny_unet(), images, steps=2, batch_size=4, seed=1, run_dir=run)
    resumed = train_denoiser(tiny_unet(), images, steps=4, batch_size=4, seed=1, run_dir=run)
    assert resumed.resumed_from == 2 and (run / "last.pt").exists()
    assert [r["total"] for r in resumed.losses] == [r["total"] for r in straight.losses]
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_is_deterministic_by_seed_and_batch_independent():
    model = tiny_unet().eval()
    s = NoiseSchedule()
    a = s.ddim_sample(model, (6, 1, 8, 8), steps=4, seed=5, batch_size=6)
    b = s.ddim_sample(model, (6, 1, 8, 8), steps=4, seed=5, batch_size=4)
    c = s.ddim_sample(model, (6, 1, 8, 8), steps=4, seed=6)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert float(a.abs().max()) <= 1.0


def test_ddim_with_the_exact_noise_of_a_point_mass_recovers_it():
    """For data x0 = c the optimal ε is (x - sqrt(ᾱ_t) c) / sqrt(1 - ᾱ_t): DDIM must land on c."""
    s = NoiseSchedule()
    a_all = s.alphas_cumprod
    c = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)

    def oracle(x, t):
        a = a_all[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    out = s.ddim_sample(oracle, (3, 1, 4, 4), steps=10, seed=0, clip=False)
    torch.testing.assert_close(out, c.expand(3, 1, 4, 4), atol=1e-4, rtol=0)
    assert s.timesteps(4) == [999, 666, 333, 0]


def test_ema_warmup_and_decay():
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, decay=0.9)
    torch.nn.init.ones_(net.weight)
    ema.update(net)  # decay min(0.9, 2/11)
    assert float(ema.module.weight) == pytest.approx(9 / 11)
    for _ in range(200):
        ema.update(net)
    assert float(ema.module.weight) == pytest.approx(1.0, abs=1e-6)
    assert ema.updates == 201


def test_objectives_weight_their_terms():
    eps, noise, teacher = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4), torch.full((2, 1, 4, 4), 3.0)
    none = DiffusionObjective("none")(eps, noise)
    assert float(none["total"]) == pytest.approx(1.0)
    out = DiffusionObjective("output")(eps, noise, teacher_eps=teacher)
    assert float(out["output"]) == pytest.approx(9.0) and float(out["total"]) == pytest.approx(0.5 + 4.5)
    s = torch.ones(2, 4, 3, 3)
    red = DiffusionObjective("red")(eps, noise, student_feats=[s, s], teacher_feats=[-s, s])
    assert float(red["red"]) == pytest.approx(1.0)  # cosine: 2 and 0 over two sites
    assert float(red["total"]) == pytest.approx(0.5 * 1.0 + 0.5 * 1.0)
    mse = DiffusionObjective("red", red_loss="mse")(eps, noise, student_feats=[s], teacher_feats=[3 * s])
    assert float(mse["red"]) == pytest.approx(4.0)
    blocks = DiffusionObjective("red-blocks")
    assert not blocks.needs_teacher and float(blocks(eps, noise)["total"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown diffusion distillation method 'kd'"):
        DiffusionObjective("kd")
    with pytest.raises(ValueError, match="needs matched features"):
        DiffusionObjective("red")(eps, noise)


def test_pad_to_unit_range():
    x = pad_to_unit_range(torch.full((1, 1, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (1, 1, 32, 32)
    assert float(x[0, 0, 2, 2]) == 1.0 and float(x[0, 0, 0, 0]) == -1.0 and float(x[0, 0, 30, 30]) == -1.0
    with pytest.raises(ValueError, match="do not fit"):
        pad_to_unit_range(torch.zeros(1, 1, 40, 40, dtype=torch.uint8))


def test_fid_self_zero_others_positive_and_analytic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    b = torch.randn(4000, 8, generator=g)
    assert 0 < frechet_distance(a, b) < 0.05  # two samples of one Gaussian
    shift = torch.zeros(8)
    shift[:2] = 1.0  # |Δμ|² = 2
    assert frechet_distance(a, b + shift) == pytest.approx(2.0, abs=0.15)
    # N(0, I) vs N(0, 4 I) in 8 dims: tr(I + 4I - 2*2I) = 8
    assert frechet_distance(a, 2 * b) == pytest.approx(8.0, rel=0.03)
    with pytest.raises(ValueError, match="two \\(N, D\\) sets"):
        frechet_distance(a, torch.zeros(10, 3))


def test_precision_recall_sanity():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(600, 4, generator=g)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)  # disjoint supports
    p, r = precision_recall(real, real[real[:, 0] > 0.5], k=5)  # mode-dropping: precise, low recall
    assert p == 1.0 and r < 0.6
    p, r = precision_recall(real, 3.0 * torch.randn(600, 4, generator=g), k=3)  # too spread: imprecise
    assert p < 0.6 and r > 0.9
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(real, real[:3], k=3)


def test_class_histogram_and_entropy():
    counts = class_histogram(torch.tensor([0, 0, 3, 9]), 10)
    assert counts == [2, 0, 0, 1, 0, 0, 0, 0, 0, 1] and sum(counts) == 4
    assert histogram_entropy(counts) == pytest.approx(1.5)
    assert histogram_entropy([7] * 10) == pytest.approx(math.log2(10))
