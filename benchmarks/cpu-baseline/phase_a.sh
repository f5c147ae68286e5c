#!/bin/bash
# On the GPU machine: the CPU-only build through the helper (auto), its no-op rerun, the
# self-test's seconds, and the tiny model's output through llama-server (finite?).
export PATH=/opt/torch/.venv/bin:/usr/local/cuda/bin:$PATH
python3 --version; cmake --version | head -1; which ccache || echo "no ccache"
lscpu | grep -iE 'model name|hypervisor|^CPU\(s\)'
echo "cpuinfo flags:"; grep -m1 -o -w -E 'avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
tar xzf .devcarry/wt-cpu/llama.cpp.tar.gz -C /tmp
s=$(date +%s%N); bash .devcarry/wt-cpu/build_cpu.sh > $OUT/build_cpu.out 2>&1; rc=$?
echo "helper rc=$rc in $(( ($(date +%s%N)-s)/1000000 )) ms"
grep -E "CPU self-test|faults|built for|verified|failed|done in" $OUT/build_cpu.out
s=$(date +%s%N); bash .devcarry/wt-cpu/build_cpu.sh; echo "rerun rc=$? in $(( ($(date +%s%N)-s)/1000000 )) ms"
cp /tmp/builds/cpu/.llmhost-build.json $OUT/marker_cpu.json; cp /tmp/builds/cpu.log $OUT/cpu.log
B=/tmp/builds/cpu/bin
for i in 1 2 3; do s=$(date +%s%N); CUDA_VISIBLE_DEVICES= $B/llama-bench -m /tmp/builds/cpu/selftest.gguf -p 32 -n 8 -r 1 -ngl 0 -o jsonl > /dev/null 2>&1; echo "selftest rc=$? $(( ($(date +%s%N)-s)/1000000 )) ms"; done
for t in 2 1; do s=$(date +%s%N); CUDA_VISIBLE_DEVICES= $B/llama-bench -t $t -m /tmp/builds/cpu/selftest.gguf -p 32 -n 8 -r 1 -ngl 0 -o jsonl > /dev/null 2>&1; echo "selftest -t $t rc=$? $(( ($(date +%s%N)-s)/1000000 )) ms"; done
$B/llama-server -m /tmp/builds/cpu/selftest.gguf --host 127.0.0.1 --port 18555 -c 256 -np 1 > $OUT/server.log 2>&1 &
pid=$!
python3 - <<'PY'
import json, math, time, urllib.request
for _ in range(60):
    try:
        urllib.request.urlopen("http://127.0.0.1:18555/health", timeout=2); break
    except Exception: time.sleep(0.5)
body = json.dumps({"prompt": "abc def", "n_predict": 8, "n_probs": 5, "temperature": 0}).encode()
r = json.load(urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:18555/completion", data=body), timeout=60))
probs = [p["logprob"] for step in r["completion_probabilities"] for p in step["top_logprobs"]]
print("completion tokens", r["tokens_predicted"], "content", repr(r["content"]))
print("top logprobs finite:", all(math.isfinite(p) for p in probs), "n", len(probs), "min", min(probs), "max", max(probs))
PY
kill $pid; wait $pid 2>/dev/null
grep -E "system_info|load_tensors|repack|AMX|CPU_REPACK" $OUT/server.log | head -12
