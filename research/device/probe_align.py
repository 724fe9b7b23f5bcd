"""Which items the probe-sums kernel gets wrong on CUDA: aligned vs unaligned, per dtype."""
import sys

sys.path.insert(0, "tests")
import torch  # noqa: E402
from test_probe_sums import SHAPES, operands, reference  # noqa: E402

from molf import _probe_sums  # noqa: E402
from molf.heldout import HeldoutProbe  # noqa: E402

for pd, sd in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]:
    for offset in (0, 3):
        for adam in (True, False):
            for k, shape in enumerate(SHAPES):
                item = operands(shape, pd, sd, adam=adam, seed=k, offset=offset)
                got = _probe_sums.heldout_sums([item]).cpu()[0]
                want = torch.tensor(reference(item), dtype=torch.float64)
                tp = HeldoutProbe._batch_sums([item]).cpu()[0]
                scale = torch.tensor(reference(item, magnitude=True), dtype=torch.float64)
                bad = (got - want).abs() > 1e-5 * scale + 1e-12
                if bad.any():
                    print(f"BAD {pd} {sd} offset={offset} adam={adam} shape={shape} got={got.tolist()} want={want.tolist()} torch={tp.tolist()}")
print("done")
