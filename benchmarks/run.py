"""`make bench`: run every bench_<op>.py on each available device, then render the results.

    benchmarks/run.py [--quick] [--out DIR] [pytest arguments, e.g. -k zlpr]

--quick runs every op and provider once at its smallest size (CI's check of the pipeline);
--out writes the JSON, CSV, markdown and PNGs to DIR instead of benchmarks/results/ and leaves
the README alone.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args, pytest_args = parser.parse_known_args()
    out = (args.out or HERE / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw.json"
    command = [sys.executable, "-m", "pytest", str(HERE), "-o", "python_files=bench_*.py",
               "-p", "no:cacheprovider", "-qq", "--benchmark-only",
               f"--benchmark-json={raw}", "--benchmark-columns=median,iqr,rounds",
               "--benchmark-sort=name", *pytest_args]
    env = dict(os.environ, KXOPS_BENCH_PROGRESS="1", KXOPS_BENCH_QUICK=str(int(args.quick)))
    sys.path.insert(0, str(HERE.parent))
    from kxops._info import cpu_gemm_engine, cpu_model

    gemm = cpu_gemm_engine()
    print(f"make bench: CPU {cpu_model()}; CPU GEMM engine {gemm['engine']} ({gemm['reason']})",
          flush=True)
    code = subprocess.call(command, cwd=HERE.parent, env=env)
    if code == 5:
        print("make bench: no benchmark selected; nothing to render")
        return
    if code != 0:
        sys.exit(code)
    render = [sys.executable, str(HERE / "render.py"), str(raw)]
    subprocess.check_call(render + (["--out", str(out)] if args.out else []))


if __name__ == "__main__":
    main()
