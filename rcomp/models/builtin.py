"""Built-in architectures: the study's 8-layer CNN, the CIFAR ResNet-18, and a tiny MLP (listed in
:data:`rcomp.models.catalog.ARCHITECTURES`)."""

from __future__ import annotations

from torch import nn

from rcomp.spec import InputSpec


def _conv_out(size: int, stride: int) -> int:
    # 3x3, padding 1
    return (size + 2 - 3) // stride + 1


class ConvNet8(nn.Module):
    """The 8-layer CNN of Thorsteinsson et al. (2024) for Fashion-MNIST.

    Six 3x3 convolutions (32, 32, 64, 64, 128, 128 filters, padding 1, stride 2 on the 2nd,
    4th and 6th, ReLU), then Linear to 128, ReLU, Linear to the classes. The first Linear's
    input size follows from the input spec (2048 for 28x28).
    """

    def __init__(self, in_channels: int = 1, height: int = 28, width: int = 28, num_classes: int = 10,
                 widths=(32, 32, 64, 64, 128, 128), hidden: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c, h, w = in_channels, height, width
        for i, out in enumerate(widths):
            stride = 2 if i % 2 == 1 else 1
            layers += [nn.Conv2d(c, out, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]
            c, h, w = out, _conv_out(h, stride), _conv_out(w, stride)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-18 for 32x32 images: 3x3 stride-1 stem, no max-pool (He et al. 2016, CIFAR variant)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, blocks=(2, 2, 2, 2), width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes, layers, in_planes = width, [], width
        for i, n in enumerate(blocks):
            stride = 1 if i == 0 else 2
            blk = []
            for j in range(n):
                blk.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blk))
            planes *= 2
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


class MLP(nn.Module):
    """A small multi-layer perceptron (flatten, hidden layers with ReLU, linear classifier)."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden=(128,)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def convnet8(spec: InputSpec, num_classes: int, **kw) -> nn.Module:
    return ConvNet8(spec.channels, spec.height, spec.width, num_classes, **kw)


def resnet18_cifar(spec: InputSpec, num_classes: int, **kw) -> nn.Module:
    return ResNetCifar(spec.channels, num_classes, **kw)


def mlp(spec: InputSpec, num_classes: int, **kw) -> nn.Module:
    return MLP(spec.channels * spec.height * spec.width, num_classes, **kw)
