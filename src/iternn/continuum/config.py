"""What the continuum instrument sweeps: :class:`ContinuumConfig`, ``QUICK`` and ``FULL``.

Imports nothing heavy (no torch), so the command line checks a configuration at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["ContinuumConfig", "QUICK", "FULL", "POLICIES", "MODES"]

#: Initial-vector policies: the state each input's applications start from. ``"zeros"``:
#: reset to zeros before every input; ``"carried"``: the state the previous input left (the
#: first input starts from zeros); ``"random"``: reset before every input to one fixed
#: random vector (``N(0, 1)`` per unit, drawn from the seed).
POLICIES = ("zeros", "carried", "random")
#: How an input is written: ``"forced"`` (before every application, eq. 11) or ``"held"``
#: (once per input, then kept by the identity block, eq. 50); see
#: :mod:`iternn.dynamics.memory`.
MODES = ("forced", "held")


def _ints(value: Any, key: str, low: int, *, distinct: bool = True) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"ContinuumConfig.{key} must be a non-empty list of ints, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value):
        raise ConfigError(f"ContinuumConfig.{key} must hold ints >= {low}, got {list(value)}")
    if distinct and len(set(value)) != len(value):
        raise ConfigError(f"ContinuumConfig.{key} repeats a value: {list(value)}")
    return tuple(value)


def _choices(value: Any, key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"ContinuumConfig.{key} must be a non-empty list of "
                          f"{', '.join(allowed)}, got {value!r}")
    bad = [v for v in value if v not in allowed]
    if bad:
        raise ConfigError(f"ContinuumConfig.{key} has {bad[0]!r}; allowed: {', '.join(allowed)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"ContinuumConfig.{key} repeats a value: {list(value)}")
    return tuple(value)


@dataclass(frozen=True)
class ContinuumConfig:
    """The sweep of :func:`iternn.continuum.run_continuum` (validated on construction; an
    error names the key).

    Attributes:
        name: a label for the report.
        hidden: hidden widths of the map family (``L = len(hidden) + 1`` weight layers;
            ``n_x = 64`` and ``n_y = 10`` come from the data).
        activation: of the hidden slots.
        ks: applications per input (each ``>= 1``; from 1 to beyond the depth ``L``).
        alphas: feedback scales (each in ``[0, 1]``).
        policies, modes: the initial-vector policies and input modes whose memory and
            dynamics are measured at every ``(k, alpha)``.
        train_policies, train_modes: those also trained at every ``(k, alpha)`` (each a
            subset of ``policies`` / ``modes``).
        seed: the map's weights, the random initial vector, the data splits, the batch
            order.
        anomaly: sizes of the anomaly data set (``n_train``, ``n_val``, ``n_test``).
        digits_epochs, anomaly_epochs, digits_lr, anomaly_lr, batch_size: training.
        memory_batch: anomaly test sequences the memory profiles are averaged over.
        probe_batch: digits test images whose fixed points, spectra, Lyapunov exponents
            and impulse responses are measured (averaged).
        dynamics_steps: applications of the Lyapunov average and the impulse response.
    """

    name: str = "full"
    hidden: tuple[int, ...] = (32, 32)
    activation: str = "tanh"
    ks: tuple[int, ...] = (1, 2, 3, 4, 5)
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    policies: tuple[str, ...] = POLICIES
    modes: tuple[str, ...] = MODES
    train_policies: tuple[str, ...] = POLICIES
    train_modes: tuple[str, ...] = MODES
    seed: int = 0
    anomaly: dict[str, int] = field(
        default_factory=lambda: {"n_train": 3000, "n_val": 1000, "n_test": 1000})
    digits_epochs: int = 20
    anomaly_epochs: int = 40
    digits_lr: float = 3e-3
    anomaly_lr: float = 3e-3
    batch_size: int = 64
    memory_batch: int = 16
    probe_batch: int = 4
    dynamics_steps: int = 200

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"ContinuumConfig.name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "hidden", _ints(self.hidden, "hidden", 1, distinct=False))
        if not isinstance(self.activation, str):
            raise ConfigError(f"ContinuumConfig.activation must be a string, got {self.activation!r}")
        object.__setattr__(self, "ks", tuple(sorted(_ints(self.ks, "ks", 1))))
        alphas = self.alphas
        if isinstance(alphas, (str, bytes)) or not isinstance(alphas, (list, tuple)) or not alphas:
            raise ConfigError(f"ContinuumConfig.alphas must be a non-empty list of numbers, "
                              f"got {alphas!r}")
        for a in alphas:
            if (isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)
                    or not 0 <= a <= 1):
                raise ConfigError(f"ContinuumConfig.alphas must hold numbers in [0, 1], got {a!r}")
        if len(set(alphas)) != len(alphas):
            raise ConfigError(f"ContinuumConfig.alphas repeats a value: {list(alphas)}")
        object.__setattr__(self, "alphas", tuple(sorted(float(a) for a in alphas)))
        for key, allowed in (("policies", POLICIES), ("modes", MODES)):
            object.__setattr__(self, key, _choices(getattr(self, key), key, allowed))
        for key, within in (("train_policies", "policies"), ("train_modes", "modes")):
            value = _choices(getattr(self, key), key, getattr(self, within))
            object.__setattr__(self, key, value)
        for key in ("seed",):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"ContinuumConfig.{key} must be an int >= 0, got {v!r}")
        if not isinstance(self.anomaly, dict) or set(self.anomaly) - {"n_train", "n_val", "n_test"}:
            raise ConfigError("ContinuumConfig.anomaly must be a dict with keys among n_train, "
                              f"n_val, n_test, got {self.anomaly!r}")
        for key in ("digits_epochs", "anomaly_epochs", "batch_size", "memory_batch",
                    "probe_batch", "dynamics_steps", *(f"anomaly.{k}" for k in self.anomaly)):
            v = self.anomaly[key[8:]] if key.startswith("anomaly.") else getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ContinuumConfig.{key} must be an int >= 1, got {v!r}")
        for key in ("digits_lr", "anomaly_lr"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                raise ConfigError(f"ContinuumConfig.{key} must be a finite number > 0, got {v!r}")

    @property
    def depth(self) -> int:
        """``L``, the number of weight layers of the map family."""
        return len(self.hidden) + 1

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


#: ``iternn continuum``: about 45 minutes on 2 cores (see :mod:`iternn.continuum`).
FULL = ContinuumConfig()

#: ``iternn continuum --quick``: a coarse (k, alpha) grid, only the carried/forced
#: setting trained, smaller data and fewer epochs: about 2.5 minutes on 2 cores (see
#: :mod:`iternn.continuum`).
QUICK = ContinuumConfig(
    name="quick",
    ks=(1, 2, 3, 4),
    alphas=(0.0, 0.5, 1.0),
    train_policies=("carried",),
    train_modes=("forced",),
    anomaly={"n_train": 2000, "n_val": 400, "n_test": 400},
    digits_epochs=5,
    anomaly_epochs=15,
    memory_batch=8,
    probe_batch=2,
    dynamics_steps=60,
)
