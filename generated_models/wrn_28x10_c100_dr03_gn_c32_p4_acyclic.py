# python -m autopipe.partition vision --model wrn_28x10_c100_dr03_gn -p 4 -b 256 --crop 32
"""wrn_28x10_c100_dr03_gn_c32 split into 4 pipeline stages.

Each ``StageK`` holds the original model's layers for its part, registered under the original
qualified names, so ``StageK().state_dict()`` keys are the original model's keys. ``PIPELINE``
says what each stage receives and sends. ``build_stages(state_dict)`` builds the stages with the
original model's weights; ``merge_state_dicts`` joins the stages' state dicts back into one.

Analysis (predicted)
flops profile on v100, batch 256, 12 GB/s links, 4 microbatches
stage    fwd ms    bwd ms  params MB    in MB   out MB  comm ms  memory GB
    0     46.07    134.97       4.72     0.00   167.77    27.96      0.991
    1     47.96    141.47      14.96   167.77    83.89    13.98      0.905
    2     45.96    136.39      37.70    83.89    41.94     6.99      0.606
    3     48.22    143.72      88.77    41.94     0.00     0.00      0.550
slowest stage 209.00 ms per batch, lower bound 186.19 ms (ratio 1.122); one device 744.75 ms
gpipe with 4 microbatches: 355.17 ms per batch, 720.8 samples/s, 2.10x one device, peak memory 0.991 GB
1f1b with 4 microbatches: 355.17 ms per batch, 720.8 samples/s, 2.10x one device, peak memory 0.991 GB
"""

import torch
import torch.nn.functional as F
from torch import nn


