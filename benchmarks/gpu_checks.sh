#!/usr/bin/env bash
# Every check that needs a GPU, in one run (issue 6): the float16/bfloat16 tests, speed against diffusers (eager and
# compiled, UNet step and whole 50-step 512x512 images), peak memory measured next to the estimate, and notebook 09
# at full size. Prints everything and keeps a copy in benchmarks/results/gpu_<device>.txt.
#   bash benchmarks/gpu_checks.sh
set -o pipefail
name=$(python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null) \
    || { echo "gpu_checks.sh: no CUDA GPU here; the CPU figures come from python -m benchmarks.speed" >&2; exit 2; }
out="benchmarks/results/gpu_${name}.txt"
{
    echo "# $(date -u +%F), $name, torch $(python -c 'import torch; print(torch.__version__)')"
    python -m pytest -q -p no:cacheprovider tests/test_low_precision.py tests/test_memory_options.py tests/test_runtime.py
    python -m benchmarks.speed --device cuda --configs full --image --compile
    python -m benchmarks.memory --measure
    python -m pytest -q -p no:cacheprovider --nbval-lax solutions/09_text_to_image.ipynb
} 2>&1 | grep --line-buffered -v "^\[transformers\]" | tee "$out"
