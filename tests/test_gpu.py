"""Checks that need a CUDA device: run them on a GPU machine (``python3 -m pytest tests/test_gpu.py``).
Skipped elsewhere."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from bench_helpers import load_script

from rgfusion.trainer.model import ModelConfig, TextConfig, build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=100, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    transformers.BertModel(config).save_pretrained(path)
    return str(path)


def model(encoder: str, hf_path: str | None):
    torch.manual_seed(0)
    text = TextConfig(encoder="hf", hf_path=hf_path) if encoder == "hf" else TextConfig(word_dim=32)
    cfg = ModelConfig(width=64, heads=4, dropout=0.0, text=text)
    return build_model(cfg, region_dim=48, grid_dim=40, grid_size=(3, 3), vocab_size=100).to(DEVICE)


def batch(seed: int, b: int = 16, regions: int = 6, words: int = 9) -> SimpleNamespace:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    xy = torch.rand(b, regions, 2, device=DEVICE, generator=g) * 0.6
    lengths = torch.randint(2, words + 1, (b,), device=DEVICE, generator=g)
    return SimpleNamespace(
        regions=torch.rand(b, regions, 48, device=DEVICE, generator=g),
        boxes=torch.cat([xy, xy + 0.3], -1),
        region_mask=torch.arange(regions, device=DEVICE)[None] < torch.randint(2, regions + 1, (b, 1), device=DEVICE,
                                                                               generator=g),
        grids=torch.rand(b, 9, 40, device=DEVICE, generator=g),
        tokens=torch.randint(4, 100, (b, words), device=DEVICE, generator=g),
        lengths=lengths,
        attention_mask=torch.arange(words, device=DEVICE)[None] < lengths[:, None],
        grid_size=(3, 3),
    )


def loss_of(img: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(img @ cap.T * 10, torch.arange(len(img), device=DEVICE))


def step(m, b) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.zero_grad(set_to_none=True)
    loss = loss_of(*m(b))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def exact_matmuls():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("encoder", ["bigru", "hf"])
def test_side_streams_give_the_same_loss_and_gradients(encoder, bert_dir):
    m, b = model(encoder, bert_dir), batch(0)
    loss_one, grads_one = step(m, b)
    m.use_side_streams(True)
    loss_two, grads_two = step(m, b)
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-5, atol=1e-6)
    assert grads_two.keys() == grads_one.keys()
    for name in grads_one:
        torch.testing.assert_close(grads_two[name], grads_one[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("side_first", [True, False])
def test_beside_gives_both_results_in_either_launch_order(side_first):
    from rgfusion.trainer.model.streams import beside

    x = torch.rand(256, 256, device=DEVICE)
    chain = lambda t: (t @ t).softmax(-1) @ t  # noqa: E731 - the same work on each stream
    main, side = beside(lambda: chain(x), lambda: chain(x.T.contiguous()), x.device, enabled=True,
                        side_first=side_first)
    torch.testing.assert_close(main, chain(x))
    torch.testing.assert_close(side, chain(x.T.contiguous()))


def test_a_captured_step_with_side_streams_replays_new_inputs(bert_dir):
    """The branches on two streams are captured as parallel paths of one CUDA graph; replaying
    it on new inputs gives what an eager one-stream step gives on them."""
    m = model("bigru", None)
    static = batch(1)
    m.use_side_streams(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(m, static)
    torch.cuda.current_stream().wait_stream(side)
    m.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = loss_of(*m(static))
        loss.backward()
    fresh = batch(2)
    for name in ("regions", "boxes", "region_mask", "grids", "tokens", "lengths", "attention_mask"):
        getattr(static, name).copy_(getattr(fresh, name))
    graph.replay()
    torch.cuda.synchronize()
    captured = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.use_side_streams(False)
    ref_loss, ref_grads = step(m, fresh)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(captured[name], g, rtol=1e-4, atol=1e-6, msg=name)


def flat_run(captured: bool, batches: list[SimpleNamespace]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Train the small model (bf16 weights, fp32 masters in FlatAdamW, compiled update) on
    ``batches``, eagerly or by replaying one captured step; the losses and final masters."""
    from rgfusion.trainer.flat_adamw import FlatAdamW

    m = model("bigru", None)
    opt = FlatAdamW([{"params": list(m.parameters())}], precision="bf16", lr=1e-3, weight_decay=0.01, max_norm=0.5)
    m.to(torch.bfloat16)
    static = batch(3)
    cast = {"regions": torch.bfloat16, "grids": torch.bfloat16}

    def load(b: SimpleNamespace) -> None:
        for name in ("regions", "boxes", "region_mask", "grids", "tokens", "lengths", "attention_mask"):
            getattr(static, name).copy_(getattr(b, name))

    for name, dtype in cast.items():
        setattr(static, name, getattr(static, name).to(dtype))

    def step() -> torch.Tensor:
        loss = loss_of(*(e.float() for e in m(static)))
        loss.backward()
        opt.step()
        return loss.detach()

    losses = []
    if not captured:
        for b in batches:
            load(b)
            losses.append(step().clone())
        return losses, [t.clone() for t in opt.masters()]
    # Warm up (compiles the update) on a scratch copy of the state, then restore it.
    state = {k: v.clone() for k, v in m.state_dict().items()}, [t.clone() for t in opt.masters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for t, saved in zip(opt.masters(), state[1]):
            t.copy_(saved)
        m.load_state_dict(state[0])
        for s in opt.state.values():
            for v in s.values():
                v.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for b in batches:
        load(b)
        graph.replay()
        losses.append(loss.clone())
    return losses, [t.clone() for t in opt.masters()]


def test_flat_adamw_steps_the_same_captured_as_eager():
    """The compiled flat update (clip, AdamW, bf16 weights) replays in a CUDA
    graph exactly as it runs eagerly, over several steps on new inputs."""
    batches = [batch(10 + i) for i in range(3)]
    eager_losses, eager_masters = flat_run(False, batches)
    graph_losses, graph_masters = flat_run(True, batches)
    torch.testing.assert_close(torch.stack(graph_losses), torch.stack(eager_losses), rtol=1e-3, atol=1e-4)
    for g, e in zip(graph_masters, eager_masters):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


def train_batch(seed: int, words: int):
    from rgfusion.datasets import Batch

    b = batch(seed, words=words)
    return Batch(regions=b.regions, boxes=b.boxes, region_mask=b.region_mask, grids=b.grids, grid_size=(3, 3),
                 tokens=b.tokens, lengths=b.lengths, attention_mask=b.attention_mask,
                 caption_image=torch.arange(len(b.tokens), device=DEVICE), image_ids=[str(i) for i in range(16)])


def trainer_steps(encoder: str, hf_path: str | None, mode: str, batches, lrs) -> tuple[list, list, int]:
    """Steps of the trainer's module and FlatAdamW: ``plain`` as the eager loop takes them,
    ``uncaptured`` through CapturedSteps that never captures, ``captured`` through it capturing
    each caption shape after one uncaptured step."""
    from rgfusion.trainer.flat_adamw import FlatAdamW
    from rgfusion.trainer.graphs import CapturedSteps
    from rgfusion.trainer.loop import TrainModule
    from rgfusion.trainer.loss import ContrastiveLoss, LossConfig

    loss_cfg = LossConfig(warmup_steps=2, warmup_mode="gradual", ramp_steps=3)
    module = TrainModule(model(encoder, hf_path), ContrastiveLoss(loss_cfg))
    opt = FlatAdamW([{"params": list(module.parameters())}], precision="fp32", lr=1e-3, max_norm=1.0)
    steps = CapturedSteps(module, opt, loss_cfg, "cuda", warmup=1 if mode == "captured" else len(batches))
    ids = torch.arange(16, device=DEVICE)
    losses = []
    for i, (b, lr) in enumerate(zip(batches, lrs)):
        opt.param_groups[0]["lr"] = lr  # a schedule's change, read at every replay
        if mode == "plain":
            loss, _ = module(b, ids, step=i, gather=None)
            loss.backward()
            opt.step()
        else:
            loss, _ = steps(b, ids, i)
        losses.append(loss.clone())
    return losses, [m.clone() for m in opt.masters()], len(steps.graphs)


@pytest.mark.parametrize("encoder", ["bigru", "hf"])
def test_captured_trainer_steps_equal_uncaptured_ones(encoder, bert_dir):
    """trainer/graphs.py: two caption lengths (two graphs sharing one pool, replayed in turn),
    a learning rate changing every step and the loss's warm-up ramp. Against the same steps
    uncaptured, the replays must agree to rounding; against the plain loop (captions unpadded,
    the hardest-negative weight a Python float) the losses agree to what Adam makes of rounding."""
    words = [5, 5, 5, 12, 12, 12, 5, 12]
    batches = [train_batch(20 + i, w) for i, w in enumerate(words)]
    lrs = [1e-3 * (1 + i % 3) for i in range(len(words))]
    runs = {mode: trainer_steps(encoder, bert_dir, mode, batches, lrs) for mode in ("plain", "uncaptured", "captured")}
    assert runs["captured"][2] == 2 and runs["uncaptured"][2] == 0
    torch.testing.assert_close(torch.stack(runs["captured"][0]), torch.stack(runs["uncaptured"][0]),
                               rtol=1e-5, atol=1e-6)
    for g, e in zip(runs["captured"][1], runs["uncaptured"][1]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.stack(runs["captured"][0]), torch.stack(runs["plain"][0]), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("workers", [1, 2])
def test_reused_memory_pinned_in_place_feeds_the_batches_of_fresh_memory(tmp_path, workers):
    # The loader registers each worker buffer with CUDA and the feed copies straight from it,
    # handing the buffer back once the copy is done: a buffer released early would be
    # overwritten by a later batch before its copy, and the batches would differ.
    from rgfusion.datasets.reader import DataConfig, load_manifest, train_loader
    from rgfusion.datasets.text import build_text_processor
    from rgfusion.trainer.feed import DeviceFeed
    from data_helpers import write_dataset

    write_dataset(str(tmp_path), {"train": [7, 1, 13, 0, 3]})
    m = load_manifest(str(tmp_path))
    cfg = DataConfig(url=str(tmp_path), num_workers=workers, shuffle_buffer=8, dtype="float16", prefetch_factor=2)
    text = build_text_processor(cfg, m)
    args = dict(batch_size=4, steps=16, rank=0, world_size=1, seed=3, epoch=0, pin_memory=True)

    def fed(reuse: bool) -> list:
        loader = train_loader(cfg, m, text, reuse_memory=reuse, **args)
        return [(b.image_ids, b.regions.cpu(), b.grids.cpu(), b.tokens.cpu())
                for b, _ in DeviceFeed(iter(loader), "cuda", torch.bfloat16)]

    fresh, reused = fed(False), fed(True)
    assert len(reused) == 16
    for a, b in zip(fresh, reused, strict=True):
        assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))


