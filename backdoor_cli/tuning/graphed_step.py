"""One training step captured as a CUDA graph and replayed, so a small model's step runs at the GPU's
pace instead of Python's.

Why: a tuning step of a CIFAR ResNet launches a few hundred small kernels (forward, backward, the
optimiser, the FST projection). On an H200 a ResNet-18 step at batch 128 took 11 ms eagerly where its
arithmetic is about 1 ms: the time went to launching. A replayed graph launches them all at once.

What is captured is exactly the eager step (`step(inputs, labels)`: forward, loss, backward, optimiser
step and whatever runs after it), on fixed input buffers; each replay copies the batch into them first.
The rules that keep the replay the same computation as the eager step:
- the first steps run eagerly on a side stream (warm-up: cuDNN and cuBLAS set themselves up there,
  which a capture must not see); they are real steps of the run, not extra ones;
- the learning rate is a device tensor that the scheduler fills in place (torch's fused SGD reads it
  on the device), so one graph serves every epoch;
- only full batches replay; a smaller last batch runs eagerly (a graph has fixed shapes);
- anything a capture refuses (a host sync inside the step, an op that cannot be captured) ends
  graphing for the rest of the run with the reason recorded, and that step runs eagerly. Nothing is
  lost: a failed capture executes no kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Eager steps on a side stream before the capture (PyTorch's documented warm-up for whole-step capture).
WARMUP_STEPS = 2

Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class GraphedStep:
    """Runs `step(inputs, labels) -> (loss, logits)`: eagerly for the first steps and for batches of
    another shape, then as a replayed CUDA graph. `status` says which, and why not where it fell back.
    A replay returns the graph's own output tensors, which the next replay overwrites: read them (or
    queue work on them, as tune's running sums do) before the next call."""

    def __init__(self, step: Step, batch_size: int, refusal: Callable[[], str | None] = lambda: None):
        """`refusal()`, asked just before the capture, names a reason not to capture (None: capture)."""
        self.step = step
        self.batch_size = batch_size
        self.refusal = refusal
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.warmed = 0
        self.failed: str | None = None
        self.replays = 0
        self.eager_steps = 0

    @property
    def status(self) -> str:
        if self.failed:
            return f"eager (no CUDA graph: {self.failed})"
        if self.graph is None:
            return "eager (no full batch reached the capture)"
        return f"CUDA graph ({self.replays} replayed steps, {self.eager_steps} eager)"

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failed or inputs.shape[0] != self.batch_size:
            return self._eager(inputs, labels)
        if self.graph is None:
            if self.warmed < WARMUP_STEPS:
                self.warmed += 1
                return self._side_stream(inputs, labels)
            if not self._capture(inputs, labels):
                return self._eager(inputs, labels)
        static_inputs, static_labels = self.static
        static_inputs.copy_(inputs)
        static_labels.copy_(labels)
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def _eager(self, inputs, labels):
        self.eager_steps += 1
        return self.step(inputs, labels)

    def _side_stream(self, inputs, labels):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._eager(inputs, labels)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, inputs: torch.Tensor, labels: torch.Tensor) -> bool:
        reason = self.refusal()
        if reason:
            self.failed = reason
            return False
        # clone keeps the batch's layout (channels_last or not), so the captured kernels are the ones the
        # eager steps ran.
        static_inputs, static_labels = inputs.clone(), labels.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loss, logits = self.step(static_inputs, static_labels)
        except Exception as exc:  # noqa: BLE001 - any refusal means: stay eager, and say why
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            torch.cuda.synchronize()
            return False
        self.graph, self.static, self.outputs = graph, (static_inputs, static_labels), (loss, logits)
        return True
