#!/usr/bin/env bash
# Fashion-MNIST IPC 1 and 10 at GPU size in one call on one GPU (benchmarks/gpu_fashion_mnist.py).
#
# Here, once (needs this machine's pip and the Debian Fashion-MNIST):
#     bash benchmarks/gpu_fashion_mnist.sh --prepare
# puts WebDataset's wheels and the IDX files in .gpu/ (ignored by git). Then, through the
# device tool, carry [".gpu"] and run:  bash benchmarks/gpu_fashion_mnist.sh
# The GPU machine's python3 has torch, numpy, pillow, fsspec, safetensors, pyyaml and tqdm; it
# has no Ray and no pydantic (the wheels above carry it; the stages run in one process) and no network. Results go to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
    mkdir -p .gpu/whl .gpu/fashion-mnist
    cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/whl webdataset==1.0.2 braceexpand==0.1.7 \
        pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing_extensions==4.16.0 \
        typing-inspection==0.4.5
    grep -qsx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ -n "${OUT:-}" ] && command -v nvidia-smi >/dev/null; then  # is the GPU busy or idle?
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 \
        > "$OUT/gpu_utilisation.csv" 2>/dev/null &
fi
EAD_BENCH_LAUNCHER="bash benchmarks/gpu_fashion_mnist.sh" python3 benchmarks/gpu_fashion_mnist.py --source .gpu/fashion-mnist --out "${OUT:-benchmarks/results}" "$@"
