#!/usr/bin/env bash
# The H100 proof through the project's own deploy (issue 6, point 8), on the lent device machine,
# from the repo root. Calls, back to back (README.md):
#   proof.sh setup   carry .whl .devcarry/llama.cpp.tar.gz .devcarry/manifest.txt: pyinfra from
#                    wheels, then `pyinfra inventory.py gpu_deploy.py` (LLMHOST_STAGE=build: facts,
#                    preflight, source, CUDA build) started in the background, so it builds while
#                    the model pieces arrive
#   proof.sh recv    carry one .devcarry/model piece: receive.sh, and the build's progress
#   proof.sh serve   wait for that build; the full deploy (model, key, unit) and its no-op rerun,
#                    timed; llama-bench; llama-server from the staged unit's ExecStart vs by hand
#                    with the guide's flags, alternated; the FlashAttention log check and control
#   proof.sh fa      LLMHOST_EXTRA_PAIR=q8_0-q8_0: one more FA pair builds beside the old build
#   proof.sh bench   carry the last model piece: wait for that build; the full deploy; the unit's
#                    server; decode by hand, `python -m operations.bench` (issue 7), decode by hand
#                    again, and the bench-vs-hand table (benchonly: the same on a deploy already there)
#   proof.sh deploy  carry the last model piece: wait for that build; the full deploy
#   proof.sh benchalt on a deploy already there: hand and bench blocks alternated (BLOCKS=3), so
#                    the machine's drift cancels out of the bench-vs-hand table
# Files land in $OUT (at most 8 a call); summary.txt has the figures.
set -uo pipefail
phase=${1:?usage: proof.sh setup|recv|serve|fa|bench|deploy|benchonly|benchalt}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$repo/benchmarks/h100
W=${LLMHOST_WORK:-/var/tmp/llmhost}
OUTDIR=${OUT:-$W/out}
mkdir -p "$OUTDIR"
export LLMHOST_WORK=$W PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
export PATH=/opt/torch/.venv/bin:/usr/local/cuda/bin:$PATH
summary=$OUTDIR/summary.txt
say() { echo "$*" | tee -a "$summary"; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
INV=benchmarks/h100/inventory.py
DEP=benchmarks/h100/gpu_deploy.py
CONF=$W/etc/llama

wheels() {
  if [ ! -d /tmp/site/pyinfra ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$repo"/.whl/*.whl || { echo "proof: wheel install failed" >&2; exit 1; }
  fi
  say "pyinfra $(python3 -c 'import importlib.metadata as m; print(m.version("pyinfra"))') from wheels, python $(python3 -c 'import sys; print(sys.version.split()[0])')"
}

# The deploy runs from a copy outside the checkout, so a call's re-sync cannot pull files from
# under a build that runs on between calls.
snapshot() {
  rm -rf "$W/repo" && mkdir -p "$W/repo/benchmarks"
  cp -r "$repo/operations" "$repo/files" "$repo/templates" "$W/repo/"
  cp -r "$here" "$W/repo/benchmarks/h100"
}

# deploy LOGFILE LABEL [VAR=VALUE...]: the real CLI, timed; appends to LOGFILE
deploy() {
  local log=$1 label=$2 t0 t1 rc; shift 2
  t0=$(now)
  (cd "$W/repo" && env "$@" python3 -m pyinfra "$INV" "$DEP" -y -v) >> "$log" 2>&1
  rc=$?
  t1=$(now)
  echo "=== $label: exit $rc in $(secs "$t0" "$t1") s" >> "$log"
  say "deploy $label: exit $rc, $(secs "$t0" "$t1") s wall; changed: $(changed_ops "$log" "$label")"
  return $rc
}

# Operations with a change in the last results table of LOGFILE (pyinfra's Success column)
changed_ops() {
  python3 - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read()
last = text.rsplit("--> Results:", 1)[-1] if "--> Results:" in text else ""
out = []
for line in last.splitlines():
    cells = re.split(r"\s{2,}", line.strip())
    if len(cells) >= 5 and cells[0] not in ("Operation", "Grand total") and cells[2] not in ("-", "Success", "0"):
        out.append(cells[0])
print("; ".join(out) or "none")
EOF
}

start_build() {
  say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader); $(nvcc --version | grep release); cmake $(cmake --version | head -1 | awk '{print $3}'); ninja $(ninja --version); $(nproc) cores; ccache: $(command -v ccache || echo absent)"
  snapshot
  rm -f "$W/deploy-1.log" "$W/deploy-1.done"
  # setsid: the build outlives this call (the machine stays warm while pieces arrive)
  setsid bash -c '
    t0=$(date +%s.%N)
    cd "$LLMHOST_WORK/repo" && LLMHOST_STAGE=build python3 -m pyinfra '"$INV $DEP"' -y -v > "$LLMHOST_WORK/deploy-1.log" 2>&1
    echo "$? $t0 $(date +%s.%N)" > "$LLMHOST_WORK/deploy-1.done"' < /dev/null > /dev/null 2>&1 &
  say "deploy 1 (LLMHOST_STAGE=build) started in the background, pid $!"
}

progress() {
  [ -f "$W/deploy-1.log" ] && { echo "--- deploy-1.log (last lines)"; tail -n 6 "$W/deploy-1.log"; }
  [ -f "$W/deploy-1.done" ] && echo "deploy 1 done: $(cat "$W/deploy-1.done")"
  return 0
}

wait_build() {
  local waited=0
  while [ ! -f "$W/deploy-1.done" ] && [ $waited -lt "${1:-420}" ]; do
    sleep 10; waited=$((waited + 10))
    [ $((waited % 60)) = 0 ] && tail -n 1 "$W/deploy-1.log"
  done
  [ -f "$W/deploy-1.done" ] || { echo "proof: deploy 1 still running after ${1:-420} s" >&2; tail -20 "$W/deploy-1.log"; exit 1; }
  read -r rc t0 t1 < "$W/deploy-1.done"
  { echo "### deploy 1: LLMHOST_STAGE=build, from nothing"; cat "$W/deploy-1.log"; echo "=== deploy 1: exit $rc in $(secs "$t0" "$t1") s"; } >> "$OUTDIR/deploy.log"
  say "deploy 1 (stage build, from nothing): exit $rc, $(secs "$t0" "$t1") s wall; changed: $(changed_ops "$W/deploy-1.log")"
  say "  $(grep -m1 'preflight:' "$W/deploy-1.log")"
  say "  $(grep -m1 'build plan:' "$W/deploy-1.log" | cut -c1-400)"
  grep -E 'configure: done|build: done|system_info:|verified:|check failed' "$W/deploy-1.log" | sed 's/^/  /' | tee -a "$summary"
  [ "$rc" = 0 ] || { tail -40 "$W/deploy-1.log"; exit 1; }
}

server_pid=
# serve KIND LOG -- ARGV...: start llama-server (KIND unit: through unit_exec.py)
start_server() {
  local log=$1; shift
  echo "### $(date -u +%H:%M:%S) $*" >> "$log"
  "$@" >> "$log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
}
stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}

