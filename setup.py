"""Build script. Package metadata lives in pyproject.toml; this file builds the compiled
ladder-projection extension in csrc/ against the torch that is already installed:

    pip install torch torchvision setuptools wheel
    pip install --no-build-isolation -e ".[dev]"

(With build isolation pip would build against a fresh torch in a throwaway
environment; there torch is absent, so the package installs without the extension and
vpeft_kernels falls back to eager, saying why in ``backend_status()``.)

Extensions:
* ``vpeft_kernels._C``: op schemas and the CPU kernels. Always built when torch is
  importable at build time.
* ``vpeft_kernels._C_cuda``: the CUDA kernels. ``VPEFT_BUILD_CUDA=1`` forces it (fails
  without a CUDA toolkit or with a CPU-only torch), ``0`` skips it; unset (auto) builds it
  when a CUDA toolkit is found, torch is a CUDA build, and either a GPU is visible or
  ``TORCH_CUDA_ARCH_LIST`` names the target GPUs. A toolkit on a machine without a GPU
  (CI here) therefore does not cost a CUDA build at install; CI compile-checks the
  ``.cu`` sources separately (scripts/check_cuda_compile.sh).
* ``VPEFT_BUILD_EXTENSION=0`` skips both (pure Python install, eager/Triton only).
Parallel compile jobs follow ``MAX_JOBS`` (torch's convention).
"""
import json
import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _say(msg):
    print(f"vpeft setup: {msg}", file=sys.stderr)


def _env_switch(name):
    """'1' -> True, '0' -> False, unset/'auto' -> None."""
    v = os.environ.get(name, "").strip().lower()
    if v in ("", "auto"):
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"vpeft setup: {name}={v!r}; expected 0, 1 or auto")


def _nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if "release" in line:
            return line.split("release")[-1].split(",")[0].strip()
    return None


def _locate_cuda_home():
    """torch guesses the toolkit as dirname(dirname(which nvcc)); with nvcc symlinked or
    wrapped into /usr/local/bin that is /usr/local, which has no CUDA headers. Ask nvcc
    where it lives (its --dryrun prints TOP=<toolkit>/bin/..), unless CUDA_HOME or
    CUDA_PATH is set."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ TOP="):
                candidates.insert(0, os.path.normpath(line.split("=", 1)[1].strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _extensions():
    """(ext_modules, cmdclass) for this machine, or ([], {}) when nothing is built."""
    if _env_switch("VPEFT_BUILD_EXTENSION") is False:
        _say("VPEFT_BUILD_EXTENSION=0: building no compiled extension")
        return [], {}
    _locate_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time (pip build isolation?): the compiled "
             "ladder extension is skipped; install torch first, then "
             "`pip install --no-build-isolation -e .`")
        return [], {}

    cxx = ["-O3"]
    cpu_sources = [f"{CSRC}/ladder_cpu.cpp", f"{CSRC}/ladder_flow.cpp"]
    exts = [CppExtension("vpeft_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx})]

    want_cuda = _env_switch("VPEFT_BUILD_CUDA")
    cuda_skip = None
    if want_cuda is False:
        cuda_skip = "VPEFT_BUILD_CUDA=0 at build time"
    elif torch.version.cuda is None:
        cuda_skip = "torch at build time was a CPU-only build"
    elif CUDA_HOME is None:
        cuda_skip = "no CUDA toolkit (nvcc) found at build time"
    elif want_cuda is None and not (torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        cuda_skip = ("no GPU visible and TORCH_CUDA_ARCH_LIST unset at build time "
                     "(set VPEFT_BUILD_CUDA=1 or TORCH_CUDA_ARCH_LIST to build the CUDA kernels)")
    if cuda_skip and want_cuda:
        raise SystemExit(f"vpeft setup: VPEFT_BUILD_CUDA=1 but {cuda_skip}")
    nvcc = None
    if cuda_skip is None:
        nvcc = _nvcc_version(CUDA_HOME)
        cuda_sources = [f"{CSRC}/ladder_cuda_module.cpp", f"{CSRC}/ladder_flow.cpp", f"{CSRC}/ladder_cuda.cu"]
        exts.append(CUDAExtension(
            "vpeft_kernels._C_cuda", cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] + (
                # ptxas's register / spill report per kernel (scripts/check_cuda_compile.sh)
                ["-Xptxas", "-v"] if os.environ.get("VPEFT_PTXAS_VERBOSE") == "1" else [])}))
        _say(f"building the CUDA kernels with nvcc {nvcc} from {CUDA_HOME}")
    else:
        _say(f"building the CPU kernels only: {cuda_skip}")

    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": cuda_skip is None,
        "cuda_skip_reason": cuda_skip,
        "nvcc": nvcc,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "python": sys.version.split()[0],
    }

    class build_ext(BuildExtension):
        """Generates vpeft_build_info.h, which embeds ``info`` (JSON) in both libraries, so
        the loader can tell "built for torch X / CUDA Y, running Z" before loading them."""

        def build_extensions(self):
            gen = os.path.join(os.path.abspath(self.build_temp), "vpeft_gen")
            os.makedirs(gen, exist_ok=True)
            text = json.dumps(info, sort_keys=True)
            c_string = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
            header = os.path.join(gen, "vpeft_build_info.h")
            content = f"// generated by setup.py\n#pragma once\n#define VPEFT_BUILD_INFO_JSON {c_string}\n"
            old = open(header).read() if os.path.exists(header) else None
            if old != content:  # keep the timestamp (and ninja's incremental build) otherwise
                with open(header, "w") as f:
                    f.write(content)
            for ext in self.extensions:
                ext.include_dirs.append(gen)
                ext.include_dirs.append(os.path.join(HERE, CSRC))
            super().build_extensions()

    return exts, {"build_ext": build_ext.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
