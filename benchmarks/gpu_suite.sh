#!/usr/bin/env bash
# The GPU benchmark suite, run on a machine of the device tool from the repo root:
#   bash benchmarks/gpu_suite.sh setup data converge      # 4-GPU machine: 3 recipes + harness in parallel
#   bash benchmarks/gpu_suite.sh setup data scale         # ZeRO 1/2/3 x 1/2/4 GPUs, negatives, resume
#   bash benchmarks/gpu_suite.sh setup data moments       # 2-GPU machine: AdamW's moments in fp32 and bf16
#   MOMENTS_SETS="--set optim.master=split" MOMENTS_EPOCHS=20 TRAIN_IMAGES=6000 ... moments   # 1 GPU, both on it
#   RUNS="2:1 2:8 3:8" bash benchmarks/gpu_suite.sh setup data scale   # any stage:GPU-count pairs
#   TRAIN_IMAGES=6000 bash benchmarks/gpu_suite.sh setup data feed     # 1 GPU: loader and trainer profile
#   bash benchmarks/gpu_suite.sh setup mfu                                # 1 GPU: MFU by precision, compile, attention, batch
#   MFU_ATTENTION=math MFU_BATCHES= MFU_ONLY=full-bert-bf16w-compile-graph MFU_FLAGS="--side-streams --pad-shapes --launch-order main" \
#     bash benchmarks/gpu_suite.sh setup mfu                              # 1 GPU: one row and its trace
#   bash benchmarks/gpu_suite.sh setup streams                            # 1 GPU: CUDA tests, towers on 1 vs 2 streams
#   bash benchmarks/gpu_suite.sh setup towers                             # 1 GPU: the BERT step and each tower's alone
#                                                                           (TOWERS_ATTENTION=math: on the math path)
#   TRAIN_IMAGES=6000 bash benchmarks/gpu_suite.sh setup data graphs      # 1 GPU: loader memory, trainer captured or not
#   bash benchmarks/gpu_suite.sh setup attention                          # 1 GPU: the attention kernels per launch option
#   bash benchmarks/gpu_suite.sh setup kernels                            # 1 GPU: the geometry and bias-GELU kernels too
#   bash benchmarks/gpu_suite.sh setup adamw                              # 1 GPU: the optimizer update alone
#   AB="kernels:;compiled:--adamw compiled" bash benchmarks/gpu_suite.sh setup ab  # 1 GPU: BERT rows A, B, A, B
#   AB="main:;q4:CUDA_SCALE_LAUNCH_QUEUES=4x" ...                                   # (a row's environment first)
#   AB="..." bash benchmarks/gpu_suite.sh setup verify ab                             # the GPU tests, then the rows
#   VERIFY_K=edge_bias bash benchmarks/gpu_suite.sh setup verify                      # the tests pytest -k selects
# Results (logs, JSON, the MLflow store as a tarball) land in $OUT; more than 8 files there are
# packed into one suite.tgz at the end, the most the device tool brings back.
# `setup` installs from ./.whl, for machines without a network. Fill it on one with the network,
# from the repo root after `make venv`: `bash benchmarks/gpu_suite.sh wheels` (the device's Python,
# 3.12 in December 2026, is set by DEVICE_PYTHON; wheels built for another one fail to install there).
set -uo pipefail
export MLFLOW_ALLOW_FILE_STORE=true PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/rgfusion-out}
mkdir -p "$OUT"
RECIPE=configs/bench/paper_dims.yaml
TRAIN_IMAGES=${TRAIN_IMAGES:-20000}  # convergence needs 20K; throughput runs are fine with fewer
DATA=data/synthetic_paper_dims_$TRAIN_IMAGES
log() { echo "[$(date +%T)] $*"; }
# The bf16w rows' optimizer update as configs/bench/paper_dims_native.yaml has it (session 22);
# UPDATE_FLAGS= times the fp32 masters and moments of sessions 1-21.
UPDATE_FLAGS=${UPDATE_FLAGS---moments bf16 --adamw split}
RG="python3 -m rgfusion.trainer.cli"  # the console script may not be on a bare image's PATH
# The harness rows recorded in benchmarks/RESULTS.md (all 18 take twice as long).
BENCH_ONLY=full-bigru-fp32,full-bigru-bf16,full-bigru-bf16-default,full-bigru-bf16-graph,full-bert-fp32,full-bert-bf16,full-bert-bf16-default,full-bert-bf16-graph,region-gpo-bigru-fp32,region-gpo-bigru-fp32-graph,region-gpo-bigru-bf16,region-gpo-bigru-bf16-graph