# measure LABEL PORT LOG [KEYFILE] -- start command...
measure() {
  local label=$1 port=$2 log=$3 key=$4; shift 5
  start_server "$log" "$@"
  local keyarg=(); [ -n "$key" ] && keyarg=(--api-key-file "$key")
  if timeout 300 python3 "$here/decode_client.py" --port "$port" --parallel 1 4 --tokens 256 \
       --rounds "${ROUNDS:-5}" --health-timeout 120 "${keyarg[@]}" > "$W/decode.tmp"; then
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["run"]=sys.argv[2]; print(json.dumps(d))' \
      "$W/decode.tmp" "$label" | tee -a "$OUTDIR/decode.jsonl"
  else
    say "decode $label FAILED"; tail -30 "$log"
  fi
  stop_server
}

phase_serve() {
  bash "$here/receive.sh" || exit 1
  wait_build 420
  snapshot
  { echo; echo "### deploy 2: full (model, key, unit), build already there"; } >> "$OUTDIR/deploy.log"
  deploy "$OUTDIR/deploy.log" "2 (full)" || { tail -40 "$OUTDIR/deploy.log"; exit 1; }
  { echo; echo "### deploy 3: rerun, nothing changed"; } >> "$OUTDIR/deploy.log"
  deploy "$OUTDIR/deploy.log" "3 (rerun, nothing changed)" || exit 1
  say "  build op in the rerun: $(grep -E 'noop: llama.cpp (build|source)' "$OUTDIR/deploy.log" | tail -n 2 | tr -s ' ' | tr '\n' '|')"

  local B MODEL KEY UNIT ARGV
  B=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["llama_cpp"]["build_dir"])' "$CONF/llmhost.json")
  MODEL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["services"][0]["model_path"])' "$CONF/llmhost.json")
  KEY=$CONF/keys/main.key UNIT=$CONF/units/llama-main.service ARGV=$CONF/units/main.argv.json
  say "build dir $B; marker: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["seconds"], "s recorded;", d["version"])' "$B/.llmhost-build.json")"
  say "system_info (llama-server -lv 4, as the build helper reads it): $("$B/bin/llama-server" -lv 4 --host 127.0.0.1 --port 0 --model /nonexistent.gguf 2>&1 | grep -m1 -o 'system_info:.*' | cut -c1-300)"
  say "GPU device nodes: $(ls -l /dev/nvidia* 2>/dev/null | awk '{print $1, $NF}' | tr '\n' ' ')"
  say "unit: $(grep -E '^(ExecStart|User|LimitMEMLOCK|Environment)=' "$UNIT" | tr '\n' '|')"
  python3 "$here/unit_exec.py" "$UNIT" "$ARGV" --check 2>&1 | tee -a "$summary"
  grep -m1 'FlashAttention K-V type combinations' "$B.log" | tee -a "$summary"
  { echo "# host-side build log $B.log: configure, first and last ninja lines"; sed -n '1,/^\$ cmake --build/p' "$B.log"; grep -m3 '^\[' "$B.log"; tail -n 5 "$B.log"; } > "$OUTDIR/build-host.log"

  say "--- llama-bench (the deploy's build, $B/bin/llama-bench)"
  timeout 300 "$B/bin/llama-bench" -m "$MODEL" -p 512 -n 128 -ngl 99 -fa 1 -ctk q4_0 -ctv q8_0 -o md \
    2> "$W/bench.err" | tee "$OUTDIR/llama-bench.md" | tee -a "$summary"
  say "llama-bench FA fallback lines: $(grep -c 'no FlashAttention vector kernel compiled' "$W/bench.err")"

  say "--- served decode: unit argv (User=llama via unit_exec.py) and by hand (guide's flags), alternated"
  local hand_port=18090
  local hand=("$B/bin/llama-server" -m "$MODEL" -ngl 99 -c 131072 -np 4 --host 127.0.0.1 --port "$hand_port"
              --flash-attn on -ctk q4_0 -ctv q8_0 --load-mode mmap+mlock --cont-batching --cache-prompt
              --reasoning-format deepseek)
  for i in 1 2 3; do
    measure "unit-$i" 18082 "$OUTDIR/server-unit.log" "$KEY" -- python3 "$here/unit_exec.py" "$UNIT" "$ARGV"
    measure "hand-$i" "$hand_port" "$OUTDIR/server-hand.log" "" -- "${hand[@]}"
  done
  python3 - "$OUTDIR/decode.jsonl" <<'EOF' | tee -a "$summary"
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
def pool(kind, par, field="all_decode_tok_s"):
    values = [v for r in runs if r["run"].startswith(kind)
              for v in (r[str(par)][field] if isinstance(r[str(par)][field], list) else [r[str(par)][field]])]
    return statistics.median(values) if values else float("nan")
