#!/usr/bin/env bash
# Fetch NVIDIA's perf_analyzer (the standard Open Inference Protocol load generator) into bench/.tools.
# PyPI's perf-analyzer is an empty placeholder; the binary that runs on glibc 2.36 ships inside the
# tritonclient 2.51.0 wheel. It needs libb64 (Debian libb64-0d) and libcudart (even on CPU).
# Prints the path of a wrapper script that sets LD_LIBRARY_PATH. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tools="$here/.tools"
wrapper="$tools/perf_analyzer"
if [[ -x "$wrapper" ]] && "$wrapper" --version >/dev/null 2>&1; then
  echo "$wrapper"; exit 0
fi
mkdir -p "$tools/dl" "$tools/lib"
python3 -m pip download --quiet --no-deps --dest "$tools/dl" "tritonclient==2.51.0" \
  --platform manylinux1_x86_64 --only-binary=:all: >&2
python3 -m pip download --quiet --no-deps --dest "$tools/dl" "nvidia-cuda-runtime-cu12" \
  --platform manylinux1_x86_64 --only-binary=:all: >&2
( cd "$tools/dl" && apt-get download libb64-0d >&2 )
python3 - "$tools" <<'PY'
import glob, os, shutil, sys, zipfile
tools = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{tools}/dl/tritonclient-2.51.0-*.whl")[0]) as wheel:
    with wheel.open("tritonclient-2.51.0.data/data/bin/perf_analyzer") as src, open(f"{tools}/perf_analyzer.bin", "wb") as dst:
        shutil.copyfileobj(src, dst)
with zipfile.ZipFile(glob.glob(f"{tools}/dl/nvidia_cuda_runtime_cu12-*.whl")[0]) as wheel:
    for name in wheel.namelist():
        if os.path.basename(name).startswith("libcudart.so.12"):
            with wheel.open(name) as src, open(f"{tools}/lib/libcudart.so.12", "wb") as dst:
                shutil.copyfileobj(src, dst)
os.chmod(f"{tools}/perf_analyzer.bin", 0o755)
PY
dpkg-deb -x "$tools"/dl/libb64-0d_*.deb "$tools/deb"
cp "$tools"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d* "$tools/lib/"
cat > "$wrapper" <<SH
#!/usr/bin/env bash
LD_LIBRARY_PATH="$tools/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$tools/perf_analyzer.bin" "\$@"
SH
chmod +x "$wrapper"
"$wrapper" --version >/dev/null 2>&1 || { echo "perf_analyzer does not run here" >&2; exit 1; }
echo "$wrapper"
