"""Host bookkeeping, plain Python: requests and sequences, KV pages and the prefix cache, the scheduler and its
policies, stop checking and incremental detokenization. Never imports JAX, the worker, models, layers or kernels
(an import-linter contract in CI), so scheduling research runs and is tested without a device."""