for r in runs:
    print(f"{r['run']}: health {r['health_s']} s; 1 request {r['1']['decode_tok_s']} tok/s "
          f"(wall {r['1']['wall_tok_s']}); 4 parallel {r['4']['decode_tok_s']} tok/s aggregate "
          f"(wall {r['4']['wall_tok_s']}); rounds {r['1']['all_decode_tok_s']} / {r['4']['all_decode_tok_s']}")
u1, h1, u4, h4 = pool("unit", 1), pool("hand", 1), pool("unit", 4), pool("hand", 4)
print(f"median over all rounds: unit 1 req {u1:.1f}, hand 1 req {h1:.1f}; unit 4 par {u4:.1f}, hand 4 par {h4:.1f} tok/s")
print(f"unit/hand-run decode ratio: {u1 / h1:.2f}")
print(f"unit/hand-run decode ratio, 4 parallel: {u4 / h4:.2f}")
uw, hw = pool("unit", 1, "wall_tok_s"), pool("hand", 1, "wall_tok_s")
print(f"unit/hand-run wall ratio, 1 request (HTTP, API key check and prompt included): {uw / hw:.2f}")
EOF

  say "--- GPU evidence (first unit run's log)"
  grep -m8 -E 'offloaded [0-9]+/[0-9]+ layers|CUDA0 KV buffer|flash_attn|graph splits|CUDA0 model buffer|using device CUDA0' "$OUTDIR/server-unit.log" | sed 's/^/  /' | tee -a "$summary"
  say "unit_exec lines: $(grep -m3 '^unit_exec' "$OUTDIR/server-unit.log" | cut -c1-200 | tr '\n' '|')"
  say "FA fallback lines (q4_0-q8_0): unit logs $(grep -c 'no FlashAttention vector kernel compiled' "$OUTDIR/server-unit.log"), hand logs $(grep -c 'no FlashAttention vector kernel compiled' "$OUTDIR/server-hand.log")"

  # control: a pair this build lacks must log the line, or the check above proves nothing
  start_server "$OUTDIR/server-control.log" "$B/bin/llama-server" -m "$MODEL" -ngl 99 -c 4096 -np 1 \
    --host 127.0.0.1 --port 18091 --flash-attn on -ctk q8_0 -ctv q4_0
  timeout 120 python3 "$here/decode_client.py" --port 18091 --parallel 1 --tokens 32 --rounds 1 > /dev/null \
    || tail -20 "$OUTDIR/server-control.log"
  stop_server
  say "control q8_0-q4_0 (not compiled): $(grep -c 'no FlashAttention vector kernel compiled' "$OUTDIR/server-control.log") fallback line(s): $(grep -m1 -o 'no FlashAttention vector kernel compiled.*' "$OUTDIR/server-control.log" | cut -c1-160)"
}

