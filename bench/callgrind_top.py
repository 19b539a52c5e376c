#!/usr/bin/env python3
"""The functions that cost the most in one callgrind dump, per operation:
`callgrind_top.py DUMP OPS [N [EVENT]]`, EVENT one of the dump's events
(`Ir`, user instructions, by default; with `--cache-sim=yes` also `D1mw`,
first-level data write misses, `DLmr`, last-level read misses, …).

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
    event = sys.argv[4] if len(sys.argv) > 4 else "Ir"
    names = {}
    for path in glob.glob(re.sub(r"\.\d+$", "", dump) + "*"):
        with open(path, errors="replace") as f:
            for line in f:
                m = NAMED.match(line)
                if m:
                    names.setdefault(m.group(1), m.group(2).rstrip())
    own = collections.Counter()
    function, after_call = None, False
    column = None
    with open(dump, errors="replace") as f:
        for line in f:
            if line.startswith("events:"):
                # Cost lines start with the position, then one field per event.
                column = line.split()[1:].index(event) + 1
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
                elif len(fields) > column and fields[column].isdigit():
                    own[function] += int(fields[column])
    for function, cost in own.most_common(top):
        print(f"  {cost / ops:8.1f}  {function[:120]}")


if __name__ == "__main__":
    main()