def test_in_place_pins_page_lock_the_worker_buffers(tmp_path):
    from rgfusion.datasets.reader import DataConfig, load_manifest, train_loader
    from rgfusion.datasets.text import build_text_processor
    from data_helpers import write_dataset

    write_dataset(str(tmp_path), {"train": [7, 1, 13, 0, 3]})
    m = load_manifest(str(tmp_path))
    cfg = DataConfig(url=str(tmp_path), num_workers=1, shuffle_buffer=8, dtype="float16")
    text = build_text_processor(cfg, m)
    for b in train_loader(cfg, m, text, batch_size=4, steps=3, rank=0, world_size=1, seed=3, epoch=0,
                          pin_memory=True, reuse_memory=True):
        assert b.lease is not None and b.regions.is_pinned() and b.grids.is_pinned() and b.tokens.is_pinned()
        b.lease.release()


def test_the_feed_counts_only_the_waits_the_gpu_did_not_hide():
    import time

    from rgfusion.trainer.feed import DeviceFeed

    def slow(n: int):
        for _ in range(n):
            time.sleep(0.05)
            yield SimpleNamespace(to=lambda device, dtype: SimpleNamespace(tensors=dict), lease=None, image_ids=["a"])

    feed = DeviceFeed(slow(3), "cuda", torch.float32)
    next(feed)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work queued: the next wait is hidden
    feed.prefetch()
    assert feed.wait_seconds == 0.0
    torch.cuda.synchronize()
    next(feed)
    feed.prefetch()  # nothing queued: the GPU idles while the loader reads
    assert feed.wait_seconds >= 0.04


