"""Write the helper's command lines, as llamacpp.build makes them, for the GPU machine run."""
import shlex, sys
from pyinfra.context import ctx_host
from llmhost import llamacpp, buildplan
from llmhost.settings import load_host_settings

class Host:
    def get_fact(self, cls, **kw): return None

def cmd(build_dir, backend_flags, expected):
    s = load_host_settings("h", {"llm_services": {"t": {"port": 1, "model": {"source": "local", "path": "/m.gguf"}}}})
    flags = buildplan.cmake_flags(s, backend_flags)
    with ctx_host.use(Host()):
        (c,) = llamacpp.build._inner(source_dir="/tmp/llama.cpp", build_dir=build_dir, commit=s.llamacpp_commit,
            cmake_flags=list(flags), expected_system_info=expected, jobs=16, ccache_dir="/tmp/ccache", cpu_baseline="auto")
    return str(c).replace("/usr/local/lib/llmhost/", "files/")

cpu = cmd("/tmp/builds/cpu", ("-DGGML_CUDA=OFF",), [])
cuda = cmd("/tmp/builds/cuda", tuple(buildplan.cuda_cmake_flags("/usr/local/cuda/bin/nvcc", ["90"], [("f16","f16")])), ["ARCHS=900"])
open(".devcarry/build_cpu.sh", "w").write(cpu + "\n")
open(".devcarry/build_cuda.sh", "w").write(cuda + "\n")
print(cpu); print(cuda)
