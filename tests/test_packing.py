import pytest
import torch

from quantkit.packing import pack_int4, unpack_int4


def test_every_code_in_every_position_round_trips():
    codes = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.stack([codes.roll(i) for i in range(16)])  # [16, 16]: each value at each column
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 8)
    assert torch.equal(unpack_int4(packed), q)


def test_random_round_trip_and_batch_dims():
    q = torch.randint(-8, 8, (3, 5, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_documented_nibble_order():
    # channel 0 -> low nibble, channel 1 -> high nibble, stored as code + 8
    packed = pack_int4(torch.tensor([[-8, 7]], dtype=torch.int8))
    assert packed.item() == (0 + (15 << 4))
    packed = pack_int4(torch.tensor([[1, -2]], dtype=torch.int8))
    assert packed.item() == (9 | (6 << 4))


def test_rejects_odd_width_and_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
