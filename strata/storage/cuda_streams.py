"""Tier transfers on CUDA streams, so that loads and saves overlap the model's compute on the GPU.

Used by the KV store only when the block pool is on a GPU (on CPU the loader thread copies directly):

* a load runs on the load stream, after the compute queued before it started; each layer records an
  event, and the runner's stream waits on that event (the host does not block on the copy);
* a save gathers the tokens' K/V on the compute stream (the blocks may be reused right after), then
  copies them to pinned host memory on the save stream; the saver thread waits for that copy's event.

Host buffers are pinned so that the copies are asynchronous DMA and the block-copy kernel can read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HostCopy:
    """A device-to-host copy in flight; `wait()` returns the host tensor once it has landed."""

    host: torch.Tensor
    done: torch.cuda.Event
    source: torch.Tensor  # the device copy stays alive until the transfer has read it

    def wait(self) -> torch.Tensor:
        self.done.synchronize()
        return self.host


class CudaStreams:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.load_stream = torch.cuda.Stream(device)
        self.save_stream = torch.cuda.Stream(device)

    def mark(self) -> torch.cuda.Event:
        """An event after everything queued so far on the calling thread's stream (the model's compute)."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def loading(self, after: torch.cuda.Event) -> torch.cuda.StreamContext:
        """Make the load stream current, its copies ordered after `after` (the blocks' earlier users)."""
        self.load_stream.wait_event(after)
        return torch.cuda.stream(self.load_stream)

    def layer_loaded(self) -> torch.cuda.Event:
        """An event after the copies queued so far on the load stream: one layer is in."""
        event = torch.cuda.Event()
        event.record(self.load_stream)
        return event

    def wait(self, event: torch.cuda.Event) -> None:
        """The calling thread's stream (the runner's) waits for `event`; the host goes on."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def finish_loads(self) -> None:
        """Block until the load stream is idle: its pinned sources may then be freed or reused."""
        self.load_stream.synchronize()

    def to_host(self, kv: torch.Tensor) -> HostCopy:
        """Start copying `kv` (on the device, made by the compute so far) into pinned host memory."""
        ready = self.mark()
        host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
        with torch.cuda.stream(self.save_stream):
            self.save_stream.wait_event(ready)
            host.copy_(kv, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.save_stream)
        return HostCopy(host, done, kv)
