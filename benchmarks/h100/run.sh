#!/usr/bin/env bash
# The H100 proof for issue 6, run on the lent device machine from the repo root, after
# receive.sh has the source and the model under /var/tmp/llmhost (see README.md):
#   bash benchmarks/h100/run.sh gpu     # build arch 90 (timed), system_info, llama-bench,
#                                       # served decode at 1 and 4 requests, FA log check (~6 min)
#   bash benchmarks/h100/run.sh sm120   # configure + compile llama-server for 120 (timed),
#                                       # sm_120a images (cuobjdump) (~5.5 min)
# Each phase fits one 10-minute call. Files land in $OUT (at most 8); summary.txt has the figures.
set -euo pipefail
phase=${1:?usage: run.sh gpu|sm120}
here=$(cd "$(dirname "$0")" && pwd)
W=${LLMHOST_WORK:-/var/tmp/llmhost}
OUTDIR=${OUT:-$W/out}
mkdir -p "$OUTDIR"
export PATH=/opt/torch/.venv/bin:/usr/local/cuda/bin:$PATH
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
JOBS=${JOBS:-$(nproc)}
SRC=$W/llama.cpp
read -r _ model_name _ _ < <(grep '^model ' "$W/manifest.txt")
MODEL=$W/model/$model_name
commit=$(awk '$1=="commit"{print $2}' "$W/manifest.txt")
build_number=$(awk '$1=="build_number"{print $2}' "$W/manifest.txt")
[ -f "$SRC/CMakeLists.txt" ] && [ -f "$MODEL" ] || { echo "run: run receive.sh until source and model are ready" >&2; exit 1; }

summary=$OUTDIR/summary.txt
say() { echo "$*" | tee -a "$summary"; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

common=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
        -DLLAMA_BUILD_COMMIT="$commit" -DLLAMA_BUILD_NUMBER="$build_number")

# build DIR LOGNAME TARGETS... -- CUDA_FLAGS... : configure and build, timed, logs in $OUTDIR
build() {
  local dir=$1 log=$2; shift 2
  local targets=(); while [ "$1" != -- ]; do targets+=("$1"); shift; done; shift
  if [ "${SKIP_BUILD:-0}" = 1 ] && [ -x "$dir/bin/llama-server" ]; then
    say "build $log: reused (SKIP_BUILD=1), not timed"; return
  fi
  rm -rf "$dir"  # from nothing, so the time is a full build
  local t0 t1 t2
  t0=$(now)
  cmake -S "$SRC" -B "$dir" "${common[@]}" "$@" > "$OUTDIR/configure-$log.log" 2>&1 \
    || { tail -40 "$OUTDIR/configure-$log.log"; exit 1; }
  t1=$(now)
  cmake --build "$dir" --target "${targets[@]}" -j "$JOBS" > "$OUTDIR/build-$log.log" 2>&1 \
    || { grep -m 20 -B2 -A10 'error' "$OUTDIR/build-$log.log" || tail -40 "$OUTDIR/build-$log.log"; exit 1; }
  t2=$(now)
  say "build $log: targets ${targets[*]}; configure $(secs "$t0" "$t1") s, build $(secs "$t1" "$t2") s, $JOBS jobs; flags: $*"
}

