#!/bin/bash
# The CUDA build through the helper (auto) on the H200 VM, then the fallback's rebuild step by
# hand: the same folder reconfigured for x86-64-v4 and built; which objects recompile, how long.
export PATH=/opt/torch/.venv/bin:/usr/local/cuda/bin:$PATH
uname -r; nproc
tar xzf .devcarry/wt-cpu/llama.cpp.tar.gz -C /tmp
s=$(date +%s%N); bash .devcarry/wt-cpu/build_cuda.sh > $OUT/build_cuda.out 2>&1; rc=$?
echo "helper rc=$rc in $(( ($(date +%s%N)-s)/1000000 )) ms"
grep -E "CPU self-test|faults|built for|verified|failed|done in|system_info" $OUT/build_cuda.out | cut -c1-400
s=$(date +%s%N); bash .devcarry/wt-cpu/build_cuda.sh | tail -1; echo "rerun $(( ($(date +%s%N)-s)/1000000 )) ms"
cp /tmp/builds/cuda/.llmhost-build.json $OUT/marker_cuda.json
B=/tmp/builds/cuda
s=$(date +%s%N); cmake -S /tmp/llama.cpp -B $B -G Ninja -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF > /tmp/reconf.log 2>&1; echo "reconfigure v4 rc=$? $(( ($(date +%s%N)-s)/1000000 )) ms"
ninja -C $B -n llama-server llama-bench > /tmp/plan.txt; echo "ninja plans $(grep -c 'Building' /tmp/plan.txt) compiles, CUDA: $(grep -c 'CUDA object' /tmp/plan.txt), ggml-cpu: $(grep -c 'ggml-cpu.dir' /tmp/plan.txt)"
s=$(date +%s%N); cmake --build $B --parallel 16 --target llama-server llama-bench > $OUT/rebuild_v4.log 2>&1; echo "rebuild v4 rc=$? $(( ($(date +%s%N)-s)/1000000 )) ms; CUDA objects compiled: $(grep -c 'CUDA object' $OUT/rebuild_v4.log), all compiles: $(grep -c 'Building' $OUT/rebuild_v4.log)"
for i in 1 2 3; do s=$(date +%s%N); CUDA_VISIBLE_DEVICES= $B/bin/llama-bench -m $B/selftest.gguf -p 32 -n 8 -r 1 -ngl 0 -o jsonl > /tmp/o 2>&1; echo "v4 selftest rc=$? $(( ($(date +%s%N)-s)/1000000 )) ms $(tr '\n' ' ' < /tmp/o | grep -o '"avg_ts": [0-9.]*' | tr '\n' ' ')"; done
$B/bin/llama-server -lv 4 --port 0 --model /nonexistent 2>&1 | grep -o "CPU : .*" | head -1
