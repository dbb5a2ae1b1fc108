"""The one table of bench/gpu_check.sh, from the outputs it kept: python3 bench/gpu_summary.py OUT."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def first_json(path: Path) -> dict | None:
    text = path.read_text(errors="replace") if path.exists() else ""
    start = text.find("{")
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0] if start >= 0 else None
    except json.JSONDecodeError:
        return None


def main(out: Path) -> None:
    rows = [("gpu", (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?")]
    if (out / "rc.txt").exists():  # "tests rc=0" lines: each part's exit status, and the seconds taken
        rows += [tuple(line.rsplit(" ", 1)) if " " in line else tuple(line.split("=", 1))
                 for line in (out / "rc.txt").read_text().splitlines() if "=" in line]
    tests = (out / "tests.txt").read_text(errors="replace") if (out / "tests.txt").exists() else ""
    for line in tests.splitlines():
        if re.match(r"^(PASSED|FAILED|ERROR|SKIPPED)", line):
            rows.append(("test", line.strip()))
    summary = [line for line in tests.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    rows.append(("tests", summary[-1].strip("= ") if summary else "no result"))
    kernels = first_json(out / "kernels.txt")
    if kernels:
        rows.append(("peak copy GB/s", str(kernels.get("peak_copy_GB_s"))))
        rows.append(("peak bf16 TFLOP/s", str(kernels.get("peak_bf16_matmul_TFLOP_s"))))
        for name, k in kernels.get("kernels", {}).items():
            achieved = {key: value for key, value in k.items() if key.startswith("achieved")}
            rows.append((f"kernel {name}", f"{k['kernel_us']} us (torch {k['torch_us']} us, {k['speedup']}x), "
                                           f"{achieved}, {k['fraction_of_peak']:.0%} of peak"))
    else:
        rows.append(("kernels", "no result (see kernels.txt)"))
    decode = first_json(out / "decode.txt")
    for name, value in (decode or {}).get("tok_s", {}).items():
        rows.append((f"LLM bf16 {name}", f"{value} tok/s"))
    if not decode:
        rows.append(("LLM decode", "no result (see decode.txt)"))
    width = max(len(name) for name, _ in rows)
    print(json.dumps({"gpu_check": [list(row) for row in rows]}))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
