"""Four SwiGLU blocks, forward and backward, with the matmuls written three ways, timed
alternately in one process (median of 9 calls each):

    .venv/bin/python bench/matmul_forms.py

- einsum3d: einsums over 3-D operands ("BLD,DF->BLF"), as the layers were written before;
- concat:   the same, the two input projections as one einsum over concatenated weights;
- flat2d:   the tokens flattened to one axis, plain 2-D matmuls (what `layers.dense` does).
Shapes are the reference model's (batch 8, length 256, width 256, SwiGLU 1024, float32).
Prints each form's milliseconds and GFLOP/s. docs/PERFORMANCE.md, change 2.
"""
import statistics
import time

import jax
import jax.numpy as jnp

B, L, D, F = 8, 256, 256, 1024


def einsum3d(x, w0, w1, wo):
    gate = jax.nn.silu(jnp.einsum("BLD,DF->BLF", x, w0))
    return jnp.einsum("BLF,FD->BLD", gate * jnp.einsum("BLD,DF->BLF", x, w1), wo)


def concat(x, w0, w1, wo):
    a, b = jnp.split(jnp.einsum("BLD,DF->BLF", x, jnp.concatenate([w0, w1], axis=1)), 2, -1)
    return jnp.einsum("BLF,FD->BLD", jax.nn.silu(a) * b, wo)


def flat2d(x, w0, w1, wo):
    x2 = x.reshape(B * L, D)
    return ((jax.nn.silu(x2 @ w0) * (x2 @ w1)) @ wo).reshape(B, L, D)


def grad_of_four_blocks(block):
    def loss(x, w0, w1, wo):
        y = x
        for _ in range(4):
            y = y + block(y, w0, w1, wo)
        return jnp.sum(y * y)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def main():
    k = jax.random.split(jax.random.key(0), 4)
    args = (jax.random.normal(k[0], (B, L, D)), jax.random.normal(k[1], (D, F)) * 0.05,
            jax.random.normal(k[2], (D, F)) * 0.05, jax.random.normal(k[3], (F, D)) * 0.03)
    fns = {f.__name__: grad_of_four_blocks(f) for f in (einsum3d, concat, flat2d)}
    times = {name: [] for name in fns}
    for f in fns.values():
        jax.block_until_ready(f(*args))
    for _ in range(9):
        for name, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    flops = 4 * 6 * 3 * B * L * D * F  # 3 matmuls per block, forward and backward
    for name, t in times.items():
        s = statistics.median(t)
        print(f"{name:<9} {s * 1e3:7.1f} ms  {flops / s / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
