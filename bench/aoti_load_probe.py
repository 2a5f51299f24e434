"""Which ways of compiling and loading an AOTInductor package work on this
machine (each in its own process: a failure may be a crash).

    python bench/aoti_load_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def compile_pkg(path: str, in_so: bool = True, threads: int | None = None):
    import torch

    if threads is not None:
        torch._inductor.config.compile_threads = threads

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 32, device="cuda", dtype=torch.float16)

        def forward(self, x):
            return torch.relu(self.lin(x))

    m = M().eval()
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    ep = torch.export.export(m, (x,), strict=False)
    cfg = {} if in_so else {"aot_inductor.package_constants_in_so": False}
    torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=cfg)
    torch.save({k: v for k, v in m.state_dict().items()}, path + ".sd")
    return m, x


def load_pkg(path: str, how: str):
    import glob
    import zipfile

    import torch

    if how == "package":
        return torch._inductor.aoti_load_package(path)
    if how == "loader":
        return torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, 0)
    if how == "runner":
        ex = path + ".x"
        zipfile.ZipFile(path).extractall(ex)
        so = glob.glob(ex + "/**/*.so", recursive=True)[0]
        return torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda", os.path.dirname(so))
    raise ValueError(how)


def child(step: str, path: str, how: str, in_so: bool, threads) -> dict:
    import torch

    out = {"step": step, "how": how, "in_so": in_so, "threads": threads}
    t0 = time.time()
    if step in ("compile", "both"):
        compile_pkg(path, in_so, threads)
        out["compile_s"] = round(time.time() - t0, 1)
    if step in ("load", "both"):
        r = load_pkg(path, how)
        out["loaded"] = True
        x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
        sd = torch.load(path + ".sd")
        if not in_so:
            if how == "runner":
                names = r.get_constant_names_to_original_fqns()
                r.update_constant_buffer({n: sd[f] for n, f in names.items()}, False, True, True)
            elif how == "package":
                r.load_constants(sd, check_full_update=True, user_managed=True)
        if how == "package":
            y = r(x)
        elif how == "loader":
            y = r.boxed_run([x])
        else:
            y = r.run([x])
        y = y[0] if isinstance(y, (list, tuple)) else y
        ref = torch.relu(torch.nn.functional.linear(x, sd["lin.weight"], sd["lin.bias"]))
        out["max_err"] = float((y - ref).abs().max())
    return out


def run(args, timeout=120):
    p = subprocess.run([sys.executable, "-X", "faulthandler", __file__, *args], capture_output=True, text=True,
                       timeout=timeout)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if line:
        return json.loads(line[0][7:])
    err = p.stderr
    i = err.find("Current thread")
    return {"args": args, "rc": p.returncode, "stderr": (err[i:i + 900] if i >= 0 else err[-900:])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", nargs=5)
    a = ap.parse_args()
    if a.child:
        step, path, how, in_so, threads = a.child
        threads = None if threads == "none" else int(threads)
        print("RESULT " + json.dumps(child(step, path, how, in_so == "1", threads)), flush=True)
        return
    d = "/tmp/aoti_probe"
    os.makedirs(d, exist_ok=True)
    results = []
    plan = [
        ["compile", f"{d}/a.pt2", "package", "1", "none"],
        ["load", f"{d}/a.pt2", "package", "1", "none"],   # fresh process, default package
        ["load", f"{d}/a.pt2", "loader", "1", "none"],
        ["load", f"{d}/a.pt2", "runner", "1", "none"],
        ["both", f"{d}/b.pt2", "package", "1", "1"],       # same process, no compile workers
        ["compile", f"{d}/c.pt2", "package", "0", "none"],
        ["load", f"{d}/c.pt2", "package", "0", "none"],
        ["load", f"{d}/c.pt2", "runner", "0", "none"],
    ]
    for args in plan:
        try:
            r = run(["--child", *args])
        except subprocess.TimeoutExpired:
            r = {"args": args, "timeout": True}
        results.append(r)
        print(json.dumps(r), flush=True)
        Path(a.out, "aoti_load_probe.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