phase_fa() {
  snapshot
  local before after
  before=$(grep -m1 -o '^ExecStart=[^ ]*' "$CONF/units/llama-main.service")
  { echo "### deploy 4: LLMHOST_EXTRA_PAIR=q8_0-q8_0 (service alt: K=q8_0 V=q8_0)"; } >> "$OUTDIR/deploy-fa.log"
  deploy "$OUTDIR/deploy-fa.log" "4 (adds FA pair q8_0-q8_0)" LLMHOST_EXTRA_PAIR=q8_0-q8_0 || { tail -40 "$OUTDIR/deploy-fa.log"; exit 1; }
  grep -E 'build plan:|configure: done|build: done|system_info:|verified:' "$OUTDIR/deploy-fa.log" | cut -c1-400 | sed 's/^/  /' | tee -a "$summary"
  after=$(grep -m1 -o '^ExecStart=[^ ]*' "$CONF/units/llama-main.service")
  say "llama-main ExecStart binary before: ${before#ExecStart=}; after: ${after#ExecStart=}"
  say "llama-alt ExecStart binary: $(grep -m1 -o '^ExecStart=[^ ]*' "$CONF/units/llama-alt.service" | cut -d= -f2)"
  say "builds: $(for d in "$W"/opt/llama.cpp/builds/*/; do printf '%s (marker %s) ' "$(basename "$d")" "$([ -f "$d/.llmhost-build.json" ] && echo yes || echo no)"; done)"
  { echo; echo "### deploy 5: rerun with the pair"; } >> "$OUTDIR/deploy-fa.log"
  deploy "$OUTDIR/deploy-fa.log" "5 (rerun with the pair)" LLMHOST_EXTRA_PAIR=q8_0-q8_0
}

