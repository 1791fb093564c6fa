"""Run by tests/test_processes.py under torchrun (or alone): one optimizer step of `fine_tune` on a
linear model, with per-sample weights, this process's share of 7 samples padded at weight 0.
Writes the trained weight to argv[1] (process 0 only)."""

import sys

import torch
from accelerate import Accelerator

from raft_diffusion.backends.training import fine_tune
from raft_diffusion.config import TrainingConfig
from raft_diffusion.distributed import pad_to, share
from raft_diffusion.precision import Precision

N = 7
X = torch.linspace(-1, 1, N * 3).reshape(N, 3)
Y = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 1.0])
W = torch.tensor([1.0, 0.5, 2.0, 1.5, 1.0, 0.25, 3.0])


def main() -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    start = {"start_weight": model.weight.detach().clone(), "start_bias": model.bias.detach().clone()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    shares = [share(N, world, r) for r in range(world)]
    mine = list(shares[rank])
    items, real = pad_to(mine, max(len(s) for s in shares))
    weights = {k: float(W[i]) * r for k, (i, r) in enumerate(zip(items, real))}
    accumulate = int(sys.argv[2])  # 1: one micro-batch holds everything; N: one sample per micro-batch
    cfg = TrainingConfig(batch_size=N if accumulate == 1 else 1, gradient_accumulation_steps=accumulate,
                         max_grad_norm=None)

    def loss(batch, denominator):
        x, y = X[[items[k] for k in batch]], Y[[items[k] for k in batch]]
        w = torch.tensor([weights[k] for k in batch])
        return (w * (model(x).squeeze(-1) - y) ** 2).sum() / denominator

    params = [p for p in model.parameters()]
    fine_tune(accelerator, model, optimizer, params, cfg, list(range(len(items))), torch.Generator().manual_seed(rank),
              loss, lambda batch: sum(weights[k] for k in batch), Precision("no", accelerator.device))
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        torch.save({"weight": inner.weight.detach().clone(), "bias": inner.bias.detach().clone(), **start}, sys.argv[1])


if __name__ == "__main__":
    main()
