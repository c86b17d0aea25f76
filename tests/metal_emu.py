"""Run moestream's Metal kernels on the CPU: the ``.metal`` text compiled as C++ against
``metal_shim/metal_emu.h`` (see there for how threads, barriers and simd_sum are emulated).

For each launch signature (kernel, template values, input and output types) this module writes what
``mx.fast.metal_kernel`` would write around the body: the ``header`` (common.metal), then a function
whose parameters are the named inputs and outputs and the Metal attributes the body mentions (found
by substring, as MLX does), with the template arguments as constants; then an ``extern "C"`` entry that
runs it over the grid. Device buffers become bounds-checked pointers. :meth:`Emulator.launch` has the
signature of :func:`moestream.metal.kernels.launch`, so the tests can put it in its place.

Two differences from MLX's generated source, neither visible to the body: template arguments become
``constexpr`` constants (``using`` for types) of one function per instantiation (so its threadgroup
arrays are plain statics the emulator can poison), and inputs MLX would pass in the ``constant`` address
space (fewer than 8 elements) are device pointers like the rest (both spaces are empty words here).
"""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from moestream.metal.kernels import Launch, source

SHIM = Path(__file__).resolve().parent / "metal_shim"

# MLX's list (mlx/backend/common/metal_kernel.cpp): attribute name -> type, in signature order.
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
EMULATED = {name for name, _ in ATTRIBUTES if "quadgroup" not in name and not name.startswith(("dispatch_", "grid_"))}

# MLX dtype -> (C type name as MLX writes it, numpy storage, NaN bit pattern to pre-fill outputs).
TYPES = {
    mx.float32: ("float", np.float32, np.float32(np.nan)),
    mx.float16: ("float16_t", np.float16, np.float16(np.nan)),
    mx.bfloat16: ("bfloat16_t", np.uint16, np.uint16(0x7FC0)),
    mx.uint32: ("uint32_t", np.uint32, np.uint32(0)),
}


def _key(spec: Launch, in_dtypes: tuple) -> tuple:
    tmpl = tuple((n, TYPES[v][0] if isinstance(v, mx.Dtype) else v) for n, v in spec.template)
    return (spec.kernel, tmpl, tuple(TYPES[d][0] for d in in_dtypes), tuple(TYPES[d][0] for d in spec.output_dtypes))


def _function(idx: int, key: tuple, inputs: tuple[str, ...], outputs: tuple[str, ...], body: str) -> str:
    kernel, tmpl, in_types, out_types = key
    params = [f"ms_emu::dptr<const {t}> {n}" for n, t in zip(inputs, in_types)]
    params += [f"ms_emu::dptr<{t}> {n}" for n, t in zip(outputs, out_types)]
    attrs = [(n, t) for n, t in ATTRIBUTES if n in body]
    missing = [n for n, _ in attrs if n not in EMULATED]
    if missing:
        raise NotImplementedError(f"{kernel}: attributes not emulated: {missing}")
    params += [f"{t} {n}" for n, t in attrs]
    consts = []
    for name, value in tmpl:
        if isinstance(value, bool):
            consts.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            consts.append(f"  constexpr int {name} = {value};")
        else:
            consts.append(f"  using {name} = {value};")
    args = [f"{{(const {t}*)b[{i}], (const {t}*)b[{i}], n[{i}]}}" for i, t in enumerate(in_types)]
    args += [
        f"{{({t}*)b[{len(inputs) + i}], ({t}*)b[{len(inputs) + i}], n[{len(inputs) + i}]}}"
        for i, t in enumerate(out_types)
    ]
    args += [f"d.{n}" for n, _ in attrs]
    return "\n".join(
        [
            f"static void ms_kernel_{idx}({', '.join(params)}) {{",
            *consts,
            f'#line 1 "{kernel}.metal"',
            body,
            "}",
            f'extern "C" int ms_run_{idx}(void** b, const size_t* n, unsigned gx, unsigned gy, unsigned gz, '
            "unsigned tx, unsigned ty, unsigned tz, char* err, int errlen) {",
            "  std::function<void(const ms_emu::Ids&)> f = [&](const ms_emu::Ids& d) {",
            f"    ms_kernel_{idx}({', '.join(args)});",
            "  };",
            "  return ms_emu::launch({gx, gy, gz}, {tx, ty, tz}, f, err, errlen);",
            "}",
        ]
    )


