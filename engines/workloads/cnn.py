"""The paper's MNIST network, with its topology as parameters so sweeps can vary it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MnistCNN(nn.Module):
    """conv(1->conv1, 5x5) + max-pool 2x2 + ReLU, conv(conv1->conv2, 5x5) + max-pool 2x2 + ReLU,
    fully connected (conv2*4*4 -> hidden) + ReLU, hidden -> 10 log-softmax."""

    def __init__(self, conv1: int = 20, conv2: int = 40, hidden: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(1, conv1, kernel_size=5)
        self.conv2 = nn.Conv2d(conv1, conv2, kernel_size=5)
        self.hidden = nn.Linear(conv2 * 4 * 4, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.hidden(x.flatten(1)))
        return F.log_softmax(self.out(x), dim=1)

    def weights(self) -> list[torch.Tensor]:
        """The weight matrices and kernels (not biases) that the L1 penalty applies to."""
        return [self.conv1.weight, self.conv2.weight, self.hidden.weight, self.out.weight]


def l1_penalty(model: MnistCNN) -> torch.Tensor:
    """sum(|w|) over the model's weights."""
    return torch.stack([w.abs().sum() for w in model.weights()]).sum()
