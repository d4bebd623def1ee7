"""Build pylandscape._C: C++ CPU kernels always, CUDA kernels when the torch we build against is a
CUDA build and a CUDA toolkit is found (no GPU needed to compile).

Environment:
  PYLANDSCAPE_CUDA=auto|0|1   auto (default): CUDA iff torch.version.cuda and a toolkit exist;
                              1: fail loudly if CUDA is impossible; 0: CPU only.
  TORCH_CUDA_ARCH_LIST        GPU targets (default "8.0;9.0+PTX" when no GPU is visible: PTX lets newer
                              GPUs JIT-compile the kernels).
  MAX_JOBS                    parallel compile jobs (ninja).
  PYLANDSCAPE_DEBUG=1         -O0 -g.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension as cext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[pylandscape build] {msg}", file=sys.stderr, flush=True)


def _real_cuda_home():
    """A toolkit folder that really holds libcudart (the nvcc on PATH may be a wrapper script)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cext.CUDA_HOME,
             "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for c in cands:
        if not c:
            continue
        if (os.path.exists(os.path.join(c, "bin", "nvcc"))
                and os.path.exists(os.path.join(c, "include", "cuda_runtime.h"))
                and (glob.glob(os.path.join(c, "lib64", "libcudart.so*"))
                     or glob.glob(os.path.join(c, "lib", "x64", "cudart*")))):
            return os.path.realpath(c)
    return None


def _sources(sub, ext):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", sub, f"*.{ext}")))


def _torch_nvidia_includes():
    """cuBLAS/cuSPARSE headers ship in the CUDA torch wheel's nvidia/* packages, not in every toolkit."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def extensions():
    mode = os.environ.get("PYLANDSCAPE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"PYLANDSCAPE_CUDA must be auto, 0 or 1, got {mode!r}")
    cuda_home = _real_cuda_home()
    want_cuda = False
    why = ""
    if mode == "0":
        why = "PYLANDSCAPE_CUDA=0"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build"
    elif cuda_home is None:
        why = "no CUDA toolkit (nvcc + libcudart) found; set CUDA_HOME"
    else:
        want_cuda = True
    if mode == "1" and not want_cuda:
        raise SystemExit(f"PYLANDSCAPE_CUDA=1 but CUDA kernels cannot be built: {why}")

    debug = os.environ.get("PYLANDSCAPE_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=off: the noise transform must round exactly as the CUDA code and the torch reference
    # (no fused multiply-add). -fno-math-errno: sqrt without an errno branch, so its loops vectorise
    # (results unchanged).
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 in torch 2.13 and
    # 2.14; 2.14's headers refuse anything older).
    cxx = opt + ["-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DPy_LIMITED_API=0x03090000"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = ["csrc/pylandscape.cpp"] + _sources("host", "cpp") + _sources("cpu", "cpp")
    define_macros = []
    ldflags = ["-fopenmp", "-ldl"]  # -ldl: dlopen/dlsym (csrc/cpu/gram.cpp finds MKL's sgemmt); part of libc since glibc 2.34

    if want_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cext.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            visible = False
            try:
                visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
            except Exception:
                pass
            if not visible:
                # torch's own arch detection crashes with no GPU (IndexError in _get_cuda_arch_flags)
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += _sources("cuda", "cu")
        include_dirs += _torch_nvidia_includes()
        define_macros.append(("PYLANDSCAPE_WITH_CUDA", "1"))
        # --fmad=false: no FMA contraction in device code (the noise code also uses explicit __f*_rn
        # intrinsics); -Xcompiler -ffp-contract=off: none in the host code of the .cu files either (the
        # statistics and sigmas computed on the host must round as in the .cpp files).
        nvcc = opt + ["--fmad=false", "-Xcompiler", "-ffp-contract=off", "--threads", os.environ.get("MAX_JOBS", "2")]
        ext = cext.CUDAExtension(
            "pylandscape._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=ldflags, py_limited_api=True)
    else:
        ext = cext.CppExtension(
            "pylandscape._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=ldflags, py_limited_api=True)

    _log(f"torch {torch.__version__} (cuda {torch.version.cuda}), PYLANDSCAPE_CUDA={mode}")
    _log(f"CUDA kernels: {'yes' if want_cuda else 'no'}" + (f" ({why})" if why else f" (CUDA_HOME={cuda_home}, "
         f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})"))
    _log(f"sources: {', '.join(sources)}")
    _log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}, debug={debug}")
    return [ext]


def _torch_requirement():
    # An extension only runs under the torch it was compiled against: pin it, so an isolated build
    # (which may pick a newer torch) cannot leave a mismatched pair behind.
    base = torch.__version__.split("+")[0]
    return f"torch=={base}"


def _write_build_info(exts):
    # Read by pylandscape._ext before loading _C: a library built for another torch is never loaded
    # (that can crash the process instead of raising).
    cuda = any(isinstance(s, str) and s.endswith(".cu") for e in exts for s in e.sources)
    with open(os.path.join(ROOT, "pylandscape", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {cuda!r}\n")


_EXTS = extensions()
_write_build_info(_EXTS)

class BuildExt(cext.BuildExtension.with_options(use_ninja=True)):
    """Also puts the built library beside the sources: `python -m pylandscape ...` run from the checkout
    imports the source folder (the current directory comes first on sys.path), which then has the
    compiled kernels too instead of silently falling back to the references."""

    def run(self):
        super().run()
        if self.inplace:
            return
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)
            dest = os.path.join(ROOT, *ext.name.split(".")[:-1], os.path.basename(built))
            if os.path.exists(built) and os.path.isdir(os.path.dirname(dest)):
                try:
                    shutil.copyfile(built, dest)
                except OSError as e:  # a read-only checkout still installs fine
                    _log(f"could not copy {os.path.basename(built)} into the source tree: {e}")


setup(
    ext_modules=_EXTS,
    install_requires=[_torch_requirement(), "numpy>=1.24", "scipy>=1.10", "matplotlib>=3.7", "safetensors>=0.4", "tqdm>=4.60"],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
