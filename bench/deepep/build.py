"""Build DeepEP V1's extension in place for the side-by-side run (run from DeepEP's source folder).

    cd .deepep && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 ../bench/deepep/build.py --mode intranode
    cd .deepep && python3 ../bench/deepep/build.py --mode full        # the fallback: with NVSHMEM

--mode intranode: DeepEP's own DISABLE_NVSHMEM build (layout + intranode kernels only, 4 sources).
  setup.py takes that branch only when NVSHMEM_DIR is unset and `nvidia.nvshmem` cannot be found;
  the GPU machines have the nvidia-nvshmem wheel and remote.sh exports NVSHMEM_DIR, so both are
  hidden for the duration of setup.py instead of editing DeepEP's source. That branch also forgets
  the device-link step that its `-rdc=true` objects need (import then fails with "undefined symbol
  __cudaRegisterLinkedBinary_..."), so one is requested from torch's BuildExtension.
--mode full: setup.py as it is, with NVSHMEM (the build seen working on nvidia-h100-x1, ~100 s).
Either way the intranode kernels are the same code; nothing here touches NVSHMEM at run time
(num_rdma_bytes = 0, low_latency_mode = False). Ends with an import check in a fresh interpreter.
"""
import argparse
import glob
import importlib.util
import os
import runpy
import subprocess
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--mode", choices=("intranode", "full"), default="intranode")
args = parser.parse_args()

if not os.path.exists("setup.py") or not os.path.isdir("csrc"):
    sys.exit(f"bench/deepep/build.py: run it from DeepEP's source folder (.deepep), not {os.getcwd()}")

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
os.environ.setdefault("MAX_JOBS", "16")
# g++ needs CCCL's headers on its path for NVSHMEM 3.4's (seen on these machines).
os.environ["CPLUS_INCLUDE_PATH"] = ":".join(
    p for p in ("/usr/local/cuda/include/cccl", os.environ.get("CPLUS_INCLUDE_PATH", "")) if p)

if args.mode == "full":
    # DeepEP links `-l:libnvshmem_host.so`, but the pip package ships only libnvshmem_host.so.3
    # (seen failing on nvidia-h200-x2, 2026-11-23): give the linker that name in a folder of its own.
    import nvidia  # the pip namespace package that holds nvshmem
    nvshmem_lib = os.path.join(list(nvidia.__path__)[0], "nvshmem", "lib")
    link_dir = "/tmp/deepep-nvshmem-link"
    os.makedirs(link_dir, exist_ok=True)
    link = os.path.join(link_dir, "libnvshmem_host.so")
    if not os.path.exists(link):
        os.symlink(os.path.join(nvshmem_lib, "libnvshmem_host.so.3"), link)
    os.environ["LIBRARY_PATH"] = ":".join(p for p in (link_dir, os.environ.get("LIBRARY_PATH", "")) if p)

if args.mode == "intranode":
    os.environ.pop("NVSHMEM_DIR", None)
    real_find_spec = importlib.util.find_spec

    def find_spec_without_nvshmem(name, *rest, **kwargs):
        if name == "nvidia.nvshmem" or name.startswith("nvidia.nvshmem."):
            return None  # setup.py reads `.submodule_search_locations` of None: AttributeError, caught
        return real_find_spec(name, *rest, **kwargs)

    importlib.util.find_spec = find_spec_without_nvshmem

    import torch.utils.cpp_extension as cpp_extension

    real_cuda_extension = cpp_extension.CUDAExtension

    def cuda_extension_with_device_link(*rest, **kwargs):
        flags = kwargs.get("extra_compile_args")
        if isinstance(flags, dict) and "-rdc=true" in flags.get("nvcc", []) and "nvcc_dlink" not in flags:
            flags["nvcc_dlink"] = ["-dlink"]  # BuildExtension appends the arch flags
        return real_cuda_extension(*rest, **kwargs)

    cpp_extension.CUDAExtension = cuda_extension_with_device_link

for stale in glob.glob("deep_ep_cpp*.so"):
    os.remove(stale)
started = time.time()
sys.argv = ["setup.py", "build_ext", "--inplace"]
try:
    runpy.run_path("setup.py", run_name="__main__")
except SystemExit as exit_:
    if exit_.code not in (None, 0):
        raise
built = glob.glob("deep_ep_cpp*.so")
if not built:
    sys.exit(f"bench/deepep/build.py ({args.mode}): setup.py returned but no deep_ep_cpp*.so is in {os.getcwd()}")
check = subprocess.run([sys.executable, "-c", "import deep_ep, deep_ep_cpp; print(deep_ep_cpp.is_sm90_compiled())"],
                       capture_output=True, text=True)
if check.returncode != 0:
    sys.exit(f"bench/deepep/build.py ({args.mode}): built {built[0]} but `import deep_ep` fails:\n{check.stderr[-2000:]}")
print(f"deepep build ({args.mode}): {built[0]} in {time.time() - started:.0f} s; sm90 compiled: {check.stdout.strip()}",
      flush=True)