# The acceptance bench (issue 7) on the deploy's own service, started from its staged unit, with
# the same decode measured by hand (decode_client.py) just before and just after it. At most 8
# files in $OUT: summary.txt (figures and the bench-vs-hand table), deploy.log, bench.log, the
# bench's local.json (its @local.json: '@' cannot come back), report.md, the two plots, logs.tar.gz.
bench_run() {
  local L=$W/benchlogs B MODEL KEY UNIT ARGV PORT T=${TOKENS:-256} R=${ROUNDS:-20} rc spid
  rm -rf "$L" && mkdir -p "$L"
  B=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["llama_cpp"]["build_dir"])' "$CONF/llmhost.json")
  MODEL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["services"][0]["model_path"])' "$CONF/llmhost.json")
  PORT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["services"][0]["port"])' "$CONF/llmhost.json")
  KEY=$CONF/keys/main.key UNIT=$CONF/units/llama-main.service ARGV=$CONF/units/main.argv.json
  say "bench run: $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null || echo no GPU); $(nproc) cores; build $B"
  python3 "$here/unit_exec.py" "$UNIT" "$ARGV" --check 2>&1 | tee -a "$summary"
  start_server "$L/server-unit.log" python3 "$here/unit_exec.py" "$UNIT" "$ARGV"
  spid=$server_pid
  hand() {
    timeout 300 python3 "$here/decode_client.py" --port "$PORT" --parallel 1 2 4 --tokens "$T" \
      --rounds "$R" --health-timeout 120 --api-key-file "$KEY" --reset-slots 4 > "$L/hand-$1.json" \
      && say "hand $1: $(cat "$L/hand-$1.json")" || say "hand $1 FAILED"
  }
  hand before
  say "GPU processes: $(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null | tr '\n' '|')"
  say "server: pid $spid ($(tr '\0' ' ' < /proc/$spid/cmdline | cut -c1-60)...), user $(stat -c %U /proc/$spid)"

  say "--- python -m operations.bench (from $W/repo, the deploy's snapshot)"
  local cmd=(python3 -m operations.bench "$INV" --out "$L/bench-out" --decode-tokens "$T" --rounds "$R"
             --parallel 1 2 4 --restart --kv-sweep --time-budget "${BUDGET:-600}" ${NEEDLE_MAX:+--needle-max "$NEEDLE_MAX"})
  say "command: (cd $W/repo && ${cmd[*]})"
  (cd "$W/repo" && timeout 900 "${cmd[@]}") 2>&1 | tee "$OUTDIR/bench.log"
  rc=${PIPESTATUS[0]}
  say "operations.bench exit $rc"
  if ! python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["services"] else 1)' \
       "$L/bench-out/@local.json" 2>/dev/null; then
    mv "$L/bench-out" "$L/bench-out-failed" 2>/dev/null
    say "operations.bench wrote no JSON: fallback, bench_service.py directly with --pid $spid, then bench_report"
    (cd "$W/repo" && timeout 900 python3 files/bench_service.py --manifest "$CONF/llmhost.json" --service main \
      --out "$L/direct.json" --decode-tokens "$T" --rounds "$R" --parallel 1 2 4 --restart --kv-sweep \
      --time-budget "${BUDGET:-600}" --pid "$spid" ${NEEDLE_MAX:+--needle-max "$NEEDLE_MAX"}) 2>&1 | tee -a "$OUTDIR/bench.log"
    (cd "$W/repo" && python3 - "$L/direct.json" "$L/bench-out" <<'PY') 2>&1 | tee -a "$summary"
