"""Pallas GPU kernels for qwenjax; each module holds a kernel, its jitted API and a jnp reference."""
