"""Host memory for the held-out probe's copies that a step never reads (`Heldout(offload=True)`):
θ and the held-out gradient at the last measurement, the dense experts' starting point, and
a kept shrink trial's undo copy (`_shrink._backup(pinned=True)`). Pinned, so the copies run
asynchronously on the GPU's copy engines; each copy is ordered on a CUDA stream, so no
kernel reads a copy before it is complete and no host thread waits for the device (the host
waits for `copy_to_host`'s events before it reads). Also the side streams such overlapped
work runs on (`side_stream`)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

__all__ = ["copy_to_host", "fetch", "host_copy", "host_zeros", "side_stream"]

_SIDE = threading.local()  # this thread's side streams, by (purpose, device)


def side_stream(purpose: str, device: torch.device) -> torch.cuda.Stream:
    """This thread's side stream for `purpose` on `device`, created at the first call."""
    streams = _SIDE.__dict__
    if (purpose, device) not in streams:
        streams[purpose, device] = torch.cuda.Stream(device)
    return streams[purpose, device]


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of the CUDA tensor `t` (complete on return)."""
    out = torch.empty_like(t, device="cpu", pin_memory=True)
    out.copy_(t)
    return out


def host_zeros(t: torch.Tensor) -> torch.Tensor:
    """Zeros like `t` in pinned host memory."""
    return torch.empty_like(t, device="cpu", pin_memory=True).zero_()


def copy_to_host(dst: list[torch.Tensor], src: list[torch.Tensor]) -> list[torch.cuda.Event] | None:
    """`dst[i].copy_(src[i])` for every i. Into host memory from a CUDA tensor without a host
    wait, on that device's current stream: returns the events recorded after those copies
    (None: there were none); the host must wait for them before it reads `dst`. The other
    pairs in one multi-tensor copy."""
    pairs = [(d, s) for d, s in zip(dst, src) if d.device.type == "cpu" and s.is_cuda]
    rest = [(d, s) for d, s in zip(dst, src) if not (d.device.type == "cpu" and s.is_cuda)]
    if rest:  # (torch's foreach ops refuse empty lists)
        torch._foreach_copy_([d for d, _ in rest], [s for _, s in rest])
    if not pairs:
        return None
    for d, s in pairs:
        d.copy_(s, non_blocking=True)
    events = []
    for device in {s.device for _, s in pairs}:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    return events


def fetch(pairs: list[tuple[torch.Tensor, torch.device]]) -> Callable[[], list[torch.Tensor]]:
    """Start copying each host tensor to its CUDA device, on a side stream per device, so the
    copies overlap what the current stream does meanwhile; the returned function makes the
    current streams wait for them (no host wait) and returns the device tensors. The device
    tensors come from the current stream's memory pool, so what it allocates after they are
    freed can reuse their memory."""
    out = [torch.empty_like(t, device=d) for t, d in pairs]
    streams = []
    for device in {d for _, d in pairs}:
        main = torch.cuda.current_stream(device)
        side = side_stream("fetch", device)
        side.wait_stream(main)  # the fresh buffers' blocks may still be in use by earlier work
        with torch.cuda.stream(side):
            for dst, (t, d) in zip(out, pairs):
                if d == device:
                    dst.copy_(t, non_blocking=True)
                    dst.record_stream(side)
        streams.append((main, side))

    def ready() -> list[torch.Tensor]:
        for main, side in streams:
            main.wait_stream(side)
        return out

    return ready