import json, sys
from pathlib import Path
from operations import bench
result = json.load(open(sys.argv[1])); result["inventory_host"] = "@local"
fleet = {"@local": {"services": [result], "error": None}}
out = Path(sys.argv[2])
bench.write_outputs(fleet, out, "files/bench_service.py --service main --pid PID (direct, see bench.log)", result["started"])
(out / "@local.json").write_text(json.dumps({"host": "@local", **fleet["@local"]}, indent=1) + "\n")
print("rendered with operations.bench.write_outputs")
PY
  fi
  hand after
  kill -0 "$spid" 2>/dev/null && say "server pid $spid still up after the bench (not restarted)" || say "server pid $spid GONE"
  stop_server

  python3 - "$L/bench-out/@local.json" "$L/hand-before.json" "$L/hand-after.json" "$spid" <<'PY' | tee -a "$summary"
import json, statistics, sys
host = json.load(open(sys.argv[1]))
res = host["services"][0]
hands = {}
for name, path in (("before", sys.argv[2]), ("after", sys.argv[3])):
    try:
        hands[name] = json.load(open(path))
    except (OSError, ValueError):
        hands[name] = None
svc = res["service"]
print(f"bench service pid {svc.get('main_pid')} ({svc.get('pid_source')}); server started as pid {sys.argv[4]}")
eng = res.get("engine") or {}
print(f"llama-bench (from the bench): pp512 {eng.get('pp512_tok_s')} ± {eng.get('pp512_stddev')}, "
      f"tg128 {eng.get('tg128_tok_s')} ± {eng.get('tg128_stddev')} tok/s; argv {' '.join(eng.get('argv', []))}")
paired = eng.get("paired") or {}
if "pairs" in paired:
    print(f"engine ceiling, served / tg128 alternated {len(paired['pairs'])} times: median "
          f"{paired['served_over_tg128']:.3f}, pairs " + ", ".join(
              f"{p['served_tok_s']:.1f}/{p['tg128_tok_s']:.1f}" for p in paired["pairs"]))
else:
    print(f"engine ceiling, alternated: {paired}")
print(f"startup: {res.get('startup')}")
print(f"errors: {res.get('errors')}")
print()
print("| parallel | measure | bench | hand before | hand after | hand pooled | bench / before | bench / after | bench / pooled |")
print("|---|---|---|---|---|---|---|---|---|")
worst = 0.0
def r(a, b):
    return f"{a / b:.3f}" if a and b else "—"
for level in res["decode"]["levels"]:
    n = level["parallel"]
    bench_sum = statistics.median(r_["sum_of_rates_tok_s"] for r_ in level["rounds"])
    rows = (("per request", level["per_request_tok_s"], "per_request_tok_s", "all_per_request_tok_s"),
            ("aggregate", level["aggregate_tok_s"], "span_tok_s", "all_span_tok_s"),
            ("sum of rates", bench_sum, "decode_tok_s", "all_decode_tok_s"))
    for label, b, field, allf in rows:
        vals, pool = [], []
        for name in ("before", "after"):
            h = (hands[name] or {}).get(str(n))
            vals.append(h[field] if h else None)
            pool += h[allf] if h else []
        p = statistics.median(pool) if pool else None
        if p and label != "sum of rates":
            worst = max(worst, abs(b / p - 1))
        f = lambda v: f"{v:.1f}" if v else "—"
        print(f"| {n} | {label} | {b:.1f} | {f(vals[0])} | {f(vals[1])} | {f(p)} | {r(b, vals[0])} | {r(b, vals[1])} | {r(b, p)} |")
print()
print("bench: median over its rounds; hand before / after: decode_client.py median over its rounds; "
      "hand pooled: median over the rounds of both hand runs; per request = median timings.predicted_per_second "
      "of a round; aggregate = tokens / span of the decode intervals; sum of rates = sum of predicted_per_second")
