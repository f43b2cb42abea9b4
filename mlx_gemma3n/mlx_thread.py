"""The one thread that runs this package's MLX work, so apps may call the API from any thread.

Two MLX 0.32 behaviours make calling MLX from arbitrary threads unsafe:

* Streams are per thread: an array built lazily in one thread cannot be evaluated first in
  another ("There is no Stream(cpu, 0) in current thread"). Our weights stay lazy after
  loading and the towers are built on first use, so the thread that loads and the thread that
  generates must agree.
* Thread-local MLX state holds Python objects (the `mx.compile` cache, the `mx.random` key).
  Its C++ destructor takes the GIL when the thread's OS thread ends; a thread that ends as the
  interpreter shuts down then aborts the process ("terminate called without an active
  exception", exit status 134), even though `join()` has returned.

So `load()` and every generation step run here: one daemon thread that is never ended (at
exit it finishes its current step and is then left blocked, so its thread-locals are never
destroyed), whose default stream is a thread-unsafe stream: what it builds can be evaluated
from any thread as well (e.g. a model called directly after `load()`), as long as two threads
never evaluate the same graph at once.
"""

import atexit
import queue
import threading
from typing import Any, Callable, Generator, Iterator, Optional

import mlx.core as mx

_lock = threading.Lock()
_thread: Optional["MLXThread"] = None
_stream: Optional[mx.Stream] = None
SHUTTING_DOWN = "the interpreter is shutting down: no more model work is accepted"


def shared_stream() -> mx.Stream:
    """The stream the MLX thread computes on; arrays built on it may be evaluated anywhere."""
    global _stream
    with _lock:
        if _stream is None:
            _stream = mx.new_thread_unsafe_stream(mx.default_device())
        return _stream


class _Job:
    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # handed to the caller, who re-raises it
            self.error = e
        finally:
            self.fn = self.args = None  # hold nothing (a model, a generator) once done
            self.done.set()

    def refuse(self) -> None:
        self.error = RuntimeError(SHUTTING_DOWN)
        self.done.set()

    def result(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class MLXThread:
    """A daemon thread that runs submitted calls one at a time, on `shared_stream()`."""

    def __init__(self):
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="mlx_gemma3n-mlx", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        mx.set_default_stream(shared_stream())
        while True:
            self._next()

    def _next(self) -> None:
        item = self._jobs.get()
        if isinstance(item, threading.Event):  # close()'s marker: everything before it is done
            item.set()
        elif self._closing:
            item.refuse()
        else:
            item.run()

    def call(self, fn: Callable, *args) -> Any:
        """`fn(*args)` on this thread; its result, or its exception re-raised here."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        if self._closing:
            raise RuntimeError(SHUTTING_DOWN)
        job = _Job(fn, args)
        self._jobs.put(job)
        return job.result()

    def iterate(self, generator: Generator) -> Iterator:
        """Run `generator` here a step at a time, yielding its items to the calling thread.
        Steps of several generators interleave; closing this iterator closes the generator."""
        try:
            while True:
                done, item = self.call(_step, generator)
                if done:
                    return
                yield item
        finally:
            if not self._closing:
                self.call(generator.close)

    def close(self) -> None:
        """Let the running step finish and refuse further work; the thread stays blocked."""
        self._closing = True
        idle = threading.Event()
        self._jobs.put(idle)
        idle.wait()


def _step(generator: Generator):
    try:
        return False, next(generator)
    except StopIteration:
        return True, None


def mlx_thread() -> MLXThread:
    """The package's MLX thread, started on first use."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = MLXThread()
            atexit.register(_thread.close)
        return _thread


def on_mlx_thread(fn: Callable, *args) -> Any:
    """`fn(*args)` run on the MLX thread."""
    return mlx_thread().call(fn, *args)
