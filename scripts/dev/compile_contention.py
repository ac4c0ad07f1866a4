"""Developer tool: how much the background compiles slow down compile_ahead's pass when they run beside it, on
this machine's CPU (no GPU needed).

    .venv/bin/python scripts/dev/compile_contention.py            # two runs of each arrangement
    .venv/bin/python scripts/dev/compile_contention.py --runs 1

The 130M model's first training step as `compile_census.py` records it: the specialisations its pass ahead
compiles and the ones `launch_once_compiled` leaves to background threads (the scan backward's faster
variants). Each run compiles them for sm_90 with `triton.compile`, as the pass does: the pass's compiles in a
pool of 8 threads, and either nothing beside them ("alone", what `_launch._after_ahead_passes` arranges) or
each background compile in a thread of its own started at the same moment ("beside"). It prints when the
pass's compiles were all done, which is what the first step waits for. Every run is a fresh process with an
empty Triton cache (the census's import makes one).
"""

import argparse
import concurrent.futures
import os
import subprocess
import sys
import threading
import time


def one_run(arrangement):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compile_census as census

    census.patch_kernels()
    census.run_model(census.build_parser().parse_args([]))  # the census's default shape: the 130M model
    train = [r for r in census.records.values() if "train" in r["phases"]]
    ahead, background = [r for r in train if r["ahead"]], [r for r in train if r.get("background")]

    start = time.perf_counter()
    threads = [threading.Thread(target=census.compile_record, args=(r,)) for r in background]
    beside = threads if arrangement == "beside" else []
    for thread in beside:
        thread.start()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(census.compile_record, ahead))
    ahead_done = time.perf_counter() - start
    for thread in beside:
        thread.join()
    print(f"| {arrangement} | {len(ahead)} | {len(beside)} | {ahead_done:.1f} | {time.perf_counter() - start:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--arrangement", choices=("alone", "beside"), help=argparse.SUPPRESS)  # one run
    args = parser.parse_args()
    if args.arrangement:
        one_run(args.arrangement)
        return
    print(f"{os.cpu_count()} CPUs; seconds from the first compile")
    print("| background compiles | pass compiles | background threads | pass done | all done |\n|---|---|---|---|---|")
    for _ in range(args.runs):
        for arrangement in ("alone", "beside"):
            run = subprocess.run(
                [sys.executable, __file__, "--arrangement", arrangement], stdout=subprocess.PIPE, text=True, check=True
            )
            print(run.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
