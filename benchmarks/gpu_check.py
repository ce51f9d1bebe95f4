"""Timings of the CUDA backend against PyTorch CUDA, in one run on one GPU.

Run by ``benchmarks/gpu_check.sh`` (``PYTHONPATH=. python benchmarks/gpu_check.py``);
needs a GPU, numba-cuda and torch. Not an asv benchmark: nothing here runs on import.

Per configuration (docs/design.md §6, plus a large-batch narrow case), float32, tanh,
cross-entropy, inputs already on the GPU:

- fastgrad ``backprop(..., backend="cuda")`` on numba device arrays (the public
  call: device-side input checks, the kernels, the loss copied back), and the
  kernels alone (inputs validated once, outside the timing);
- PyTorch: autograd for ``grad``; ``torch.func.vmap(grad)`` for ``per_sample``
  and, from its rows, ``norms`` (TF32 off, so both sides compute in float32);
- floors measured in the same run: the device copy bandwidth (``Tensor.copy_``,
  read + write bytes over time) and fill bandwidth against B·P·4 bytes of
  per-sample gradients; the float32 GEMM rate of ``torch.mm`` against the
  6·B·Σ n_l n_{l-1} flops of the mean gradient.

Times are medians of synchronised wall-clock calls (launch overheads included,
on both sides). The table is printed last; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import sys
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np

from fastgrad.tools.configs import CONFIGS as BASE_CONFIGS
from fastgrad.tools.configs import problem

try:
    from . import _timing
except ImportError:  # run as a script (python benchmarks/gpu_check.py): its folder is on sys.path
    import _timing

CONFIGS = {**BASE_CONFIGS, "narrow-B65536": (BASE_CONFIGS["narrow"][0], 65536)}
"""docs/design.md §6's configurations (the one source, ``fastgrad.tools.configs``) and a large-batch
narrow case."""


def median_ms(fn, sync, reps: int, warmup: int = 2) -> float:
    """Median ms of ``reps`` calls of ``fn``, each bracketed by ``sync()`` (the GPU's whole work)."""
    return 1e3 * _timing.median(_timing.consecutive(fn, reps, warmup=warmup, clock=_timing.synced(sync)))


_SLEEP = None


def sleep_kernel(cuda):
    """A one-thread kernel that keeps the GPU busy for about ``n`` µs (``sleep[1, 1](n)``)."""
    global _SLEEP
    if _SLEEP is None:
        if hasattr(cuda, "nanosleep"):

            @cuda.jit
            def sleep(n):
                for _ in range(n):
                    cuda.nanosleep(1000)

        else:  # the simulator (smoke test): no nanosleep, and no queue to hide the host behind

            @cuda.jit
            def sleep(n):
                pass

        _SLEEP = sleep
    return _SLEEP


def gpu_ms(fn, cuda, sync, calls: int = 10) -> float:
    """GPU time (ms) of one ``fn()``, ``fn`` launching without waiting: ``calls`` calls queued behind
    a sleeping kernel and timed between CUDA events, so the host's launch cost is hidden."""
    sleep = sleep_kernel(cuda)
    fn()
    sync()
    sleep[1, 1](20000)  # about 20 ms of GPU time, while the host queues the calls
    start, stop = cuda.event(), cuda.event()
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / calls


def tiled_gemm_shapes(sizes, B) -> list[tuple[str, int, int, int]]:
    """``(role, m, k, n)`` of every GEMM the tiled path runs for the mean gradient:
    per layer the forward Z = A·Wᵀ (B×n_in·n_in×n_out), the weight gradient Δᵀ·A
    (n_out×B·B×n_in), and for every layer but the first the backward Δ·W (B×n_out·n_out×n_in)."""
    shapes = []
    for n_in, n_out in itertools.pairwise(sizes):
        shapes.append(("forward", B, n_in, n_out))
    for l, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if l > 0:
            shapes.append(("backward_input", B, n_out, n_in))
        shapes.append(("weight_grad", n_out, B, n_in))
    return shapes


def cublas_gemms(torch, sync, tdev, sizes, B, reps) -> dict:
    """``torch.mm`` (cuBLAS on a GPU, TF32 off) on exactly the tiled path's GEMM shapes: each alone
    and all in sequence (ms), the floor of a tiled gradient made of cuBLAS calls."""
    mats = []
    for role, m, k, n in tiled_gemm_shapes(sizes, B):
        a = torch.randn(m, k, device=tdev)
        b = torch.randn(k, n, device=tdev)
        c = torch.empty(m, n, device=tdev)
        mats.append((role, m, k, n, a, b, c))

    def all_gemms():
        for *_, a, b, c in mats:
            torch.mm(a, b, out=c)

    each = [
        {
            "role": r,
            "m": m,
            "k": k,
            "n": n,
            "ms": median_ms(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), sync, reps),
        }
        for r, m, k, n, a, b, c in mats
    ]
    return {"sequence_ms": median_ms(all_gemms, sync, reps), "each": each}


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-300))