phase_gpu() {
  local B=$W/build-90 port
  mapfile -t cuda < <(python3 "$here/flags.py" --nvcc "$NVCC" --arch 90 --defaults f16-f16 q4_0-q8_0)
  [ "${#cuda[@]}" -eq 4 ] || { echo "run: flags.py failed" >&2; exit 1; }
  say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader); $("$NVCC" --version | grep release); cmake $(cmake --version | head -1 | awk '{print $3}')"
  build "$B" 90 llama-server llama-bench -- "${cuda[@]}"
  say "version: $("$B/bin/llama-server" --version 2>&1 | grep -m1 version)"

  say "--- llama-bench"
  timeout 300 "$B/bin/llama-bench" -m "$MODEL" -p 512 -n 128 -ngl 99 -fa 1 -ctk q4_0 -ctv q8_0 -o md \
    2>/dev/null | tee "$OUTDIR/llama-bench.md" | tee -a "$summary"

  say "--- llama-server by hand, the guide's flags (--mlock is --load-mode mmap+mlock at this commit)"
  port=$(free_port)
  "$B/bin/llama-server" -m "$MODEL" -ngl 99 -c 131072 -np 4 --host 127.0.0.1 --port "$port" \
    --flash-attn on -ctk q4_0 -ctv q8_0 --load-mode mmap+mlock --cont-batching --cache-prompt \
    --reasoning-format deepseek > "$OUTDIR/server-hand.log" 2>&1 &
  pids+=($!)
  timeout 400 python3 "$here/decode_client.py" --port "$port" --parallel 1 4 --tokens 256 --rounds 3 \
    | tee "$OUTDIR/decode-hand.json" | tee -a "$summary" \
    || { tail -30 "$OUTDIR/server-hand.log"; exit 1; }
  kill "${pids[-1]}" 2>/dev/null || true; wait "${pids[-1]}" 2>/dev/null || true
  say "system_info: $(grep -m1 'system_info' "$OUTDIR/server-hand.log")"
  say "expected in system_info: ARCHS = $(python3 "$here/flags.py" --nvcc x --arch 90 --archs-define), FA_QUANTS = $(printf '%s\n' "${cuda[@]}" | sed -n 's/^-DGGML_CUDA_FA_QUANTS=//p' | tr ';' ',')"
  say "offload: $(grep -m3 -E 'offloaded [0-9]+/[0-9]+ layers|flash_attn|CUDA0 KV buffer' "$OUTDIR/server-hand.log" | tr '\n' '|')"
  if grep -q 'no FlashAttention vector kernel compiled' "$OUTDIR/server-hand.log"; then
    say "FA fallback line (q4_0-q8_0): PRESENT: $(grep -m1 'no FlashAttention vector kernel' "$OUTDIR/server-hand.log")"
  else
    say "FA fallback line (q4_0-q8_0): absent: the compiled q4_0-q8_0 kernel ran"
  fi

  # control: a pair this build lacks must log the line, or the check above proves nothing
  port=$(free_port)
  "$B/bin/llama-server" -m "$MODEL" -ngl 99 -c 4096 -np 1 --host 127.0.0.1 --port "$port" \
    --flash-attn on -ctk q8_0 -ctv q4_0 > "$OUTDIR/server-control.log" 2>&1 &
  pids+=($!)
  timeout 200 python3 "$here/decode_client.py" --port "$port" --parallel 1 --tokens 32 --rounds 1 >/dev/null \
    || { tail -30 "$OUTDIR/server-control.log"; exit 1; }
  kill "${pids[-1]}" 2>/dev/null || true; wait "${pids[-1]}" 2>/dev/null || true
  say "control q8_0-q4_0 (not compiled): $(grep -c 'no FlashAttention vector kernel compiled' "$OUTDIR/server-control.log" || true) fallback line(s)"
}

phase_sm120() {
  local B=$W/build-120
  mapfile -t cuda < <(python3 "$here/flags.py" --nvcc "$NVCC" --arch 120 f16-f16 q4_0-q8_0)
  [ "${#cuda[@]}" -eq 4 ] || { echo "run: flags.py failed" >&2; exit 1; }
  build "$B" 120 llama-server -- "${cuda[@]}"
  say "configure: $(grep -E 'Replacing 120|Using CMAKE_CUDA_ARCHITECTURES' "$OUTDIR/configure-120.log" | tr '\n' '|')"
  cuobjdump --list-elf "$B/bin/libggml-cuda.so" > "$OUTDIR/cuobjdump-elf.txt"
  say "cuobjdump: $(grep -c 'sm_120a' "$OUTDIR/cuobjdump-elf.txt") sm_120a images of $(wc -l < "$OUTDIR/cuobjdump-elf.txt") ELF images"
  # FP4 block-scaled MMA in the machine code (the Blackwell path); informative, not a pass/fail
  say "FP4 MMA SASS lines (first 3): $(timeout 60 cuobjdump --dump-sass "$B/bin/libggml-cuda.so" 2>/dev/null | grep -m3 -E 'OMMA|E2M1' | tr -s ' ' | tr '\n' '|' || true)"
}

case $phase in
  gpu) phase_gpu ;;
  sm120) phase_sm120 ;;
  *) echo "usage: run.sh gpu|sm120" >&2; exit 2 ;;
esac
