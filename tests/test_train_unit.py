"""Trainer pieces without a training run: config, DeepSpeed config, schedule, parameter groups,
launcher environments, redaction, evaluation assembly and checkpoint mechanics (these last with
a tiny stand-in module on a one-process gloo group)."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from rgfusion.configs import ConfigError
from rgfusion.trainer import engine as eng
from rgfusion.trainer.checkpoint import (
    COMPLETE, Checkpoints, CheckpointError, TrainState, enable_universal, fingerprint_mismatch, rng_state,
    set_rng_state, verify_local,
)
from rgfusion.trainer.config import OptimConfig, load_config
from rgfusion.trainer.distenv import DistEnv, slurm_master_addr
from rgfusion.trainer.evaluate import assemble, format_table, natural_key
from rgfusion.trainer.redact import MASK, RedactingFilter, redact, redact_text

# ---------------------------------------------------------------- config


def test_default_recipe_loads_and_overrides():
    cfg = load_config(None, ["train.epochs=3", "optim.lr=2.0e-4", "model.width=32"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 2e-4 and cfg.model.width == 32
    assert cfg.model.features == "both" and cfg.model.text.encoder == "bigru"
    assert cfg.checkpoint_dir == str(Path(cfg.train.out_dir) / "checkpoints")


@pytest.mark.parametrize("override, needle", [
    ("train.bogus=1", "unknown key 'train.bogus'"),
    ("optim.schedule=linear", "optim.schedule"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("data.url=", "data.url is empty"),
])
def test_bad_config_is_one_clear_error(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("recipe", ["default", "flickr30k_bigru", "flickr30k_bert", "coco_bigru", "coco_bert",
                                    "ablations/region_only", "ablations/grid_only", "bench/paper_dims",
                                    "bench/paper_dims_native", "bench/paper_dims_graph"])
def test_shipped_recipes_load(recipe):
    cfg = load_config(recipe)
    assert cfg.train.engine == ("native" if recipe.endswith(("native", "graph")) else "deepspeed")
    ds = eng.deepspeed_config(cfg, 1, "cpu")
    assert ds["train_batch_size"] == cfg.train.batch_size


@pytest.mark.parametrize("preset, stage", [("deepspeed/zero1.yaml", 1), ("deepspeed/zero2.yaml", 2),
                                           ("deepspeed/zero3.yaml", 3)])
def test_deepspeed_presets_override_generated_config(preset, stage):
    cfg = load_config(None, [f"train.deepspeed={preset}", "train.zero_stage=0"])
    ds = eng.deepspeed_config(cfg, 2, "cpu")
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_clipping"] == cfg.optim.grad_clip  # untouched keys survive the merge


# ---------------------------------------------------------------- DeepSpeed config and optimizer


def test_deepspeed_config_from_typed_config():
    cfg = load_config(None, ["train.batch_size=48", "train.grad_accum=3", "train.zero_stage=3",
                             "train.precision=bf16", "optim.grad_clip=1.5", "optim.weight_decay=0.05"])
    ds = eng.deepspeed_config(cfg, 2, "cpu", load_universal=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (48, 8, 3)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 1.5 and ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["checkpoint"]["load_universal"] is True
    assert eng.deepspeed_config(load_config(None), 1, "cpu")["bf16"]["enabled"] is False  # auto -> fp32 on CPU


def test_raw_deepspeed_json_has_the_last_word(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}, "fp16": {"enabled": True}}))
    ds = eng.deepspeed_config(load_config(None, [f"train.deepspeed={raw}"]), 1, "cpu")
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000,
                                       "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0


def test_global_batch_must_split_over_ranks():
    with pytest.raises(ConfigError, match="not divisible"):
        eng.micro_batch_size(load_config(None, ["train.batch_size=10"]), 4)


class Tiny(nn.Module):
    """Stand-in for the retrieval model: a 'text.hf' part at a lower rate, norms and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.text = nn.ModuleDict({"hf": nn.Linear(4, 8), "proj": nn.Linear(8, 8, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image(x).sum() + self.text["proj"](self.text["hf"](x)).sum()

    def param_groups_hint(self) -> dict[str, float]:
        return {"text.hf": 0.1}


def test_param_groups_multipliers_and_no_decay_on_norms_and_biases():
    groups = eng.param_groups(Tiny(), OptimConfig(lr=1e-3, weight_decay=0.1), Tiny().param_groups_hint())
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lr_x0.1", "lr_x0.1_no_decay", "lr_x1", "lr_x1_no_decay"}
    assert by_name["lr_x0.1"]["lr"] == pytest.approx(1e-4) and by_name["lr_x0.1"]["weight_decay"] == 0.1
    assert by_name["lr_x1_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for g in groups if g["name"].endswith("no_decay") for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(Tiny().parameters()))
    assert eng.lr_multiplier("text.hfx.weight", {"text.hf": 0.1}) == 1.0  # prefix means a module path
    assert eng.lr_multiplier("a.b.c", {"a": 0.5, "a.b": 0.2}) == 0.2  # longest prefix wins


def test_lr_schedule_warmup_then_step_or_cosine():
    o = OptimConfig(lr=1.0, warmup_steps=10, schedule="step", decay_epochs=[2, 3], decay_factor=0.1)
    f = [eng.lr_factor(s, o, steps_per_epoch=10, total_steps=50) for s in range(50)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[19] == 1.0
    assert f[20] == pytest.approx(0.1) and f[30] == pytest.approx(0.01)
    c = replace(o, schedule="cosine", min_lr_ratio=0.1)
    g = [eng.lr_factor(s, c, steps_per_epoch=10, total_steps=50) for s in range(51)]
    assert g[10] == 1.0 and g[50] == pytest.approx(0.1)
    assert g[30] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(g[10:], g[11:]))


# ---------------------------------------------------------------- launchers


def test_distenv_torchrun_deepspeed_slurm_single():
    e = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "GROUP_RANK": "1"}, [])
    assert (e.rank, e.local_rank, e.world_size, e.node_rank, e.launcher) == (3, 1, 4, 1, "torchrun")
    # The deepspeed launcher sets RANK/WORLD_SIZE and appends --local_rank=N.
    e = DistEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2"}, ["train", "--local_rank=1"])
    assert e.local_rank == 1
    e = DistEnv.from_environ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
                              "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[07-10]",
                              "SLURM_JOB_ID": "1234"}, [])
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (5, 1, 8, 2, 2)
    env: dict[str, str] = {"SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "1234"}
    e.export(env)
    assert env["MASTER_ADDR"] == "gpu07" and env["RANK"] == "5" and env["MASTER_PORT"] == "21234"
    from rgfusion.trainer.cli import build_parser

    # The deepspeed launcher puts --local_rank=N before the subcommand, torch's old launcher after.
    for argv in (["--local_rank=1", "train", "--set", "a=1"], ["train", "--local_rank", "1"]):
        assert build_parser().parse_args(argv).command == "train"
    e = DistEnv.from_environ({}, ["x", "--local_rank", "0"])
    assert (e.world_size, e.launcher, e.is_main) == (1, "single", True)
    assert slurm_master_addr({"SLURM_JOB_NODELIST": "a1,b2"}) == "a1"


# ---------------------------------------------------------------- redaction


def test_redaction_of_keys_urls_and_env_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-very-secret-123")
    cfg = {"data": {"url": "s3://bucket/x", "storage_options": {"key": "AKIA1", "secret": "s3cr3t",
                                                                 "client_kwargs": {"endpoint_url": "http://h:9000"}}},
           "tracking": {"uri": "https://bob:hunter2@mlflow.example/?token=abc&x=1"},
           "note": "called with tok-very-secret-123", "access_key_id": "visible", "tokenizer": "/models/bert"}
    out = redact(cfg)
    assert out["data"]["storage_options"]["secret"] == MASK and out["data"]["storage_options"]["key"] == MASK
    assert out["data"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://h:9000"
    assert out["tracking"]["uri"] == f"https://bob:{MASK}@mlflow.example/?token={MASK}&x=1"
    assert "tok-very-secret-123" not in json.dumps(out)
    assert out["access_key_id"] == "visible" and out["tokenizer"] == "/models/bert"
    assert redact_text("postgresql://u:pw@db/mlflow") == f"postgresql://u:{MASK}@db/mlflow"
    record = logging.LogRecord("x", logging.INFO, "f", 1, "uri %s", ("s3://u:pw@host/b",), None)
    RedactingFilter().filter(record)
    assert record.getMessage() == f"uri s3://u:{MASK}@host/b"


# ---------------------------------------------------------------- evaluation assembly


def test_assemble_orders_by_split_position_not_by_id():
    """Batches with positions follow the manifest's order even where ids sort differently."""
    d = 2
    part = (["b", "a", "c"], [1, 2, 0], torch.tensor([[1.0, 0], [2, 0], [0, 0]]), torch.zeros(3, d),
            torch.tensor([0, 1, 2]))
    emb = assemble([part])
    assert emb.image_ids == ["c", "b", "a"]
    assert torch.equal(emb.images[:, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert emb.cap_to_img.tolist() == [0, 1, 2]


def test_assemble_puts_ranks_parts_in_canonical_order():
    d = 3
    ids_a, ids_b = ["img-10", "img-2"], ["img-1"]
    img = {i: torch.full((d,), float(k)) for k, i in enumerate(["img-1", "img-2", "img-10"])}
    keys = lambda ids: [natural_key(i) for i in ids]  # noqa: E731 - batches without positions
    part_a = (ids_a, keys(ids_a), torch.stack([img[i] for i in ids_a]), torch.arange(4 * d).float().view(4, d),
              torch.tensor([0, 1, 0, 1]))
    part_b = (ids_b, keys(ids_b), torch.stack([img[i] for i in ids_b]), 100 + torch.arange(2 * d).float().view(2, d),
              torch.tensor([0, 0]))
    emb = assemble([part_a, part_b])
    assert emb.image_ids == ["img-1", "img-2", "img-10"]
    assert torch.equal(emb.images[:, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert emb.cap_to_img.tolist() == [0, 0, 1, 1, 2, 2]
    # Captions of img-10 (rank a rows 0 and 2) follow those of img-2 (rows 1 and 3).
    assert emb.captions[4, 0].item() == 0.0 and emb.captions[2, 0].item() == 3.0
    assert sorted(["a10", "a9", "b1"], key=natural_key) == ["a9", "a10", "b1"]


def test_format_table_lists_every_protocol():
    m = {k: 1.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")}
    table = format_table([{"split": "test", "protocols": {"coco1k5fold": m, "coco5k": m}}])
    assert "coco1k5fold" in table and "coco5k" in table and "rsum" in table


# ---------------------------------------------------------------- checkpoint mechanics


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(rng_state()))
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_fingerprint_mismatch_names_the_keys():
    assert fingerprint_mismatch({"model": {"width": 64}}, {"model": {"width": 32}}) == [
        "model.width: checkpoint 64, this run 32"]


@pytest.fixture(scope="module")
def tiny_engine():
    """A one-process gloo group and a ZeRO-2 engine around ``Tiny``."""
    from rgfusion.trainer.distenv import DistEnv

    torch.manual_seed(0)
    env = DistEnv.from_environ({}, [])
    eng.init_distributed(env, "cpu")
    cfg = load_config(None, ["train.batch_size=2", "optim.warmup_steps=0", "optim.schedule=constant"])
    model = Tiny()
    enable_universal(model)
    engine = eng.build_engine(model, cfg, eng.deepspeed_config(cfg, 1, "cpu"), steps_per_epoch=5, total_steps=10)
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 4)))
        engine.step()
    return env, engine


def _manager(root: Path, env: DistEnv, keep_last: int = 2) -> Checkpoints:
    return Checkpoints(str(root), {}, env, cache_dir=root.parent / "cache", keep_last=keep_last,
                       fingerprint={"model": {"width": 8}})


def test_checkpoint_complete_corrupt_fallback_and_prune(tiny_engine, tmp_path):
    env, engine = tiny_engine
    ck = _manager(tmp_path / "ck", env)
    tags = [ck.save(engine, TrainState(global_step=s, epoch=0, batch_in_epoch=s), config={}) for s in (1, 2, 3)]
    assert [t for _, t, _ in ck.tags()] == tags[1:]  # keep_last=2 pruned the first
    assert (tmp_path / "ck" / "latest").read_text() == tags[2]
    assert verify_local(tmp_path / "ck" / tags[2]) is None

    # Corrupt the newest: auto falls back to the previous complete one, with a warning.
    victim = next(p for p in (tmp_path / "ck" / tags[2]).glob("*.pt"))
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    chosen = ck.select("auto")
    assert chosen.tag == tags[1] and chosen.meta["state"]["global_step"] == 2
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.select(str(tmp_path / "ck" / tags[2]))

    # An interrupted save (no COMPLETE.json) is refused with a clear reason.
    (tmp_path / "ck" / tags[1] / COMPLETE).unlink()
    assert "interrupted" in verify_local(tmp_path / "ck" / tags[1])
    assert ck.select("auto") is None  # nothing intact left: fresh start

    # A checkpoint of another model config is refused before training.
    ck2 = _manager(tmp_path / "ck2", env)
    ck2.save(engine, TrainState(global_step=7), config={})
    other = Checkpoints(str(tmp_path / "ck2"), {}, env, cache_dir=tmp_path / "cache", keep_last=2,
                        fingerprint={"model": {"width": 16}})
    with pytest.raises(CheckpointError, match="different model config: model.width"):
        other.select("auto")


def test_checkpoint_with_foreign_pickle_is_refused(tiny_engine, tmp_path):
    env, engine = tiny_engine
    ck = _manager(tmp_path / "ck", env)
    tag = ck.save(engine, TrainState(global_step=4), config={})
    folder = tmp_path / "ck" / tag
    torch.save({"evil": shutil.rmtree}, folder / "mp_rank_00_model_states.pt")
    complete = json.loads((folder / COMPLETE).read_text())
    from rgfusion.trainer.checkpoint import inventory
    complete["files"] = inventory(folder)  # even with matching checksums
    (folder / COMPLETE).write_text(json.dumps(complete))
    assert "does not load as plain tensors" in verify_local(folder)


def test_checkpoint_resume_restores_engine_and_state(tiny_engine, tmp_path):
    env, engine = tiny_engine
    ck = _manager(tmp_path / "ck", env)
    state = TrainState(epoch=1, batch_in_epoch=3, global_step=engine.global_steps, best_rsum=12.5, run_id="abc")
    ck.save(engine, state, config={"train": {"epochs": 2}})
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    chosen = ck.select("auto")
    engine.backward(engine(torch.randn(2, 4)))  # move the weights away
    engine.step()
    restored = ck.load(engine, chosen, ck.prepare(chosen, universal=False))
    assert restored == state
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """A NaN loss skips its step (counted); max_bad_steps in a row checkpoint and stop the run."""
    from rgfusion.datasets.synth import SynthConfig, write_synthetic
    from rgfusion.trainer import loop

    data = tmp_path / "data"
    write_synthetic(SynthConfig(train_images=48, dev_images=12, test_images=12, samples_per_shard=12, region_dim=8,
                                grid_dim=8, grid_size=(2, 2), max_regions=4), str(data), progress=False)
    calls = {"n": 0}
    real = loop.TrainModule.forward

    def flaky(self, *args, **kwargs):
        loss, stats = real(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] == 2 or calls["n"] >= 5 else (loss, stats)

    monkeypatch.setattr(loop.TrainModule, "forward", flaky)
    cfg = load_config(None, [f"data.url={data}", f"train.out_dir={tmp_path}/run", "train.batch_size=8",
                             "train.steps_per_epoch=20", "train.max_bad_steps=3", "tracking.enabled=false",
                             "train.progress=false", "data.num_workers=0", "model.width=16", "model.heads=2",
                             "model.map_heads=2", "model.text.word_dim=16", "checkpoint.every_steps=0"])
    with pytest.raises(loop.TrainingStopped, match="3 non-finite losses in a row at step 3"):
        loop.train(cfg)
    root = tmp_path / "run" / "checkpoints"
    meta = json.loads((root / (root / "latest").read_text() / "meta.json").read_text())
    assert meta["state"]["skipped_steps"] == 4 and meta["state"]["global_step"] == 3
    assert meta["state"]["batch_in_epoch"] == 7


def test_grid_features_refused_on_a_dataset_converted_without_grids():
    from rgfusion.datasets.schema import Manifest, SplitInfo
    from rgfusion.trainer.loop import check_features

    split = {"train": SplitInfo(["train-000000.tar"], [1], 1)}
    no_grids = Manifest("x", 8, 1, (1, 1), 4, 5, split, meta={"has_grids": False})
    for features in ("both", "grid"):
        with pytest.raises(ConfigError, match=f"model.features={features} needs them"):
            check_features(load_config(None, ["data.url=/d", f"model.features={features}"]), no_grids)
    check_features(load_config(None, ["data.url=/d", "model.features=region"]), no_grids)
    check_features(load_config(None, ["data.url=/d"]), replace(no_grids, meta={}))


def test_profile_steps_write_phase_and_operator_tables(tmp_path):
    """train.profile_steps profiles steps after the warm-up; the step's phases are all there."""
    from rgfusion.datasets.synth import SynthConfig, write_synthetic
    from rgfusion.trainer import loop
    from rgfusion.trainer.profiling import WARMUP_STEPS

    data = tmp_path / "data"
    write_synthetic(SynthConfig(train_images=48, dev_images=12, test_images=12, samples_per_shard=12, region_dim=8,
                                grid_dim=8, grid_size=(2, 2), max_regions=4), str(data), progress=False)
    cfg = load_config(None, [f"data.url={data}", f"train.out_dir={tmp_path}/run", "train.batch_size=8",
                             f"train.steps_per_epoch={WARMUP_STEPS + 4}", "train.epochs=1", "train.profile_steps=2",
                             "tracking.enabled=false", "train.progress=false", "data.num_workers=0", "model.width=16",
                             "model.heads=2", "model.map_heads=2", "model.text.word_dim=16"])
    result = loop.train(cfg)
    ops = (tmp_path / "run" / "profile" / "ops.txt").read_text()
    for name in ("data_wait", "forward", "loss_check", "backward", "optimizer_step"):
        assert re.search(rf"rgfusion/{name}\s+calls\s+2 ", ops), name
    assert "top operators by CPU time" in ops and (tmp_path / "run" / "profile" / "trace.json").stat().st_size
    assert 0 <= result["data_wait_share"] < 1 and result["loader_start_stop_s"] > 0


def test_device_feed_casts_counts_waits_and_ends():
    from rgfusion.datasets.reader import Batch
    from rgfusion.trainer.feed import DeviceFeed
    from rgfusion.trainer.loss import ids_to_tensor

    def batch(i: int) -> Batch:
        return Batch(torch.ones(2, 3, 4, dtype=torch.float16) * i, torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool),
                     torch.ones(2, 1, 4, dtype=torch.float16), (1, 1), torch.ones(2, 5, dtype=torch.long),
                     torch.full((2,), 5), torch.ones(2, 5, dtype=torch.bool), torch.arange(2), [f"a{i}", f"b{i}"])

    feed = DeviceFeed(iter([batch(1), batch(2)]), "cpu", torch.float32)
    got = list(feed)
    assert [b.regions.dtype for b, _ in got] == [torch.float32] * 2 and float(got[1][0].regions.max()) == 2
    assert got[1][0].boxes.dtype == torch.float32 and got[1][0].tokens.dtype == torch.long
    assert torch.equal(got[0][1], ids_to_tensor(["a1", "b1"]))
    assert feed.edge_seconds > 0 and feed.wait_seconds >= 0

    # The loop prefetches after launching a step; the next batch is taken from the loader once.
    taken = []
    source = (taken.append(i) or batch(i) for i in range(1, 4))
    feed = DeviceFeed(source, "cpu", torch.float32)
    first = next(feed)
    feed.prefetch()
    feed.prefetch()
    assert taken == [1, 2] and float(first[0].regions.max()) == 1
    assert [float(b.regions.max()) for b, _ in feed] == [2, 3] and taken == [1, 2, 3]
    feed.prefetch()
    assert list(feed) == []


@pytest.mark.slow
@pytest.mark.parametrize("engine", [[], ["train.engine=native", "train.zero_stage=0",
                                         "train.compile_mode=reduce-overhead"]], ids=["deepspeed", "native"])
def test_compiled_model_trains_and_exports_eager_names(tmp_path, engine):
    """train.compile: the run completes and the exported weights load into an eager model."""
    from safetensors.torch import load_file

    from rgfusion.datasets.synth import SynthConfig, write_synthetic
    from rgfusion.trainer import loop

    data = tmp_path / "data"
    write_synthetic(SynthConfig(train_images=48, dev_images=12, test_images=12, samples_per_shard=12, region_dim=8,
                                grid_dim=8, grid_size=(2, 2), max_regions=4), str(data), progress=False)
    cfg = load_config(None, [f"data.url={data}", f"train.out_dir={tmp_path}/run", "train.batch_size=8",
                             "train.steps_per_epoch=4", "train.epochs=1", "train.compile=true",
                             "tracking.enabled=false", "train.progress=false", "data.num_workers=0", "model.width=16",
                             "model.heads=2", "model.map_heads=2", "model.text.word_dim=16", *engine])
    result = loop.train(cfg)
    assert result["status"] == "completed" and result["test_rsum"] > 0
    keys = load_file(str(next((tmp_path / "run" / "best").glob("*.safetensors")))).keys()
    assert keys and not any("_orig_mod" in k for k in keys)


def test_compile_refuses_zero3():
    with pytest.raises(ConfigError, match="compile"):
        load_config(None, ["train.compile=true", "train.zero_stage=3"])


@pytest.mark.parametrize(("overrides", "world_size", "device", "expected"), [
    (["train.side_streams=true"], 1, "cuda:0", True),
    (["train.side_streams=true", "train.compile=true"], 1, "cuda", True),
    ([], 1, "cuda:0", False),
    (["train.side_streams=true"], 1, "cpu", False),
    (["train.side_streams=true"], 2, "cuda:0", False),
    (["train.side_streams=true", "train.engine=deepspeed", "train.zero_stage=2"], 1, "cuda:0", False),
    (["train.side_streams=true", "train.compile=true", "train.compile_mode=reduce-overhead"], 1, "cuda:0", False),
])
def test_side_streams_apply_only_where_known_safe(overrides, world_size, device, expected):
    from rgfusion.trainer.loop import uses_side_streams

    native = ["train.engine=native", "train.zero_stage=0"]
    assert uses_side_streams(load_config(None, native + overrides), world_size, device) is expected


def test_log_window_leaves_non_finite_losses_out_of_its_means():
    from rgfusion.trainer.loop import Window

    window = Window("cpu", 0.0)
    for loss, collapsed in [(2.0, 0.5), (float("nan"), 0.9), (4.0, 0.1), (float("inf"), 0.0)]:
        window.add(torch.tensor(loss), torch.tensor(collapsed))
    assert window.n == 4 and window.sums.tolist() == pytest.approx([6.0, 0.6, 2.0])