class Emulator:
    """Compiles launch signatures to one shared library per :meth:`prepare` call and runs them.

    Args:
        workdir: where the generated C++ and the libraries go (reused when the source is unchanged).
        sources: kernel texts by name replacing the shipped ``.metal`` files (``common`` is the header);
            the tests use it to show that the emulator catches broken kernels.
    """

    def __init__(self, workdir: Path, sources: dict[str, str] | None = None):
        self.sources = dict(sources or {})
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._entries: dict[tuple, object] = {}
        self.compiled = 0

    def _source(self, name: str) -> str:
        return self.sources[name] if name in self.sources else source(name)

    def prepare(self, signatures: list[tuple[Launch, tuple]]) -> None:
        """Compile (in one g++ run) every (launch, input dtypes) not compiled yet."""
        todo = {}
        for spec, in_dtypes in signatures:
            key = _key(spec, tuple(in_dtypes))
            if key not in self._entries and key not in todo:
                todo[key] = spec
        if not todo:
            return
        parts = ['#include "metal_emu.h"', '#line 1 "common.metal"', self._source("common")]
        keys = list(todo)
        for idx, key in enumerate(keys):
            parts.append(_function(idx, key, todo[key].inputs, todo[key].outputs, self._source(key[0])))
        text = "\n".join(parts) + "\n"
        digest = hashlib.sha256((text + (SHIM / "metal_emu.h").read_text()).encode()).hexdigest()[:16]
        lib = self.workdir / f"kernels-{digest}.so"
        if not lib.exists():
            src = self.workdir / f"kernels-{digest}.cpp"
            src.write_text(text)
            cmd = [
                "g++",
                "-std=c++17",
                "-O2",
                "-shared",
                "-fPIC",
                "-Wall",
                "-Wno-unused-variable",
                "-Wno-unused-but-set-variable",
                "-I",
                str(SHIM),
                str(src),
                "-o",
                str(lib) + ".tmp",
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"g++ failed on the kernels:\n{res.stderr[-6000:]}")
            Path(str(lib) + ".tmp").rename(lib)
            self.compiled += 1
        dll = ctypes.CDLL(str(lib))
        for idx, key in enumerate(keys):
            fn = getattr(dll, f"ms_run_{idx}")
            fn.restype = ctypes.c_int
            self._entries[key] = fn

    def launch(self, spec: Launch, inputs: list[mx.array]) -> list[mx.array]:
        """Run one launch on the emulator, as :func:`moestream.metal.kernels.launch` runs it on Metal."""
        in_dtypes = tuple(a.dtype for a in inputs)
        key = _key(spec, in_dtypes)
        if key not in self._entries:
            self.prepare([(spec, in_dtypes)])
        bufs = [
            np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)).reshape(-1)
            for a in inputs
        ]
        outs = [
            np.full(int(np.prod(s)), TYPES[d][2], TYPES[d][1]) for s, d in zip(spec.output_shapes, spec.output_dtypes)
        ]
        arrays = bufs + outs
        ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        sizes = (ctypes.c_size_t * len(arrays))(*[a.size for a in arrays])
        err = ctypes.create_string_buffer(512)
        rc = self._entries[key](
            ptrs, sizes, *[ctypes.c_uint(v) for v in (*spec.grid, *spec.threadgroup)], err, ctypes.c_int(512)
        )
        if rc:
            raise RuntimeError(f"emulated {spec.kernel}: {err.value.decode()}")
        res = []
        for o, s, d in zip(outs, spec.output_shapes, spec.output_dtypes):
            a = mx.array(o.reshape(s))
            res.append(a.view(mx.bfloat16) if d == mx.bfloat16 else a)
        return res
