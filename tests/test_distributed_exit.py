"""A launched rank must end cleanly after a finished run: a gloo process group still alive at
interpreter finalization aborted ranks ("terminate called without an active exception") and
failed two-process runs that had trained, evaluated and saved everything."""

from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rgfusion.trainer import engine as eng
from rgfusion.trainer.config import load_config
from rgfusion.trainer.distenv import DistEnv
from servers import free_port
from test_train_native import Mean

ENGINES = {
    "native": ["train.engine=native", "train.zero_stage=0"],
    "zero2": ["train.zero_stage=2"],
}


def _leave_worker(rank: int, port: int, engine: str, out: str) -> None:
    """Join as a torchrun rank would, take one step, leave; report this process's threads."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = DistEnv.from_environ()
    assert eng.init_distributed(env, "cpu")
    importlib.import_module("torch.distributed.nn")  # as DeepSpeed does, lazily, once the group exists

    cfg = load_config(None, [*ENGINES[engine], "train.batch_size=8", "optim.warmup_steps=0"])
    if engine == "native":
        model = eng.build_native_engine(Mean(), cfg, env, device="cpu", precision="fp32", steps_per_epoch=1,
                                        total_steps=2)
    else:
        model = eng.build_engine(Mean(), cfg, eng.deepspeed_config(cfg, 2, "cpu"), steps_per_epoch=1,
                                 total_steps=2)
    x, y = torch.randn(4, 4), torch.randn(4)
    model.backward(model(x, y))
    model.step()
    eng.release_engine(model)
    del model
    eng.leave_distributed(env)
    threads = [Path(f).read_text().strip() for f in glob.glob("/proc/self/task/*/comm")]
    Path(f"{out}.{rank}").write_text(json.dumps(threads))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names come from /proc")
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_leaving_frees_every_gloo_group_while_the_interpreter_is_whole(tmp_path, engine):
    import torch.multiprocessing as mp

    out = str(tmp_path / "threads")
    mp.spawn(_leave_worker, args=(free_port(), engine, out), nprocs=2)
    for rank in (0, 1):
        threads = json.loads(Path(f"{out}.{rank}").read_text())
        assert not [t for t in threads if "gloo" in t], threads


LEAKY_RANK = """
import atexit, os, torch, torch.distributed as dist
from rgfusion.trainer.cli import exit_before_finalization
dist.init_process_group("gloo")
import torch.distributed.nn  # keeps the world group referenced past destroy, as ZeRO-3's engine does
dist.all_reduce(torch.ones(1000))
dist.barrier()
dist.destroy_process_group()
atexit.register(print, "exit handlers ran on rank", os.environ["RANK"])
print("buffered tail", end="")
exit_before_finalization(0)
"""


def test_ranks_that_keep_a_group_alive_still_exit_cleanly(tmp_path):
    """Four ranks leaking the world group aborted in about one launch in three without the early
    exit; three launches must all end with code 0, their exit handlers run and stdout flushed."""
    script = tmp_path / "leaky.py"
    script.write_text(LEAKY_RANK)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    for _ in range(3):
        proc = subprocess.run([str(torchrun), "--nproc_per_node=4", "--master_addr=127.0.0.1",
                               f"--master_port={free_port()}", str(script)],
                              env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "terminate called" not in out, out[-3000:]
        assert out.count("exit handlers ran on rank") == 4, out[-3000:]
        assert out.count("buffered tail") == 4, out[-3000:]
