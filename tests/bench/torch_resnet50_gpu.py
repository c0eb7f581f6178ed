#!/usr/bin/env python3
"""PyTorch peer for `bench_train --device cuda --model resnet50`: torchvision's
resnet50 on one GPU, the same batch and the same SGD (momentum 0.9, Nesterov,
wd 5e-4), on random data already on the device.  Prints one JSON line like
bench_train's: images/s, ms per step and peak GPU memory over the timed
steps (torch.cuda.max_memory_allocated: tensors, not the CUDA context).

  --precision fp32  fp32 with TF32 off in cuDNN and cuBLAS: the like-for-like
                    peer of our fp32 CUDA backend (contiguous NCHW, PyTorch's
                    default layout, unless --memory-format says otherwise)
  --precision tf32  fp32 with TF32 convolutions (PyTorch's default for cuDNN;
                    matmuls stay fp32) and channels_last: the peer of our
                    train.precision tf32 (NHWC)
  --precision bf16  autocast bf16 + channels_last, PyTorch's other settings
                    left at their defaults: the goal peer

cuDNN's autotuner (torch.backends.cudnn.benchmark) is on, as in torchvision's
reference training script; the warm-up steps absorb its searches.  Timed
steps end with torch.cuda.synchronize().  Exit 2 when CUDA is unavailable.

usage: torch_resnet50_gpu.py [--mode train|infer] [--batch N]
           [--precision fp32|tf32|bf16] [--seconds S] [--warmup N]
           [--memory-format auto|channels_last|contiguous] [--no-cudnn-benchmark]
"""
import argparse
import json
import sys
import time


def fail(msg):
    print(f"torch_resnet50_gpu: {msg}", file=sys.stderr)
    sys.exit(2)


def new_tf32_api(torch):
    """PyTorch >= 2.9 sets TF32 per backend and op with fp32_precision and
    warns about the older allow_tf32 flags; the two are not to be mixed."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    return conv is not None and hasattr(conv, "fp32_precision")


def set_tf32(torch, convs):
    """TF32 in cuDNN convolutions (convs) or nowhere; never in matmuls (PyTorch's
    default is convs=True)."""
    if new_tf32_api(torch):
        torch.backends.cudnn.conv.fp32_precision = "tf32" if convs else "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = convs
        torch.backends.cuda.matmul.allow_tf32 = False


def tf32_state(torch):
    """The TF32 settings of convolutions and matmuls, as the JSON reports them:
    fp32_precision strings ("ieee": no TF32) or the older booleans."""
    if new_tf32_api(torch):
        return {"conv": torch.backends.cudnn.conv.fp32_precision,
                "matmul": torch.backends.cuda.matmul.fp32_precision}
    return {"conv": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32}


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="bf16")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"),
                    default="auto")
    ap.add_argument("--no-cudnn-benchmark", action="store_true")
    return ap.parse_args()


def main():
    a = parse()
    try:
        import torch
        import torchvision
    except ImportError as e:
        fail(f"cannot import {e.name} ({e}); run it with /opt/torch/.venv/bin/python "
             "on the GPU machine")
    if not torch.cuda.is_available():
        fail(f"CUDA is not available to torch {torch.__version__} (built for CUDA "
             f"{torch.version.cuda}): no GPU on this machine")
    fmt_name = a.memory_format
    if fmt_name == "auto":
        fmt_name = "contiguous" if a.precision == "fp32" else "channels_last"
    fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
    if a.precision in ("fp32", "tf32"):
        set_tf32(torch, a.precision == "tf32")
    torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
    dev = torch.device("cuda")
    torch.manual_seed(0)

    model = torchvision.models.resnet50().to(dev, memory_format=fmt)
    x = torch.randn(a.batch, 3, 224, 224, device=dev).to(memory_format=fmt)  # (N,3,224,224)
    y = torch.randint(0, 1000, (a.batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    train = a.mode == "train"
    model.train(train)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def step():
        if train:
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode(), autocast:
                model(x)

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    # The peak of the timed steps (parameters, gradients and momentum held
    # from before included), not that of the autotuner's trial workspaces.
    torch.cuda.reset_peak_memory_stats(dev)
    steps, t0 = 0, time.perf_counter()
    while True:
        step()
        steps += 1
        if steps >= 3 and time.perf_counter() - t0 > a.seconds:
            break
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    ips = steps * a.batch / elapsed
    print(json.dumps({
        "name": f"torch_{a.mode}_resnet50_b{a.batch}_{a.precision}",
        "value": round(ips, 1), "unit": "images/s",
        "step_ms": round(1e3 * elapsed / steps, 2),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
        "reserved_gpu_mib": round(torch.cuda.max_memory_reserved(dev) / 2**20, 1),
        "memory_format": fmt_name, "tf32": tf32_state(torch),
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "steps": steps,
        "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version()}), flush=True)


if __name__ == "__main__":
    main()