def test_captured_loop_counts_skipped_steps_and_stops_a_diverged_run(tmp_path, monkeypatch):
    # From the 5th step on every loss is NaN, decided on the device (a counter the graph
    # increments), as a real divergence would be: the host never reads a loss per step, so it
    # learns of them at the next log line (every 2 steps) and stops after 3 in a row.
    import json

    from rgfusion.datasets.synth import SynthConfig, write_synthetic
    from rgfusion.trainer import loop
    from rgfusion.trainer.config import load_config

    data = tmp_path / "data"
    write_synthetic(SynthConfig(train_images=96, dev_images=12, test_images=12, samples_per_shard=24, region_dim=8,
                                grid_dim=8, grid_size=(2, 2), max_regions=4), str(data), progress=False)
    calls = torch.zeros((), device=DEVICE)
    real = loop.TrainModule.forward

    def diverging(self, *args, **kwargs):
        loss, stats = real(self, *args, **kwargs)
        calls.add_(1)
        return loss * torch.where(calls >= 5, float("nan"), 1.0), stats

    monkeypatch.setattr(loop.TrainModule, "forward", diverging)
    cfg = load_config(None, [f"data.url={data}", f"train.out_dir={tmp_path}/run", "train.batch_size=8",
                             "train.steps_per_epoch=12", "train.max_bad_steps=3", "train.log_every=2",
                             "tracking.enabled=false", "train.progress=false", "data.num_workers=1",
                             "model.width=16", "model.heads=2", "model.map_heads=2", "model.text.word_dim=16",
                             "checkpoint.every_steps=0", "train.engine=native", "train.zero_stage=0",
                             "train.cuda_graph=true"])
    with pytest.raises(loop.TrainingStopped, match="non-finite losses in a row by step 8"):
        loop.train(cfg)
    root = tmp_path / "run" / "checkpoints"
    state = json.loads((root / (root / "latest").read_text() / "meta.json").read_text())["state"]
    assert state["global_step"] == 8 and state["skipped_steps"] == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["caption", "graph", "cgf"])
