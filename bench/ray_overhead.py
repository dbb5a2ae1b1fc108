"""What a running Ray cluster costs the engine on this machine, before any HTTP or Serve work.

The offline engine runs serve_load.py's workload three ways, in one run: alone (no Ray), as a
Ray task (the place a Serve replica's engine lives), and in this driver while the idle cluster
is up. The ratios bound what `serve_load.py`'s served/offline ratio can reach here: whatever
the cluster's own processes (GCS, raylet, workers) take from the two cores is gone before the
proxy, the ingress and the load generator take theirs.

    cd bench && ../.venv/bin/python ray_overhead.py
"""

from __future__ import annotations

import os

from common import report, small_checkpoint, timed
from serve_load import workload


def offline_rate(folder: str, clients: int) -> float:
    from moeray import LLM, SamplingParams

    requests = workload(clients)
    llm = LLM(folder, max_model_len=1024, max_num_seqs=64)
    prompts = [p for p, _ in requests]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    llm.generate(prompts[:2], params[:2])  # warm-up
    _, seconds = timed(lambda: llm.generate(prompts, params))
    return sum(n for _, n in requests) / seconds


def main() -> None:
    import ray

    folder, clients = str(small_checkpoint("small")), 16
    threads = str(os.cpu_count() or 1)
    alone = offline_rate(folder, clients)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
    in_task = ray.get(ray.remote(num_cpus=int(threads))(offline_rate).remote(folder, clients))
    beside = offline_rate(folder, clients)
    ray.shutdown()
    results = {"preset": "small", "clients": clients, "alone_tok_s": round(alone, 1),
               "ray_task_tok_s": round(in_task, 1), "driver_with_ray_up_tok_s": round(beside, 1),
               "ray_task_over_alone": round(in_task / alone, 3), "driver_over_alone": round(beside / alone, 3)}
    report("ray_overhead", results, [
        ("engine in a Ray task, tok/s", f"{in_task:.1f}", f"{alone:.1f} (no Ray)", f"{in_task / alone:.2f}"),
        ("engine beside an idle cluster, tok/s", f"{beside:.1f}", f"{alone:.1f} (no Ray)", f"{beside / alone:.2f}"),
    ])


if __name__ == "__main__":
    main()
