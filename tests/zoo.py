"""A fixed zoo of small feed-forward models for ``from_module`` (tests and benchmarks).

Each :class:`ZooCase` builds its model reproducibly (its own seed, the global RNG state
left alone) and makes example inputs of any batch size; everything is small and works in
float64. Batch-norm layers get random affine parameters and running statistics, so eval
mode is not the identity.

* ``lenet`` — a LeNet-style 2-D CNN (conv, pooling as module and function, a
  ``view(x.size(0), -1)`` flatten, linear head);
* ``resnet`` — a small ResNet: stem, a basic block, a strided block whose shortcut is a
  strided 1x1 convolution with batch norm, ``out += shortcut``, a shared in-place ReLU,
  adaptive average pooling;
* ``resmlp`` — a residual MLP: ``x + f(LayerNorm(x))`` blocks with GELU and dropout;
* ``densenet`` — a DenseNet-style net: layers whose outputs are concatenated to their
  inputs (``torch.cat``), a transition with average pooling, a mean over space;
* ``glu`` — gated (GLU) layers: ``chunk`` into value and gate, ``a * sigmoid(b)``, and a
  product of two projections;
* ``cnn1d`` — a 1-D CNN with ``LayerNorm`` over channels (``transpose`` around it) and
  dropout (module and ``F.dropout(..., self.training)``).

:func:`resnet` with its defaults is the benchmark model (widths 16/32, inputs 3x32x32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ZooCase", "ZOO", "LeNet", "ResNet", "BasicBlock", "ResMLP", "DenseNet", "GLUNet",
           "CNN1d", "resnet", "randomize_norms"]


class LeNet(nn.Module):
    def __init__(self, channels: int = 1, classes: int = 10, size: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 8, 3)
        side = (size // 2 - 2) // 2
        self.fc1 = nn.Linear(8 * side * side, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, int] = (16, 32), classes: int = 10) -> None:
        super().__init__()
        w0, w1 = widths
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0),
                                  nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(w0, w0, 1)
        self.layer2 = BasicBlock(w0, w1, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w1, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResMLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 16, d_out: int = 3, depth: int = 2,
                 p: float = 0.2) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.fcs = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Dropout(p),
                          nn.Linear(2 * hidden, hidden))
            for _ in range(depth))
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for norm, fc in zip(self.norms, self.fcs):
            h = h + fc(norm(h))
        return self.out(F.silu(h))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


class DenseNet(nn.Module):
    def __init__(self, channels: int = 3, growth: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, 6, 3, padding=1)
        c = 6
        block = []
        for _ in range(3):
            block.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block)
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 8, 1), nn.AvgPool2d(2))
        self.block2 = DenseLayer(8, growth)
        self.fc = nn.Linear(8 + growth, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.trans(self.block1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class GLUNet(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 8, d_out: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, 2 * hidden)
        self.value = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        h = a * torch.sigmoid(b)
        h = self.value(h) * self.gate(h).sigmoid() + h
        return self.out(torch.tanh(h))


class CNN1d(nn.Module):
    def __init__(self, channels: int = 3, length: int = 12, width: int = 8, d_out: int = 4,
                 p: float = 0.25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, width, 3, padding=1)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(p)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.head = nn.Linear(width * length, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x).transpose(1, 2)
        h = self.norm(h).transpose(1, 2)
        h = self.drop(F.gelu(h))
        h = self.conv2(h)
        h = F.dropout(h, 0.1, self.training)
        return self.head(h.flatten(1))


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Random batch-norm affine parameters and running statistics (eval is then not
    the identity); in place, drawing only from ``generator``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=generator))
                m.bias.copy_(0.3 * torch.randn(n, generator=generator))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def resnet(widths: tuple[int, int] = (16, 32), classes: int = 10) -> ResNet:
    """The benchmark model: inputs ``(batch, 3, 32, 32)``."""
    return ResNet(widths, classes)


@dataclass(frozen=True)
class ZooCase:
    """One model of the zoo: how to build it and what it reads (one tensor, batch first)."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    dropout: bool = False  # whether train mode draws random numbers

    def model(self, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
        """A fresh model (parameters from ``seed``), in train mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build()
        randomize_norms(model, torch.Generator().manual_seed(seed + 1))
        return model.to(dtype)

    def inputs(self, batch: int = 4, *, dtype: torch.dtype = torch.float64,
               seed: int = 0) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, *self.input_shape, generator=g).to(dtype),)


ZOO: dict[str, ZooCase] = {c.name: c for c in (
    ZooCase("lenet", LeNet, (1, 16, 16)),
    ZooCase("resnet", lambda: ResNet((4, 8), 5), (3, 8, 8)),
    ZooCase("resmlp", ResMLP, (6,), dropout=True),
    ZooCase("densenet", DenseNet, (3, 8, 8)),
    ZooCase("glu", GLUNet, (5,)),
    ZooCase("cnn1d", CNN1d, (3, 12), dropout=True),
)}
