"""Models of the scale ladder (issue 19), built in code: no torchvision, no downloads.

* ``mlp`` (~1e5 parameters) and ``wide_mlp`` (~1e8): plain ``Linear``/``ReLU`` stacks on 3x32x32 inputs;
* ``resnet18``: the ResNet-18 of He et al. (2016) as torchvision lays it out (7x7 stride-2 stem, max-pool, four
  stages of two basic blocks, BatchNorm), with a 10-class head: 11,181,642 parameters, torchvision's
  ``resnet18(num_classes=10)``;
* ``gpt2_25m``: a ``transformers`` GPT-2 built from a config (6 layers, width 512, vocabulary 16,384: 27.4M);
  ``gpt2_124m`` GPT-2 small's shape (12 layers, width 768, vocabulary 50,257: 124.4M).
* ``vit_tiny``: a ``transformers`` ViT-Tiny (Touvron et al. 2021: 12 layers, width 192, 3 heads, MLP 768) on 32x32
  images in 4x4 patches (64 patches and the class token), 10 classes: 5,362,762 parameters.

:func:`side_by_side` gives a saved entry as a model, inputs, targets and loss for tools run in-process (PyHessian).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin, layers = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet18(num_classes)


def mlp(width: int = 32, depth: int = 2, num_classes: int = 10) -> nn.Module:
    """``3072 -> width (x depth) -> classes`` with ReLU: width 32 gives 99,722 parameters, 3,072 x 4 gives 1e8
    with ``wide_mlp``."""
    layers: list[nn.Module] = [nn.Flatten()]
    cin = 3 * 32 * 32
    for _ in range(depth):
        layers += [nn.Linear(cin, width), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers, nn.Linear(cin, num_classes))


def wide_mlp() -> nn.Module:
    """``3072 -> 5000 -> 5000 -> 5000 -> 5000 -> 10``: 90,440,010 parameters."""
    return mlp(width=5000, depth=4)


def gpt2_config(size: str = "25m") -> dict:
    sizes = {"25m": dict(vocab_size=16384, n_positions=128, n_embd=512, n_layer=6, n_head=8),
             "124m": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)}
    return sizes[size]


def gpt2(size: str = "25m") -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **gpt2_config(size)))


def vit_tiny() -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
        intermediate_size=768, num_labels=10))


def build(name: str) -> nn.Module:
    """A ladder entry by name, freshly initialised."""
    return gpt2(name.split("_")[1]) if name.startswith("gpt2") else globals()[name]()


class Logits(nn.Module):
    """A ``transformers`` classifier's ``logits``, for tools that want a tensor out (PyHessian)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


class NextToken(nn.Module):
    """A causal LM as a classifier of the next token: ``ids (n, T) -> logits (n, T - 1, vocab)``; with
    :func:`next_token_loss` the loss ``landscape`` computes for the model's folder (PyHessian needs such a pair)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits[:, :-1]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def side_by_side(name: str, checkpoint: str, data: str | None, samples: int, context: int
                 ) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    """Model, inputs, targets and loss of a ladder entry as the benchmark saved it, for tools run in-process."""
    if name.startswith("gpt2"):
        import transformers

        from landscape.io.hf import tokens

        lm = transformers.GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager")
        ids, _ = tokens(n=samples, vocab=gpt2_config(name.split("_")[1])["vocab_size"], context=context)
        return NextToken(lm), ids, ids[:, 1:], next_token_loss
    d = torch.load(data, weights_only=True)
    if name.startswith("vit"):
        import transformers

        vit = transformers.ViTForImageClassification.from_pretrained(checkpoint, attn_implementation="eager")
        return Logits(vit), d["X"], d["y"], nn.functional.cross_entropy
    model = globals()[name]()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model, d["X"], d["y"], nn.functional.cross_entropy