def test_triton_attention_equals_the_reference(dtype, shape):
    """The kernels at the step's shapes: BERT's 20-word captions (one block of keys), the joint
    graph's 85 nodes with a geometry bias per head (three blocks), CGF's 49 cells over 36 regions."""
    from test_triton_attention import key_bias, reference

    from rgfusion.trainer.model import triton_attention

    g = torch.Generator().manual_seed(0)
    if shape == "cgf":
        inputs = [torch.randn(4, 49, 2 * 128, generator=g), torch.randn(4, 36, 4 * 128, generator=g)]
        bias, heads = key_bias(4, 36, (36, 20, 5, 1)), 2
    else:
        t, heads, d = (20, 3, 64) if shape == "caption" else (85, 8, 128)
        inputs = [torch.randn(4, t, 3 * heads * d, generator=g)]
        bias = key_bias(4, t, (20, 17, 5, 1)) if shape == "caption" else torch.randn(4, t, t, heads, generator=g)
    bias = bias.to(DEVICE) if shape != "graph" else bias.to(DEVICE).permute(0, 3, 1, 2).requires_grad_()
    inputs = [x.to(DEVICE).requires_grad_() for x in inputs]
    ours = [x.detach().to(dtype).requires_grad_() for x in inputs]
    our_bias = bias.detach().to(dtype).requires_grad_(bias.requires_grad)
    kv = ours[1] if shape == "cgf" else None
    if kv is None:
        out = triton_attention.self_attention(ours[0], our_bias, heads, 0.0)
    else:
        out = triton_attention.cross_attention(ours[0], kv, our_bias, heads, 0.0)
    ref = reference(inputs[0], inputs[1] if kv is not None else None, bias, heads)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    weight = torch.randn(ref.shape, dtype=torch.float64, device=DEVICE)
    with_bias = [bias] if bias.requires_grad else []
    got = torch.autograd.grad((out * weight.to(dtype)).sum(), ours + ([our_bias] if with_bias else []))
    want = torch.autograd.grad((ref * weight).sum(), inputs + with_bias)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=tol * 4, rtol=tol * 4)


