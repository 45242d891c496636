"""Run under ``torchrun --nproc_per_node 2`` by tests/test_ddp_methods.py: train each of
vpeft's five methods for a few steps on the synthetic data (gloo, CPU), then check that
every rank ends with the same trained parameters. Prints one JSON line per method on rank 0.

Usage: ``torchrun --standalone --nproc_per_node 2 tests/ddp_methods.py DATA.json OUT_DIR``
"""
import hashlib
import json
import sys

import torch

from vpeft.engine import Trainer, init_distributed, load_config
from vpeft.engine.distributed import all_gather_objects, cleanup

OPTIONS = {
    "linear_probe": [],
    "full_finetune": [],
    "st_adapter": ["model.options.bottleneck=16"],
    "msta": ["model.options.bottleneck=32", "model.options.layers=[1,2]"],
    "side4video": ["model.options.side_width=64", "model.options.side_layers=2"],
}


def main(data_json: str, out: str) -> int:
    data = json.load(open(data_json))
    info = init_distributed("cpu")
    torch.set_num_threads(1)
    try:
        for method, extra in OPTIONS.items():
            cfg = load_config(None, [
                f"data.root={data['root']}", f"data.train_list={data['train_list']}",
                f"data.val_list={data['val_list']}", f"data.class_names={data['class_names']}",
                "data.num_workers=0", "model.backbone=vpeft-tiny", "model.num_frames=4", f"model.method={method}",
                "model.dropout=0.0", "train.batch_size=2", "train.epochs=1", "train.lr=1e-3", "train.warmup_epochs=0",
                "train.log_every=1", "train.eval_every=0", "tensorboard=false", "device=cpu",
                f"output_dir={out}/{method}", *extra])
            trainer = Trainer(cfg, info, progress=False)
            summary = trainer.fit()
            h = hashlib.sha256()
            # trained parameters only: BatchNorm running statistics are per rank between DDP's broadcasts
            for k, v in sorted((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad):
                h.update(k.encode())
                h.update(v.detach().float().contiguous().numpy().tobytes())
            digests = all_gather_objects(h.hexdigest(), info)
            if info.is_main:
                print(json.dumps({"method": method, "steps": summary["steps"], "world": info.world,
                                  "same_weights_on_every_rank": len(set(digests)) == 1}), flush=True)
    finally:
        cleanup(info)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
