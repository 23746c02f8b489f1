"""Reference CNNs in a timm-style registry, with torchvision-identical architectures.

The torchvision families (``resnet18``, ``resnet34``, ``resnet50``, ``resnext50_32x4d``,
``mobilenet_v2``, ``mobilenet_v3_small``, ``vgg11_bn``, ``densenet121``) have the same module names,
``state_dict`` keys and shapes and forward semantics as torchvision >= 0.13 (in-place ReLUs,
``out += identity``, ``torch.flatten(x, 1)``...), so torchvision checkpoints load unchanged. Small-image
variants (``resnet18_small``, ``resnet_tiny``, ``resnet10_narrow``, ``mobilenet_v2_small``,
``densenet_small``, ``unet_small``) serve 28–128 px data and fast tests. ResNets also take ``widths``
(channels per layer; the stem's is ``widths[0]``), kept as their ``widths`` attribute.

Every constructor takes ``num_classes``, ``in_chans`` and ``strides``: the list of the network's
downsampling points in forward order (docs/definitions.md §4). An aggressive-pool student is the same constructor
with a different list, e.g. the ReDistill ResNet18 student ``resnet18(strides=[8, 1, 1, 2, 2, 1])``;
every model keeps the resolved list as its ``strides`` attribute (a tuple). A wrong length or a
non-positive entry raises :class:`ZooError` (a ``ValueError``) naming the expected slots.
A pool whose slot in ``strides`` is a plain pooling layer (VGG pools, DenseNet transitions, UNet
encoder pools) uses ``kernel_size = stride = s``, so ``s = 1`` keeps the spatial size.

Example:
    >>> import torch
    >>> from memplan.zoo import create_model, default_input, list_models
    >>> "resnet18" in list_models()
    True
    >>> model = create_model("resnet_tiny").eval()
    >>> model(torch.zeros(default_input("resnet_tiny"))).shape
    torch.Size([1, 10])
"""

from memplan.zoo._registry import (
    IMAGENET_INPUT,
    MODELS,
    UnknownModelError,
    ZooError,
    create_model,
    default_input,
    extra_inputs,
    list_models,
    register_model,
)
from memplan.zoo.common import ConvNormAct
from memplan.zoo.ddpm import DDPMUNet
from memplan.zoo.densenet import DenseNet
from memplan.zoo.mobilenet import MobileNetV2, MobileNetV3
from memplan.zoo.resnet import BasicBlock, Bottleneck, ResNet
from memplan.zoo.unet import UNet
from memplan.zoo.vgg import VGG

__all__ = [
    "IMAGENET_INPUT", "MODELS", "BasicBlock", "Bottleneck", "ConvNormAct", "DDPMUNet", "DenseNet", "MobileNetV2",
    "MobileNetV3", "ResNet",
    "UNet", "UnknownModelError", "VGG", "ZooError", "create_model", "default_input", "extra_inputs", "list_models", "register_model",
]
