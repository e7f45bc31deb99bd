"""The device side: model set-up (weights, mesh, KV cache), the model runner's jitted steps per bucket, step inputs
and their packing, the KV cache, sampling and its penalty state, and the multi-host lockstep replay."""