class Stage0(nn.Module):
    """Stage 0: from conv1 to layer1.2.conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = nn.ModuleDict(
            {
                "0": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(16, 16),
                        "relu1": nn.ReLU(inplace=True),
                        "shortcut": nn.Conv2d(16, 160, 1, bias=False),
                        "conv1": nn.Conv2d(16, 160, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 160),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(160, 160, 3, padding=1, bias=False),
                    }
                ),
                "1": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 160),
                        "relu1": nn.ReLU(inplace=True),
                        "conv1": nn.Conv2d(160, 160, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 160),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(160, 160, 3, padding=1, bias=False),
                    }
                ),
                "2": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 160),
                        "relu1": nn.ReLU(inplace=True),
                        "conv1": nn.Conv2d(160, 160, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 160),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(160, 160, 3, padding=1, bias=False),
                    }
                ),
            }
        )

    def forward(self, x) -> tuple:
        conv1 = self.conv1(x)  # conv1
        layer1_0_bn1 = self.layer1["0"].bn1(conv1)  # layer1.0.bn1
        layer1_0_relu1 = self.layer1["0"].relu1(layer1_0_bn1)  # layer1.0.relu1
        layer1_0_shortcut = self.layer1["0"].shortcut(layer1_0_relu1)  # layer1.0.shortcut
        layer1_0_conv1 = self.layer1["0"].conv1(layer1_0_relu1)  # layer1.0.conv1
        layer1_0_bn2 = self.layer1["0"].bn2(layer1_0_conv1)  # layer1.0.bn2
        layer1_0_relu2 = self.layer1["0"].relu2(layer1_0_bn2)  # layer1.0.relu2
        layer1_0_dropout = self.layer1["0"].dropout(layer1_0_relu2)  # layer1.0.dropout
        layer1_0_conv2 = self.layer1["0"].conv2(layer1_0_dropout)  # layer1.0.conv2
        add = layer1_0_conv2 + layer1_0_shortcut  # layer1.0 (WideBasicBlock)
        layer1_1_bn1 = self.layer1["1"].bn1(add)  # layer1.1.bn1
        layer1_1_relu1 = self.layer1["1"].relu1(layer1_1_bn1)  # layer1.1.relu1
        layer1_1_conv1 = self.layer1["1"].conv1(layer1_1_relu1)  # layer1.1.conv1
        layer1_1_bn2 = self.layer1["1"].bn2(layer1_1_conv1)  # layer1.1.bn2
        layer1_1_relu2 = self.layer1["1"].relu2(layer1_1_bn2)  # layer1.1.relu2
        layer1_1_dropout = self.layer1["1"].dropout(layer1_1_relu2)  # layer1.1.dropout
        layer1_1_conv2 = self.layer1["1"].conv2(layer1_1_dropout)  # layer1.1.conv2
        add_1 = layer1_1_conv2 + add  # layer1.1 (WideBasicBlock)
        layer1_2_bn1 = self.layer1["2"].bn1(add_1)  # layer1.2.bn1
        layer1_2_relu1 = self.layer1["2"].relu1(layer1_2_bn1)  # layer1.2.relu1
        layer1_2_conv1 = self.layer1["2"].conv1(layer1_2_relu1)  # layer1.2.conv1
        layer1_2_bn2 = self.layer1["2"].bn2(layer1_2_conv1)  # layer1.2.bn2
        layer1_2_relu2 = self.layer1["2"].relu2(layer1_2_bn2)  # layer1.2.relu2
        layer1_2_dropout = self.layer1["2"].dropout(layer1_2_relu2)  # layer1.2.dropout
        layer1_2_conv2 = self.layer1["2"].conv2(layer1_2_dropout)  # layer1.2.conv2
        add_2 = layer1_2_conv2 + add_1  # layer1.2 (WideBasicBlock)
        return (add_2,)


class Stage1(nn.Module):
    """Stage 1: from layer1.3.bn1 to layer2.1.conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.ModuleDict(
            {
                "3": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 160),
                        "relu1": nn.ReLU(inplace=True),
                        "conv1": nn.Conv2d(160, 160, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 160),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(160, 160, 3, padding=1, bias=False),
                    }
                )
            }
        )
        self.layer2 = nn.ModuleDict(
            {
                "0": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 160),
                        "relu1": nn.ReLU(inplace=True),
                        "shortcut": nn.Conv2d(160, 320, 1, stride=2, bias=False),
                        "conv1": nn.Conv2d(160, 320, 3, stride=2, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 320),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(320, 320, 3, padding=1, bias=False),
                    }
                ),
                "1": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 320),
                        "relu1": nn.ReLU(inplace=True),
                        "conv1": nn.Conv2d(320, 320, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 320),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(320, 320, 3, padding=1, bias=False),
                    }
                ),
            }
        )

    def forward(self, add_2) -> tuple:
        layer1_3_bn1 = self.layer1["3"].bn1(add_2)  # layer1.3.bn1
        layer1_3_relu1 = self.layer1["3"].relu1(layer1_3_bn1)  # layer1.3.relu1
        layer1_3_conv1 = self.layer1["3"].conv1(layer1_3_relu1)  # layer1.3.conv1
        layer1_3_bn2 = self.layer1["3"].bn2(layer1_3_conv1)  # layer1.3.bn2
        layer1_3_relu2 = self.layer1["3"].relu2(layer1_3_bn2)  # layer1.3.relu2
        layer1_3_dropout = self.layer1["3"].dropout(layer1_3_relu2)  # layer1.3.dropout
        layer1_3_conv2 = self.layer1["3"].conv2(layer1_3_dropout)  # layer1.3.conv2
        add_3 = layer1_3_conv2 + add_2  # layer1.3 (WideBasicBlock)
        layer2_0_bn1 = self.layer2["0"].bn1(add_3)  # layer2.0.bn1
        layer2_0_relu1 = self.layer2["0"].relu1(layer2_0_bn1)  # layer2.0.relu1
        layer2_0_shortcut = self.layer2["0"].shortcut(layer2_0_relu1)  # layer2.0.shortcut
        layer2_0_conv1 = self.layer2["0"].conv1(layer2_0_relu1)  # layer2.0.conv1
        layer2_0_bn2 = self.layer2["0"].bn2(layer2_0_conv1)  # layer2.0.bn2
        layer2_0_relu2 = self.layer2["0"].relu2(layer2_0_bn2)  # layer2.0.relu2
        layer2_0_dropout = self.layer2["0"].dropout(layer2_0_relu2)  # layer2.0.dropout
        layer2_0_conv2 = self.layer2["0"].conv2(layer2_0_dropout)  # layer2.0.conv2
        add_4 = layer2_0_conv2 + layer2_0_shortcut  # layer2.0 (WideBasicBlock)
        layer2_1_bn1 = self.layer2["1"].bn1(add_4)  # layer2.1.bn1
        layer2_1_relu1 = self.layer2["1"].relu1(layer2_1_bn1)  # layer2.1.relu1
        layer2_1_conv1 = self.layer2["1"].conv1(layer2_1_relu1)  # layer2.1.conv1
        layer2_1_bn2 = self.layer2["1"].bn2(layer2_1_conv1)  # layer2.1.bn2
        layer2_1_relu2 = self.layer2["1"].relu2(layer2_1_bn2)  # layer2.1.relu2
        layer2_1_dropout = self.layer2["1"].dropout(layer2_1_relu2)  # layer2.1.dropout
        layer2_1_conv2 = self.layer2["1"].conv2(layer2_1_dropout)  # layer2.1.conv2
        add_5 = layer2_1_conv2 + add_4  # layer2.1 (WideBasicBlock)
        return (add_5,)


