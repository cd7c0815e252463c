"""Summary of the last ``make mutation`` run: the score per module and every mutant not killed.

mutmut 3 prints one total and lists survivors by generated name (``mutmut results``), with a diff
whose line numbers count from the function (``mutmut show NAME``). This reads the results it keeps
under ``mutants/`` and prints, per source file, killed / survived / timeout / suspicious / no
tests and the score, then each mutant that was not killed as ``file:line function`` with the
original and the mutated line, the form docs/testing.md records them in.

    python scripts/mutation_report.py              # plain text
    python scripts/mutation_report.py --markdown   # the tables for docs/testing.md
    python scripts/mutation_report.py --json       # the same, for other tools

Run from the repository root, after ``mutmut run``; it only reads.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import libcst as cst
from mutmut.mutation.diff_apply import (
    get_diff_for_mutant,
    read_functions_from_index,
    read_mutants_module,
    read_original_function,
)
from mutmut.stats import status_by_exit_code

COLUMNS = ("killed", "survived", "timeout", "suspicious", "no tests", "other")
HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@")


def status(exit_code) -> str:
    name = status_by_exit_code[exit_code]
    return name if name in COLUMNS else "other"


def function_of(mutant: str) -> tuple[str | None, str]:
    """(class or None, function) of a mutant name like ``pkg.mod.xǁClassǁmethod__mutmut_3``."""
    local = mutant.rpartition(".")[2].rpartition("__mutmut_")[0]
    if local.startswith("xǁ"):
        cls, _, func = local[2:].partition("ǁ")
        return cls, func
    return None, local[2:]  # "x_" + name


def def_line(tree: ast.Module, cls: str | None, func: str) -> int | None:
    body = tree.body
    if cls is not None:
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            return node.lineno
    return None


def def_offset(mutant: str, source: Path, func: str) -> int | None:
    """Line of ``def func`` within the original function's code as mutmut diffs it (1-based):
    that code starts at the function's leading comments and decorators."""
    functions = read_functions_from_index(mutant, source)
    orig = functions[0] if functions else read_original_function(read_mutants_module(source), mutant)
    for number, line in enumerate(cst.Module([orig]).code.strip().split("\n"), 1):
        if re.match(rf"\s*(async\s+)?def {re.escape(func)}\b", line):
            return number
    return None


def changed_lines(diff: str) -> tuple[int | None, list[str], list[str]]:
    """(line of the first changed line in the function's code, original lines, mutated lines)."""
    orig_no, first_changed, removed, added = 0, None, [], []
    for line in diff.splitlines()[2:]:
        hunk = HUNK.match(line)
        if hunk:
            orig_no = int(hunk.group(1)) - 1
        elif line.startswith("+"):
            added.append(line[1:].strip())
        else:
            orig_no += 1
            if line.startswith("-"):
                removed.append(line[1:].strip())
                first_changed = first_changed or orig_no
    return first_changed, removed, added


def collect(root: Path):
    rows, survivors = {}, []
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        source = meta.relative_to(root / "mutants").with_suffix("")  # src/ctok/....py
        results = json.loads(meta.read_text())["exit_code_by_key"]
        if not results:
            continue
        counts = Counter(status(code) for code in results.values())
        rows[str(source)] = counts
        tree = ast.parse((root / source).read_text())
        for mutant, code in sorted(results.items(), key=lambda kv: int(kv[0].rpartition("_")[2])):
            if status(code) == "killed":
                continue
            cls, func = function_of(mutant)
            line = None
            try:
                rel, removed, added = changed_lines(get_diff_for_mutant(mutant, path=source))
                def_rel, def_abs = def_offset(mutant, source, func), def_line(tree, cls, func)
                if None not in (rel, def_rel, def_abs):
                    line = def_abs + rel - def_rel
            except Exception as err:  # mutants/ older than the source: still list the mutant
                removed, added = [f"? ({type(err).__name__}: {err})"], []
            survivors.append(dict(
                file=str(source), line=line, function=f"{cls}.{func}" if cls else func,
                mutant=mutant, status=status_by_exit_code[code], original=removed, mutated=added,
            ))
    survivors.sort(key=lambda s: (s["file"], s["line"] or 0, s["mutant"]))
    return rows, survivors


def score(c: Counter) -> float:
    judged = sum(c.values()) - c["no tests"] - c["other"]
    return 100.0 * (c["killed"] + c["timeout"]) / judged if judged else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", action="store_true", help="markdown tables instead of plain text")
    ap.add_argument("--json", action="store_true", help="the scores and the mutants not killed as JSON")
    ap.add_argument("--root", type=Path, default=Path("."), help="repository root (holds mutants/)")
    args = ap.parse_args(argv)
    os.chdir(args.root)  # mutmut's helpers read mutants/ relative to the working directory
    args.root = Path(".")
    if not (args.root / "mutants").is_dir():
        print("no mutants/ folder: run `make mutation` first", file=sys.stderr)
        return 1
    rows, survivors = collect(args.root)
    total = sum(rows.values(), Counter())
    if args.json:
        scores = {name: {**{k: c[k] for k in COLUMNS}, "score": round(score(c), 1)} for name, c in rows.items()}
        json.dump({"modules": scores, "not_killed": survivors}, sys.stdout, indent=1, ensure_ascii=False)
        print()
        return 0
    head = ("module", "mutants", *COLUMNS, "score")

    def cells(name, c):
        return (name, str(sum(c.values())), *(str(c[k]) for k in COLUMNS), f"{score(c):.1f}%")

    table = [cells(name, c) for name, c in rows.items()] + [cells("total", total)]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for row in table:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
        for row in [head, *table]:
            print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print()
    print("score = (killed + timeout) / (mutants - no tests - other); 'no tests': no selected test calls the function")
    print()
    current = None
    for i, s in enumerate(survivors):
        if s["file"] != current:
            current = s["file"]
            print(f"### {current}" if args.markdown else f"== {current}")
            if args.markdown:
                print()
                print("| line | function | status | original | mutated | mutant |")
                print("|---:|---|---|---|---|---|")
        orig, mut = " / ".join(s["original"]), " / ".join(s["mutated"])
        mutant_id = s["mutant"].rpartition("__mutmut_")[2]
        if args.markdown:
            def code(text):
                return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else ""
            print(f"| {s['line'] or '?'} | {s['function']} | {s['status']} | "
                  f"{code(orig)} | {code(mut)} | {mutant_id} |")
        else:
            print(f"  {s['file']}:{s['line'] or '?'} {s['function']} [{s['status']}, mutant {mutant_id}]")
            print(f"      - {orig}")
            print(f"      + {mut}")
        if args.markdown and (i + 1 == len(survivors) or survivors[i + 1]["file"] != current):
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
