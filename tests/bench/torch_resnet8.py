#!/usr/bin/python3
"""PyTorch peer for bench_train: the same resnet8-fmnist (conv3x3 1->16 + BN +
ReLU, three basic blocks of 16/32/64 channels with strides 1/2/2 and 1x1
conv + BN shortcuts where the shape changes, global average pool, FC 64->10),
the same batch and the same SGD (momentum 0.9, Nesterov, wd 5e-4), on
synthetic data.  Prints one JSON line: images/s and peak RSS.

usage: torch_resnet8.py --mode train|infer --batch N --threads T
                        [--channels-last] [--seconds S]
"""
import argparse, json, resource, time

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (self.short(x) if self.short is not None else x))


def resnet8():
    return nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="train")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = resnet8().to(memory_format=fmt)
    x = torch.randn(a.batch, 1, 28, 28).to(memory_format=fmt)
    y = torch.randint(0, 10, (a.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    train = a.mode == "train"
    model.train(train)

    def step():
        if train:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)

    for _ in range(2):
        step()
    images, t0 = 0, time.perf_counter()
    while True:
        step()
        images += a.batch
        if time.perf_counter() - t0 > a.seconds and images >= 3 * a.batch:
            break
    ips = images / (time.perf_counter() - t0)
    print(json.dumps({"name": f"torch_{a.mode}_resnet8-fmnist_b{a.batch}", "value": round(ips, 1),
                      "unit": "images/s", "channels_last": a.channels_last,
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "threads": a.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
