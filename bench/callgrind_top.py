#!/usr/bin/env python3
"""The functions that cost the most user instructions in one callgrind dump,
per operation: `callgrind_top.py DUMP OPS [N]`.

A dump taken with `callgrind_control --dump` names a function only where
it first appears in the whole run, so `callgrind_annotate` on a later dump
shows its costs under numbers (or all under `clone`); the names are read
from every dump of the run (DUMP's siblings) first. Costs are exclusive:
a function's own instructions, not those of what it calls.
"""
import collections
import glob
import re
import sys

NAMED = re.compile(r"^c?fn=\((\d+)\) (.+)$")
FUNCTION = re.compile(r"^fn=\((\d+)\)")


def main():
    dump, ops = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    names = {}
    for path in glob.glob(re.sub(r"\.\d+$", "", dump) + "*"):
        with open(path, errors="replace") as f:
            for line in f:
                m = NAMED.match(line)
                if m:
                    names.setdefault(m.group(1), m.group(2).rstrip())
    own = collections.Counter()
    function, after_call = None, False
    with open(dump, errors="replace") as f:
        for line in f:
            m = FUNCTION.match(line)
            if m:
                function = names.get(m.group(1), m.group(1))
            elif line.startswith("calls="):
                # The next cost line is the call's inclusive cost.
                after_call = True
            elif function and line[:1] in ("+", "-", "*") or line[:1].isdigit():
                fields = line.split()
                if after_call:
                    after_call = False
                elif len(fields) >= 2 and fields[1].isdigit():
                    own[function] += int(fields[1])
    for function, cost in own.most_common(top):
        print(f"  {cost / ops:8.0f}  {function[:120]}")


if __name__ == "__main__":
    main()
