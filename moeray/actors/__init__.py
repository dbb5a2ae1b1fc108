"""Expert parallelism on Ray: `ExpertShard` actors hold routed experts, the named `Router`
owns placement, health and load balancing, and `ShardedExperts` is the engine's expert backend
that dispatches each MoE layer's tokens to the shards."""

TRANSPORTS = ("ray", "collective")
