#!/usr/bin/env bash
# On the device machine, from the repo root: take what this call carried under .devcarry/ into
# /var/tmp/llmhost (outside the checkout, kept while the machine stays warm), unpack the source
# once, and join the model once every piece has arrived. Safe to run on every call.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
W=${LLMHOST_WORK:-/var/tmp/llmhost}
mkdir -p "$W/pieces" "$W/model"
carry=$repo/.devcarry

[ -f "$carry/manifest.txt" ] && cp "$carry/manifest.txt" "$W/manifest.txt"
[ -f "$W/manifest.txt" ] || { echo "receive: no manifest yet: carry .devcarry/manifest.txt first" >&2; exit 1; }

# kept as a file too: the deploy's llm_llamacpp_local_path (gpu_deploy.py) pushes it like a user's
if [ -f "$carry/llama.cpp.tar.gz" ] && [ ! -f "$W/llama.cpp.tar.gz" ]; then
  cp "$carry/llama.cpp.tar.gz" "$W/llama.cpp.tar.gz"
fi
if [ -f "$carry/llama.cpp.tar.gz" ] && [ ! -f "$W/llama.cpp/CMakeLists.txt" ]; then
  rm -rf "$W/llama.cpp" && mkdir -p "$W/llama.cpp"
  tar -C "$W/llama.cpp" -xzf "$carry/llama.cpp.tar.gz"
  echo "receive: source unpacked ($(du -sh "$W/llama.cpp" | cut -f1))"
fi

# each piece is checked against the manifest as it lands
while read -r kind file size sha; do
  [ "$kind" = piece ] || continue
  if [ -f "$carry/model/$file" ] && [ ! -f "$W/pieces/$file" ]; then
    got=$(sha256sum "$carry/model/$file" | cut -d' ' -f1)
    [ "$got" = "$sha" ] || { echo "receive: $file sha256 $got, expected $sha" >&2; exit 1; }
    cp "$carry/model/$file" "$W/pieces/$file"
  fi
done < "$W/manifest.txt"

read -r _ name size sha < <(grep '^model ' "$W/manifest.txt")
want=$(grep -c '^piece ' "$W/manifest.txt")
have=$(ls "$W/pieces" | wc -l)
if [ ! -f "$W/model/$name" ] && [ "$have" -eq "$want" ]; then
  cat "$W/pieces/$name".part-* > "$W/model/$name.tmp"
  got=$(sha256sum "$W/model/$name.tmp" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || { echo "receive: joined $name sha256 $got, expected $sha" >&2; exit 1; }
  mv "$W/model/$name.tmp" "$W/model/$name" && rm -rf "$W/pieces"/*
fi
echo "receive: source $( [ -f "$W/llama.cpp/CMakeLists.txt" ] && echo ready || echo missing);" \
     "model $( [ -f "$W/model/$name" ] && echo "ready ($size bytes, sha256 ok)" || echo "$have of $want pieces")"