class Stage2(nn.Module):
    """Stage 2: from layer2.2.bn1 to layer3.0.conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.layer2 = nn.ModuleDict(
            {
                "2": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 320),
                        "relu1": nn.ReLU(inplace=True),
                        "conv1": nn.Conv2d(320, 320, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 320),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(320, 320, 3, padding=1, bias=False),
                    }
                ),
                "3": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 320),
                        "relu1": nn.ReLU(inplace=True),
                        "conv1": nn.Conv2d(320, 320, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 320),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(320, 320, 3, padding=1, bias=False),
                    }
                ),
            }
        )
        self.layer3 = nn.ModuleDict(
            {
                "0": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 320),
                        "relu1": nn.ReLU(inplace=True),
                        "shortcut": nn.Conv2d(320, 640, 1, stride=2, bias=False),
                        "conv1": nn.Conv2d(320, 640, 3, stride=2, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 640),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(640, 640, 3, padding=1, bias=False),
                    }
                )
            }
        )

    def forward(self, add_5) -> tuple:
        layer2_2_bn1 = self.layer2["2"].bn1(add_5)  # layer2.2.bn1
        layer2_2_relu1 = self.layer2["2"].relu1(layer2_2_bn1)  # layer2.2.relu1
        layer2_2_conv1 = self.layer2["2"].conv1(layer2_2_relu1)  # layer2.2.conv1
        layer2_2_bn2 = self.layer2["2"].bn2(layer2_2_conv1)  # layer2.2.bn2
        layer2_2_relu2 = self.layer2["2"].relu2(layer2_2_bn2)  # layer2.2.relu2
        layer2_2_dropout = self.layer2["2"].dropout(layer2_2_relu2)  # layer2.2.dropout
        layer2_2_conv2 = self.layer2["2"].conv2(layer2_2_dropout)  # layer2.2.conv2
        add_6 = layer2_2_conv2 + add_5  # layer2.2 (WideBasicBlock)
        layer2_3_bn1 = self.layer2["3"].bn1(add_6)  # layer2.3.bn1
        layer2_3_relu1 = self.layer2["3"].relu1(layer2_3_bn1)  # layer2.3.relu1
        layer2_3_conv1 = self.layer2["3"].conv1(layer2_3_relu1)  # layer2.3.conv1
        layer2_3_bn2 = self.layer2["3"].bn2(layer2_3_conv1)  # layer2.3.bn2
        layer2_3_relu2 = self.layer2["3"].relu2(layer2_3_bn2)  # layer2.3.relu2
        layer2_3_dropout = self.layer2["3"].dropout(layer2_3_relu2)  # layer2.3.dropout
        layer2_3_conv2 = self.layer2["3"].conv2(layer2_3_dropout)  # layer2.3.conv2
        add_7 = layer2_3_conv2 + add_6  # layer2.3 (WideBasicBlock)
        layer3_0_bn1 = self.layer3["0"].bn1(add_7)  # layer3.0.bn1
        layer3_0_relu1 = self.layer3["0"].relu1(layer3_0_bn1)  # layer3.0.relu1
        layer3_0_shortcut = self.layer3["0"].shortcut(layer3_0_relu1)  # layer3.0.shortcut
        layer3_0_conv1 = self.layer3["0"].conv1(layer3_0_relu1)  # layer3.0.conv1
        layer3_0_bn2 = self.layer3["0"].bn2(layer3_0_conv1)  # layer3.0.bn2
        layer3_0_relu2 = self.layer3["0"].relu2(layer3_0_bn2)  # layer3.0.relu2
        layer3_0_dropout = self.layer3["0"].dropout(layer3_0_relu2)  # layer3.0.dropout
        layer3_0_conv2 = self.layer3["0"].conv2(layer3_0_dropout)  # layer3.0.conv2
        add_8 = layer3_0_conv2 + layer3_0_shortcut  # layer3.0 (WideBasicBlock)
        return (add_8,)


class Stage3(nn.Module):
    """Stage 3: from layer3.1.bn1 to fc."""

    def __init__(self) -> None:
        super().__init__()
        self.layer3 = nn.ModuleDict(
            {
                "1": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 640),
                        "relu1": nn.ReLU(inplace=True),
                        "conv1": nn.Conv2d(640, 640, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 640),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(640, 640, 3, padding=1, bias=False),
                    }
                ),
                "2": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 640),
                        "relu1": nn.ReLU(inplace=True),
                        "conv1": nn.Conv2d(640, 640, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 640),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(640, 640, 3, padding=1, bias=False),
                    }
                ),
                "3": nn.ModuleDict(
                    {
                        "bn1": nn.GroupNorm(32, 640),
                        "relu1": nn.ReLU(inplace=True),
                        "conv1": nn.Conv2d(640, 640, 3, padding=1, bias=False),
                        "bn2": nn.GroupNorm(32, 640),
                        "relu2": nn.ReLU(inplace=True),
                        "dropout": nn.Dropout(p=0.3),
                        "conv2": nn.Conv2d(640, 640, 3, padding=1, bias=False),
                    }
                ),
            }
        )
        self.bn1 = nn.GroupNorm(32, 640)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(640, 100)

    def forward(self, add_8) -> tuple:
        layer3_1_bn1 = self.layer3["1"].bn1(add_8)  # layer3.1.bn1
        layer3_1_relu1 = self.layer3["1"].relu1(layer3_1_bn1)  # layer3.1.relu1
        layer3_1_conv1 = self.layer3["1"].conv1(layer3_1_relu1)  # layer3.1.conv1
        layer3_1_bn2 = self.layer3["1"].bn2(layer3_1_conv1)  # layer3.1.bn2
        layer3_1_relu2 = self.layer3["1"].relu2(layer3_1_bn2)  # layer3.1.relu2
        layer3_1_dropout = self.layer3["1"].dropout(layer3_1_relu2)  # layer3.1.dropout
        layer3_1_conv2 = self.layer3["1"].conv2(layer3_1_dropout)  # layer3.1.conv2
        add_9 = layer3_1_conv2 + add_8  # layer3.1 (WideBasicBlock)
        layer3_2_bn1 = self.layer3["2"].bn1(add_9)  # layer3.2.bn1
        layer3_2_relu1 = self.layer3["2"].relu1(layer3_2_bn1)  # layer3.2.relu1
        layer3_2_conv1 = self.layer3["2"].conv1(layer3_2_relu1)  # layer3.2.conv1
        layer3_2_bn2 = self.layer3["2"].bn2(layer3_2_conv1)  # layer3.2.bn2
        layer3_2_relu2 = self.layer3["2"].relu2(layer3_2_bn2)  # layer3.2.relu2
        layer3_2_dropout = self.layer3["2"].dropout(layer3_2_relu2)  # layer3.2.dropout
        layer3_2_conv2 = self.layer3["2"].conv2(layer3_2_dropout)  # layer3.2.conv2
        add_10 = layer3_2_conv2 + add_9  # layer3.2 (WideBasicBlock)
        layer3_3_bn1 = self.layer3["3"].bn1(add_10)  # layer3.3.bn1
        layer3_3_relu1 = self.layer3["3"].relu1(layer3_3_bn1)  # layer3.3.relu1
        layer3_3_conv1 = self.layer3["3"].conv1(layer3_3_relu1)  # layer3.3.conv1
        layer3_3_bn2 = self.layer3["3"].bn2(layer3_3_conv1)  # layer3.3.bn2
        layer3_3_relu2 = self.layer3["3"].relu2(layer3_3_bn2)  # layer3.3.relu2
        layer3_3_dropout = self.layer3["3"].dropout(layer3_3_relu2)  # layer3.3.dropout
        layer3_3_conv2 = self.layer3["3"].conv2(layer3_3_dropout)  # layer3.3.conv2
        add_11 = layer3_3_conv2 + add_10  # layer3.3 (WideBasicBlock)
        bn1 = self.bn1(add_11)  # bn1
        relu = self.relu(bn1)  # relu
        avgpool = self.avgpool(relu)  # avgpool
        flatten = self.flatten(avgpool)  # flatten
        fc = self.fc(flatten)  # fc
        return (fc,)


PIPELINE = {
    "model": "wrn_28x10_c100_dr03_gn_c32",
    "method": "acyclic",
    "batch_size": 256,
    "source": {"family": "vision", "model": "wrn_28x10_c100_dr03_gn"},
    "model_inputs": ["x"],
    "model_outputs": ["fc"],
    "batch_dim": 0,
    "n_stages": 4,
    "stages": [
        {
            "inputs": ["x"],
            "outputs": ["add_2"],
            "values": {
                "x": {
                    "shape": [256, 3, 32, 32],
                    "dtype": "float32",
                    "requires_grad": False,
                    "batch_dim": 0,
                    "producer": None,
                    "consumers": [0],
                },
                "add_2": {
                    "shape": [256, 160, 32, 32],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 0,
                    "consumers": [1],
                },
            },
            "parameters": [
                "conv1.weight",
                "layer1.0.bn1.weight",
                "layer1.0.bn1.bias",
                "layer1.0.shortcut.weight",
                "layer1.0.conv1.weight",
                "layer1.0.bn2.weight",
                "layer1.0.bn2.bias",
                "layer1.0.conv2.weight",
                "layer1.1.bn1.weight",
                "layer1.1.bn1.bias",
                "layer1.1.conv1.weight",
                "layer1.1.bn2.weight",
                "layer1.1.bn2.bias",
                "layer1.1.conv2.weight",
                "layer1.2.bn1.weight",
                "layer1.2.bn1.bias",
                "layer1.2.conv1.weight",
                "layer1.2.bn2.weight",
                "layer1.2.bn2.bias",
                "layer1.2.conv2.weight",
            ],
            "buffers": [],
            "replicas": 1,
            "costs": {
                "forward_ms": 46.0657,
                "backward_ms": 134.9687,
                "comm_ms": 27.962,
                "param_bytes": 4718656,
                "send_bytes": 167772160,
                "recv_bytes": 0,
                "memory_bytes": 991428800,
            },
        },
        {
            "inputs": ["add_2"],
            "outputs": ["add_5"],
            "values": {
                "add_2": {
                    "shape": [256, 160, 32, 32],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 0,
                    "consumers": [1],
                },
                "add_5": {
                    "shape": [256, 320, 16, 16],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 1,
                    "consumers": [2],
                },
            },
            "parameters": [
                "layer1.3.bn1.weight",
                "layer1.3.bn1.bias",
                "layer1.3.conv1.weight",
                "layer1.3.bn2.weight",
                "layer1.3.bn2.bias",
                "layer1.3.conv2.weight",
                "layer2.0.bn1.weight",
                "layer2.0.bn1.bias",
                "layer2.0.shortcut.weight",
                "layer2.0.conv1.weight",
                "layer2.0.bn2.weight",
                "layer2.0.bn2.bias",
                "layer2.0.conv2.weight",
                "layer2.1.bn1.weight",
                "layer2.1.bn1.bias",
                "layer2.1.conv1.weight",
                "layer2.1.bn2.weight",
                "layer2.1.bn2.bias",
                "layer2.1.conv2.weight",
            ],
            "buffers": [],
            "replicas": 1,
            "costs": {
                "forward_ms": 47.9641,
                "backward_ms": 141.4689,
                "comm_ms": 13.981,
                "param_bytes": 14961920,
                "send_bytes": 83886080,
                "recv_bytes": 167772160,
                "memory_bytes": 904718080,
            },
        },
        {
            "inputs": ["add_5"],
            "outputs": ["add_8"],
            "values": {
                "add_5": {
                    "shape": [256, 320, 16, 16],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 1,
                    "consumers": [2],
                },
                "add_8": {
                    "shape": [256, 640, 8, 8],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 2,
                    "consumers": [3],
                },
            },
            "parameters": [
                "layer2.2.bn1.weight",
                "layer2.2.bn1.bias",
                "layer2.2.conv1.weight",
                "layer2.2.bn2.weight",
                "layer2.2.bn2.bias",
                "layer2.2.conv2.weight",
                "layer2.3.bn1.weight",
                "layer2.3.bn1.bias",
                "layer2.3.conv1.weight",
                "layer2.3.bn2.weight",
                "layer2.3.bn2.bias",
                "layer2.3.conv2.weight",
                "layer3.0.bn1.weight",
                "layer3.0.bn1.bias",
                "layer3.0.shortcut.weight",
                "layer3.0.conv1.weight",
                "layer3.0.bn2.weight",
                "layer3.0.bn2.bias",
                "layer3.0.conv2.weight",
            ],
            "buffers": [],
            "replicas": 1,
            "costs": {
                "forward_ms": 45.9602,
                "backward_ms": 136.3891,
                "comm_ms": 6.9905,
                "param_bytes": 37701120,
                "send_bytes": 41943040,
                "recv_bytes": 83886080,
                "memory_bytes": 605934080,
            },
        },
        {
            "inputs": ["add_8"],
            "outputs": ["fc"],
            "values": {
                "add_8": {
                    "shape": [256, 640, 8, 8],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 2,
                    "consumers": [3],
                },
                "fc": {
                    "shape": [256, 100],
                    "dtype": "float32",
                    "requires_grad": True,
                    "batch_dim": 0,
                    "producer": 3,
                    "consumers": [],
                },
            },
            "parameters": [
                "layer3.1.bn1.weight",
                "layer3.1.bn1.bias",
                "layer3.1.conv1.weight",
                "layer3.1.bn2.weight",
                "layer3.1.bn2.bias",
                "layer3.1.conv2.weight",
                "layer3.2.bn1.weight",
                "layer3.2.bn1.bias",
                "layer3.2.conv1.weight",
                "layer3.2.bn2.weight",
                "layer3.2.bn2.bias",
                "layer3.2.conv2.weight",
                "layer3.3.bn1.weight",
                "layer3.3.bn1.bias",
                "layer3.3.conv1.weight",
                "layer3.3.bn2.weight",
                "layer3.3.bn2.bias",
                "layer3.3.conv2.weight",
                "bn1.weight",
                "bn1.bias",
                "fc.weight",
                "fc.bias",
            ],
            "buffers": [],
            "replicas": 1,
            "costs": {
                "forward_ms": 48.2175,
                "backward_ms": 143.7196,
                "comm_ms": 0.0,
                "param_bytes": 88765840,
                "send_bytes": 0,
                "recv_bytes": 41943040,
                "memory_bytes": 549766320,
            },
        },
    ],
    "tied_parameters": [],
    "state_keys": [
        "conv1.weight",
        "layer1.0.bn1.weight",
        "layer1.0.bn1.bias",
        "layer1.0.conv1.weight",
        "layer1.0.bn2.weight",
        "layer1.0.bn2.bias",
        "layer1.0.conv2.weight",
        "layer1.0.shortcut.weight",
        "layer1.1.bn1.weight",
        "layer1.1.bn1.bias",
        "layer1.1.conv1.weight",
        "layer1.1.bn2.weight",
        "layer1.1.bn2.bias",
        "layer1.1.conv2.weight",
        "layer1.2.bn1.weight",
        "layer1.2.bn1.bias",
        "layer1.2.conv1.weight",
        "layer1.2.bn2.weight",
        "layer1.2.bn2.bias",
        "layer1.2.conv2.weight",
        "layer1.3.bn1.weight",
        "layer1.3.bn1.bias",
        "layer1.3.conv1.weight",
        "layer1.3.bn2.weight",
        "layer1.3.bn2.bias",
        "layer1.3.conv2.weight",
        "layer2.0.bn1.weight",
        "layer2.0.bn1.bias",
        "layer2.0.conv1.weight",
        "layer2.0.bn2.weight",
        "layer2.0.bn2.bias",
        "layer2.0.conv2.weight",
        "layer2.0.shortcut.weight",
        "layer2.1.bn1.weight",
        "layer2.1.bn1.bias",
        "layer2.1.conv1.weight",
        "layer2.1.bn2.weight",
        "layer2.1.bn2.bias",
        "layer2.1.conv2.weight",
        "layer2.2.bn1.weight",
        "layer2.2.bn1.bias",
        "layer2.2.conv1.weight",
        "layer2.2.bn2.weight",
        "layer2.2.bn2.bias",
        "layer2.2.conv2.weight",
        "layer2.3.bn1.weight",
        "layer2.3.bn1.bias",
        "layer2.3.conv1.weight",
        "layer2.3.bn2.weight",
        "layer2.3.bn2.bias",
        "layer2.3.conv2.weight",
        "layer3.0.bn1.weight",
        "layer3.0.bn1.bias",
        "layer3.0.conv1.weight",
        "layer3.0.bn2.weight",
        "layer3.0.bn2.bias",
        "layer3.0.conv2.weight",
        "layer3.0.shortcut.weight",
        "layer3.1.bn1.weight",
        "layer3.1.bn1.bias",
        "layer3.1.conv1.weight",
        "layer3.1.bn2.weight",
        "layer3.1.bn2.bias",
        "layer3.1.conv2.weight",
        "layer3.2.bn1.weight",
        "layer3.2.bn1.bias",
        "layer3.2.conv1.weight",
        "layer3.2.bn2.weight",
        "layer3.2.bn2.bias",
        "layer3.2.conv2.weight",
        "layer3.3.bn1.weight",
        "layer3.3.bn1.bias",
        "layer3.3.conv1.weight",
        "layer3.3.bn2.weight",
        "layer3.3.bn2.bias",
        "layer3.3.conv2.weight",
        "bn1.weight",
        "bn1.bias",
        "fc.weight",
        "fc.bias",
    ],
}

STAGES = [
    Stage0,
    Stage1,
    Stage2,
    Stage3,
]


def build_stage(index: int, state_dict: dict | None = None) -> nn.Module:
    """Build stage ``index``; with the original model's ``state_dict``, load its weights."""
    stage = STAGES[index]()
    if state_dict is not None:
        own = stage.state_dict()
        missing = [key for key in own if key not in state_dict]
        if missing:
            raise KeyError(f"the state dict has no {missing[0]!r}, which stage {index} needs")
        stage.load_state_dict({key: state_dict[key] for key in own})
    return stage


def build_stages(state_dict: dict | None = None) -> list:
    """Build every stage, loading the original model's ``state_dict`` when given."""
    return [build_stage(index, state_dict) for index in range(len(STAGES))]


def merge_state_dicts(stage_state_dicts: list) -> dict:
    """One state dict with the original model's keys, in its order, from the stages' ones."""
    merged = {}
    for state_dict in stage_state_dicts:
        merged.update(state_dict)
    return {key: merged[key] for key in PIPELINE["state_keys"] if key in merged}
