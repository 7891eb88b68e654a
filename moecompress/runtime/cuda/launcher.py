"""A Triton kernel bound once to its grid, compile-time arguments and static arguments, launched with little Python.

Triton's `kernel[grid](...)` binds and specialises every argument, looks the compiled kernel up and checks globals
on each call: tens of µs of Python for a kernel of ~40 arguments, several launches per MoE layer and token. A
`Launcher` makes the first call through Triton (it compiles, and gives back the compiled kernel) and later calls
the compiled kernel's launcher directly with the same arguments, only the few that change per call (`dynamic`
positions) replaced. Triton specialises a kernel on each pointer's 16-byte alignment: a dynamic tensor that is not
16-byte aligned takes Triton's own path for that call. Under TRITON_INTERPRET, and where Triton gives no compiled
kernel back, every call is Triton's own.
"""
from __future__ import annotations

import os

import torch

FAST_LAUNCH = os.environ.get("MOECOMPRESS_FAST_LAUNCH", "1") != "0"  # 0: every launch through kernel[grid]


class Launcher:
    """kernel[grid](*args, **constexprs) with args[i] for i in `dynamic` given per call (in that order)."""

    def __init__(self, kernel, grid: tuple[int, ...], args: list, dynamic: tuple[int, ...], constexprs: dict,
                 num_warps: int, num_stages: int = 1):
        self.kernel, self.grid = kernel, tuple(grid) + (1,) * (3 - len(grid))
        self.args, self.dynamic = list(args), tuple(dynamic)
        self.options = dict(constexprs, num_warps=num_warps, num_stages=num_stages)
        names = kernel.arg_names  # the order Triton's launcher takes every argument in, constexprs included
        self._tail = [constexprs[name] for name in names[len(args):]]
        if len(self._tail) + len(args) != len(names):
            raise TypeError(f"{kernel.__name__}: {len(args)} arguments + constexprs {sorted(constexprs)} do not "
                            f"cover its parameters {names}")
        self._compiled, self._dtypes = None, None
        self._fast = FAST_LAUNCH and not os.environ.get("TRITON_INTERPRET")

    def _same_kind(self, values) -> bool:
        """The dynamic values are what the compiled kernel was specialised for: dtypes, 16-byte alignment."""
        for v, dtype in zip(values, self._dtypes):
            if isinstance(v, torch.Tensor) and (v.dtype != dtype or v.data_ptr() % 16):
                return False
        return True

    def __call__(self, *values) -> None:
        args = self.args.copy()  # (no reference to this call's tensors is kept)
        for i, v in zip(self.dynamic, values):
            args[i] = v
        compiled = self._compiled
        if compiled is None or not self._same_kind(values):
            result = self.kernel[self.grid](*args, **self.options)
            if compiled is None and self._fast and hasattr(result, "packed_metadata"):
                from triton import knobs
                from triton.runtime import driver

                result.run  # noqa: B018 (loads the module: sets result.function)
                if all(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor)):
                    self._driver, self._knobs = driver.active, knobs.runtime
                    self._dtypes = [getattr(v, "dtype", None) for v in values]
                    self._compiled = result
            return
        stream = self._driver.get_current_stream(self._driver.get_current_device())
        enter, leave = self._knobs.launch_enter_hook, self._knobs.launch_exit_hook
        meta = compiled.launch_metadata(self.grid, stream, *args, *self._tail) if enter is not None else None
        compiled.run(*self.grid, stream, compiled.function, compiled.packed_metadata, meta, enter, leave, *args,
                     *self._tail)