print(f"hand slots reset: before {(hands['before'] or {}).get('reset_slots')}, after {(hands['after'] or {}).get('reset_slots')}")
print(f"largest bench / hand-pooled deviation (per request and aggregate): {worst:.1%} (target within 5%)")
wall = {n: [(hands[k] or {}).get(str(n), {}).get("wall_tok_s") for k in ("before", "after")] for n in (1, 2, 4)}
print(f"hand client wall-clock tok/s (prompt and HTTP included), before/after: {wall}")
PY

  cp "$L/bench-out/@local.json" "$OUTDIR/local.json" 2>/dev/null
  for f in report.md throughput.png context.png; do cp "$L/bench-out/$f" "$OUTDIR/$f" 2>/dev/null || say "no $f"; done
  grep -c 'no FlashAttention vector kernel compiled' "$L/server-unit.log" | sed 's/^/FA fallback lines in the server log: /' | tee -a "$summary"
  tar -C "$L" -czf "$OUTDIR/logs.tar.gz" --exclude=bench-out . 2>/dev/null
  ls -la "$OUTDIR"
}

# The bench-vs-hand check with the machine's drift cancelled: hand, bench, hand, bench, ... hand
# (BLOCKS bench blocks, each between two hand blocks), the same server throughout. Per level, the
# medians over every bench round and every hand round are compared, and each bench block with the
# mean of the hand blocks on either side. Block 1 is the full bench (its report and plots come
# back); later blocks measure decode with the needle capped and no K/V sweep, to fit one call.
bench_alternated() {
  local L=$W/benchlogs B MODEL KEY UNIT ARGV PORT T=${TOKENS:-256} R=${ROUNDS:-20} N=${BLOCKS:-3} spid i
  rm -rf "$L" && mkdir -p "$L"
  MODEL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["services"][0]["model_path"])' "$CONF/llmhost.json")
  PORT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["services"][0]["port"])' "$CONF/llmhost.json")
  KEY=$CONF/keys/main.key UNIT=$CONF/units/llama-main.service ARGV=$CONF/units/main.argv.json
  say "bench alternated: $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null || echo no GPU); $N bench blocks, $R rounds of $T tokens each"
  start_server "$L/server-unit.log" python3 "$here/unit_exec.py" "$UNIT" "$ARGV"
  spid=$server_pid
  hand() {
    timeout 300 python3 "$here/decode_client.py" --port "$PORT" --parallel 1 2 4 --tokens "$T" \
      --rounds "$R" --health-timeout 120 --api-key-file "$KEY" --reset-slots 4 > "$L/hand-$1.json" \
      && say "hand $1 done $(date -u +%T)" || say "hand $1 FAILED"
  }
  hand 0
  for i in $(seq 1 "$N"); do
    local extra=(--kv-sweep)
    [ "$i" -gt 1 ] && extra=(--needle-max 2048 --ceiling-pairs 0)
    local cmd=(python3 -m operations.bench "$INV" --out "$L/bench-$i" --decode-tokens "$T" --rounds "$R"
               --parallel 1 2 4 --time-budget "${BUDGET:-600}" "${extra[@]}")
    say "bench $i: (cd $W/repo && ${cmd[*]})"
    (cd "$W/repo" && timeout 600 "${cmd[@]}") >> "$OUTDIR/bench.log" 2>&1
    say "bench $i exit $? $(date -u +%T)"
    hand "$i"
  done
  kill -0 "$spid" 2>/dev/null && say "server pid $spid up throughout (never restarted)" || say "server pid $spid GONE"
  stop_server
  python3 - "$L" "$N" <<'PY' | tee -a "$summary"
import json, statistics, sys
from pathlib import Path
L, N = Path(sys.argv[1]), int(sys.argv[2])
bench = [json.load(open(L / f"bench-{i}/@local.json"))["services"][0] for i in range(1, N + 1)]
hand = [json.load(open(L / f"hand-{i}.json")) for i in range(N + 1)]
print("per request = timings.predicted_per_second of a request, median in a round; aggregate = tokens / "
      "span of the decode intervals; bench and hand pooled = median over every round of every block")
