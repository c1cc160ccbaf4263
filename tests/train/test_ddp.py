"""The DDP path of the item tower trainer, with two CPU processes over gloo (marked slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, sys, torch
from atelier.schema import ItemJSON, load_schema
from atelier.vocab import build_vocab
from atelier.models.item_tower import ItemTowerConfig, item_inputs
from atelier.train.item import TrainItemConfig, distributed, train_item_tower
vocab = build_vocab(load_schema())
items = [ItemJSON(item_id=f"i{i}", clothes={"color": [["black", "white", "red", "navy"][i % 4]]}) for i in range(64)]
x = item_inputs(items, vocab, torch.randn(64, 384, generator=torch.Generator().manual_seed(0)))
cfg = ItemTowerConfig(vocab.std_size, vocab.re_size, vocab.field_size, n_text=1, d_model=16, n_layers=1, n_heads=2,
                      out_dim=8)
model, history = train_item_tower(x, cfg, TrainItemConfig(epochs=2, batch_size=16))
rank, world = distributed()
# DDP keeps replicas identical: every rank ends with the same weights.
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(world)]
torch.distributed.all_gather(gathered, flat)
if rank == 0:
    print(json.dumps({"world": world, "same": all(torch.equal(g, gathered[0]) for g in gathered),
                      "epochs": len(history["epochs"])}))
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(script)], capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"world": 2, "same": True, "epochs": 2}
