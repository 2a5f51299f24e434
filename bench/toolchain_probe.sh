#!/bin/bash
# What C++ toolchain AOTInductor compiles with on this machine, which libstdc++
# the Python process runs with, and whether a compiled package loads under
# a few environments (each load in its own process).
set -u
OUT=${OUT:-.}
echo "== compilers"; which -a g++ c++ clang++ gcc 2>/dev/null; g++ --version | head -1; echo "CXX=${CXX:-}"
echo "== libstdc++"; ls -la /usr/lib/x86_64-linux-gnu/libstdc++.so.6* 2>/dev/null; g++ -print-file-name=libstdc++.so.6
python3 - <<'PY'
import torch, torch._inductor.config as c
from torch._inductor import cpp_builder
print("inductor cxx:", c.cpp.cxx, "->", cpp_builder.get_cpp_compiler())
print("abi:", torch._C._GLIBCXX_USE_CXX11_ABI)
print([l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l][:1])
import locale; print("locale", locale.setlocale(locale.LC_ALL, None))
PY
env | grep -i "^LC_\|^LANG" 
mkdir -p /tmp/tp && cd /tmp/tp
python3 - <<'PY'
import torch, time
class M(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.lin = torch.nn.Linear(64, 32, device="cuda", dtype=torch.float16)
    def forward(s, x): return torch.relu(s.lin(x))
x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
t = time.time()
torch._inductor.aoti_compile_and_package(torch.export.export(M(), (x,)), package_path="/tmp/tp/a.pt2")
print("compiled", round(time.time() - t, 1))
PY
rm -rf /tmp/tp/x && mkdir /tmp/tp/x && cd /tmp/tp/x && python3 -c "import zipfile; zipfile.ZipFile('/tmp/tp/a.pt2').extractall('.')"
SO=$(find /tmp/tp/x -name "*.so" | head -1); echo "== ldd $SO"; ldd $SO | head -20
nm -D --defined-only $SO | grep -c " T \| W " ; nm -D $SO | grep -i "regex\|locale" | head -5
LOAD='import torch; r=torch._inductor.aoti_load_package("/tmp/tp/a.pt2"); print("LOAD OK", r(torch.randn(4,64,device="cuda",dtype=torch.float16)).shape)'
echo "== plain"; python3 -c "$LOAD" 2>&1 | tail -1
echo "== LC_ALL=C"; LC_ALL=C LANG=C python3 -c "$LOAD" 2>&1 | tail -1
G=$(g++ -print-file-name=libstdc++.so.6); echo "== LD_PRELOAD=$G"; LD_PRELOAD=$G python3 -c "$LOAD" 2>&1 | tail -1
echo "== LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6"; LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 python3 -c "$LOAD" 2>&1 | tail -1
echo "== import order: load before anything (python -S)"; python3 -c "$LOAD" 2>&1 | tail -1
