"""Package data of the runtime: the default evaluation text of the cache-kind quality gates."""
