"""`_backup`, the copies a shrink trial keeps of the tensors it writes: one buffer per dtype
and device, values and shapes as the tensors', independent of them, and written back by
`_copy` bit for bit (a non-contiguous tensor included)."""

import torch

from molf._shrink import _backup, _copy


def test_backup_copies_and_restores_bitwise():
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(5, 3, generator=gen),
        torch.randn(7, generator=gen).to(torch.bfloat16),
        torch.randn(4, 6, generator=gen).t(),  # non-contiguous
        torch.randn(2, 2, generator=gen, dtype=torch.float64),
        torch.randn(3, generator=gen).to(torch.bfloat16),
    ]
    before = [t.clone() for t in tensors]
    saved = _backup(tensors)
    assert [s.shape for s in saved] == [t.shape for t in tensors]
    assert [s.dtype for s in saved] == [t.dtype for t in tensors]
    # One buffer per dtype: the two bf16 copies share storage, none shares a tensor's.
    assert saved[1].untyped_storage().data_ptr() == saved[4].untyped_storage().data_ptr()
    assert not {s.untyped_storage().data_ptr() for s in saved} & {t.untyped_storage().data_ptr() for t in tensors}
    for t in tensors:
        t.mul_(0.5).add_(1.0)
    assert all(torch.equal(s, b) for s, b in zip(saved, before))
    _copy(tensors, saved)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
