"""Training text available offline on every machine: the Python standard library's own source.

Contract: `stdlib_sources(limit_bytes)` returns the text of the standard library's top-level
and first-level modules (tests and site-packages left out) in a fixed order, up to about
`limit_bytes`; `write_stdlib_jsonl(path, ...)` writes them as pre-training rows
`{"text": ...}`, one chunk of at most `chunk_lines` lines per row, and returns the row count.
Both are deterministic for a given Python installation.

    python -m moeray.jobs.corpus OUT.jsonl [--limit-mb 8] [--chunk-lines 80]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path


def stdlib_sources(limit_bytes: int = 8 << 20) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def write_stdlib_jsonl(path: str | Path, limit_bytes: int = 8 << 20, chunk_lines: int = 80) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with path.open("w", encoding="utf-8") as out:
        for source in stdlib_sources(limit_bytes):
            lines = source.splitlines(keepends=True)
            for start in range(0, len(lines), chunk_lines):
                chunk = "".join(lines[start:start + chunk_lines])
                if chunk.strip():
                    out.write(json.dumps({"text": chunk}) + "\n")
                    rows += 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the standard library's source as pre-training JSONL.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit-mb", type=float, default=8.0)
    parser.add_argument("--chunk-lines", type=int, default=80)
    opts = parser.parse_args()
    rows = write_stdlib_jsonl(opts.out, int(opts.limit_mb * (1 << 20)), opts.chunk_lines)
    print(f"wrote {rows} rows to {opts.out}")


if __name__ == "__main__":
    main()
