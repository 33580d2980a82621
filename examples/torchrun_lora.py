"""Distributed LoRA fine-tuning with fastlora on any torchrun setup.

    torchrun --nproc-per-node 2 examples/torchrun_lora.py --mode ddp
    torchrun --nproc-per-node 2 examples/torchrun_lora.py --mode fsdp2
    torchrun --nproc-per-node 2 examples/torchrun_lora.py --mode fsdp2 --quantize nf4

Uses NCCL on CUDA machines and gloo on CPU. Each rank trains on its own shard
of a synthetic batch; rank 0 prints the loss and the trainable-parameter count.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import fastlora


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quantize", choices=["nf4", "fp4"], default=None, help="QLoRA: 4-bit base weights")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same base model and adapters on every rank
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 16)).to(device)
    fastlora.apply_lora(model, r=16, alpha=32.0, dropout=0.05, quantize=args.quantize)
    if args.mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if not isinstance(layer, nn.GELU):  # LoRA / QLoRA layers (4-bit buffers stay replicated)
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    trainable, total = fastlora.count_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data shard
    x = torch.randn(64, 256, generator=g).to(device)
    labels = (x[:, :16].argmax(1)).to(device)
    for step in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"[{args.mode}] step {step:3d}  mean loss over {world} ranks {mean.item() / world:.4f}")
    if rank == 0:
        print(f"[{args.mode}] trainable {trainable:,} of {total:,} parameters")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