@pytest.mark.parametrize("launch", [dict(), dict(forward_keys=32), dict(forward_rows=64, forward_warps=8)])
def test_triton_attention_dropout_is_the_mask_the_backward_assumes(launch, monkeypatch):
    """Compiled for the GPU at the graph's shape (85 nodes: three tiles of 32 keys backward; heads
    of 128): the weights the forward drops, read back as in test_triton_attention.keep_mask, are
    the ones the backward's gradients assume, with the forward's keys in one tile (the default
    here) or in the backward's three, and with the forward on 64-row tiles (warpgroup products)."""
    from test_triton_attention import reference

    from rgfusion.trainer.model import _triton_attention_kernels as kernels
    from rgfusion.trainer.model import triton_attention

    monkeypatch.setattr(kernels, "LAUNCH", kernels.Launch(**launch))
    b, t, heads, d, p = 2, 85, 2, 128, 0.1
    probe = torch.zeros(b, t, heads, 3, d, device=DEVICE)
    probe[:, :, :, 2, :t] = torch.eye(t, device=DEVICE)[None, :, None]  # q = k = 0, values the unit vectors
    torch.manual_seed(3)
    dropped = triton_attention.self_attention(probe.permute(0, 1, 3, 2, 4).reshape(b, t, -1), None, heads, p)
    keep = (dropped.view(b, t, heads, d)[..., :t].permute(0, 2, 1, 3) > 0).cpu()
    assert 0.87 < keep.double().mean().item() < 0.93
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, t, 3 * heads * d, generator=g).double().requires_grad_(),
              torch.randn(b, heads, t, t, generator=g).double().requires_grad_()]
    ours = [x.detach().float().to(DEVICE).requires_grad_() for x in inputs]
    torch.manual_seed(3)
    out = triton_attention.self_attention(ours[0], ours[1], heads, p)
    ref = reference(inputs[0], None, inputs[1], heads, keep, p)
    torch.testing.assert_close(out.cpu().double(), ref.detach(), atol=1e-4, rtol=1e-4)
    weight = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad((out * weight.float().to(DEVICE)).sum(), ours)
    for a, want in zip(got, torch.autograd.grad((ref * weight).sum(), inputs)):
        torch.testing.assert_close(a.cpu().double(), want, atol=4e-4, rtol=4e-4)


def test_compiled_captured_bert_with_the_triton_kernel_draws_new_dropout_each_replay():
    """Compiled as the trainer compiles (PyTorch's random numbers) and captured in a CUDA graph,
    the kernel's forward matches the eager one from the same generator state, and each replay
    draws a new dropout mask."""
    import transformers

    from rgfusion.trainer.model.bert import FusedBert
    from rgfusion.trainer.model.retrieval import compile_options

    cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                  vocab_size=100, attention_probs_dropout_prob=0.3)
    torch.manual_seed(0)
    bert = FusedBert(cfg, "triton").to(DEVICE)
    compiled = torch.compile(bert, options=compile_options("default", eager_random=True))
    tokens = torch.randint(4, 100, (8, 20), device=DEVICE)
    lengths = torch.randint(5, 21, (8,), device=DEVICE)
    mask = torch.arange(20, device=DEVICE)[None] < lengths[:, None]
    with torch.no_grad():  # an autograd graph kept alive here would break the capture below
        torch.manual_seed(1)
        eager = bert(tokens, lengths, mask)
        torch.manual_seed(1)
        torch.testing.assert_close(compiled(tokens, lengths, mask), eager, atol=1e-4, rtol=1e-4)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            compiled(tokens, lengths, mask).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    bert.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(tokens, lengths, mask)
        out.square().mean().backward()
    outs = []
    for _ in range(2):
        graph.replay()
        outs.append(out.clone())
    assert not torch.allclose(outs[0], outs[1])
    assert all(p.grad is not None and p.grad.isfinite().all() for p in bert.parameters() if p.requires_grad)


