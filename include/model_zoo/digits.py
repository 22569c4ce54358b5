"""DigitsCNN: a small CNN (batch norm + a residual block) for sklearn's 8x8 handwritten digits.

Input `pixels` float32 [batch, 1, 8, 8] (scaled with `preprocess`), output `logits` [batch, num_classes].
`train_digits` trains it on sklearn's bundled `load_digits` in a few seconds on a CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, channels: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.block = ResidualBlock(channels)
        self.down = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * channels), nn.ReLU())
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.down(self.block(self.stem(pixels)))
        return self.head(x.mean(dim=(2, 3)))


def preprocess(images: np.ndarray) -> np.ndarray:
    """sklearn digit images (values 0..16, [n, 8, 8] or [n, 64]) -> float32 [n, 1, 8, 8] in [-1, 1]."""
    x = np.asarray(images, dtype=np.float32).reshape(-1, 1, 8, 8)
    return x / 8.0 - 1.0


def load_split(seed: int = 0, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) from sklearn's bundled digits (no download), stratified and seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = preprocess(digits.images), digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def train_digits(epochs: int = 8, seed: int = 0, batch_size: int = 64,
                 lr: float = 3e-3) -> tuple[DigitsCNN, float, dict[str, np.ndarray]]:
    """Train DigitsCNN; returns (model in eval mode, held-out top-1 accuracy, eval arrays).

    The eval arrays are {"pixels": [n,1,8,8] float32, "labels": [n] int64}: save them with `np.savez` to get
    an `accuracy.eval_data` file for `top1_accuracy`.
    """
    # One intra-op thread: for batches this small, thread hand-offs cost more than they save, and on a busy
    # machine 2 spinning threads made training 20x slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, seed, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(epochs: int, seed: int, batch_size: int, lr: float) -> tuple[DigitsCNN, float, dict[str, np.ndarray]]:
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_split(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_te)).argmax(dim=1).numpy()
    accuracy = float((pred == y_te).mean())
    return model, accuracy, {"pixels": x_te, "labels": y_te}
