#!/usr/bin/env bash
# Compile and link the CUDA kernels of the ladder extension (csrc/*.cu) with this
# machine's nvcc for one GPU architecture, then load the library, so that a CUDA source
# error (or an undefined symbol) fails CI on a machine without a GPU. ptxas reports
# every kernel's registers, stack frame and spills (-Xptxas -v); any spill fails the
# check. Nothing is installed: the build goes to a temporary directory.
#
#   PYTHON=.venv/bin/python scripts/check_cuda_compile.sh
#
# PYTHON: interpreter with torch and an installed vpeft (default: python).
# VPEFT_CHECK_ARCH: TORCH_CUDA_ARCH_LIST for the check (default 9.0, H100).
# No nvcc: skipped with a message, or a failure when VPEFT_REQUIRE_CUDA_CHECK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
    if [ "${VPEFT_REQUIRE_CUDA_CHECK:-0}" = "1" ]; then
        echo "check_cuda_compile: no nvcc and no CUDA_HOME, but VPEFT_REQUIRE_CUDA_CHECK=1" >&2
        exit 1
    fi
    echo "check_cuda_compile: no nvcc on this machine; CUDA sources not checked"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
VPEFT_PTXAS_VERBOSE=1 VPEFT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${VPEFT_CHECK_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" setup.py build_ext --build-temp "$tmp/temp" --build-lib "$tmp/lib" >"$tmp/build.log" 2>&1 || {
    grep -E "error|FAILED" "$tmp/build.log" | head -40 >&2 || true
    echo "check_cuda_compile: CUDA build FAILED (full log above the error lines was in $tmp/build.log)" >&2
    tail -40 "$tmp/build.log" >&2
    exit 1
}
# ptxas -v: one "Compiling entry function" / "Used N registers" / "spill" group per kernel
"$PY" - "$tmp/build.log" <<'PYEOF'
import re, shutil, subprocess, sys
log = open(sys.argv[1], errors="replace").read()
rows, name, spills = [], None, []
for line in log.splitlines():
    m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
    if m:
        name = m.group(1), m.group(2)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        stack, st, ld = map(int, m.groups())
        rows.append([name[0], name[1], None, stack, st, ld])
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and rows and rows[-1][0] == name[0] and rows[-1][2] is None:
        rows[-1][2] = int(m.group(1))
if not rows:
    sys.exit("check_cuda_compile: no ptxas -v report in the build log (was -Xptxas -v passed?)")
filt = shutil.which("c++filt")
for r in rows:
    pretty = subprocess.run([filt, r[0]], capture_output=True, text=True).stdout.strip() if filt else r[0]
    pretty = re.sub(r"\(.*", "", pretty.replace("(anonymous namespace)::", ""))
    print(f"check_cuda_compile: {r[1]} {pretty[:90]:<90} regs {r[2]:>3}  stack {r[3]:>4} B  "
          f"spill {r[4]}/{r[5]} B")
bad = [r for r in rows if r[4] or r[5]]
if bad:
    sys.exit(f"check_cuda_compile: {len(bad)} CUDA kernels spill registers (see above)")
print(f"check_cuda_compile: {len(rows)} CUDA kernels, no register spills")
PYEOF
# Load the CUDA library beside the installed CPU one (which defines the op schemas).
"$PY" - "$tmp/lib/vpeft_kernels" <<'PYEOF'
import glob, importlib.util, json, sys
import vpeft_kernels, torch  # noqa: F401  (loads vpeft_kernels._C: the schemas)
if not vpeft_kernels.extension_status()["available"]:
    sys.exit("check_cuda_compile: the installed CPU extension is not loaded: "
             + vpeft_kernels.extension_status()["summary"])
path, = glob.glob(sys.argv[1] + "/_C_cuda*.so")
spec = importlib.util.spec_from_file_location("vpeft_kernels._C_cuda", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
info = json.loads(mod.build_info())
assert info["cuda_kernels"], info
assert torch._C._dispatch_has_kernel_for_dispatch_key("vpeft_ext::ladder_forward", "CUDA")
assert torch._C._dispatch_has_kernel_for_dispatch_key("vpeft_ext::ladder_backward", "CUDA")
print(f"check_cuda_compile: CUDA kernels compile, link and load (nvcc {info['nvcc']}, "
      f"arch {info['arch_list']}, torch {info['torch']}, CUDA headers {mod.cudart_version()})")
PYEOF
echo "check_cuda_compile: done in $(( $(date +%s) - start )) s"
