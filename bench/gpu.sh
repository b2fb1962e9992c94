#!/usr/bin/env bash
# Every check and benchmark that needs a CUDA GPU, in one go, for a machine where one is at hand:
#   bash bench/gpu.sh OUT_DIR [STEP ...]  (steps: tests attention ditxl training sweep vae report; default all)
# Runs the CUDA tests (with the model and attention tests beside them), then the attention,
# backbone and VAE benchmarks and the whole performance report (bench/report.py), writing logs,
# JSON and plots to OUT_DIR. The ditxl step trains dit-XL at 16x32x32 latents in bf16 at batch
# 1, 4 and 8, eager and with compiled blocks (profiles at batch 1), and ends with an MFU table;
# the training step runs train.py itself on cached dit-XL latents (bench/training.py), both ways.
# Each step has a time limit and a failing step does not stop the others; the exit status says
# whether all passed.
set -uo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR [STEP ...]}
shift
steps=${*:-tests attention ditxl training sweep vae report}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND, log to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v '^WARNING\[XFORMERS\]\|^  \(PyTorch\|Python\|Please\|Memory\|Set XFORMERS\)'
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name: exit $rc"; status=1; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1

wants() { [[ " $steps " == *" $1 "* ]]; }

wants tests && step tests 240 python3 -m pytest -q -p no:cacheprovider --log-level=INFO -rs \
    tests/test_cuda.py tests/test_attention.py tests/test_dit.py tests/test_unet3d.py
wants attention && step attention 120 python3 bench/attention.py --device cuda --dtype bf16 --out "$out/attention_cuda.json"
wants ditxl && for batch in 1 4 8; do  # dit-XL at 16x32x32 latents, eager and with compiled blocks
    for mode in eager compiled; do
        flags=()
        [ "$mode" = compiled ] && flags+=(--compile)
        [ "$batch" = 1 ] && flags+=(--profile 12)
        step "ditxl_b${batch}_$mode" 360 python3 bench/backbones.py --device cuda --dtype bf16 --batch "$batch" \
            "${flags[@]}" --width 1152 --depth 28 --heads 16 --size 32 --frames 16 --arms dit --repeats 10 \
            --out "$out/backbones_ditxl_b${batch}_$mode.json"
    done
done
wants ditxl && python3 - "$out" <<'SUMMARY'
import json, pathlib, sys
print(f"{'dit-XL 16x32x32':<16} {'batch':>5} {'step s':>7} {'tokens/s':>9} {'peak GiB':>8} {'MFU':>6}")
for path in sorted(pathlib.Path(sys.argv[1]).glob("backbones_ditxl_b*.json")):
    result = json.loads(path.read_text())
    for row in result["rows"]:
        mode = "compiled" if result.get("compile") else "eager"
        print(f"{mode:<16} {result['batch']:>5} {row['step_s']:7.3f} {row['tokens_per_s']:9.0f} "
              f"{row['peak_mib'] / 1024:8.1f} {100 * row['mfu']:5.1f}%")
SUMMARY
wants training && step training 600 python3 bench/training.py --device cuda --batch 4 \
    --work "${TMPDIR:-/tmp}/bench_training" --out "$out/training_cuda.json"  # its clips and latents stay off OUT_DIR
wants sweep && step backbones_sweep 240 python3 bench/backbones.py --device cuda --dtype bf16 --width 768 --depth 12 --heads 12 \
    --size 32 --frames 4 8 16 32 64 --arms dit dit3d unet3d --repeats 10 --out "$out/backbones_cuda.json"
wants vae && step vae 240 python3 bench/vae.py --config configs/vae/base.yaml --device cuda --dtype bf16 --size 256 \
    --frames 17 33 65 129 --chunk 16 --out "$out/vae_cuda.json"
wants report && step report 600 python3 bench/report.py --device cuda --dtype bf16 --out "$out/report_cuda.json"
exit $status
