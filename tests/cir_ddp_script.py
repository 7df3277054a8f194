"""Run by tests/test_cir.py under ``torch.distributed.run`` (2 gloo processes): train_cirr end to end."""

import sys
import warnings

import torch

from mora_retrieval.engine import TrainConfig
from mora_retrieval.engine.distributed import detect
from mora_retrieval.fileio import save_tensors
from mora_retrieval.tasks.cir import CIRSettings, train_cirr

warnings.simplefilter("ignore")
torch.set_num_threads(1)
cirr_root, run_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
settings = CIRSettings.with_defaults(cirr_root, run_dir, "mora", arch="mora-tiny", pretrained=sys.argv[4])
settings.stage1 = TrainConfig(epochs=1, batch_size=4, lr=1e-2, log_every=1, seed=3, device="cpu")
settings.stage2 = TrainConfig(epochs=1, batch_size=4, lr=1e-3, weight_decay=0.0, log_every=1, seed=3, device="cpu")
results = train_cirr(settings, quiet=True)
rank = detect().rank

save_tensors(f"{out}/rank{rank}.safetensors", {"avg": torch.tensor(results["val_stage1"]["avg"])})
