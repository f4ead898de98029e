"""Every benchmark of the project in one command: one JSON and one markdown report.

Each benchmark is its own script under launch/ (each measures its reference in the same run, at its
best, and prints its own table); this runs them one after another as subprocesses, so each starts on a
machine no other benchmark is using, and collects:

  <out>/bench.json   machine (CPU count, devices), thread settings (XLA_FLAGS, torch threads), and per
                     benchmark: the command, exit status, wall seconds, load average before and after,
                     and the script's own JSON
  <out>/bench.md     the same, with every script's printed table under its heading

  python launch/bench.py --out /tmp/bench --settle_load 0.5     # everything (about an hour on 2 CPU cores)
  python launch/bench.py --out /tmp/bench --quick              # small sizes: minutes, to check it all runs
  python launch/bench.py --out /tmp/bench --only stage1,decode --pause_s 60

`--pause_s` waits between benchmarks so the load average of one does not fall on the next; a script
withholds its ratio when the load average at its start is above 1.0 (launch/bench_common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (script, arguments, quick arguments, JSON flag); "{json}" is the script's JSON output path.
BENCHMARKS = {
    "data": ("bench_data.py", [], ["--families", "20", "--steps", "10"], "--json"),
    "agcl": ("bench_agcl.py", [], ["--sizes", "1024", "--gradcache_sizes", "1024", "--time_budget_s", "10"],
             "--json_out"),
    "stage1": ("bench_stage1.py", ["--rounds", "7"], ["--rounds", "2", "--batch", "8"], "--json"),
    "decode": ("bench_decode.py", [], ["--repeats", "2", "--new_tokens", "8"], "--json"),
    "generate": ("bench_generate.py", [], ["--repeats", "2", "--batch", "16", "--new_tokens", "8"], "--json"),
    "retrieval_1e5": ("bench_retrieval.py", ["--gallery", "100000"], ["--gallery", "5000", "--queries", "200"],
                      "--json"),
    "retrieval_1e6": ("bench_retrieval.py", ["--gallery", "1000000", "--queries", "1000"], None, "--json"),
    "rar": ("bench_rar.py", [], ["--steps", "2", "--gallery", "5000", "--repeats", "2"], "--out"),
}


MACHINE = r"""
import json, os, sys
import jax
model = ""
if os.path.exists("/proc/cpuinfo"):
  model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
out = {"cpu_model": model, "cpu_count": os.cpu_count(), "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
       "xla_flags": os.environ.get("XLA_FLAGS", ""), "python": sys.version.split()[0], "jax": jax.__version__}
try:
  import torch
  out["torch_threads"] = torch.get_num_threads()
except ImportError:
  out["torch_threads"] = None
print(json.dumps(out))
"""


def machine() -> dict:
  """The machine as the benchmarks see it, asked in a subprocess: this process never holds the
  accelerator (a TPU is one process's at a time; a GPU's memory would be preallocated here)."""
  out = subprocess.run([sys.executable, "-c", MACHINE], capture_output=True, text=True)
  return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-2000:]}


def run_one(name: str, quick: bool, out_dir: str) -> dict:
  script, args, quick_args, json_flag = BENCHMARKS[name]
  if quick and quick_args is None:
    return {"skipped": "no quick form (too large for a quick run)"}
  json_path = os.path.join(out_dir, f"{name}.json")
  if os.path.exists(json_path):  # an earlier run's: never reported as this one's
    os.remove(json_path)
  cmd = [sys.executable, os.path.join(HERE, script), *(quick_args if quick else args), json_flag, json_path]
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=os.path.dirname(HERE), capture_output=True, text=True)
  entry = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
           "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
           "stdout": proc.stdout[-20000:]}
  if proc.returncode:
    entry["stderr"] = proc.stderr[-5000:]
  if os.path.isfile(json_path):
    with open(json_path, encoding="utf-8") as f:
      entry["result"] = json.load(f)
  return entry


def markdown(report: dict) -> str:
  m = {"cpu_count": "?", "backend": "?", "devices": [], "jax": "?", "torch_threads": "?", "xla_flags": "",
       **report["machine"]}
  lines = ["# Benchmarks", "",
           f"{m['cpu_count']} CPUs{' (' + m['cpu_model'] + ')' if m.get('cpu_model') else ''}, {m['backend']} "
           f"({', '.join(sorted(set(m['devices'])))}), "
           f"jax {m['jax']}, torch threads {m['torch_threads']}, XLA_FLAGS={m['xla_flags']!r}"
           f"{', quick sizes' if report['quick'] else ''}.", "",
           "| benchmark | status | wall s | load before -> after |", "|---|---|---|---|"]
  for name, e in report["benchmarks"].items():
    if "skipped" in e:
      lines.append(f"| {name} | skipped: {e['skipped']} | - | - |")
      continue
    status = "ok" if e["returncode"] == 0 else f"FAILED ({e['returncode']})"
    lines.append(f"| {name} | {status} | {e['wall_s']:.0f} | {e['load_average_before']:.2f} -> "
                 f"{e['load_average_after']:.2f} |")
  for name, e in report["benchmarks"].items():
    if "stdout" in e:
      lines += ["", f"## {name}", "", f"`python launch/{e['command'].split('launch/', 1)[-1]}`", "", "```",
                e["stdout"].strip(), "```"]
  return "\n".join(lines) + "\n"


def settle(below: float, limit_s: float = 600.0) -> None:
  """Waits until the one-minute load average is under `below` (a 2-core benchmark leaves it near 2 for
  about a minute), at most `limit_s`; no wait for `below` 0."""
  t0 = time.time()
  while below and os.getloadavg()[0] >= below and time.time() - t0 < limit_s:
    time.sleep(5)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True, help="folder for bench.json, bench.md and each script's JSON")
  ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
  ap.add_argument("--quick", action="store_true", help="small sizes: checks that every benchmark runs")
  ap.add_argument("--pause_s", type=float, default=0.0, help="wait between benchmarks (let the load settle)")
  ap.add_argument("--settle_load", type=float, default=0.0,
                  help="before each benchmark also wait (up to 10 min) until the 1-minute load average is below this")
  args = ap.parse_args()
  names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    sys.exit(f"bench.py: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
  os.makedirs(args.out, exist_ok=True)
  report = {"quick": args.quick, "benchmarks": {}}
  for i, name in enumerate(names):
    if i and args.pause_s:
      time.sleep(args.pause_s)
    settle(args.settle_load)
    print(f"[bench] {name} ...", flush=True)
    report["benchmarks"][name] = entry = run_one(name, args.quick, args.out)
    print(f"[bench] {name}: exit {entry.get('returncode', '-')} in {entry.get('wall_s', 0):.0f} s", flush=True)
  report["machine"] = machine()
  with open(os.path.join(args.out, "bench.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, default=str)
  with open(os.path.join(args.out, "bench.md"), "w", encoding="utf-8") as f:
    f.write(markdown(report))
  failed = [n for n, e in report["benchmarks"].items() if e.get("returncode")]
  print(f"[bench] wrote {args.out}/bench.json and bench.md" + (f"; FAILED: {failed}" if failed else ""))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