def test_attention_bench_times_each_kernel(tmp_path, monkeypatch):
    import json
    import sys

    attention_bench = load_script("attention_bench")
    out = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["attention_bench", "--shapes", "graph", "caption", "--batch", "4", "--iters", "2",
                                      "--blocks", "0", "64", "--dropout", "0.1", "0", "--out", str(out)])
    attention_bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all("error" not in r for r in rows)
    graph = [r for r in rows if r["shape"] == "graph" and r["block"] == "auto"][0]
    assert set(graph["kernels_us"]) == {"_forward", "_backward_query", "_backward_key"}


def test_geometry_and_ffn_benches_time_each_launch_and_restore_the_kernels_own(tmp_path, monkeypatch):
    import json
    import sys

    from rgfusion.trainer.model import _triton_geometry_kernels as geometry
    from rgfusion.trainer.model import _triton_gelu_kernels as gelu

    own_geometry, own_gelu = dict(geometry.LAUNCH), gelu.LAUNCH
    out = tmp_path / "geometry.json"
    monkeypatch.setattr(sys, "argv", ["geometry_bench", "--rows", "4", "--warps", "2", "--stages", "1", "--batch", "8",
                                      "--out", str(out)])
    load_script("geometry_bench").main()
    rows = json.loads(out.read_text())
    assert [r["launch"] for r in rows] == ["the kernels' own", "4 rows, 2 warps, 1 stages"]
    assert all(r["forward_us"] > 0 and r["backward_us"] > 0 for r in rows)
    out = tmp_path / "ffn.json"
    monkeypatch.setattr(sys, "argv", ["ffn_bench", "--tiles", "64x128x4", "32x128x4", "--out", str(out)])
    load_script("ffn_bench").main()
    for shape in json.loads(out.read_text()):
        assert [(k["block_m"], k["block_n"]) for k in shape["kernel"]] == [(64, 128), (32, 128)]
        assert all(k["error"] < 1e-2 for k in shape["kernel"])
    assert geometry.LAUNCH == own_geometry and gelu.LAUNCH == own_gelu


def test_adamw_bench_times_every_kind_of_master_and_moments(tmp_path, monkeypatch):
    """adamw_bench.py at the BERT recipe's groups: a row per program shape, then each kind of
    master and moments at each shape, with the bytes a parameter each moves."""
    import json
    import sys

    out = tmp_path / "adamw.json"
    monkeypatch.setattr(sys, "argv", ["adamw_bench", "--updates", "1024x4", "2048x4", "--sums", "32768x8",
                                      "--kernels-only", "--iters", "3", "--out", str(out)])
    load_script("adamw_bench").main()
    rows = json.loads(out.read_text())["rows"]
    kinds = [r["name"] for r in rows if r["name"].startswith("kernels, ")]
    assert kinds == [f"kernels, {kind}, update {u}" for kind in ("split masters", "bf16 moments",
                                                                   "split masters, bf16 moments")
                     for u in ("1024x4", "2048x4")]
    assert all(r["us"] > 0 and r["tb_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_bias_kernels_equal_the_math_path_compiled(dtype):
    """The geometry biases of the step's two graph layers at its shape (85 nodes, 8 heads), in one
    pass of the kernels, compiled as the towers are, against the math path in float64: in
    float32, the biases on every edge and the MLPs' weight gradients within float32 rounding; in
    bf16, no further from float64 than the math path in bf16 is. (TF32 products and the ReLU's
    kinks move a few summed gradients by more than a fixed tolerance allows: session 12's run 4
    failed one that way, 4.8 off in one of 80 entries.)"""
    from test_edge_bias import graph, mlp

    from rgfusion.trainer.model import edge_bias as module
    from rgfusion.trainer.model.edge_bias import edge_biases

    module.ops()  # before compiling, as RetrievalModel does
    boxes, adj = (t.to(DEVICE) for t in graph(16, 85))
    grads = torch.randn(2, 16, 8, 85, 85, device=DEVICE)
    edges = adj[None, :, None].expand_as(grads)

    def run(impl: str, precision: torch.dtype, compiled: bool):
        # float64 holds the rounded weights exactly
        layers = [mlp(16, 8, seed).to(DEVICE, dtype).to(precision) for seed in range(2)]
        biases = (torch.compile(edge_biases, fullgraph=True) if compiled else edge_biases)(
            layers, boxes.to(precision if precision == torch.float64 else torch.float32), adj, precision, impl)
        bias = torch.stack(biases).double()
        (bias * grads.double()).sum().backward()
        return bias, [p.grad.double() for layer in layers for p in layer.parameters()]

    want, want_grads = run("math", torch.float64, False)
    got, got_grads = run("triton", dtype, True)
    assert (got[~edges] == torch.finfo(dtype).min).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got[edges], want[edges], atol=1e-5, rtol=1e-5)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=4e-5)
        return
    math, math_grads = run("math", dtype, False)

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert error(got[edges], want[edges]) <= 2 * error(math[edges], want[edges])
    for ours, theirs, exact in zip(got_grads, math_grads, want_grads):
        assert error(ours, exact) <= 2 * error(theirs, exact)


