"""Expert parallelism on Ray: `ExpertShard` actors hold routed experts, the named `Router`
owns placement, health and load balancing, and `ShardedExperts` is the engine's expert backend
that dispatches each MoE layer's tokens to the shards."""

TRANSPORTS = ("ray", "collective")

# Processes that share CPU cores with expert shards (the shards, and a model replica whose experts
# live in them) cap how long OpenMP worker threads spin-wait after a parallel region. With the
# default (about a millisecond of spinning) a replica waiting for its shards keeps its idle
# workers busy on the very cores the shards need: on 2 shared cores decode throughput went from
# about 100 to 140 tokens/s (bench/expert_parallel.py). Read by libgomp at start-up, so it is set
# in the environment of the processes Ray starts.
SHARED_CPU_ENV = {"GOMP_SPINCOUNT": "20000"}
