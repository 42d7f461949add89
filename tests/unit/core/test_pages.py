"""Weight memory backed by transparent huge pages (edgetp.core.pages)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from helpers.mappings import mapping_of

from edgetp.core.pages import ALIGNMENT, HUGE_PAGE, huge_page_bytes, huge_pages_supported, pack

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
linux_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not huge_pages_supported() or not THP.exists()
    or "[never]" in THP.read_text(), reason="no transparent huge pages here")


@linux_thp
def test_a_large_buffer_is_aligned_anonymous_and_advised_huge() -> None:
    nbytes = 3 * HUGE_PAGE + 12345
    buffer = huge_page_bytes(nbytes)
    assert buffer.dtype == torch.uint8 and buffer.numel() == nbytes
    assert buffer.data_ptr() % HUGE_PAGE == 0
    buffer.fill_(7)
    whole = mapping_of(buffer.data_ptr())
    assert whole is not None and whole.path == "", "not anonymous memory of its own"
    assert "hg" in whole.flags, f"no MADV_HUGEPAGE on the buffer's spans: {sorted(whole.flags)}"
    tail = mapping_of(buffer.data_ptr() + 3 * HUGE_PAGE)  # the part short of a huge page
    assert tail is not None and "hg" not in tail.flags, "the partial span was advised too"
    assert int(buffer[-1]) == 7 and int(buffer.sum()) == 7 * nbytes


def test_a_buffer_under_a_huge_page_is_an_ordinary_tensor() -> None:
    buffer = huge_page_bytes(1000)
    assert buffer.numel() == 1000 and buffer.dtype == torch.uint8


@linux_thp
def test_the_mapping_goes_with_its_last_view() -> None:
    buffer = huge_page_bytes(2 * HUGE_PAGE)
    view = buffer[HUGE_PAGE:].view(torch.float32)
    address = buffer.data_ptr()
    del buffer
    gc.collect()
    assert mapping_of(address) is not None, "freed while a view still held it"
    view.fill_(1.0)
    del view
    gc.collect()
    found = mapping_of(address)
    assert found is None or found.path != "" or "hg" not in found.flags, "never unmapped"


def test_pack_copies_every_tensor_aligned_into_one_buffer() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(700, 1000, generator=gen),  # 2.8 MB: the buffer is huge-paged
               torch.randn(33, generator=gen).to(torch.bfloat16),
               torch.randint(-128, 127, (5, 31), dtype=torch.int8, generator=gen),
               torch.randn(3, 7, 2, generator=gen).half(),
               torch.tensor(2.5),
               torch.randn(10, 20, generator=gen).t()]  # not contiguous
    copies = pack(tensors)
    storage = copies[0].untyped_storage().data_ptr()
    for source, copy in zip(tensors, copies, strict=True):
        assert copy.dtype == source.dtype and copy.shape == source.shape
        assert copy.is_contiguous() and copy.data_ptr() % ALIGNMENT == 0
        assert torch.equal(copy, source)
        assert copy.untyped_storage().data_ptr() == storage, "not one buffer"
    tensors[0].zero_()
    assert copies[0].abs().sum() > 0, "a view of the source, not a copy"
