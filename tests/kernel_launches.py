"""Test helper for the decode kernels: a kernel factory that runs the CPU executor and
records each launch."""

from metal_executor import metal_kernel


class Counting:
    """The executor's metal_kernel, recording each launch's kernel name in `launches`."""

    def __init__(self):
        self.launches = []

    def __call__(self, **spec):
        kernel = metal_kernel(**spec)

        def launch(**kw):
            self.launches.append(spec["name"])
            return kernel(**kw)

        return launch