print()
print("| parallel | measure | bench pooled | hand pooled | bench / hand | each bench block / mean of its two hand blocks |")
print("|---|---|---|---|---|---|")
worst = 0.0
for n in (1, 2, 4):
    for label, bfield, hfield in (("per request", "per_request_tok_s", "all_per_request_tok_s"),
                                  ("aggregate", "aggregate_tok_s", "all_span_tok_s")):
        b_rounds = [r[bfield] for res in bench for lv in res["decode"]["levels"] if lv["parallel"] == n
                    for r in lv["rounds"]]
        h_rounds = [v for h in hand for v in h[str(n)][hfield]]
        bp, hp = statistics.median(b_rounds), statistics.median(h_rounds)
        worst = max(worst, abs(bp / hp - 1))
        blocks = []
        for i, res in enumerate(bench):
            lv = next(lv for lv in res["decode"]["levels"] if lv["parallel"] == n)
            around = (statistics.median(hand[i][str(n)][hfield]) + statistics.median(hand[i + 1][str(n)][hfield])) / 2
            blocks.append(f"{lv[bfield] / around:.3f}")
        print(f"| {n} | {label} | {bp:.1f} | {hp:.1f} | {bp / hp:.3f} | {' / '.join(blocks)} |")
print()
print(f"largest pooled bench / hand deviation: {worst:.1%} (target within 5%)")
hands1 = [statistics.median(h["1"]["all_per_request_tok_s"]) for h in hand]
print(f"hand blocks, 1 request, median per block: {', '.join(f'{v:.1f}' for v in hands1)} (drift)")
paired = (bench[0].get("engine") or {}).get("paired") or {}
if "pairs" in paired:
    print(f"engine ceiling (block 1), served / tg128 alternated {len(paired['pairs'])} times: median "
          f"{paired['served_over_tg128']:.3f}")
PY
  cp "$L/bench-1/@local.json" "$OUTDIR/local.json" 2>/dev/null
  for f in report.md throughput.png context.png; do cp "$L/bench-1/$f" "$OUTDIR/$f" 2>/dev/null || say "no $f"; done
  tar -C "$L" -czf "$OUTDIR/logs.tar.gz" . 2>/dev/null
}

phase_bench() {
  bash "$here/receive.sh" || exit 1
  wait_build "${BUILD_WAIT:-420}"
  snapshot
  { echo; echo "### deploy 2: full (model, key, unit), build already there"; } >> "$OUTDIR/deploy.log"
  deploy "$OUTDIR/deploy.log" "2 (full)" || { tail -40 "$OUTDIR/deploy.log"; exit 1; }
  bench_run
}

case $phase in
  setup) wheels; bash "$here/receive.sh" && start_build; sleep "${SETUP_WAIT:-25}"; progress ;;
  recv) bash "$here/receive.sh"; progress ;;
  serve) phase_serve ;;
  fa) phase_fa ;;
  bench) phase_bench ;;                 # issue 7: the deploy, then the bench and the hand decode
  deploy) bash "$here/receive.sh" || exit 1; wait_build "${BUILD_WAIT:-420}"; snapshot
          deploy "$OUTDIR/deploy.log" "2 (full)" || { tail -40 "$OUTDIR/deploy.log"; exit 1; }
          tail -3 "$OUTDIR/deploy.log" ;;  # the deploy alone, for benchalt in the next call
  benchonly) snapshot; bench_run ;;     # the same on a deploy already there
  benchalt) snapshot; bench_alternated ;;  # hand and bench blocks alternated, on a deploy already there
  lib) ;;  # sourced by a test: functions only
  *) echo "usage: proof.sh setup|recv|serve|fa|bench|deploy|benchonly|benchalt" >&2; exit 2 ;;
esac
