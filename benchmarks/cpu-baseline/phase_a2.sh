#!/bin/bash
# Which CPU computation faults with native code on this VM? The native CPU-only build, then
# llama-bench / llama-server on the tiny model with the services' flags.
export PATH=/opt/torch/.venv/bin:/usr/local/cuda/bin:$PATH
tar xzf .devcarry/wt-cpu/llama.cpp.tar.gz -C /tmp
cd /tmp && cmake -S llama.cpp -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_CUDA=OFF -DGGML_NATIVE=ON > $OUT/configure.log 2>&1 && cmake --build /tmp/b --parallel 16 --target llama-server llama-bench llama-cli > $OUT/build.log 2>&1; echo build rc=$?
cd - >/dev/null
python3 .devcarry/wt-cpu/files/tiny_gguf.py /tmp/tiny.gguf
B=/tmp/b/bin; M=/tmp/tiny.gguf
run() { s=$(date +%s%N); "$@" > /tmp/o 2>&1; rc=$?; echo "rc=$rc $(( ($(date +%s%N)-s)/1000000 ))ms :: ${*:2}"; [ $rc -ne 0 ] && tail -3 /tmp/o; }
run $B/llama-bench -m $M -p 32 -n 8 -r 1 -ngl 0 -v
grep -iE "AMX|buffer size|REPACK|system_info|flash" /tmp/o | head -8
run $B/llama-bench -m $M -p 32 -n 8 -r 1 -ngl 0 -fa 1 -ctk q4_0 -ctv q8_0
run $B/llama-bench -m $M -p 512 -n 8 -r 1 -ngl 0 -fa 0
run $B/llama-bench -m $M -p 512 -n 32 -r 1 -ngl 0 -fa 1 -ctk q4_0 -ctv q8_0
run $B/llama-bench -m $M -p 512 -n 32 -r 1 -ngl 0 -fa 1 -ctk f16 -ctv f16
run $B/llama-bench -m $M -p 512 -n 32 -r 1 -ngl 0 -fa 1 -ctk bf16 -ctv bf16
run $B/llama-bench -m $M -p 32 -n 8 -r 1 -ngl 0 -t 1
run $B/llama-bench -m $M -p 32 -n 8 -r 1 -ngl 0 -nr 1
run $B/llama-cli -m $M -p "abc" -n 16 -no-cnv --temp 0 -ngl 0 -fa on -ctk q4_0 -ctv q8_0
run $B/llama-cli -m $M -p "abc" -n 16 -no-cnv --temp 0 -ngl 0 -fa on -ctk q4_0 -ctv q8_0 -np 4 -c 4096
dmesg 2>/dev/null | grep -iE "trap|invalid opcode|segfault" | tail -5
echo "---- objdump of libggml-cpu: AMX / AVX512-FP16 instructions present?"
objdump -d $B/libggml-cpu.so 2>/dev/null | grep -cE "tileloadd|tdpbssd|ldtilecfg" 
objdump -d $B/libggml-cpu.so 2>/dev/null | grep -cE "vfmadd[0-9]+ph|vcvtph2psx|vaddph|vmulph"
