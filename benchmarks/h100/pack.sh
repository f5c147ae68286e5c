#!/usr/bin/env bash
# Prepare what the H100 proof carries (run here, from anywhere; writes <repo>/.devcarry/, git-ignored):
#   .devcarry/llama.cpp.tar.gz   llama.cpp at the pinned commit, trimmed to ~9 MB (NOTES.md)
#   .devcarry/manifest.txt       commit, build number, model sha256 and its pieces
#   .devcarry/model/<model>.part-0N  the GGUF in 5 pieces under 50 MB: the device tool carries
#                                at most 64 MiB per call, so one piece travels per call
# Usage: pack.sh [--dry-run]   (--dry-run checks inputs and prints the plan, writes nothing)
set -euo pipefail

SRC=${LLAMA_SRC:-/var/cache/llmhost/llama.cpp-0c1e57098bba}
MODEL=${MODEL:-/var/cache/llmhost/models/gemma-3-270m-q4_k_m.gguf}
MODEL_SHA256=${MODEL_SHA256:-a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818}
BUILD_NUMBER=${BUILD_NUMBER:-11312}
PIECES=${PIECES:-5}
repo=$(cd "$(dirname "$0")/../.." && pwd)
dest=$repo/.devcarry
dry=0; [ "${1:-}" = --dry-run ] && dry=1

# Trimmed as measured in NOTES.md; tools/ui/CMakeLists.txt must stay (configure reads it).
excludes=(--exclude=./.git --exclude=./docs --exclude=./models --exclude=./media
          --exclude=./benches --exclude=./tools/ui/src --exclude=./tools/ui/tests)

[ -f "$SRC/CMakeLists.txt" ] || { echo "pack: no llama.cpp checkout at $SRC" >&2; exit 1; }
[ -f "$SRC/tools/ui/CMakeLists.txt" ] || { echo "pack: $SRC/tools/ui/CMakeLists.txt missing" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "pack: no model at $MODEL" >&2; exit 1; }
commit=$(git -C "$SRC" rev-parse HEAD)
(cd "$repo" && git check-ignore -q .devcarry/model/piece) || { echo "pack: .devcarry/ is not git-ignored in $repo: it would travel on every call" >&2; exit 1; }
name=$(basename "$MODEL")
size=$(stat -c %s "$MODEL")
piece=$(( (size + PIECES - 1) / PIECES ))

if [ $dry = 1 ]; then
  echo "pack (dry run): source $SRC at $commit, build number $BUILD_NUMBER"
  echo "  tar -C $SRC -czf $dest/llama.cpp.tar.gz ${excludes[*]} ."
  echo "  trimmed tree: $(tar -C "$SRC" -cf - "${excludes[@]}" . | wc -c) bytes before gzip"
  echo "  model $MODEL: $size bytes in $PIECES pieces of <= $piece bytes under $dest/model/"
  exit 0
fi

rm -rf "$dest/model" "$dest/llama.cpp.tar.gz" "$dest/manifest.txt"
mkdir -p "$dest/model"
tar -C "$SRC" -czf "$dest/llama.cpp.tar.gz" "${excludes[@]}" .
tar -tzf "$dest/llama.cpp.tar.gz" ./tools/ui/CMakeLists.txt >/dev/null

actual=$(sha256sum "$MODEL" | cut -d' ' -f1)
[ "$actual" = "$MODEL_SHA256" ] || { echo "pack: $MODEL sha256 $actual, expected $MODEL_SHA256" >&2; exit 1; }
split -b "$piece" -d -a 2 "$MODEL" "$dest/model/$name.part-"

{
  echo "commit $commit"
  echo "build_number $BUILD_NUMBER"
  echo "model $name $size $MODEL_SHA256"
  (cd "$dest/model" && for f in "$name".part-*; do echo "piece $f $(stat -c %s "$f") $(sha256sum "$f" | cut -d' ' -f1)"; done)
} > "$dest/manifest.txt"

echo "pack: $(du -h "$dest/llama.cpp.tar.gz" | cut -f1) source, $(ls "$dest/model" | wc -l) model pieces"
cat "$dest/manifest.txt"
