"""Run under torchrun (2 CPU processes, gloo): train a ReftModel a few steps through accelerate's DDP
and check on every rank that R is orthonormal and identical across ranks after each step.
Writes `ok <rank>` lines to the file given as argv[2]; model folder in argv[1]."""

import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from heft.config.schema import PositionsConfig, ReftConfig
from heft.methods.model import decoder_layers, hidden_size
from heft.methods.reft import ReftModel

acc = Accelerator(cpu=True)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).requires_grad_(False)
reft = ReftModel(model, ReftConfig(rank=2, positions=PositionsConfig(2, 2)), decoder_layers(model), hidden_size(model))
opt = torch.optim.AdamW(reft.interventions.parameters(), lr=0.05, weight_decay=0.1)
ddp, opt = acc.prepare(reft, opt)
g = torch.Generator().manual_seed(100 + acc.process_index)  # each rank sees different data
for step in range(4):
    ids = torch.randint(0, 50, (2, 12), generator=g)
    out = ddp(input_ids=ids, prompt_start=torch.zeros(2, dtype=torch.long), prompt_len=torch.full((2,), 12),
              attention_mask=torch.ones_like(ids)).logits
    acc.backward(out.float().pow(2).mean())
    opt.step()
    opt.zero_grad()
    for name, m in reft.interventions.items():
        R = m.R().detach()
        assert torch.allclose(R @ R.T, torch.eye(R.shape[0]), atol=1e-5), (step, name)
        gathered = [torch.empty_like(R) for _ in range(acc.num_processes)]
        dist.all_gather(gathered, R.contiguous())
        assert all(torch.equal(gathered[0], x) for x in gathered), (step, name, "ranks differ")
with open(sys.argv[2], "a") as f:
    f.write(f"ok {acc.process_index} of {acc.num_processes}\n")
dist.barrier()
dist.destroy_process_group()  # left to exit-time destructors, gloo can abort a process still finishing
