"""Session-wide fixtures: one local Ray instance for every test that needs Ray."""

import os

import pytest
import torch

from support import write_hf_model_folder


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with more logical CPUs than this machine has cores (actors mostly wait)."""
    import ray

    # Report load to the Serve autoscaler every half second (default 10 s) so scaling tests are quick.
    env = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5", "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update(env)
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A random transformers DeepseekV3 checkpoint with the tiny tokenizer: (folder, reference model)."""
    folder = tmp_path_factory.mktemp("engine-v3")
    return folder, write_hf_model_folder(folder, "v3", seed=11)


@pytest.fixture(scope="session")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 23, 40, 1, 12, 64)]
