"""`make bench`: run every bench_<op>.py on each available device, then render the results."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAW = HERE / "results" / "raw.json"


def main():
    RAW.parent.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "pytest", str(HERE), "-o", "python_files=bench_*.py",
               "-p", "no:cacheprovider", "-qq", "--benchmark-only", "--benchmark-save-data",
               f"--benchmark-json={RAW}", "--benchmark-columns=median,iqr,rounds",
               "--benchmark-sort=name", *sys.argv[1:]]
    code = subprocess.call(command, cwd=HERE.parent,
                           env=dict(os.environ, KXOPS_BENCH_PROGRESS="1"))
    if code == 5:
        print("make bench: no benchmark selected; nothing to render")
        return
    if code != 0:
        sys.exit(code)
    subprocess.check_call([sys.executable, str(HERE / "render.py"), str(RAW)])


if __name__ == "__main__":
    main()