def test_ffn_kernels_equal_the_math_path_compiled():
    """The GELU feed-forward at the graph's shape in bf16 (1,360 rows, 1,024 → 4,096), compiled as
    the towers are: the output and all five gradients no further from float64 than PyTorch's
    bf16 path is (twice its error at most: both round, in different places)."""
    import copy

    from rgfusion.trainer.model import ffn

    ffn.ops()  # before compiling, as RetrievalModel does
    torch.manual_seed(0)
    layers = torch.nn.Linear(1024, 4096).to(DEVICE), torch.nn.Linear(4096, 1024).to(DEVICE)
    x = torch.randn(16, 85, 1024, device=DEVICE)
    grad = torch.randn(16, 85, 1024, device=DEVICE, dtype=torch.float64)

    def run(impl: str, dtype: torch.dtype, compiled: bool):
        up, down = (copy.deepcopy(m).to(dtype) for m in layers)
        inputs = x.to(dtype).requires_grad_()
        y = (torch.compile(ffn.feed_forward, fullgraph=True) if compiled else ffn.feed_forward)(inputs, up, down, impl)
        (y.double() * grad).sum().backward()
        return [t.detach().double() for t in (y, inputs.grad, up.weight.grad, up.bias.grad, down.weight.grad,
                                              down.bias.grad)]

    exact = run("math", torch.float64, False)
    ours, theirs = run("triton", torch.bfloat16, True), run("math", torch.bfloat16, False)
    for name, a, b, want in zip(("output", "x", "up.weight", "up.bias", "down.weight", "down.bias"), ours, theirs,
                                exact):
        assert float((a - want).norm()) <= 2 * float((b - want).norm()), name


# gpu_bench's captured BERT rows, small, with the Triton attention and the caption tower on its side stream.
CAPTURED_BERT = dict(batch=16, regions=6, region_dim=48, grid=(3, 3), grid_dim=40, width=128, words=9, vocab=100,
                     attention="triton", side_streams=True)


@pytest.mark.parametrize("variant", ["full-bert-bf16w-graph", "full-bert-bf16w-compile-graph"])
def test_pipelined_update_waits_for_each_stage(variant, bert_dir, monkeypatch):
    """gpu_bench's captured BERT row with the update pipelined into the next forward
    (trainer/update_pipeline.py), replayed: each update stage idling 5 ms first changes no loss,
    as it would if a kernel read a weight before its stage's event (a step moves these weights by
    a few percent; 1e-4 leaves room for the backward's atomic adds, whose order varies); and the
    losses are those of the same buffers updated at each step's end, within bf16 rounding."""
    from rgfusion.trainer.update_pipeline import UpdatePipeline

    bench = load_script("gpu_bench")
    v = next(v for v in bench.variants() if v.name == variant)

    def losses(update: str, spin: int) -> list[float]:
        monkeypatch.setattr(UpdatePipeline, "spin", spin)
        shape = bench.Shape(**CAPTURED_BERT, update=update, update_stages=3)
        built = bench.build_bench(v, shape, DEVICE, bert_dir, tiny=True)
        return [float(built.step(built.batches[i % 3])) for i in range(5)]

    pipelined = torch.tensor(losses("pipelined", 0))
    torch.testing.assert_close(torch.tensor(losses("pipelined", 10_000_000)), pipelined, rtol=1e-4, atol=0)
    torch.testing.assert_close(pipelined, torch.tensor(losses("staged", 0)), rtol=2e-3, atol=0)
