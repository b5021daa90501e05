"""Flow matching on the straight path (rectified flow): the training objective and sampler of SD3 and FLUX.

The path from data to noise is a straight line, and the network learns its velocity:

    x_t = (1 - t) * x0 + t * eps,   t in [0, 1]         (Liu et al. 2022; Lipman et al. 2023; Esser et al. 2024 eq. 3)
    v   = d x_t / d t = eps - x0                        the regression target of the conditional flow-matching loss

Sampling integrates dx/dt = v from t = 1 (pure noise) to t = 0 (data); Euler's step is x <- x + (t_next - t) * v.
In the sigma view of notebook 08 the same path reads x_t / (1 - t) = x0 + sigma * eps with sigma = t / (1 - t):
dividing by (1 - t) turns the straight path into the variance-exploding path, so the flow ODE is the probability-flow
ODE of a particular noise schedule.

SD3 samples t from a logit-normal density during training (Esser et al. 2024, sec. 3.1: t = sigmoid(n),
n ~ N(m, s^2), m = 0, s = 1), which puts more training on the middle of the path; at inference its scheduler shifts
the levels towards the noise end (`FlowMatchEulerDiscreteScheduler`, shift 3.0 for SD3 medium).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

# diffusers' FlowMatchEulerDiscreteScheduler: 1000 training levels t = 1/1000 ... 1000/1000.
NUM_TRAIN_TIMESTEPS = 1000
# SD3's training density of t (Esser et al. 2024, sec. 3.1, "lognorm(0.00, 1.00)").
LOGIT_NORMAL_MEAN = 0.0
LOGIT_NORMAL_STD = 1.0
# SD3 medium's scheduler config: shift 3.0.
SD3_SHIFT = 3.0

# predict_velocity(x_t, t) -> v, with t a (B,) tensor of times in [0, 1]
VelocityPredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against x (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def straight_path(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, each sample at its own time t (B,)."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = eps - x0: the time derivative of the straight path, the same at every t."""
    return noise - x0


def sigma_of_time(t: torch.Tensor) -> torch.Tensor:
    """sigma = t / (1 - t): the noise level of x_t / (1 - t) = x0 + sigma * eps (infinite at t = 1)."""
    return t / (1 - t)


def time_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """t = sigma / (1 + sigma): the inverse of sigma_of_time."""
    return sigma / (1 + sigma)


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift, t <- shift t / (1 + (shift - 1) t): the same sigma multiplied by `shift`.

    In sigma terms, t / (1 - t) becomes shift * t / (1 - t): every noise level is `shift` times larger, which spends
    more of the steps at high noise, as larger images need (Esser et al. 2024, sec. 5.3.2).
    """
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    return shift * t / (1 + (shift - 1) * t)


def sample_training_times(n: int, generator: torch.Generator | None = None, *, density: str = "logit_normal",
                          mean: float = LOGIT_NORMAL_MEAN, std: float = LOGIT_NORMAL_STD,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """n training times in (0, 1): "uniform", or SD3's "logit_normal" (t = sigmoid(n), n ~ N(mean, std^2))."""
    if density == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if density == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"density must be 'uniform' or 'logit_normal', got {density!r}")


def logit_normal_density(t: torch.Tensor, mean: float = LOGIT_NORMAL_MEAN,
                         std: float = LOGIT_NORMAL_STD) -> torch.Tensor:
    """The density of t = sigmoid(n), n ~ N(mean, std^2), at t in (0, 1) (Esser et al. 2024, eq. 19)."""
    logit = torch.log(t / (1 - t))
    return torch.exp(-(logit - mean) ** 2 / (2 * std ** 2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))


def flow_matching_loss(predict_velocity: VelocityPredictor, x0: torch.Tensor, generator: torch.Generator | None = None,
                       *, density: str = "logit_normal") -> torch.Tensor:
    """The conditional flow-matching loss: mean squared error between the predicted and the true velocity."""
    # 1. a time per sample and the noise
    t = sample_training_times(x0.shape[0], generator, density=density, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    # 2. the point on the straight path, and where it is heading
    x_t = straight_path(x0, noise, t)
    target = velocity_target(x0, noise)
    # 3. regress the velocity
    return torch.mean((predict_velocity(x_t, t) - target) ** 2)


def flow_sigmas(num_inference_steps: int, shift: float = 1.0,
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The times FlowMatchEulerDiscreteScheduler steps through (its `sigmas`), num_inference_steps + 1 of them.

    Evenly spaced from the largest training level to the smallest, both shifted, then shifted again (diffusers
    shifts its training levels once in __init__ and the spaced ones again in set_timesteps), then a final 0.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    levels = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
    levels = shift_times(levels, shift)                                   # the scheduler's training levels
    t_max, t_min = float(levels[0]), float(levels[-1])
    # spaced in "timesteps" (t * 1000) as diffusers does, in float64 like its numpy linspace
    spaced = torch.linspace(t_max * num_train_timesteps, t_min * num_train_timesteps, num_inference_steps,
                            dtype=torch.float64) / num_train_timesteps
    times = shift_times(spaced, shift).to(torch.float32)
    return torch.cat([times, torch.zeros(1)])


@torch.no_grad()
def sample_flow_euler(predict_velocity: VelocityPredictor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = v from times[0] (noise) to times[-1] (0, data) with Euler steps: x <- x + (t_next - t) v."""
    x = noise
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        v = predict_velocity(x, t.expand(x.shape[0]).to(x.device))
        x = x + (t_next - t) * v
    return x
