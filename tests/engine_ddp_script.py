"""Run by test_engine_ddp.py under torchrun (2 CPU processes, gloo): train the toy task.

Usage: engine_ddp_script.py RUN_DIR OUT_DIR — each rank writes OUT_DIR/rank<R>.safetensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_toys import ToyData, ToyTask  # noqa: E402
from mora_retrieval.engine import Trainer, TrainConfig  # noqa: E402
from mora_retrieval.fileio import save_tensors  # noqa: E402


def main() -> None:
    run_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    task = ToyTask()
    config = TrainConfig(epochs=2, batch_size=4, lr=0.05, weight_decay=0.01, seed=7, log_every=2,
                         checkpoint_every=5, max_grad_norm=5.0, device="cpu")
    result = Trainer(task, config, run_dir, ToyData(48), quiet=True).fit()
    rank = int(os.environ["RANK"])
    save_tensors(out_dir / f"rank{rank}.safetensors", dict(task.state_dict()),
                 metadata={"best_epoch": str(result.best_epoch), "evaluations": str(task.evaluations)})


if __name__ == "__main__":
    main()
