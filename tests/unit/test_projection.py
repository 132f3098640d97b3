"""The decoder's projections: packed (oneDNN) weights compute what the modules compute."""

import pytest
import torch
from torch import nn

from shared.engine.decoder import Projection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projections_equal_their_modules_side_by_side(dtype):
    torch.manual_seed(0)
    q = nn.Linear(48, 48, bias=True, dtype=dtype)
    k = nn.Linear(48, 16, bias=False, dtype=dtype)  # a missing bias counts as zeros
    v = nn.Linear(48, 16, bias=True, dtype=dtype)
    x = torch.randn(5, 48, dtype=dtype)
    fused = Projection(q, k, v)
    bf16_native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert fused.packed is not None or (dtype == torch.bfloat16 and not bf16_native)  # the packed path is tested
    expected = torch.cat([q(x), k(x), v(x)], -1)
    with torch.inference_mode():
        got = fused(x)
        assert torch.allclose(got.float(), expected.float(), atol=1e-4 if dtype == torch.float32 else 5e-2)
        for rows in (1, 32, 200):  # any row count, not only the one the layout was made for
            y = torch.randn(rows, 48, dtype=dtype)
            assert fused(y).shape == (rows, 80)


def test_anything_but_a_plain_linear_runs_its_own_modules():
    class Scaled(nn.Linear):  # e.g. an adapter-wrapped or quantized projection
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Scaled(8, 4)
    projection = Projection(layer)
    x = torch.randn(3, 8)
    assert projection.packed is None
    assert torch.equal(projection(x), layer(x))