wheels() {  # on the CPU machine: the wheels `setup` needs, for the device's Python, into .whl (under 64 MiB)
  local platforms="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"
  python3 -m pip download -q -d .whl --python-version "${DEVICE_PYTHON:-3.12}" --only-binary=:all: $platforms \
    webdataset mlflow-skinny hjson py-cpuinfo pytest pydantic 2>&1 | grep -v "^WARNING: Location" | tail -3
  rm -f .whl/numpy-*  # the device's torch was built against its own numpy
  .venv/bin/pip wheel -q --no-deps --no-build-isolation deepspeed -w .whl 2>&1 | grep -v "^WARNING: Location" | tail -3
  du -sh .whl
}

setup() {
  python3 -m pip install -q --no-index --find-links .whl webdataset deepspeed mlflow-skinny hjson py-cpuinfo pytest 2>&1 | tail -2
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
  python3 -c "import torch, deepspeed, webdataset, mlflow; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'gpus', torch.cuda.device_count())"
}

data() {
  [ -f $DATA/manifest.json ] && return
  log "synth $TRAIN_IMAGES/1000/1000 at paper dims"
  SECONDS=0; $RG data synth --out $DATA \
    --recipe configs/data/synthetic_paper_dims.yaml --set train_images=$TRAIN_IMAGES --set dev_images=1000 \
    --set test_images=1000 --workers "$(( $(nproc) - 2 ))" --quiet; echo "synth ${SECONDS}s"
}

train1() {  # GPU PORT NAME [--set k=v ...]: one single-GPU run
  local gpu=$1 port=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    $RG train --config $RECIPE --set data.url=$DATA --set train.out_dir=runs/$name --set train.progress=false \
    --set tracking.uri=file://$PWD/mlruns --set tracking.experiment=convergence --set tracking.run_name=$name "$@" \
    > "$OUT/$name.log" 2>&1
}