def measure_floors(torch, sync, tdev: str, reps: int) -> dict:
    """Device copy and fill bandwidth (torch, 1 GiB) and the float32 GEMM rate, in this run."""
    n = 256 * 1024 * 1024 if tdev == "cuda" else 1024 * 1024
    src = torch.ones(n, device=tdev)
    dst = torch.empty_like(src)
    t_copy = median_ms(lambda: dst.copy_(src), sync, reps)
    t_fill = median_ms(lambda: dst.fill_(0.5), sync, reps)
    m = 8192 if tdev == "cuda" else 256
    a = torch.randn(m, m, device=tdev)
    t_mm = median_ms(lambda: torch.mm(a, a), sync, 5)
    return {
        "copy_GBps": 2 * n * 4 / t_copy / 1e6,  # read + write
        "fill_GBps": n * 4 / t_fill / 1e6,
        "sgemm_TFLOPs": 2 * m**3 / t_mm / 1e9,
    }


def bench_config(name, sizes, B, floors, torch, cuda, fastgrad, fc, sync, tdev, reps) -> list[dict]:
    """fastgrad (public call and kernels alone) and PyTorch on one configuration; one row per quantity."""
    from torch.func import functional_call, grad, vmap

    net, theta, X, y = problem(sizes, B)
    P = net.num_params
    theta_d, X_d, y_d = cuda.to_device(theta), cuda.to_device(X), cuda.to_device(y)
    G_d = cuda.device_array((B, P), dtype=np.float32)
    path = "fused" if fc.fused_tile(net, B, np.float32) else "tiled"

    def fg(compute, out=None):
        if fc.SIMULATOR:  # the simulator's arrays lack __cuda_array_interface__
            return SimpleNamespace(**fc.backprop_device(net, theta_d, X_d, y_d, frozenset(compute), out))
        return fastgrad.backprop(net, theta_d, X_d, y_d, compute=compute, backend="cuda", out=out)

    def fg_clipped():
        if fc.SIMULATOR:
            return fc.clipped_grad_device(net, theta_d, X_d, y_d, 1.0, 0.0, None)
        return fastgrad.clipped_grad(net, theta_d, X_d, y_d, 1.0, backend="cuda")

    d = fc.check_device_inputs(net, theta_d, X_d, y_d)

    def kernels_only(need, out=None):
        return fc._run_device(net, d, frozenset(need) | {"loss"}, None, out)

    model = fastgrad.to_torch(net, theta).to(tdev)  # the same network in torch, same parameters
    params = {k: v.detach() for k, v in model.named_parameters()}
    plist = list(model.parameters())
    Xt, yt = torch.from_numpy(X).to(tdev), torch.from_numpy(y).to(tdev)

    def torch_grad():
        loss = torch.nn.functional.cross_entropy(model(Xt), yt)
        return torch.autograd.grad(loss, plist)

    def sample_loss(p, x, t):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    ps_fn = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def torch_per_sample():
        return ps_fn(params, Xt, yt)

    def torch_norms():
        g = ps_fn(params, Xt, yt)
        return torch.sqrt(sum(v.reshape(B, -1).pow(2).sum(1) for v in g.values()))

    # what is compared must agree, in the same run
    res = fg(("grad", "norms"))
    tg = torch.cat([g.reshape(-1) for g in torch_grad()]).cpu().numpy()
    errs = {
        "grad": rel_err(res.grad.copy_to_host(), tg),
        "norms": rel_err(res.norms.copy_to_host(), torch_norms().cpu().numpy()),
        "clipped": float("nan"),
    }
    fg(("per_sample",), out=G_d)
    k = min(B, 64)  # rows compared
    tps = torch_per_sample()
    tps = torch.cat([tps[name_][:k].reshape(k, -1) for name_ in params], dim=1).cpu().numpy()
    errs["per_sample"] = rel_err(G_d[:k].copy_to_host(), tps)

    flops = 6 * B * sum(a * b for a, b in itertools.pairwise(sizes))
    ps_bytes = B * P * 4
    slow_reps = max(3, reps // 3)
    nan = float("nan")
    meas = {
        "grad": (
            median_ms(lambda: fg(("grad",)), sync, reps),
            median_ms(lambda: kernels_only({"grad"}), sync, reps),
            median_ms(torch_grad, sync, reps),
            flops / (floors["sgemm_TFLOPs"] * 1e9),
        ),
        "per_sample": (
            median_ms(lambda: fg(("per_sample",), out=G_d), sync, reps),
            median_ms(lambda: kernels_only({"per_sample"}, G_d), sync, reps),
            median_ms(torch_per_sample, sync, slow_reps),
            ps_bytes / (floors["fill_GBps"] * 1e6),
        ),
        "norms": (
            median_ms(lambda: fg(("norms",)), sync, reps),
            median_ms(lambda: kernels_only({"norms"}), sync, reps),
            median_ms(torch_norms, sync, slow_reps),
            nan,
        ),
        "clipped": (median_ms(fg_clipped, sync, reps), nan, nan, nan),
    }
    gpu = {}
    for q, need, out in (
        ("grad", {"grad"}, None),
        ("per_sample", {"per_sample"}, G_d),
        ("norms", {"norms"}, None),
    ):
        try:  # GPU time of the kernels alone; the public call's time minus it is the host's cost
            gpu[q] = gpu_ms(
                lambda need=need, out=out: fc._run_device(
                    net, d, frozenset(need) | {"loss"}, None, out, host_loss=False
                ),
                cuda,
                sync,
            )
        except Exception as exc:  # a diagnostic: never lose the timings to it
            print(f"kernel GPU time of {q} failed: {type(exc).__name__}: {exc}", flush=True)
            gpu[q] = nan
    try:
        cublas = cublas_gemms(torch, sync, tdev, sizes, B, reps)
    except Exception as exc:
        print(f"cuBLAS GEMMs failed: {type(exc).__name__}: {exc}", flush=True)
        cublas = {"sequence_ms": nan, "each": []}
    rows = []
    for q, (t_api, t_kern, t_torch, t_floor) in meas.items():
        row = {
            "config": name,
            "sizes": sizes,
            "B": B,
            "P": P,
            "path": path,
            "quantity": q,
            "fastgrad_ms": t_api,
            "fastgrad_kernels_ms": t_kern,
            "torch_ms": t_torch,
            "speedup_vs_torch": t_torch / t_api,
            "floor_ms": t_floor,
            "rel_err_vs_torch": errs[q],
            "kernels_gpu_ms": gpu.get(q, nan),
            "host_above_kernels_us": 1e3 * (t_api - gpu.get(q, nan)),
        }
        if q == "grad":
            row["cublas_gemms_ms"] = cublas["sequence_ms"]
            row["cublas_gemms"] = cublas["each"]
        if q == "per_sample":
            row["per_sample_GBps"] = ps_bytes / t_api / 1e6
            row["fraction_of_copy_bw"] = row["per_sample_GBps"] / floors["copy_GBps"]
            row["kernels_fraction_of_copy_bw"] = ps_bytes / t_kern / 1e6 / floors["copy_GBps"]
            row["kernels_gpu_fraction_of_copy_bw"] = ps_bytes / gpu["per_sample"] / 1e6 / floors["copy_GBps"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profile_overheads(torch, cuda, fastgrad, fc, sync, reps: int) -> dict:
    """Where the time of a small call goes: host cost of launches and copies, GPU time of the kernels.

    GPU times are taken between CUDA events queued behind a sleeping kernel, so the
    host's launch cost is hidden and only the kernels' own time is measured.
    """
    import numba

    @cuda.jit
    def one_array(a):
        i = cuda.grid(1)
        if i < a.shape[0]:
            a[i] = a[i]

    @cuda.jit
    def twelve_arrays(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, s0, s1, s2, s3, s4, s5, s6, s7):
        i = cuda.grid(1)
        if i < a0.shape[0]:
            a0[i] = a1[i] + a2[i] + a3[i] + a4[i] + a5[i] + a6[i] + a7[i] + a8[i] + a9[i] + a10[i] + a11[i]

    @cuda.jit
    def sleep(n):
        for _ in range(n):
            cuda.nanosleep(1000)

    a = [cuda.device_array(1024, np.float32) for _ in range(12)]
    small = np.zeros(512, np.float32)
    tt = torch.zeros(16, device="cuda")
    out = {
        "launch_1_array_us": 1e3 * median_ms(lambda: one_array[4, 256](a[0]), sync, reps),
        "launch_12_arrays_8_scalars_us": 1e3
        * median_ms(lambda: twelve_arrays[4, 256](*a, 1, 2, 3, 4, 5, 6, 7, np.float32(8)), sync, reps),
        "device_array_9000_us": 1e3 * median_ms(lambda: cuda.device_array(9000, np.float32), sync, reps),
        "copy_to_host_512_us": 1e3 * median_ms(lambda: a[0][:512].copy_to_host(), sync, reps),
        "copy_to_device_512_us": 1e3 * median_ms(lambda: a[0][:512].copy_to_device(small), sync, reps),
        "torch_tiny_add_us": 1e3 * median_ms(lambda: tt.add_(1.0), sync, reps),
        "numba": numba.__version__,
    }
    for name, (sizes, B) in (("narrow", CONFIGS["narrow"]), ("mnist", CONFIGS["mnist"])):
        out.update(profile_call(name, sizes, B, cuda, fastgrad, fc, sync, sleep, reps))
        fc.clear_scratch()
    print("overheads:", json.dumps(out), flush=True)
    return out


def device_problem(cuda, sizes, B):
    """``(net, θ, X, y)`` of :func:`fastgrad.tools.configs.problem`, the arrays on the GPU."""
    net, *arrays = problem(sizes, B)
    return (net, *(cuda.to_device(a) for a in arrays))


def profile_call(name, sizes, B, cuda, fastgrad, fc, sync, sleep, reps) -> dict:
    """Host launch cost and GPU time of one kernels-only call, per set of quantities."""
    net, theta_d, X_d, y_d = device_problem(cuda, sizes, B)
    d = fc.check_device_inputs(net, theta_d, X_d, y_d)
    out = {
        f"{name}_check_inputs_us": 1e3
        * median_ms(lambda: fc.check_device_inputs(net, theta_d, X_d, y_d), sync, reps)
    }
    for need in ({"loss"}, {"loss", "grad"}, {"loss", "norms"}):
        need = frozenset(need)
        fc._run_device(net, d, need, None)
        sync()
        sleep[1, 1](50000)  # about 50 ms of GPU time, while the host queues the calls
        start, stop = cuda.event(), cuda.event()
        start.record()
        queue = functools.partial(fc._run_device, net, d, need, None, host_loss=False)
        host = _timing.timer(queue, calls=10)()
        stop.record()
        stop.synchronize()
        key = f"{name}_{'+'.join(sorted(need))}"
        out[f"{key}_gpu_us"] = 1e3 * cuda.event_elapsed_time(start, stop) / 10
        out[f"{key}_host_us"] = 1e6 * host
    return out


def launch_ab(cuda, fastgrad, fc, sync, configs, reps) -> list[dict]:
    """``fastgrad.cuda.config.DIRECT_LAUNCH`` off (Numba's dispatcher) against on (overloads resolved
    once), per configuration and quantity: results compared bit for bit first, then the public call
    timed with the two settings interleaved call by call, and the host time of the kernels-only call
    queued behind a sleeping kernel (so the GPU never holds the host up)."""
    out = []
    for name, (sizes, B) in configs.items():
        net, theta_d, X_d, y_d = device_problem(cuda, sizes, B)
        G_d = cuda.device_array((B, net.num_params), dtype=np.float32)
        for q in ("grad", "per_sample"):
            row = {
                "config": name,
                "path": "fused" if fc.fused_tile(net, B, np.float32) else "tiled",
                "quantity": q,
            }
            try:
                row.update(_ab_one(cuda, fc, sync, net, (theta_d, X_d, y_d), q, G_d, reps))
            except Exception as exc:  # a diagnostic: never lose the other numbers to it
                row["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                fc.config.DIRECT_LAUNCH = False
            print("launch A/B:", json.dumps(row), flush=True)
            out.append(row)
        del G_d
        fc.clear_scratch()
    return out


def _ab_one(cuda, fc, sync, net, inputs, q, G_d, reps) -> dict:
    need = frozenset({q, "loss"})
    G = G_d if q == "per_sample" else None
    d = fc.check_device_inputs(net, *inputs)

    def call():
        return fc.backprop_device(net, *inputs, need, G)

    def kernels():
        return fc._run_device(net, d, need, None, G, host_loss=False)

    row = {}
    got = {}
    for flag in (False, True):
        fc.config.DIRECT_LAUNCH = flag
        r = call()
        got[flag] = (r[q].copy_to_host(), r["loss"])
    row["bit_identical"] = bool(np.array_equal(got[False][0], got[True][0]) and got[False][1] == got[True][1])
    if not row["bit_identical"]:
        raise RuntimeError("results differ between the two launchers")
    timed = _timing.timer(call, clock=_timing.synced(sync))
    times = {False: [], True: []}
    for i in range(2 * reps):  # the two launchers take turns, the first of each pair alternating
        for flag in (False, True) if i % 2 else (True, False):
            fc.config.DIRECT_LAUNCH = flag
            times[flag].append(timed())
    row["call_us_dispatcher"] = 1e6 * _timing.median(times[False])
    row["call_us_direct"] = 1e6 * _timing.median(times[True])
    for flag, key in ((False, "host_us_dispatcher"), (True, "host_us_direct")):
        fc.config.DIRECT_LAUNCH = flag
        row[key] = host_us(kernels, cuda, sync)
    return row


def host_us(fn, cuda, sync, calls: int = 10) -> float:
    """Host time (µs) of one ``fn()`` that does not wait for the GPU, with the GPU kept busy by a
    sleeping kernel so no launch waits for a queue slot."""
    sleep = sleep_kernel(cuda)
    fn()
    sleep[1, 1](1)  # compiled before the timing
    sync()
    sleep[1, 1](20000)
    t = _timing.timer(fn, calls=calls)()
    sync()
    return 1e6 * t


def kernel_profile(path, torch, cuda, fastgrad, fc, sync, configs) -> None:
    """Every kernel's GPU time in 5 public ``grad`` calls and 2 ``per_sample`` calls per configuration,
    by ``torch.profiler`` (CUPTI records the kernels Numba launches in the same process), to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with open(path, "w") as fh:
        for name, (sizes, B) in configs.items():
            net, theta_d, X_d, y_d = device_problem(cuda, sizes, B)
            G_d = cuda.device_array((B, net.num_params), dtype=np.float32)
            for compute, out, n in ((("grad",), None, 5), (("per_sample",), G_d, 2)):
                fastgrad.backprop(net, theta_d, X_d, y_d, compute=compute, backend="cuda", out=out)
                sync()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(n):
                        fastgrad.backprop(net, theta_d, X_d, y_d, compute=compute, backend="cuda", out=out)
                    sync()
                fh.write(
                    f"\n=== {name} {list(sizes)} B={B} {compute[0]} x{n} (times are totals over {n} calls)\n"
                )
                fh.write(
                    prof.key_averages().table(
                        sort_by="cuda_time_total", row_limit=25, max_name_column_width=60
                    )
                )
                fh.write("\n")
            del G_d
            fc.clear_scratch()
    print(f"kernel profile written to {path}", flush=True)


TARGETS = (
    ("host cost above the kernels, narrow grad (us)", "<= 30"),
    ("narrow grad: torch autograd / fastgrad", ">= 3.0"),
    ("tiled grad (wide): torch autograd / fastgrad", ">= 1.0"),
    ("narrow per_sample: fraction of copy bandwidth", ">= 0.50"),
)


def targets_table(rows) -> list[tuple[str, str, str, str]]:
    """The issue's targets against this run: (target, wanted, measured, the profile that explains it)."""
    by = {(r["config"], r["quantity"]): r for r in rows}
    out = []
    g = by.get(("narrow", "grad"))
    if g:
        out.append(
            (
                *TARGETS[0],
                f"{g['host_above_kernels_us']:.0f}",
                f"call {1e3 * g['fastgrad_ms']:.0f} us, kernels on GPU {1e3 * g['kernels_gpu_ms']:.0f} us",
            )
        )
        out.append(
            (
                *TARGETS[1],
                f"{g['speedup_vs_torch']:.2f}",
                f"torch / kernels' GPU time {g['torch_ms'] / g['kernels_gpu_ms']:.2f}x; "
                f"cuBLAS GEMMs {g['cublas_gemms_ms']:.3f} ms",
            )
        )
    for name in ("mnist", "wide"):
        t = by.get((name, "grad"))
        if t:
            out.append(
                (
                    TARGETS[2][0].replace("(wide)", f"({name}, {t['path']})"),
                    TARGETS[2][1],
                    f"{t['speedup_vs_torch']:.2f}",
                    f"kernels GPU {t['kernels_gpu_ms']:.3f} ms, cuBLAS on its GEMM shapes "
                    f"{t['cublas_gemms_ms']:.3f} ms, torch {t['torch_ms']:.3f} ms",
                )
            )
    p = by.get(("narrow", "per_sample"))
    if p:
        out.append(
            (
                *TARGETS[3],
                f"{p['fraction_of_copy_bw']:.2f}",
                f"kernels-only GPU time: {p['kernels_gpu_fraction_of_copy_bw']:.2f} of copy bw",
            )
        )
    return out


def write_json(path, results) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


def print_table(env, floors, rows) -> None:
    copy_gbs, fill_gbs, sgemm_tflops = floors["copy_GBps"], floors["fill_GBps"], floors["sgemm_TFLOPs"]
    print()
    print(
        f"{env['gpu']} (cc {env['compute_capability']}), {env['date']}; numba {env['numba']}, "
        f"numba-cuda {env['numba_cuda']}, torch {env['torch']} (CUDA {env['torch_cuda']})"
    )
    print(
        f"floors: device copy {copy_gbs:.0f} GB/s (read+write), fill {fill_gbs:.0f} GB/s, "
        f"sgemm {sgemm_tflops:.1f} TFLOP/s"
    )
    head = (
        "config",
        "path",
        "quantity",
        "fastgrad ms",
        "kernels ms",
        "torch ms",
        "torch/fastgrad",
        "floor ms",
        "rel err",
        "kernels GPU ms",
        "host us",
        "note",
    )
    body = []
    for r in rows:
        note = ""
        if r["quantity"] == "per_sample":
            note = (
                f"{r['per_sample_GBps']:.0f} GB/s = {100 * r['fraction_of_copy_bw']:.0f}% of copy bw "
                f"(kernels {100 * r['kernels_fraction_of_copy_bw']:.0f}%)"
            )
        body.append(
            (
                r["config"],
                r["path"],
                r["quantity"],
                f"{r['fastgrad_ms']:.3f}",
                f"{r['fastgrad_kernels_ms']:.3f}",
                f"{r['torch_ms']:.3f}",
                f"{r['speedup_vs_torch']:.2f}x",
                f"{r['floor_ms']:.3f}",
                f"{r['rel_err_vs_torch']:.1e}",
                f"{r['kernels_gpu_ms']:.3f}",
                f"{r['host_above_kernels_us']:.0f}",
                note,
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    for line in [head, ["-" * w for w in widths], *body]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)).rstrip())


def print_ab(ab) -> None:
    if ab:
        print("\nlaunchers A/B (DIRECT_LAUNCH off -> on): public call us, kernels-only host us")
        for r in ab:
            if "error" in r:
                print(f"  {r['config']:>13} {r['quantity']:<10} {r['error']}")
            else:
                print(
                    f"  {r['config']:>13} {r['path']:<5} {r['quantity']:<10} "
                    f"call {r['call_us_dispatcher']:7.0f} -> {r['call_us_direct']:7.0f}; "
                    f"host {r['host_us_dispatcher']:7.0f} -> {r['host_us_direct']:7.0f}; "
                    f"bit-identical {r['bit_identical']}"
                )


def print_targets(targets) -> None:
    if targets:
        print("\ntargets (issue 21):")
        for t in targets:
            print("  " + " | ".join(t))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write every number to FILE")
    parser.add_argument("--reps", type=int, default=15, help="timed calls per measurement (median)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--profile", action="store_true", help="also measure launch and copy overheads")
    parser.add_argument(
        "--kernel-profile", metavar="FILE", help="write each kernel's GPU time (torch.profiler)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny problem, torch on the CPU: checks this script under the CUDA simulator",
    )
    args = parser.parse_args(argv)
    configs = (
        {"smoke": ([3, 5, 2], 6), "smoke-wide": ([3, 5, 2], 6)}
        if args.smoke
        else {k: CONFIGS[k] for k in args.configs}
    )
    tdev = "cpu" if args.smoke else "cuda"

    import numba
    import torch
    from numba import cuda

    import fastgrad
    from fastgrad import cuda as fc

    fc.check_available()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def sync():
        cuda.synchronize()
        if tdev == "cuda":
            torch.cuda.synchronize()

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0) if tdev == "cuda" else "CUDA simulator (smoke test)",
        "compute_capability": list(cuda.get_current_device().compute_capability) if tdev == "cuda" else [],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_cuda": getattr(sys.modules.get("numba_cuda"), "__version__", "?"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "fastgrad": fastgrad.__version__,
    }
    print("environment:", json.dumps(env))

    overheads = {}
    if args.profile:
        try:
            overheads = profile_overheads(torch, cuda, fastgrad, fc, sync, args.reps)
        except Exception as exc:  # the profile is a diagnostic: never lose the timings to it
            print(f"profile failed: {type(exc).__name__}: {exc}", flush=True)
    floors = measure_floors(torch, sync, tdev, args.reps)
    copy_gbs, fill_gbs, sgemm_tflops = floors["copy_GBps"], floors["fill_GBps"], floors["sgemm_TFLOPs"]
    print(
        f"floors: copy {copy_gbs:.0f} GB/s (read+write), fill {fill_gbs:.0f} GB/s, "
        f"sgemm {sgemm_tflops:.1f} TFLOP/s (float32, TF32 off)"
    )
    rows = []
    for name, (sizes, B) in configs.items():
        if name == "smoke-wide":  # the tiled path at a smoke test's size
            fc.config.FUSED_MAX_WIDTH = 4  # the tunables are read through fastgrad.cuda.config
        rows += bench_config(name, sizes, B, floors, torch, cuda, fastgrad, fc, sync, tdev, args.reps)
        if tdev == "cuda":
            torch.cuda.empty_cache()
        fc.clear_scratch()

    targets = targets_table(rows)
    results = {"environment": env, "floors": floors, "overheads": overheads, "rows": rows, "targets": targets}
    write_json(args.json, results)
    print_table(env, floors, rows)
    print_targets(targets)  # here too, in case a diagnostic below runs out of time

    results["launch_ab"] = []
    try:
        results["launch_ab"] = launch_ab(cuda, fastgrad, fc, sync, configs, args.reps)
    except Exception as exc:  # a diagnostic: never lose the timings to it
        print(f"launch A/B failed: {type(exc).__name__}: {exc}", flush=True)
    write_json(args.json, results)
    print_ab(results["launch_ab"])

    if args.kernel_profile:
        try:
            if tdev != "cuda":
                raise RuntimeError("needs a GPU")
            kernel_profile(args.kernel_profile, torch, cuda, fastgrad, fc, sync, configs)
        except Exception as exc:  # a diagnostic: never lose the timings to it
            print(f"kernel profile failed: {type(exc).__name__}: {exc}", flush=True)
    print_targets(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
