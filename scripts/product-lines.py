#!/usr/bin/env python3
"""Product code lines at a git revision, per crate (issue 25's measure).

Counts .rs files under <crate>/src, leaving out tests/, bench/, build.rs, tests.rs and
everything from a file's first `#[cfg(test)] mod ...` (any visibility) on. Prints the
non-blank lines, and the code lines (non-blank and not a `//` comment).

    scripts/product-lines.py [REV]       (default HEAD; run inside the repository)
"""
import collections
import re
import subprocess
import sys

TEST_MODULE = re.compile(r"^#\[cfg\(test\)\]\s*\n(pub(\([^)]*\))?\s+)?mod \w+\s*\{", re.M)


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def counts(rev):
    lines, code = collections.Counter(), collections.Counter()
    for entry in git("ls-tree", "-r", rev).splitlines():
        meta, path = entry.split("\t", 1)
        crate = path.split("/")[0]
        if (not path.endswith(".rs") or "/src/" not in path or crate in ("tests", "bench")
                or "/tests/" in path or path.endswith(("/tests.rs", "build.rs"))):
            continue
        text = git("cat-file", "-p", meta.split()[2])
        m = TEST_MODULE.search(text)
        kept = [l.strip() for l in (text[: m.start()] if m else text).splitlines() if l.strip()]
        lines[crate] += len(kept)
        code[crate] += sum(1 for l in kept if not l.startswith("//"))
    return lines, code


if __name__ == "__main__":
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    lines, code = counts(rev)
    print(f"{'crate':<10}{'non-blank':>10}{'code':>8}")
    for crate in sorted(lines):
        print(f"{crate:<10}{lines[crate]:>10}{code[crate]:>8}")
    print(f"{'total':<10}{sum(lines.values()):>10}{sum(code.values()):>8}")