converge() {
  log "smoke run"
  if ! timeout 240 bash -c "$(declare -f train1); OUT=$OUT RECIPE=$RECIPE RG='$RG' train1 0 29400 smoke --set train.epochs=1 --set train.steps_per_epoch=40 --set tracking.enabled=false"; then
    tail -40 "$OUT/smoke.log"; log "smoke failed: harness only"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_bench.py --iters 15 --only $BENCH_ONLY --out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log" 2>&1
    tail -20 "$OUT/gpu_bench.log"; return
  fi
  grep -E "throughput|rsum" "$OUT/smoke.log" | tail -3
  log "convergence: full / region-only / grid-only on GPUs 0-2, harness on GPU 3"
  train1 0 29401 full & p0=$!
  train1 1 29402 region_only --set model.features=region --set model.graph=false --set model.cgf=false & p1=$!
  train1 2 29403 grid_only --set model.features=grid --set model.graph=false --set model.cgf=false & p2=$!
  CUDA_VISIBLE_DEVICES=3 python3 benchmarks/gpu_bench.py --iters 15 --only $BENCH_ONLY --out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log" 2>&1
  wait $p0 $p1 $p2
  for n in full region_only grid_only; do echo "== $n"; grep -E "epoch [0-9]+:|throughput" "$OUT/$n.log" | tail -12; done
  tail -16 "$OUT/gpu_bench.log"
  tar czf "$OUT/mlruns.tgz" mlruns runs/*/reports 2>/dev/null
}

moments() {  # the full model on the native engine, AdamW's moments in fp32 and in bf16, one budget, side by side
  local RECIPE=configs/bench/paper_dims_native.yaml  # train1 reads it
  local second; second=$(python3 -c "import torch; print(min(1, torch.cuda.device_count() - 1))")  # one GPU: both on it
  local sets=(--set train.epochs=${MOMENTS_EPOCHS:-10} ${MOMENTS_SETS:-})
  log "convergence: fp32 moments on GPU 0, bf16 moments on GPU $second"
  train1 0 29411 moments_fp32 --set optim.moments=fp32 "${sets[@]}" & local p0=$!
  train1 "$second" 29412 moments_bf16 --set optim.moments=bf16 "${sets[@]}" & local p1=$!
  wait $p0 $p1
  for n in moments_fp32 moments_bf16; do echo "== $n"; grep -E "epoch [0-9]+:|throughput" "$OUT/$n.log" | tail -12; done
  tar czf "$OUT/mlruns.tgz" mlruns 2>/dev/null
}

scale_run() {  # NGPU STAGE NAME [--set ...]
  local n=$1 stage=$2 name=$3; shift 3
  timeout ${RUN_TIMEOUT:-150} torchrun --nproc_per_node "$n" --master_addr 127.0.0.1 --master_port $((29500 + RANDOM % 400)) \
    -m rgfusion.trainer.cli train --config $RECIPE --set data.url=$DATA --set train.zero_stage="$stage" \
    --set train.batch_size=$((128 * n)) --set train.out_dir=runs/$name --set train.progress=false \
    --set tracking.enabled=false "$@" > "$OUT/$name.log" 2>&1
  echo "$name: $(grep -E 'throughput' "$OUT/$name.log" | tail -1) $(grep -oE 'dev rsum [0-9.]+' "$OUT/$name.log" | tail -1)"
  echo "  steady: $(grep -oE '[0-9]+ pairs/s, data wait [0-9.]+%' "$OUT/$name.log" | tail -2 | tr '\n' ' ')"
}

scale() {
  log "ZeRO scaling at 128 pairs per GPU"
  # RUNS=stage:gpus[:flags] with flags from: serial (DeepSpeed's overlap of gradient reduction
  # with backward off), native (train.engine=native, stage 0), graphs (compiled, CUDA graphs);
  # e.g. RUNS="2:1 2:4 2:8 3:1 3:8" or RUNS="0:1:native 0:4:native,graphs".
  echo "zero_optimization: {overlap_comm: false}" > "$OUT/serial_comm.yaml"
  for run in ${RUNS:-2:1 2:2 2:4 1:1 1:4 3:1 3:4}; do
    IFS=: read -r stage n flags <<< "$run"
    extra=()
    [[ ,$flags, == *,serial,* ]] && extra+=(--set train.deepspeed=$OUT/serial_comm.yaml)
    [[ ,$flags, == *,native,* ]] && extra+=(--set train.engine=native)
    [[ ,$flags, == *,graphs,* ]] && extra+=(--set train.compile=true --set train.compile_mode=reduce-overhead)
    scale_run "$n" "$stage" "z${stage}_n${n}${flags:+_${flags//,/_}}" --set train.epochs=1 --set train.steps_per_epoch=100 \
      "${extra[@]}"
  done | tee -a "$OUT/scaling.txt"
  [ -n "${SCALE_ONLY:-}" ] && return
  log "global negatives on/off, 4 GPUs, 2 epochs"
  for g in true false; do
    scale_run 4 2 "neg_${g}" --set train.epochs=2 --set train.global_negatives=$g
  done | tee "$OUT/negatives.txt"
  log "universal checkpoint: 4 GPUs for 1 epoch, resumed on 2 GPUs for the 2nd"
  SECONDS=0; scale_run 4 2 resume_4gpu --set train.epochs=1 --set train.out_dir=runs/resume
  echo "4-GPU part ${SECONDS}s"
  SECONDS=0; scale_run 2 2 resume_2gpu --set train.epochs=2 --set train.out_dir=runs/resume --resume auto
  echo "2-GPU resume part ${SECONDS}s"
  grep -iE "resum|universal|checkpoint|epoch [0-9]+:" "$OUT/resume_2gpu.log" | head -8
  tar czf "$OUT/scale_logs.tgz" -C "$OUT" $(cd "$OUT" && ls z*.log neg_*.log resume_*.log)
}

feed() {  # one GPU: what feeds and what bounds the trainer's step
  log "loader alone (train mode, batch 128, float16): images/s by worker count"
  for w in ${LOADER_WORKERS-4 8 12}; do
    echo "workers $w: $($RG data bench $DATA --mode train --workers $w --steps 80 --batch-size 128 \
      --dtype float16 --shuffle-buffer 2000 2>/dev/null | grep -E '^total' )"
  done | tee "$OUT/loader.txt"
  # Each run is NAME:k=v,k=v (config overrides); the profiled ones also keep their op tables.
  log "trainer, 1 GPU, ${FEED_STEPS:=120} steps per run"
  for run in ${FEED_RUNS:-w6_z2:data.num_workers=6,train.profile_steps=10 w12_z2:data.num_workers=12 w12_z0:data.num_workers=12,train.zero_stage=0 w12_native:data.num_workers=12,train.engine=native,train.zero_stage=0}; do
    name=t_${run%%:*}
    sets=(); IFS=, read -ra kv <<< "${run#*:}"; for s in "${kv[@]}"; do sets+=(--set "$s"); done
    train1 0 29410 "$name" --set train.epochs=1 --set train.steps_per_epoch=$FEED_STEPS --set tracking.enabled=false \
      --set eval.batch_size=1000 "${sets[@]}"
    echo "$name (${run#*:}): $(grep throughput "$OUT/$name.log" || tail -3 "$OUT/$name.log")"
    grep -oE 'step [0-9]+: .*' "$OUT/$name.log" | tail -3
    [ -f runs/$name/profile/ops.txt ] && cp runs/$name/profile/ops.txt "$OUT/profile_$name.txt" && head -12 "$OUT/profile_$name.txt"
  done | tee "$OUT/trainer.txt"
}

mfu() {  # one GPU: MFU rows, each variant in a process of its own; MFU_ATTENTION="sdpa math" compares the kernels, MFU_FLAGS adds gpu_bench flags
  # One process per variant: a BERT row compiled after a BiGRU row in one process did not finish in 7 min (session 7).
  log "model step: MFU by variant, attention and batch"
  local row="python3 benchmarks/gpu_bench.py --iters 15 --warmup 3 --no-eval $UPDATE_FLAGS"
  for att in ${MFU_ATTENTION:-sdpa math}; do
    for b in 128 ${MFU_BATCHES-256 512}; do
      local only=${MFU_ONLY:-full-bert-bf16w-compile-graph,full-bigru-bf16w-compile-graph,region-gpo-bigru-fp32-graph,region-gpo-bigru-bf16w-graph,region-gpo-bigru-bf16w-compile-graph}
      [ "$b" = 128 ] || only=${MFU_BIG:-full-bert-bf16w-compile-graph,full-bigru-bf16w-compile-graph}
      for v in ${only//,/ }; do
        local name=mfu_${att}_b${b}_$v
        $row --attention "$att" --batch "$b" ${MFU_FLAGS:-} --only "$v" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
        local got; got=$(grep -E '^\{' "$OUT/$name.log" | tail -1)
        echo "$name: ${got:-$(tail -2 "$OUT/$name.log")}"
      done
    done
    local profiled=${MFU_PROFILE-full-bert-bf16w-compile-graph}  # MFU_PROFILE= profiles nothing
    [ -n "$profiled" ] || continue
    $row --attention "$att" ${MFU_FLAGS:-} --only "$profiled" --profile "$profiled" \
      --trace "$OUT/trace_$att.json.gz" > "$OUT/profile_$att.log" 2>&1
    python3 benchmarks/trace_summary.py "$OUT/trace_$att.json.gz" --steps 5 --timeline 500 > "$OUT/trace_$att.txt" 2>&1; head -4 "$OUT/trace_$att.txt"
  done | tee "$OUT/mfu.txt"
}

towers() {  # one GPU: the BERT step, then each tower's step alone (the other's embeddings a stand-in), with traces
  local row="python3 benchmarks/gpu_bench.py --iters 15 --warmup 3 --no-eval --attention ${TOWERS_ATTENTION:-triton} --side-streams --pad-shapes"
  row="$row --launch-order main --only full-bert-bf16w-compile-graph $UPDATE_FLAGS ${TOWERS_FLAGS:-}"
  for t in both image text; do
    local trace=(); [ $t = both ] || trace=(--profile full-bert-bf16w-compile-graph --trace "$OUT/towers_$t.json.gz")
    $row --towers $t "${trace[@]}" > "$OUT/towers_$t.log" 2>&1
    echo "$t: $(grep -E '^\{' "$OUT/towers_$t.log" | tail -1)"
    [ $t = both ] || python3 benchmarks/trace_summary.py "$OUT/towers_$t.json.gz" --steps 5 --top 60 > "$OUT/towers_$t.txt" 2>&1
  done | tee "$OUT/towers.txt"
}

attention() {  # one GPU: the Triton attention kernels' times at the step's shapes, per launch option
  python3 benchmarks/attention_bench.py --warps ${ATTN_WARPS:-2 4 8} --stages ${ATTN_STAGES:-1 3} \
    --blocks ${ATTN_BLOCKS:-0 16 64} --dropout ${ATTN_DROPOUT:-0.1 0} --out "$OUT/attention_sweep.json" 2>&1 | tee "$OUT/attention_sweep.txt"
}

kernels() {  # one GPU: the geometry-bias and bias-GELU kernels' times at the step's shapes, per launch setting
  python3 benchmarks/geometry_bench.py --rows ${GEO_ROWS:-4 8 16} --warps ${GEO_WARPS:-2 4 8} --stages ${GEO_STAGES:-1 3} \
    --out "$OUT/geometry_sweep.json" 2>&1 | tee "$OUT/geometry_sweep.txt"
  python3 benchmarks/ffn_bench.py --tiles ${FFN_TILES:-64x128x4 32x128x4 64x64x2 32x256x4} --out "$OUT/ffn_sweep.json" \
    2>&1 | tee "$OUT/ffn_sweep.txt"
}

adamw() {  # one GPU: the whole optimizer update alone, per program shape and per kind of master and moments
  python3 benchmarks/adamw_bench.py --updates ${ADAMW_UPDATES:-1024x4 2048x4 2048x8} --sums ${ADAMW_SUMS:-32768x8} --kernels-only \
    --out "$OUT/adamw.json" 2>&1 | tee "$OUT/adamw.txt"
}

streams() {  # one GPU: the CUDA-only tests, then the model step with the towers on one stream and on two
  log "tests/test_gpu.py"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4
  for side in "" --side-streams; do
    name=streams_${STREAMS_ATTENTION:-math}${side:+_side}
    python3 benchmarks/gpu_bench.py --iters 15 --warmup 3 --no-eval --attention ${STREAMS_ATTENTION:-math} $side \
      --only ${STREAMS_ONLY:-full-bigru-bf16w-graph,full-bigru-bf16w-compile-graph,full-bert-bf16w-compile-graph} \
      --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; tail -4 "$OUT/$name.log"
  done
}

graphs() {  # one GPU: the CUDA tests, the loader with reused batch memory, the trainer captured and not
  GRAPH_WORKERS=${GRAPH_WORKERS:-14}
  log "tests/test_gpu.py"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
  # 300 steps and a small shuffle buffer: past the buffers' filling, which halves a worker's rate.
  log "loader alone, copied to the GPU as the trainer does, fresh vs reused batch memory ($(nproc) cores)"
  for reuse in "" --reuse-memory; do
    echo "workers $GRAPH_WORKERS${reuse:+ $reuse}: $($RG data bench $DATA --mode train --workers $GRAPH_WORKERS \
      --steps 300 --batch-size 128 --dtype float16 --shuffle-buffer 128 --pin $reuse 2>/dev/null | grep -E '^(total|cpu)' | tr '\n' ' ')"
  done | tee "$OUT/loader_reuse.txt"
  local n="train.engine=native,train.zero_stage=0,data.num_workers=$GRAPH_WORKERS,train.compile=true"
  local g="$n,train.cuda_graph=true,train.side_streams=true"
  # 700 steps: the shuffle buffers (2,000 per worker) fill during the first ~220.
  FEED_STEPS=${FEED_STEPS:-700} LOADER_WORKERS="" \
    FEED_RUNS="${GRAPH_RUNS:-captured:$g captured_fresh:$g,data.reuse_batch_memory=false eager:$n}" feed
}

ab() {  # one GPU: the BERT row once per "name:flags" in AB (';' between them), the whole set twice in turn
  # Against a machine's drift: session 15's three machines gave the same code 11.27-11.55 ms, while the
  # changes it compared moved the row by 0.03-0.09 ms. A second pass compiles from inductor's caches.
  local row=${AB_ROW:-python3 benchmarks/gpu_bench.py --iters 30 --warmup 3 --no-eval --side-streams --pad-shapes \
--launch-order main --only full-bert-bf16w-compile-graph --attention triton $UPDATE_FLAGS}
  local pairs; IFS=';' read -ra pairs <<< "${AB:?AB=\"name:flags;name:flags\"}"
  for pass in 1 2; do
    for pair in "${pairs[@]}"; do
      local name=${pair%%:*} flags=${pair#*:}
      local file="$OUT/ab_${name}_$pass"
      # Leading NAME=VALUE words are the row's environment, e.g. "q4:CUDA_SCALE_LAUNCH_QUEUES=4x".
      local envs=() args=() word
      for word in $flags; do
        if [[ ${#args[@]} -eq 0 && $word =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then envs+=("$word"); else args+=("$word"); fi
      done
      env "${envs[@]}" $row "${args[@]}" --out "$file.json" > "$file.log" 2>&1
      echo "$name, pass $pass: $(grep -oE '"(step_ms|step_ms_spread|mfu_bf16_peak|error)": [^,}]*' "$file.log" | tr '\n' ' ')"
    done
  done | tee "$OUT/ab.txt"
}

verify() {  # one GPU: the tests that run the kernels for real (CUDA-only tests, FlatAdamW's kernels), first;
  # VERIFY_K="edge_bias or ffn" keeps the ones pytest -k selects
  log "tests/test_gpu.py tests/test_adamw_kernels.py ${VERIFY_K:+-k \"$VERIFY_K\"}"
  timeout "${VERIFY_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_adamw_kernels.py \
    ${VERIFY_K:+-k "$VERIFY_K"} > "$OUT/verify.log" 2>&1
  tail -3 "$OUT/verify.log"
}

pack() {  # the device tool brings back at most 8 files from $OUT: past that, one archive of them all
  local files; files=$(cd "$OUT" && ls -A)
  [ "$(echo "$files" | grep -c .)" -le 8 ] && return
  (cd "$OUT" && tar czf suite.tgz --remove-files $files) && log "$OUT packed into suite.tgz"
}

for part in "$@"; do "$part"; done
pack
