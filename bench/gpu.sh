#!/usr/bin/env bash
# The GPU measurements asked of the benchmarks, in one run on one GPU (H100/H200 class):
#   bash bench/gpu.sh [OUT_DIR]
# Both stages in float32 and bfloat16 beside PyTorch at 64³, one 64³ sample (Euler-50 + decode,
# tsit5 + decode), and the 128³ VQ-GAN with downsample 2 (latent 64³ x 8) with its flow step,
# which the thesis' 11 GB GPU could not train. Each command is capped at 150 s; every output
# goes to OUT_DIR/NAME.txt (default bench/gpu-out) with the command line and the exit status.
set -u
out=${1:-bench/gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" \
  >> "$out/gpu.txt" 2>&1

run() {
  local name=$1
  shift
  echo "+ python -m bench.run $*" > "$out/$name.txt"
  timeout 150 python -m bench.run "$@" >> "$out/$name.txt" 2>&1
  echo "rc=$?" >> "$out/$name.txt"
  tail -n 4 "$out/$name.txt"
}

run flow64_f32 --stages flow --size 64 --batch 8 --repeats 10 --torch
run flow64_bf16 --stages flow --size 64 --batch 8 --repeats 10 --dtype bfloat16 --torch
run vqgan64_f32 --stages vqgan --size 64 --batch 2 --repeats 10 --torch
run vqgan64_bf16 --stages vqgan --size 64 --batch 2 --repeats 10 --dtype bfloat16 --torch
run sample64 --stages sample --size 64 --repeats 10
run vqgan128_f2 --stages vqgan --size 128 --downsample 2 --batch 2 --repeats 5 --dtype bfloat16 --remat
run flow128_f2 --stages flow --size 128 --downsample 2 --batch 2 --repeats 5 --dtype bfloat16
